//! A bump allocator for memory the guest shares with devices (rings, request headers, data buffers): the
//! guest never frees any, so a cursor over one region of usable RAM is enough (pure address arithmetic,
//! `core` only; also compiled host-side for unit tests). The caller zeroes what it gets.

pub const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    /// The region [base, base + len) (saturating at the top of the address space).
    pub const fn new(base: u64, len: u64) -> Arena {
        Arena {
            next: base,
            end: base.saturating_add(len),
        }
    }

    /// `len` bytes aligned to `align` (a power of two; 0 or 1 means unaligned), or `None` if they do not fit.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let align = align.max(1);
        if !align.is_power_of_two() {
            return None;
        }
        let start = self.next.checked_next_multiple_of(align)?;
        let end = start.checked_add(len)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }

    /// Bytes left (ignoring alignment).
    pub fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.next)
    }
}
