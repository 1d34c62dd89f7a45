//! Test helpers: a split virtqueue laid out in a small guest memory, filled the way a driver would.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::virtio::GuestMemory;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const MEM_SIZE: u64 = 1 << 20;
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x4000;
pub const USED_RING: u64 = 0x6000;
pub const DATA: u64 = 0x10000;

#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Self {
            addr,
            len,
            flags,
            next,
        }
    }
}

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Writes descriptors at table indices `first..` of the table at `table`.
pub fn write_descs(mem: &GuestMemory, table: u64, first: u16, descs: &[Desc]) {
    for (i, d) in descs.iter().enumerate() {
        let at = table + 16 * (u64::from(first) + i as u64);
        mem.write_obj(d.addr, GuestAddress(at)).unwrap();
        mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(d.next, GuestAddress(at + 14)).unwrap();
    }
}

pub struct TestQueue {
    pub mem: GuestMemory,
    pub queue: Queue,
    pub size: u16,
    avail_idx: u16,
}

impl TestQueue {
    pub fn new(size: u16) -> Self {
        Self::with_memory(guest_memory(), size)
    }

    pub fn with_memory(mem: GuestMemory, size: u16) -> Self {
        let mut queue = Queue::new(size).unwrap();
        queue.set_size(size);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        Self {
            mem,
            queue,
            size,
            avail_idx: 0,
        }
    }

    pub fn data_addr(&self) -> u64 {
        DATA
    }

    pub fn mem_size(&self) -> u64 {
        MEM_SIZE
    }

    /// Writes `descs` at table indices `first..` and makes `first` available.
    pub fn publish(&mut self, descs: &[Desc], first: u16) {
        write_descs(&self.mem, DESC_TABLE, first, descs);
        self.publish_head(first);
    }

    /// Puts `head` in the next available ring slot and bumps the index.
    pub fn publish_head(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Sets the available index directly (to simulate a driver lying about it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// (id, len) of used ring element `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = USED_RING + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// A self-cleaning temporary directory (no extra dependency).
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("trenv-devices-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// Writes `bytes` to a file in the directory and returns its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Records interrupts and NEEDS_RESET.
#[derive(Default)]
pub struct RecordingInterrupt {
    pub triggered: std::sync::Mutex<Vec<crate::virtio::VirtioInterruptType>>,
    pub needs_reset: std::sync::atomic::AtomicBool,
}

impl crate::virtio::VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, kind: crate::virtio::VirtioInterruptType) {
        self.triggered.lock().unwrap().push(kind);
    }
    fn set_needs_reset(&self) {
        self.needs_reset
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
