//! The virtio-pmem device (virtio 1.2 §5.19).
//!
//! Configuration (§5.19.4): `le64 start; le64 size;`, the guest-physical range the host file is mapped at
//! (its own KVM memslot, outside guest RAM). One request queue (§5.19.2). A request (§5.19.6) is a
//! device-readable `le32 type` followed by a device-writable `le32 ret`; the only type is FLUSH (0), which
//! makes every earlier guest write to the range durable: `fsync` of the file. `ret` is 0 on success, 1 on
//! failure (Linux's `VIRTIO_PMEM_RESP_TYPE_EIO`); an unknown type also answers 1.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::virtio::chain::parse_chain;
use devices::virtio::worker::{pause_worker, resume_worker, saved_queues, QueueHandler, Worker};
use devices::virtio::{
    check_common_state, read_config_bytes, ActivateContext, ActivateError, GuestMemory,
    SnapshotError, VirtioDevice, VirtioDeviceState, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use devices::warn_ratelimited;
use virtio_queue::{DescriptorChain, Queue};

use crate::mapping::PmemBacking;
use crate::TYPE_PMEM;

pub const QUEUE_SIZE: u16 = 256;
pub const REQ_TYPE_FLUSH: u32 = 0;
pub const RESP_OK: u32 = 0;
pub const RESP_EIO: u32 = 1;
/// Size of `struct virtio_pmem_config`.
pub const CONFIG_SIZE: usize = 16;

/// What the device has done, for `vm.counters`.
#[derive(Debug, Default)]
pub struct PmemCounters {
    pub flushes: AtomicU64,
    pub flush_errors: AtomicU64,
    pub bad_requests: AtomicU64,
}

pub struct Pmem {
    backing: Arc<PmemBacking>,
    config: [u8; CONFIG_SIZE],
    counters: Arc<PmemCounters>,
    queue_sizes: [u16; 1],
    acked_features: u64,
    worker: Option<Worker>,
}

impl Pmem {
    /// A device describing `backing` to the guest at guest-physical `guest_addr` (where the VMM registered
    /// its memslot).
    pub fn new(backing: Arc<PmemBacking>, guest_addr: u64) -> Self {
        let mut config = [0u8; CONFIG_SIZE];
        config[..8].copy_from_slice(&guest_addr.to_le_bytes());
        config[8..].copy_from_slice(&backing.size().to_le_bytes());
        Self {
            backing,
            config,
            counters: Arc::default(),
            queue_sizes: [QUEUE_SIZE],
            acked_features: 0,
            worker: None,
        }
    }

    pub fn backing(&self) -> &Arc<PmemBacking> {
        &self.backing
    }

    pub fn counters(&self) -> Arc<PmemCounters> {
        self.counters.clone()
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        TYPE_PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        // VIRTIO_PMEM_F_SHMEM_REGION (a shared-memory capability instead of config fields) is not offered:
        // Linux's driver uses `start`/`size` without it.
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Some(active) = ctx.queues.into_iter().find(|q| q.index == 0) else {
            return Err(ActivateError::MissingQueue(0));
        };
        let handler = PmemHandler {
            mem: ctx.mem,
            queue: active.queue,
            backing: self.backing.clone(),
            counters: self.counters.clone(),
            interrupt: ctx.interrupt.clone(),
        };
        self.worker = Some(
            Worker::spawn("pmem", vec![active.event], Box::new(handler), ctx.interrupt)
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
        "virtio-pmem"
    }

    fn pause(&mut self) -> Result<(), SnapshotError> {
        let name = self.name();
        pause_worker(&mut self.worker, name)
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_worker(&mut self.worker)
    }

    /// Device bytes: the configuration (`le64 start; le64 size`) the guest mapped; the file's pages are
    /// the host's, not the guest's, and stay out of snapshots.
    fn state(&self) -> Result<VirtioDeviceState, SnapshotError> {
        let name = self.name();
        Ok(VirtioDeviceState {
            acked_features: self.acked_features,
            queues: saved_queues(&self.worker, name)?,
            device: self.config.to_vec(),
        })
    }

    /// The guest has the saved range mapped: a device at another address or of another size is refused.
    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        check_common_state(self.name(), self.features(), state, Some(&self.config))
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

pub(crate) struct PmemHandler {
    mem: GuestMemory,
    queue: Queue,
    backing: Arc<PmemBacking>,
    counters: Arc<PmemCounters>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl PmemHandler {
    /// Serves one request; returns the bytes written into the chain (4 with a response, 0 without).
    fn serve<M>(
        mem: &GuestMemory,
        backing: &PmemBacking,
        counters: &PmemCounters,
        chain: DescriptorChain<M>,
    ) -> u32
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let parsed = match parse_chain(chain) {
            Ok(p) => p,
            Err(e) => {
                counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                warn_ratelimited!("virtio-pmem: request dropped: {e}");
                return 0;
            }
        };
        if let Err(e) = parsed.check_memory(mem) {
            counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            warn_ratelimited!("virtio-pmem: request dropped: {e}");
            return 0;
        }
        // §5.19.6: the response needs 4 device-writable bytes; without them there is nowhere to answer.
        if parsed.writable_len() < 4 {
            counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            warn_ratelimited!("virtio-pmem: request without room for a response: dropped");
            return 0;
        }
        let mut kind = [0u8; 4];
        let ret = match parsed.read_at(mem, 0, &mut kind) {
            Ok(()) if u32::from_le_bytes(kind) == REQ_TYPE_FLUSH => {
                counters.flushes.fetch_add(1, Ordering::Relaxed);
                match backing.flush() {
                    Ok(()) => RESP_OK,
                    Err(e) => {
                        counters.flush_errors.fetch_add(1, Ordering::Relaxed);
                        warn_ratelimited!(
                            "virtio-pmem {}: flush of {} failed: {e}",
                            backing.id(),
                            backing.path().display()
                        );
                        RESP_EIO
                    }
                }
            }
            Ok(()) => {
                counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                warn_ratelimited!(
                    "virtio-pmem: unknown request type {}",
                    u32::from_le_bytes(kind)
                );
                RESP_EIO
            }
            Err(e) => {
                counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                warn_ratelimited!("virtio-pmem: unreadable request: {e}");
                RESP_EIO
            }
        };
        match parsed.write_at(mem, 0, &ret.to_le_bytes()) {
            Ok(()) => 4,
            Err(e) => {
                warn_ratelimited!("virtio-pmem: cannot write the response: {e}");
                0
            }
        }
    }
}

impl QueueHandler for PmemHandler {
    fn handle_queue(&mut self, _index: usize) -> Result<(), String> {
        let PmemHandler {
            mem,
            queue,
            backing,
            counters,
            interrupt,
        } = self;
        devices::virtio::serve_available(
            queue,
            mem,
            interrupt.as_ref(),
            0,
            "virtio-pmem",
            |chain| Self::serve(mem, backing, counters, chain),
        )
    }

    fn queues(&self) -> Vec<&Queue> {
        vec![&self.queue]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::tests::{spec, TempDir};
    use devices::virtio::VirtioInterruptType;
    use std::sync::Mutex;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x4000;
    const USED: u64 = 0x6000;
    const DATA: u64 = 0x10000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    #[derive(Default)]
    struct Irq(Mutex<Vec<VirtioInterruptType>>);

    impl VirtioInterrupt for Irq {
        fn trigger(&self, kind: VirtioInterruptType) {
            self.0.lock().unwrap().push(kind);
        }
        fn set_needs_reset(&self) {}
    }

    /// A driver's side of one queue in 1 MiB of guest memory.
    struct Driver {
        mem: GuestMemory,
        avail_idx: u16,
    }

    impl Driver {
        fn new() -> (Self, Queue) {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut q = Queue::new(16).unwrap();
            q.set_size(16);
            q.set_desc_table_address(Some(DESC as u32), Some(0));
            q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q.set_ready(true);
            (Self { mem, avail_idx: 0 }, q)
        }

        /// Publishes a chain of (addr, len, flags) starting at descriptor `first`.
        fn publish(&mut self, first: u16, descs: &[(u64, u32, u16)]) {
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let at = DESC + 16 * (u64::from(first) + i as u64);
                let next = first + i as u16 + 1;
                self.mem.write_obj(addr, GuestAddress(at)).unwrap();
                self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
            }
            let slot = u64::from(self.avail_idx % 16);
            self.mem
                .write_obj(first, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx += 1;
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        fn used(&self, i: u64) -> (u32, u32) {
            let at = USED + 4 + 8 * i;
            (
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        fn u32_at(&self, addr: u64) -> u32 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }
    }

    fn handler(
        backing: Arc<PmemBacking>,
        queue: Queue,
        mem: GuestMemory,
    ) -> (PmemHandler, Arc<Irq>) {
        let irq = Arc::new(Irq::default());
        (
            PmemHandler {
                mem,
                queue,
                backing,
                counters: Arc::default(),
                interrupt: irq.clone(),
            },
            irq,
        )
    }

    #[test]
    fn config_names_the_range_and_the_device_is_pmem() {
        let dir = TempDir::new();
        let path = dir.image("img", 4 << 20);
        let backing = Arc::new(PmemBacking::open(&spec(&path, None, true)).unwrap());
        let dev = Pmem::new(backing, 64 << 30);
        assert_eq!(dev.device_type(), 27);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
        assert_eq!(dev.features(), 1 << 32);
        let mut cfg = [0u8; 16];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), 64 << 30);
        assert_eq!(u64::from_le_bytes(cfg[8..].try_into().unwrap()), 4 << 20);
        let mut high = [0xffu8; 4];
        dev.read_config(12, &mut high);
        assert_eq!(u32::from_le_bytes(high), 0, "upper half of size");
        let mut past = [0xffu8; 4];
        dev.read_config(16, &mut past);
        assert_eq!(past, [0; 4]);
        let state = dev.state().unwrap();
        assert_eq!(
            state.device,
            cfg.to_vec(),
            "the range is the device's state"
        );
        dev.check_state(&state).unwrap();
        let other = Pmem::new(dev.backing().clone(), 65 << 30);
        assert!(
            other.check_state(&state).is_err(),
            "a device at another address is refused"
        );
    }

    #[test]
    fn flush_persists_and_bad_requests_get_eio_or_nothing() {
        let dir = TempDir::new();
        let path = dir.image("img", 2 << 20);
        let backing = Arc::new(PmemBacking::open(&spec(&path, None, false)).unwrap());
        let (mut drv, queue) = Driver::new();
        // 0: FLUSH, split request/response.
        drv.mem
            .write_obj(REQ_TYPE_FLUSH, GuestAddress(DATA))
            .unwrap();
        drv.mem.write_obj(0xffu32, GuestAddress(DATA + 4)).unwrap();
        drv.publish(0, &[(DATA, 4, F_NEXT), (DATA + 4, 4, F_WRITE)]);
        // 1: unknown type 9.
        drv.mem.write_obj(9u32, GuestAddress(DATA + 0x100)).unwrap();
        drv.publish(2, &[(DATA + 0x100, 4, F_NEXT), (DATA + 0x104, 4, F_WRITE)]);
        // 2: no writable part: dropped with length 0.
        drv.publish(4, &[(DATA + 0x200, 4, 0)]);
        // 3: a buffer outside guest memory.
        drv.publish(5, &[(DATA, 4, F_NEXT), ((1 << 20) - 2, 4, F_WRITE)]);
        // 4: a request with nothing readable: EIO.
        drv.publish(7, &[(DATA + 0x300, 4, F_WRITE)]);

        let mem = drv.mem.clone();
        let (mut h, irq) = handler(backing, queue, mem);
        h.handle_queue(0).unwrap();
        assert_eq!(drv.used(0), (0, 4));
        assert_eq!(drv.u32_at(DATA + 4), RESP_OK);
        assert_eq!(drv.used(1), (2, 4));
        assert_eq!(drv.u32_at(DATA + 0x104), RESP_EIO);
        assert_eq!(drv.used(2), (4, 0));
        assert_eq!(drv.used(3), (5, 0));
        assert_eq!(drv.used(4), (7, 4));
        assert_eq!(drv.u32_at(DATA + 0x300), RESP_EIO);
        assert_eq!(h.counters.flushes.load(Ordering::Relaxed), 1);
        assert_eq!(h.counters.bad_requests.load(Ordering::Relaxed), 4);
        assert_eq!(*irq.0.lock().unwrap(), vec![VirtioInterruptType::Queue(0)]);
    }
}
