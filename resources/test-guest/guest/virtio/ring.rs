//! Split virtqueues, driver side (virtio 1.2 §2.7; pure logic over a `RingMemory`, `core` only; also
//! compiled host-side, where a test plays the device on a byte array).
//!
//! One allocation holds the three parts, each at its required alignment (§2.7):
//! ```text
//! 0                       descriptor table  16 * size bytes, 16-byte aligned
//! 16 * size               available ring    flags, idx, ring[size], used_event (6 + 2 * size), 2-aligned
//! align4(..)              used ring         flags, idx, ring[size] {id u32, len u32}, avail_event, 4-aligned
//! ```
//! Indices are free-running u16 counters; a ring slot is `idx % size`, consistent across the wrap because
//! the size is a power of two. The driver polls the used index but leaves interrupts on (no
//! AVAIL_F_NO_INTERRUPT): with no MSI-X vector nothing is delivered, yet the VMM's guest-idle device ends a
//! wait when a device raises one, as an interrupt ends `hlt`. It keeps its free list privately, so a device
//! that scribbles on descriptors cannot corrupt it.

use core::sync::atomic::{fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
pub const DESC_SIZE: u64 = 16;
pub const USED_ELEM_SIZE: u64 = 8;
/// The largest queue this driver sets up (the device may offer more; §4.1.4.3 lets the driver shrink it).
pub const MAX_SIZE: u16 = 256;
/// The largest size a split queue can have (§2.7).
pub const SPEC_MAX_SIZE: u16 = 32768;

/// Offsets of the three parts inside one allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Bytes the allocation needs.
    pub total: u64,
}

impl Layout {
    /// `None` unless `size` is a power of two in 1..=32768.
    pub fn new(size: u16) -> Option<Layout> {
        if !size.is_power_of_two() || size > SPEC_MAX_SIZE {
            return None;
        }
        let n = u64::from(size);
        let avail = DESC_SIZE * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        Some(Layout {
            size,
            desc: 0,
            avail,
            used,
            total: used + 6 + USED_ELEM_SIZE * n,
        })
    }

    pub fn desc_entry(&self, index: u16) -> u64 {
        self.desc + DESC_SIZE * u64::from(index)
    }

    pub fn avail_idx(&self) -> u64 {
        self.avail + 2
    }

    pub fn avail_slot(&self, idx: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(idx % self.size)
    }

    pub fn used_idx(&self) -> u64 {
        self.used + 2
    }

    pub fn used_slot(&self, idx: u16) -> u64 {
        self.used + 4 + USED_ELEM_SIZE * u64::from(idx % self.size)
    }
}

/// The queue size to program: the largest power of two not above the device's maximum or MAX_SIZE.
/// `None` if the device offers no queue (maximum 0).
pub fn choose_size(device_max: u16) -> Option<u16> {
    let limit = device_max.min(MAX_SIZE);
    (limit > 0).then(|| 1 << (15 - limit.leading_zeros()))
}

/// Little-endian access to the ring allocation, by offset from its start.
pub trait RingMemory {
    fn read_u16(&self, offset: u64) -> u16;
    fn read_u32(&self, offset: u64) -> u32;
    fn write_u16(&mut self, offset: u64, value: u16);
    fn write_u32(&mut self, offset: u64, value: u32);
    fn write_u64(&mut self, offset: u64, value: u64);
}

/// One buffer of a chain: guest-physical address, length, and who writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE); device-readable otherwise.
    pub device_writes: bool,
}

/// A used-ring element: the chain's head descriptor and the bytes the device wrote into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// Not enough free descriptors for the chain (or an empty chain).
    Full { needed: usize, free: u16 },
    /// The device returned an id that is not the head of a chain in flight.
    BadUsedId(u32),
    /// The device's used index ran ahead of what was made available.
    UsedOverrun { used_idx: u16, avail_idx: u16 },
}

impl core::fmt::Display for QueueError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            QueueError::Full { needed, free } => {
                write!(f, "queue full: need {needed} descriptors, {free} free")
            }
            QueueError::BadUsedId(id) => {
                write!(f, "device returned id {id}, not a chain in flight")
            }
            QueueError::UsedOverrun {
                used_idx,
                avail_idx,
            } => write!(
                f,
                "device used index {used_idx} is past the available index {avail_idx}"
            ),
        }
    }
}

const MAX: usize = MAX_SIZE as usize;

/// The driver's view of one split virtqueue.
pub struct SplitQueue<M> {
    mem: M,
    layout: Layout,
    /// Free descriptors, linked through `next` (private: never read back from shared memory).
    free_head: u16,
    num_free: u16,
    next: [u16; MAX],
    /// Descriptors in the chain headed here, 0 if no chain in flight starts here.
    chain_len: [u16; MAX],
    /// avail.idx as the driver will publish it.
    next_avail: u16,
    /// avail.idx as last published.
    published: u16,
    /// Used elements consumed so far.
    last_used: u16,
}

impl<M: RingMemory> SplitQueue<M> {
    /// Takes over a zeroed allocation of `layout.total` bytes. `None` if the layout is larger than
    /// MAX_SIZE.
    pub fn new(mut mem: M, layout: Layout) -> Option<Self> {
        if layout.size > MAX_SIZE {
            return None;
        }
        let mut next = [0u16; MAX];
        for (i, n) in next.iter_mut().enumerate().take(usize::from(layout.size)) {
            *n = (i as u16).wrapping_add(1);
        }
        // Interrupts stay on: they are what wakes this guest from an idle wait.
        mem.write_u16(layout.avail, 0);
        mem.write_u16(layout.avail_idx(), 0);
        mem.write_u16(layout.used, 0);
        mem.write_u16(layout.used_idx(), 0);
        Some(SplitQueue {
            mem,
            layout,
            free_head: 0,
            num_free: layout.size,
            next,
            chain_len: [0; MAX],
            next_avail: 0,
            published: 0,
            last_used: 0,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn memory(&self) -> &M {
        &self.mem
    }

    pub fn memory_mut(&mut self) -> &mut M {
        &mut self.mem
    }

    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains made available (published or not) whose used element has not been seen.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    /// Writes a chain's descriptors and puts its head in the next available slot; the device sees it only
    /// after `publish`. Returns the head descriptor index.
    pub fn add(&mut self, buffers: &[Buffer]) -> Result<u16, QueueError> {
        if buffers.is_empty() || buffers.len() > usize::from(self.num_free) {
            return Err(QueueError::Full {
                needed: buffers.len(),
                free: self.num_free,
            });
        }
        let head = self.free_head;
        let mut index = head;
        for (i, b) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            let next = self.next[usize::from(index)];
            if !last {
                flags |= DESC_F_NEXT;
            }
            let entry = self.layout.desc_entry(index);
            self.mem.write_u64(entry, b.addr);
            self.mem.write_u32(entry + 8, b.len);
            self.mem.write_u16(entry + 12, flags);
            self.mem.write_u16(entry + 14, if last { 0 } else { next });
            if last {
                self.free_head = next;
            } else {
                index = next;
            }
        }
        self.num_free -= buffers.len() as u16;
        self.chain_len[usize::from(head)] = buffers.len() as u16;
        let slot = self.layout.avail_slot(self.next_avail);
        self.mem.write_u16(slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(head)
    }

    /// Makes every chain added so far visible to the device (§2.7.13: descriptors and ring entries before
    /// the index). Returns whether there was anything new, i.e. whether to notify.
    pub fn publish(&mut self) -> bool {
        if self.published == self.next_avail {
            return false;
        }
        // The descriptor and data writes must be visible before the index that announces them.
        fence(Ordering::SeqCst);
        self.mem.write_u16(self.layout.avail_idx(), self.next_avail);
        self.published = self.next_avail;
        true
    }

    /// The next used element, if the device has returned one; frees its chain.
    pub fn poll_used(&mut self) -> Result<Option<Used>, QueueError> {
        let used_idx = self.mem.read_u16(self.layout.used_idx());
        if used_idx == self.last_used {
            return Ok(None);
        }
        // The index is read before the element and the data it covers (§2.7.14).
        fence(Ordering::Acquire);
        if used_idx.wrapping_sub(self.last_used) > self.published.wrapping_sub(self.last_used) {
            return Err(QueueError::UsedOverrun {
                used_idx,
                avail_idx: self.published,
            });
        }
        let slot = self.layout.used_slot(self.last_used);
        let id = self.mem.read_u32(slot);
        let len = self.mem.read_u32(slot + 4);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.layout.size && self.chain_len[usize::from(h)] != 0)
            .ok_or(QueueError::BadUsedId(id))?;
        self.free_chain(head);
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(Used { head, len }))
    }

    fn free_chain(&mut self, head: u16) {
        let n = core::mem::take(&mut self.chain_len[usize::from(head)]);
        let mut tail = head;
        for _ in 1..n {
            tail = self.next[usize::from(tail)];
        }
        self.next[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.num_free += n;
    }
}
