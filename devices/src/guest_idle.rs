//! TrEnv's guest-idle device: lets a guest that cannot halt wait without burning a host CPU.
//!
//! On hosts where guests run their workloads at CPL3 (this project's software hypervisor, see
//! HOST-FACTS), `hlt` faults, so an idle guest would spin. A read of this device's register blocks the
//! reading vCPU in the VMM until the VMM has news for the guest (it was restored from a template, it is
//! being paused or stopped, a device raised an interrupt) or a short timeout passes. Guests that can halt (Linux) never need it.
//!
//! MMIO at `0xfe00_2000`, 4 KiB: a read of any width at offset 0 waits up to [`MAX_WAIT`] and returns 1 when
//! woken, 0 on timeout; at offset 8 the same, up to [`LONG_WAIT`]; other offsets read 0; writes are
//! ignored.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The longest a guest's idle read blocks: bounds how late a vCPU notices anything the VMM did not
/// explicitly wake it for.
pub const MAX_WAIT: Duration = Duration::from_millis(10);

/// The longest a read of the long-wait register blocks: for a guest that waits only for news the VMM wakes
/// it for (a restore, a packet), so that an idle guest exits about once a second instead of a hundred
/// times (each wake costs the host a vCPU exit and entry; dozens of idle sandboxes add up).
pub const LONG_WAIT: Duration = Duration::from_secs(1);

/// Register offsets: a wait of up to [`MAX_WAIT`], and one of up to [`LONG_WAIT`].
const REG_WAIT: u64 = 0;
const REG_LONG_WAIT: u64 = 8;

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

    fn wait(&self, seen: &mut u64, limit: Duration) -> bool {
        let (epoch, cvar) = &*self.inner;
        let guard = epoch.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cvar
            .wait_timeout_while(guard, limit, |e| *e == *seen)
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
        let limit = match offset {
            REG_WAIT => MAX_WAIT,
            REG_LONG_WAIT => LONG_WAIT,
            _ => return,
        };
        if let Some(first) = data.first_mut() {
            *first = u8::from(self.waker.wait(&mut self.seen, limit));
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
        dev.read(16, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
    }

    #[test]
    fn the_long_wait_outlasts_the_short_one_and_ends_when_woken() {
        let waker = IdleWaker::default();
        let mut dev = GuestIdleDevice::new(waker.clone());
        let mut b = [0xffu8; 4];
        let wake_after = MAX_WAIT * 5;
        let w = waker.clone();
        let t = Instant::now();
        let h = std::thread::spawn(move || {
            std::thread::sleep(wake_after);
            w.wake();
        });
        dev.read(8, &mut b);
        h.join().unwrap();
        assert_eq!(b, [1, 0, 0, 0], "woken, not timed out");
        let waited = t.elapsed();
        assert!(waited >= wake_after, "returned after {waited:?}");
        assert!(waited < LONG_WAIT, "returned after {waited:?}");
    }
}
