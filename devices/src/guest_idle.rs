//! TrEnv's guest-idle device: lets a guest that cannot halt wait without burning a host CPU.
//!
//! On hosts where guests run their workloads at CPL3 (this project's software hypervisor, see
//! HOST-FACTS), `hlt` faults, so an idle guest would spin. A read of this device's register blocks the
//! reading vCPU in the VMM until the VMM has news for the guest (it was restored from a template, it is
//! being paused or stopped, a device raised an interrupt) or a short timeout passes. Guests that can halt (Linux) never need it.
//!
//! MMIO at `0xfe00_2000`, 4 KiB: a read of any width at offset 0 waits up to [`MAX_WAIT`] and returns 1 when
//! woken, 0 on timeout; other offsets read 0; writes are ignored.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The longest a guest's idle read blocks: bounds how late a vCPU notices anything the VMM did not
/// explicitly wake it for.
pub const MAX_WAIT: Duration = Duration::from_millis(10);

/// Wakes guests blocked in the idle register. Cheap to clone; the VMM keeps one to call `wake`.
#[derive(Clone, Default)]
pub struct IdleWaker {
    inner: Arc<(Mutex<u64>, Condvar)>,
}

impl IdleWaker {
    /// Ends every current idle wait (and makes the next one return at once if nobody was waiting).
    pub fn wake(&self) {
        let (epoch, cvar) = &*self.inner;
        *epoch.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cvar.notify_all();
    }

    fn wait(&self, seen: &mut u64) -> bool {
        let (epoch, cvar) = &*self.inner;
        let guard = epoch.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cvar
            .wait_timeout_while(guard, MAX_WAIT, |e| *e == *seen)
            .unwrap_or_else(|e| e.into_inner());
        let woken = *guard != *seen;
        *seen = *guard;
        woken
    }
}

pub struct GuestIdleDevice {
    waker: IdleWaker,
    seen: u64,
}

impl GuestIdleDevice {
    pub fn new(waker: IdleWaker) -> Self {
        GuestIdleDevice { waker, seen: 0 }
    }
}

impl crate::BusDevice for GuestIdleDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && !data.is_empty() {
            data[0] = u8::from(self.waker.wait(&mut self.seen));
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use std::time::Instant;

    #[test]
    fn times_out_without_news_and_returns_early_when_woken() {
        let waker = IdleWaker::default();
        let mut dev = GuestIdleDevice::new(waker.clone());
        let mut b = [0xffu8; 4];
        let t = Instant::now();
        dev.read(0, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
        assert!(t.elapsed() >= MAX_WAIT);

        // A wake before the read is not lost.
        waker.wake();
        let t = Instant::now();
        dev.read(0, &mut b);
        assert_eq!(b[0], 1);
        assert!(t.elapsed() < MAX_WAIT);

        let w = waker.clone();
        let t = Instant::now();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            w.wake();
        });
        dev.read(0, &mut b);
        h.join().unwrap();
        assert_eq!(b[0], 1);
        assert!(t.elapsed() < MAX_WAIT);
        dev.read(8, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
    }
}
