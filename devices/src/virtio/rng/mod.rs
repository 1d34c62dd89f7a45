//! virtio-rng (entropy device, §5.4): fills the driver's device-writable buffers from a host source
//! (default /dev/urandom), at most [`MAX_BYTES_PER_REQUEST`] per request.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};

use crate::virtio::chain::parse_chain;
use crate::virtio::worker::{pause_worker, resume_worker, saved_queues, QueueHandler, Worker};
use crate::virtio::{
    check_common_state, ActivateContext, ActivateError, GuestMemory, SnapshotError, VirtioDevice,
    VirtioDeviceState, VirtioInterrupt, TYPE_RNG, VIRTIO_F_VERSION_1,
};
use crate::warn_ratelimited;

pub const DEFAULT_SOURCE: &str = "/dev/urandom";
pub const QUEUE_SIZE: u16 = 256;
/// A guest asking for more gets this much; it asks again.
pub const MAX_BYTES_PER_REQUEST: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open entropy source {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Rng {
    source: File,
    path: PathBuf,
    queue_sizes: [u16; 1],
    acked_features: u64,
    worker: Option<Worker>,
}

impl Rng {
    pub fn new(source: &Path) -> Result<Self, RngError> {
        let file = File::open(source).map_err(|e| RngError::Open {
            path: source.to_path_buf(),
            source: e,
        })?;
        Ok(Self {
            source: file,
            path: source.to_path_buf(),
            queue_sizes: [QUEUE_SIZE],
            acked_features: 0,
            worker: None,
        })
    }

    pub fn source(&self) -> &Path {
        &self.path
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Some(active) = ctx.queues.into_iter().find(|q| q.index == 0) else {
            return Err(ActivateError::MissingQueue(0));
        };
        let handler = RngHandler {
            mem: ctx.mem,
            queue: active.queue,
            source: self.source.try_clone().map_err(ActivateError::Thread)?,
            interrupt: ctx.interrupt.clone(),
        };
        self.worker = Some(
            Worker::spawn("rng", vec![active.event], Box::new(handler), ctx.interrupt)
                .map_err(ActivateError::Thread)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
        self.acked_features = 0;
    }

    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn pause(&mut self) -> Result<(), SnapshotError> {
        let name = self.name();
        pause_worker(&mut self.worker, name)
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_worker(&mut self.worker)
    }

    /// Nothing beyond the queue: requests are served synchronously, the source is reopened from the config.
    fn state(&self) -> Result<VirtioDeviceState, SnapshotError> {
        Ok(VirtioDeviceState {
            acked_features: self.acked_features,
            queues: saved_queues(&self.worker, self.name())?,
            device: Vec::new(),
        })
    }

    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        check_common_state(self.name(), self.features(), state, Some(&[]))
    }

    fn set_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        if self.worker.is_some() {
            return Err(SnapshotError::Active(self.name()));
        }
        self.check_state(state)?;
        self.acked_features = state.acked_features;
        Ok(())
    }
}

pub(crate) struct RngHandler {
    mem: GuestMemory,
    queue: Queue,
    source: File,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// Fills the chain's writable buffers; returns the bytes written. Readable buffers are ignored, a chain
/// with a buffer outside guest RAM gets nothing.
fn fill<M>(mem: &GuestMemory, source: &mut File, chain: DescriptorChain<M>) -> u32
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let parsed = match parse_chain(chain) {
        Ok(p) => p,
        Err(e) => {
            warn_ratelimited!("virtio-rng: request dropped: {e}");
            return 0;
        }
    };
    if let Err(e) = parsed.check_memory(mem) {
        warn_ratelimited!("virtio-rng: request dropped: {e}");
        return 0;
    }
    let want = parsed.writable_len().min(MAX_BYTES_PER_REQUEST);
    let mut done = 0u64;
    for (addr, len) in parsed.writable_pieces(0, want) {
        use vm_memory::Bytes;
        match mem.read_exact_volatile_from(addr, source, len) {
            Ok(()) => done += len as u64,
            Err(e) => {
                warn_ratelimited!("virtio-rng: entropy source: {e}");
                break;
            }
        }
    }
    done as u32
}

impl QueueHandler for RngHandler {
    fn handle_queue(&mut self, _index: usize) -> Result<(), String> {
        let RngHandler {
            mem,
            queue,
            source,
            interrupt,
            ..
        } = self;
        crate::virtio::serve_available(queue, mem, interrupt.as_ref(), 0, "virtio-rng", |chain| {
            fill(mem, source, chain)
        })
    }

    fn queues(&self) -> Vec<&Queue> {
        vec![&self.queue]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{Desc, RecordingInterrupt, TempDir, TestQueue, F_NEXT, F_WRITE};
    use crate::virtio::VirtioInterruptType;
    use vm_memory::{Bytes, GuestAddress};

    fn handler(tq: TestQueue, source: &Path) -> (RngHandler, Arc<RecordingInterrupt>) {
        let rec = Arc::new(RecordingInterrupt::default());
        (
            RngHandler {
                mem: tq.mem.clone(),
                queue: tq.queue,
                source: File::open(source).unwrap(),
                interrupt: rec.clone(),
            },
            rec,
        )
    }

    fn source_file(bytes: &[u8]) -> (TempDir, PathBuf) {
        let dir = TempDir::new();
        let path = dir.file("entropy", bytes);
        (dir, path)
    }

    #[test]
    fn fills_writable_buffers_from_the_source() {
        let pattern: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let (_dir, path) = source_file(&pattern);
        let mut tq = TestQueue::new(16);
        let d = tq.data_addr();
        tq.publish(
            &[
                Desc::new(d, 100, F_WRITE | F_NEXT, 1),
                Desc::new(d + 0x1000, 28, F_WRITE, 0),
            ],
            0,
        );
        let mem = tq.mem.clone();
        let (mut h, rec) = handler(tq, &path);
        h.handle_queue(0).unwrap();
        let mut out = vec![0u8; 100];
        mem.read_slice(&mut out, GuestAddress(d)).unwrap();
        assert_eq!(out, pattern[..100]);
        let mut tail = vec![0u8; 28];
        mem.read_slice(&mut tail, GuestAddress(d + 0x1000)).unwrap();
        assert_eq!(tail, pattern[100..128]);
        let used_len: u32 = mem.read_obj(GuestAddress(0x6000 + 8)).unwrap();
        assert_eq!(used_len, 128);
        assert_eq!(
            *rec.triggered.lock().unwrap(),
            vec![VirtioInterruptType::Queue(0)]
        );
    }

    #[test]
    fn requests_are_bounded_and_bad_buffers_get_nothing() {
        let (_dir, path) = source_file(&vec![7u8; 1 << 20]);
        let mut tq = TestQueue::new(16);
        let d = tq.data_addr();
        let end = tq.mem_size();
        // 128 KiB asked, 64 KiB given.
        tq.publish(&[Desc::new(d, 128 << 10, F_WRITE, 0)], 0);
        // Device-readable only: nothing written.
        tq.publish(&[Desc::new(d, 64, 0, 0)], 1);
        // Outside guest RAM.
        tq.publish(&[Desc::new(end - 8, 64, F_WRITE, 0)], 2);
        let mem = tq.mem.clone();
        let (mut h, _) = handler(tq, &path);
        h.handle_queue(0).unwrap();
        let used = |i: u64| -> u32 { mem.read_obj(GuestAddress(0x6000 + 8 + 8 * i)).unwrap() };
        assert_eq!(used(0), 64 << 10);
        assert_eq!(used(1), 0);
        assert_eq!(used(2), 0);
        let beyond: u8 = mem.read_obj(GuestAddress(d + (64 << 10))).unwrap();
        assert_eq!(beyond, 0, "nothing past the bound");
    }

    #[test]
    fn exhausted_source_gives_what_it_has() {
        let (_dir, path) = source_file(&[1, 2, 3]);
        let mut tq = TestQueue::new(16);
        let d = tq.data_addr();
        tq.publish(&[Desc::new(d, 16, F_WRITE, 0)], 0);
        let mem = tq.mem.clone();
        let (mut h, _) = handler(tq, &path);
        h.handle_queue(0).unwrap();
        let used_len: u32 = mem.read_obj(GuestAddress(0x6000 + 8)).unwrap();
        assert_eq!(used_len, 0, "short read: the buffer is returned empty");
    }

    #[test]
    fn device_contract() {
        let rng = Rng::new(Path::new(DEFAULT_SOURCE)).unwrap();
        assert_eq!(rng.device_type(), TYPE_RNG);
        assert_eq!(rng.features(), 1 << 32);
        let state = rng.state().unwrap();
        assert!(state.queues.is_empty(), "an inactive device has no queues");
        assert!(Rng::new(Path::new("/nonexistent/entropy")).is_err());
    }
}
