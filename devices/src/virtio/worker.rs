//! The thread that serves a device's queues: an epoll loop over the queues' notification eventfds
//! (ioeventfds registered with KVM), any other descriptor the device waits on, and a stop eventfd.
//!
//! A handler can also ask for a call at a point in time ([`QueueHandler::next_deadline`]): the wait's
//! timeout is computed from it, so timers cost no descriptor and no polling.
//!
//! A worker can be paused: its thread ends and hands back everything it owned (the handler with its queues
//! and backend state, the epoll set), so that nothing touches guest memory while a snapshot is written and
//! the queues can be read; `resume` serves again from the same state on a new thread. Notifications that
//! arrive in between stay in their eventfds (and edges in the epoll set) and are served after the resume.

use std::any::Any;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{ActivateError, QueueSnapshot, SnapshotError, VirtioInterrupt};
use crate::warn_ratelimited;

const STOP_TOKEN: u64 = u64::MAX;

/// A device's data path, owned by its worker thread.
pub trait QueueHandler: Any + Send {
    /// Serves source `index` (position in the worker's source list) after it became ready. An error means
    /// the device cannot go on without a reset.
    fn handle_queue(&mut self, index: usize) -> Result<(), String>;
    /// Every virtqueue of the device, in virtio queue-index order (for snapshots).
    fn queues(&self) -> Vec<&Queue>;
    /// The earliest time the handler wants [`Self::handle_deadline`] called, if any. Asked before every
    /// wait, so a new deadline takes effect once the current batch is served.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// Called once [`Self::next_deadline`] has passed (late by the length of a batch at most, or by a
    /// pause); it must move or drop every deadline up to `now`. An error means the device cannot go on
    /// without a reset.
    fn handle_deadline(&mut self, _now: Instant) -> Result<(), String> {
        Ok(())
    }
}

/// What a worker waits on.
pub enum Source {
    /// An eventfd (a queue notification, a wake-up); drained before the handler runs.
    Event(EventFd),
    /// A descriptor the handler drains itself (a tap), edge-triggered: the handler runs once per edge.
    Edge(OwnedFd),
    /// A descriptor the handler drains itself, level-triggered: the handler runs after every wait that
    /// finds it still ready (a nested epoll set served a batch at a time).
    Level(OwnedFd),
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot signal the worker thread")]
    Signal(#[source] std::io::Error),
    #[error("the worker thread panicked; the device's queues are lost")]
    Panicked,
    #[error("the worker's queues are lost (an earlier failure)")]
    Lost,
}

/// Everything the thread owns, handed back when it stops.
struct Parts {
    handler: Box<dyn QueueHandler>,
    sources: Vec<Source>,
    epoll: Epoll,
    stop: EventFd,
    /// A queue failed: the device waits for a reset and serves nothing.
    broken: bool,
}

enum State {
    Running(JoinHandle<Parts>),
    Paused(Box<Parts>),
    Stopped,
}

pub struct Worker {
    label: String,
    stop: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    state: State,
}

impl Worker {
    /// Starts a thread serving `events[i]` with `handler.handle_queue(i)`.
    pub fn spawn(
        name: &str,
        events: Vec<EventFd>,
        handler: Box<dyn QueueHandler>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let sources = events.into_iter().map(Source::Event).collect();
        Self::spawn_sources(name, sources, handler, interrupt)
    }

    /// Starts a thread serving `sources[i]` with `handler.handle_queue(i)`.
    pub fn spawn_sources(
        name: &str,
        sources: Vec<Source>,
        handler: Box<dyn QueueHandler>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, source) in sources.iter().enumerate() {
            let (fd, events) = match source {
                Source::Event(e) => (e.as_raw_fd(), EventSet::IN),
                Source::Edge(fd) => (fd.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED),
                Source::Level(fd) => (fd.as_raw_fd(), EventSet::IN),
            };
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, i as u64))?;
        }
        let parts = Parts {
            handler,
            sources,
            epoll,
            stop: stop.try_clone()?,
            broken: false,
        };
        let mut worker = Self {
            label: name.to_string(),
            stop,
            interrupt,
            state: State::Paused(Box::new(parts)),
        };
        worker.start()?;
        Ok(worker)
    }

    /// Runs the paused parts on a new thread.
    fn start(&mut self) -> std::io::Result<()> {
        let parts = match std::mem::replace(&mut self.state, State::Stopped) {
            State::Paused(parts) => parts,
            // Running already (or lost): nothing to start.
            other => {
                self.state = other;
                return Ok(());
            }
        };
        let label = self.label.clone();
        let interrupt = self.interrupt.clone();
        // A failed spawn drops the closure and the queues with it: the device is lost until a reset.
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{label}"))
            .spawn(move || serve(*parts, &label, interrupt.as_ref()))?;
        self.state = State::Running(thread);
        Ok(())
    }

    /// Stops the thread but keeps its state (the batch of events being served completes first). Once this
    /// returns, the device touches neither guest memory nor its queues until [`Self::resume`].
    pub fn pause(&mut self) -> Result<(), WorkerError> {
        match std::mem::replace(&mut self.state, State::Stopped) {
            State::Running(thread) => {
                if let Err(e) = self.stop.write(1) {
                    // The thread keeps running; keep its handle.
                    self.state = State::Running(thread);
                    return Err(WorkerError::Signal(e));
                }
                let parts = thread.join().map_err(|_| WorkerError::Panicked)?;
                // A thread that ended on its own (epoll failure) left the stop event set: clear it, or
                // the next thread would stop at once.
                let _ = parts.stop.read();
                self.state = State::Paused(Box::new(parts));
                Ok(())
            }
            paused @ State::Paused(_) => {
                self.state = paused;
                Ok(())
            }
            State::Stopped => Err(WorkerError::Lost),
        }
    }

    /// Serves again from where [`Self::pause`] stopped.
    pub fn resume(&mut self) -> std::io::Result<()> {
        self.start()
    }

    pub fn is_paused(&self) -> bool {
        matches!(self.state, State::Paused(_))
    }

    /// The paused handler, to read device-specific state from.
    pub fn handler(&self) -> Option<&dyn QueueHandler> {
        match &self.state {
            State::Paused(parts) => Some(parts.handler.as_ref()),
            _ => None,
        }
    }

    /// The queues' state, for a snapshot: only while paused.
    pub fn queue_snapshots(
        &self,
        device: &'static str,
    ) -> Result<Vec<QueueSnapshot>, SnapshotError> {
        match &self.state {
            State::Paused(parts) => Ok(parts
                .handler
                .queues()
                .into_iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect()),
            State::Running(_) => Err(SnapshotError::NotPaused(device)),
            State::Stopped => Err(SnapshotError::Worker(device, WorkerError::Lost)),
        }
    }

    /// Stops the thread and drops its state: the device is done with its queues.
    pub fn stop(&mut self) {
        if let Err(e) = self.pause() {
            if !matches!(e, WorkerError::Lost) {
                log::error!("virtio-{}: cannot stop the worker: {e}", self.label);
            }
        }
        self.state = State::Stopped;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread: serves ready sources until the stop event; returns what it owned.
fn serve(mut parts: Parts, label: &str, interrupt: &dyn VirtioInterrupt) -> Parts {
    let mut ready = [EpollEvent::default(); 16];
    loop {
        let deadline = if parts.broken {
            None
        } else {
            parts.handler.next_deadline()
        };
        let n = match parts.epoll.wait(wait_timeout_ms(deadline), &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio-{label}: epoll failed, device stops: {e}");
                interrupt.set_needs_reset();
                parts.broken = true;
                return parts;
            }
        };
        // The whole batch is served before stopping: an edge reported here would not be reported again.
        let mut stop = false;
        for ev in &ready[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                let _ = parts.stop.read();
                stop = true;
                continue;
            }
            let index = token as usize;
            if let Some(Source::Event(e)) = parts.sources.get(index) {
                // Non-blocking: a spurious wake-up reads EAGAIN, which is fine.
                let _ = e.read();
            }
            if parts.broken {
                continue;
            }
            if let Err(e) = parts.handler.handle_queue(index) {
                warn_ratelimited!("virtio-{label}: queue {index} failed, device needs reset: {e}");
                interrupt.set_needs_reset();
                parts.broken = true;
            }
        }
        if stop {
            return parts;
        }
        // Asked again: the batch may have moved or dropped the deadline the wait was timed for.
        let due = if parts.broken {
            None
        } else {
            parts.handler.next_deadline()
        };
        if let Some(deadline) = due {
            let now = Instant::now();
            if now >= deadline {
                if let Err(e) = parts.handler.handle_deadline(now) {
                    warn_ratelimited!("virtio-{label}: timer failed, device needs reset: {e}");
                    interrupt.set_needs_reset();
                    parts.broken = true;
                }
            }
        }
    }
}

/// The epoll timeout that wakes at `deadline` (-1: none). Rounded up, so the wait never ends before the
/// deadline and the loop does not spin through its last fraction of a millisecond.
fn wait_timeout_ms(deadline: Option<Instant>) -> i32 {
    let Some(deadline) = deadline else {
        return -1;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_nanos().div_ceil(1_000_000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

/// [`crate::virtio::VirtioDevice::pause`] for a device whose data path is `worker` (if started).
pub fn pause_worker(
    worker: &mut Option<Worker>,
    device: &'static str,
) -> Result<(), SnapshotError> {
    match worker {
        Some(w) => w.pause().map_err(|e| SnapshotError::Worker(device, e)),
        None => Ok(()),
    }
}

/// [`crate::virtio::VirtioDevice::resume`] for a device whose data path is `worker` (if started).
pub fn resume_worker(worker: &mut Option<Worker>) -> Result<(), ActivateError> {
    match worker {
        Some(w) => w.resume().map_err(ActivateError::Thread),
        None => Ok(()),
    }
}

/// The saved queues of a device whose data path is `worker`: none while it was never started.
pub fn saved_queues(
    worker: &Option<Worker>,
    device: &'static str,
) -> Result<Vec<QueueSnapshot>, SnapshotError> {
    match worker {
        Some(w) => w.queue_snapshots(device),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VirtioInterruptType;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    use virtio_queue::QueueT;

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

    struct Handler {
        flags: Arc<Flags>,
        fail_queue_1: bool,
        queue: Queue,
        served: u16,
    }

    impl Handler {
        fn boxed(flags: &Arc<Flags>, fail_queue_1: bool) -> Box<Self> {
            Box::new(Handler {
                flags: flags.clone(),
                fail_queue_1,
                queue: Queue::new(16).unwrap(),
                served: 0,
            })
        }
    }

    impl QueueHandler for Handler {
        fn handle_queue(&mut self, index: usize) -> Result<(), String> {
            self.flags.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail_queue_1 && index == 1 {
                return Err("boom".into());
            }
            // Stands in for progress through the ring.
            self.served += 1;
            self.queue.set_next_avail(self.served);
            Ok(())
        }

        fn queues(&self) -> Vec<&Queue> {
            vec![&self.queue]
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
        let mut w = Worker::spawn("t", evts, Handler::boxed(&flags, false), flags.clone()).unwrap();
        notify.write(1).unwrap();
        wait_for(|| flags.calls.load(Ordering::SeqCst) == 1);
        w.stop();
        w.stop();
        assert!(
            w.queue_snapshots("t").is_err(),
            "a stopped worker has no queues"
        );
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
        let _w = Worker::spawn("t", evts, Handler::boxed(&flags, true), flags.clone()).unwrap();
        n1.write(1).unwrap();
        wait_for(|| flags.needs_reset.load(Ordering::SeqCst));
        let calls = flags.calls.load(Ordering::SeqCst);
        n0.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(flags.calls.load(Ordering::SeqCst), calls);
    }

    #[test]
    fn pause_keeps_the_state_and_resume_serves_what_arrived_meanwhile() {
        let flags = Arc::new(Flags::default());
        let evts = vec![EventFd::new(EFD_NONBLOCK).unwrap()];
        let notify = evts[0].try_clone().unwrap();
        let mut w = Worker::spawn("t", evts, Handler::boxed(&flags, false), flags.clone()).unwrap();
        assert!(matches!(
            w.queue_snapshots("t"),
            Err(SnapshotError::NotPaused("t"))
        ));
        notify.write(1).unwrap();
        wait_for(|| flags.calls.load(Ordering::SeqCst) == 1);
        w.pause().unwrap();
        w.pause().unwrap();
        assert!(w.is_paused() && w.handler().is_some());
        assert_eq!(w.queue_snapshots("t").unwrap()[0].next_avail, 1);
        // Nothing is served while paused...
        notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(flags.calls.load(Ordering::SeqCst), 1);
        // ...and the notification is not lost.
        w.resume().unwrap();
        wait_for(|| flags.calls.load(Ordering::SeqCst) == 2);
        w.pause().unwrap();
        assert_eq!(w.queue_snapshots("t").unwrap()[0].next_avail, 2);
        w.resume().unwrap();
        notify.write(1).unwrap();
        wait_for(|| flags.calls.load(Ordering::SeqCst) == 3);
        // Resuming a running worker changes nothing: it still stops for good.
        w.resume().unwrap();
        w.stop();
        notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(flags.calls.load(Ordering::SeqCst), 3, "stopped");
    }

    /// Asks for a call at each of `due` in turn; records when each came.
    struct Timed {
        due: Vec<Instant>,
        fired: Arc<std::sync::Mutex<Vec<Instant>>>,
        queue: Queue,
    }

    impl QueueHandler for Timed {
        fn handle_queue(&mut self, _index: usize) -> Result<(), String> {
            Ok(())
        }

        fn queues(&self) -> Vec<&Queue> {
            vec![&self.queue]
        }

        fn next_deadline(&self) -> Option<Instant> {
            self.due.first().copied()
        }

        fn handle_deadline(&mut self, now: Instant) -> Result<(), String> {
            assert!(now >= self.due[0], "called early");
            self.due.remove(0);
            self.fired.lock().unwrap().push(now);
            Ok(())
        }
    }

    #[test]
    fn deadlines_fire_without_any_notification_and_survive_a_pause() {
        let flags = Arc::new(Flags::default());
        let start = Instant::now();
        let due = vec![
            start + Duration::from_millis(30),
            start + Duration::from_millis(60),
            start + Duration::from_millis(200),
        ];
        let fired = Arc::new(std::sync::Mutex::new(Vec::new()));
        let handler = Box::new(Timed {
            due: due.clone(),
            fired: fired.clone(),
            queue: Queue::new(16).unwrap(),
        });
        let evts = vec![EventFd::new(EFD_NONBLOCK).unwrap()];
        let mut w = Worker::spawn("t", evts, handler, flags.clone()).unwrap();
        wait_for(|| fired.lock().unwrap().len() == 2);
        // Paused past the third deadline: it fires once the worker serves again.
        w.pause().unwrap();
        std::thread::sleep(due[2].saturating_duration_since(Instant::now()));
        assert_eq!(fired.lock().unwrap().len(), 2);
        w.resume().unwrap();
        wait_for(|| fired.lock().unwrap().len() == 3);
        let fired = fired.lock().unwrap();
        for (at, want) in fired.iter().zip(&due) {
            assert!(at >= want);
        }
        assert!(!flags.needs_reset.load(Ordering::SeqCst));
    }

    #[test]
    fn rounded_wait_timeouts() {
        assert_eq!(wait_timeout_ms(None), -1);
        let past = Instant::now() - Duration::from_millis(5);
        assert_eq!(wait_timeout_ms(Some(past)), 0);
        let soon = Instant::now() + Duration::from_micros(300);
        assert_eq!(
            wait_timeout_ms(Some(soon)),
            1,
            "a fraction of a ms waits a whole one"
        );
        let far = Instant::now() + Duration::from_secs(1 << 40);
        assert_eq!(wait_timeout_ms(Some(far)), i32::MAX);
    }

    #[test]
    fn level_sources_are_served_until_the_handler_drains_them() {
        let flags = Arc::new(Flags::default());
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        reader.set_nonblocking(true).unwrap();
        let sources = vec![Source::Level(OwnedFd::from(reader.try_clone().unwrap()))];
        let w = Worker::spawn_sources("t", sources, Handler::boxed(&flags, false), flags.clone())
            .unwrap();
        // The handler never reads: the byte keeps the source ready, so it is served again and again.
        std::io::Write::write_all(&mut writer, b"x").unwrap();
        wait_for(|| flags.calls.load(Ordering::SeqCst) >= 3);
        drop(w);
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &reader, &mut byte).unwrap(), 1);
    }

    #[test]
    fn edge_sources_are_not_drained_by_the_worker() {
        let flags = Arc::new(Flags::default());
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        reader.set_nonblocking(true).unwrap();
        let sources = vec![Source::Edge(OwnedFd::from(reader.try_clone().unwrap()))];
        let mut w =
            Worker::spawn_sources("t", sources, Handler::boxed(&flags, false), flags.clone())
                .unwrap();
        std::io::Write::write_all(&mut writer, b"x").unwrap();
        wait_for(|| flags.calls.load(Ordering::SeqCst) == 1);
        w.pause().unwrap();
        // The byte is still there: the handler, not the worker, reads an edge source.
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &reader, &mut byte).unwrap(), 1);
        // An edge while paused is served after the resume.
        std::io::Write::write_all(&mut writer, b"y").unwrap();
        w.resume().unwrap();
        wait_for(|| flags.calls.load(Ordering::SeqCst) == 2);
    }
}
