//! The thread that serves a device's queues: an epoll loop over the queues' notification eventfds
//! (ioeventfds registered with KVM) and a stop eventfd.

use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::VirtioInterrupt;
use crate::warn_ratelimited;

const STOP_TOKEN: u64 = u64::MAX;

/// A device's data path, owned by its worker thread.
pub trait QueueHandler: Send + 'static {
    /// Serves queue `index` (position in the worker's event list) after a notification. An error means
    /// the device cannot go on without a reset.
    fn handle_queue(&mut self, index: usize) -> Result<(), String>;
}

pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts a thread serving `events[i]` with `handler.handle_queue(i)`.
    pub fn spawn(
        name: &str,
        events: Vec<EventFd>,
        mut handler: Box<dyn QueueHandler>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&stop),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, e) in events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(e),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let thread_stop = stop.try_clone()?;
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{name}"))
            .spawn(move || {
                // Keep the stop eventfd alive as long as it is registered.
                let _stop = thread_stop;
                let mut ready = [EpollEvent::default(); 16];
                let mut broken = false;
                loop {
                    let n = match epoll.wait(-1, &mut ready) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("virtio-{label}: epoll failed, device stops: {e}");
                            interrupt.set_needs_reset();
                            return;
                        }
                    };
                    for ev in &ready[..n] {
                        let token = ev.data();
                        if token == STOP_TOKEN {
                            return;
                        }
                        let index = token as usize;
                        // Non-blocking: a spurious wake-up reads EAGAIN, which is fine.
                        let _ = events[index].read();
                        if broken {
                            continue;
                        }
                        if let Err(e) = handler.handle_queue(index) {
                            warn_ratelimited!(
                                "virtio-{label}: queue {index} failed, device needs reset: {e}"
                            );
                            interrupt.set_needs_reset();
                            broken = true;
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (the request being served completes first).
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("cannot stop a virtio worker: {e}");
                return;
            }
            if thread.join().is_err() {
                log::error!("a virtio worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VirtioInterruptType;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Flags {
        needs_reset: AtomicBool,
        calls: AtomicUsize,
    }

    impl VirtioInterrupt for Flags {
        fn trigger(&self, _kind: VirtioInterruptType) {}
        fn set_needs_reset(&self) {
            self.needs_reset.store(true, Ordering::SeqCst);
        }
    }

    struct Handler(Arc<Flags>, bool);

    impl QueueHandler for Handler {
        fn handle_queue(&mut self, index: usize) -> Result<(), String> {
            self.0.calls.fetch_add(1, Ordering::SeqCst);
            if self.1 && index == 1 {
                return Err("boom".into());
            }
            Ok(())
        }
    }

    fn wait_for(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn serves_notifications_and_stops() {
        let flags = Arc::new(Flags::default());
        let evts = vec![EventFd::new(EFD_NONBLOCK).unwrap()];
        let notify = evts[0].try_clone().unwrap();
        let mut w = Worker::spawn(
            "t",
            evts,
            Box::new(Handler(flags.clone(), false)),
            flags.clone(),
        )
        .unwrap();
        notify.write(1).unwrap();
        wait_for(|| flags.calls.load(Ordering::SeqCst) == 1);
        w.stop();
        w.stop();
    }

    #[test]
    fn a_failing_queue_sets_needs_reset_and_stops_serving() {
        let flags = Arc::new(Flags::default());
        let evts = vec![
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let n0 = evts[0].try_clone().unwrap();
        let n1 = evts[1].try_clone().unwrap();
        let _w = Worker::spawn(
            "t",
            evts,
            Box::new(Handler(flags.clone(), true)),
            flags.clone(),
        )
        .unwrap();
        n1.write(1).unwrap();
        wait_for(|| flags.needs_reset.load(Ordering::SeqCst));
        let calls = flags.calls.load(Ordering::SeqCst);
        n0.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(flags.calls.load(Ordering::SeqCst), calls);
    }
}
