//! Validation of a descriptor chain before a device acts on it.
//!
//! virtio-queue's `DescriptorChain` already bounds the walk: at most queue-size descriptors (so a loop
//! ends), an indirect table only once, and at most 2^32 bytes. It ends a chain silently on those limits
//! and on a descriptor it cannot read, so here a chain whose last descriptor still has NEXT set is a
//! truncated (invalid) chain. Further rules enforced here:
//! - device-writable descriptors follow all device-readable ones (§2.7.4.2 "Drivers MUST place any
//!   device-writable descriptor elements after any device-readable descriptor elements");
//! - every buffer lies inside guest RAM ([`ParsedChain::check_memory`]), with no address overflow.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::virtio::GuestMemory;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("empty descriptor chain (head index out of range or unreadable)")]
    Empty,
    #[error(
        "descriptor chain truncated (a loop, longer than the queue, or an unreadable descriptor)"
    )]
    Truncated,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("request of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("request layout: {0}")]
    Layout(&'static str),
}

/// A chain split into its device-readable and device-writable buffers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedChain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

/// `parse_chain` plus the memory check, for devices that drop (and log, rate-limited, as `device`) any
/// buffer that fails either: None for such a chain.
pub fn parse_checked<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    device: &str,
) -> Option<ParsedChain>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let result = parse_chain(chain).and_then(|parsed| parsed.check_memory(mem).map(|()| parsed));
    match result {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            crate::warn_ratelimited!("{device}: buffer dropped: {e}");
            None
        }
    }
}

/// Walks `chain` and checks its structure (not yet its buffers' addresses).
pub fn parse_chain<M>(chain: DescriptorChain<M>) -> Result<ParsedChain, ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut parsed = ParsedChain {
        head: chain.head_index(),
        ..Default::default()
    };
    let mut last_has_next = false;
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        last_has_next = desc.has_next();
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            parsed.writable.push(segment);
        } else if !parsed.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            parsed.readable.push(segment);
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok(parsed)
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// The pieces of the concatenation of `segments` covering bytes `start..start + len`.
fn pieces(segments: &[Segment], start: u64, len: u64) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    let (mut skip, mut left) = (start, len);
    for s in segments {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(s.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(left);
        // A wrapping address ends the list short; callers check the length they got.
        let Some(addr) = s.addr.checked_add(skip) else {
            break;
        };
        out.push((addr, take as usize));
        skip = 0;
        left -= take;
    }
    out
}

impl ParsedChain {
    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }

    /// Every buffer must be inside guest memory.
    pub fn check_memory(&self, mem: &GuestMemory) -> Result<(), ChainError> {
        for s in self.readable.iter().chain(&self.writable) {
            check_segment(mem, s)?;
        }
        Ok(())
    }

    /// Readable bytes `offset..offset + len` as guest ranges (unchecked: see [`Self::check_memory`]).
    pub fn readable_pieces(&self, offset: u64, len: u64) -> Vec<(GuestAddress, usize)> {
        pieces(&self.readable, offset, len)
    }

    /// Writable bytes `offset..offset + len` as guest ranges (unchecked: see [`Self::check_memory`]).
    pub fn writable_pieces(&self, offset: u64, len: u64) -> Vec<(GuestAddress, usize)> {
        pieces(&self.writable, offset, len)
    }

    /// Copies readable bytes starting at `offset` into `buf`.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, len) in self.readable_pieces(offset, buf.len() as u64) {
            mem.read_slice(&mut buf[done..done + len], addr)
                .map_err(|_| ChainError::OutOfMemory {
                    addr: addr.0,
                    len: len as u32,
                })?;
            done += len;
        }
        if done != buf.len() {
            return Err(ChainError::Layout("readable part too short"));
        }
        Ok(())
    }

    /// Copies `buf` into the writable bytes starting at `offset`.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, len) in self.writable_pieces(offset, buf.len() as u64) {
            mem.write_slice(&buf[done..done + len], addr)
                .map_err(|_| ChainError::OutOfMemory {
                    addr: addr.0,
                    len: len as u32,
                })?;
            done += len;
        }
        if done != buf.len() {
            return Err(ChainError::Layout("writable part too short"));
        }
        Ok(())
    }
}

/// `segment` lies inside guest memory (possibly across adjacent regions) without address overflow.
pub fn check_segment(mem: &GuestMemory, s: &Segment) -> Result<(), ChainError> {
    let err = ChainError::OutOfMemory {
        addr: s.addr.0,
        len: s.len,
    };
    if s.addr.checked_add(u64::from(s.len)).is_none() {
        return Err(err);
    }
    if s.len > 0 && !GuestMemoryBackend::check_range(mem, s.addr, s.len as usize) {
        return Err(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{Desc, TestQueue, F_NEXT, F_WRITE};
    use virtio_queue::QueueOwnedT;

    fn parse(tq: &mut TestQueue, descs: &[Desc]) -> Result<ParsedChain, ChainError> {
        tq.publish(descs, 0);
        let mem = tq.mem.clone();
        let chain = tq.queue.iter(&mem).unwrap().next().unwrap();
        parse_chain(chain)
    }

    #[test]
    fn well_formed_chain_splits_by_direction() {
        let mut tq = TestQueue::new(16);
        let d = tq.data_addr();
        let p = parse(
            &mut tq,
            &[
                Desc::new(d, 16, F_NEXT, 1),
                Desc::new(d + 0x100, 512, F_NEXT | F_WRITE, 2),
                Desc::new(d + 0x400, 1, F_WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!((p.readable.len(), p.writable.len()), (1, 2));
        assert_eq!((p.readable_len(), p.writable_len()), (16, 513));
        p.check_memory(&tq.mem).unwrap();
        assert_eq!(
            p.writable_pieces(500, 13),
            vec![
                (GuestAddress(d + 0x100 + 500), 12),
                (GuestAddress(d + 0x400), 1)
            ]
        );
    }

    #[test]
    fn loop_is_truncated() {
        let mut tq = TestQueue::new(8);
        let d = tq.data_addr();
        let err = parse(
            &mut tq,
            &[Desc::new(d, 16, F_NEXT, 1), Desc::new(d, 16, F_NEXT, 0)],
        );
        assert_eq!(err, Err(ChainError::Truncated));
    }

    #[test]
    fn chain_longer_than_queue_is_truncated() {
        let mut tq = TestQueue::new(4);
        let d = tq.data_addr();
        // Descriptor 3 points past the table (next = 4 >= queue size).
        let descs: Vec<Desc> = (0..4).map(|i| Desc::new(d, 1, F_NEXT, i + 1)).collect();
        assert_eq!(parse(&mut tq, &descs), Err(ChainError::Truncated));
    }

    #[test]
    fn readable_after_writable_is_refused() {
        let mut tq = TestQueue::new(8);
        let d = tq.data_addr();
        let err = parse(
            &mut tq,
            &[Desc::new(d, 1, F_NEXT | F_WRITE, 1), Desc::new(d, 16, 0, 0)],
        );
        assert_eq!(err, Err(ChainError::ReadableAfterWritable));
    }

    #[test]
    fn head_out_of_range_is_empty() {
        let mut tq = TestQueue::new(8);
        tq.publish_head(200);
        let mem = tq.mem.clone();
        let chain = tq.queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(parse_chain(chain), Err(ChainError::Empty));
    }

    #[test]
    fn buffers_outside_memory_and_overflowing_lengths() {
        let mut tq = TestQueue::new(8);
        let end = tq.mem_size();
        for (addr, len) in [
            (end, 1),
            (end - 4, 8),
            (u64::MAX - 2, 16),
            (u64::MAX, u32::MAX),
        ] {
            let p = parse(&mut tq, &[Desc::new(addr, len, 0, 0)]).unwrap();
            assert!(
                matches!(p.check_memory(&tq.mem), Err(ChainError::OutOfMemory { .. })),
                "{addr:#x}+{len:#x}"
            );
        }
        // Zero-length buffers are fine anywhere.
        let p = parse(&mut tq, &[Desc::new(u64::MAX, 0, 0, 0)]).unwrap();
        p.check_memory(&tq.mem).unwrap();
    }
}
