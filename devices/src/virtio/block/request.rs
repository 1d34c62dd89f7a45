//! One virtio-blk request (§5.2.6): a 16-byte device-readable header (type, reserved, sector), the data,
//! and a one-byte device-writable status at the very end.
//!
//! Structural garbage (loops, truncated chains, readable after writable, no writable status byte in
//! guest RAM) cannot be answered and is returned with length 0. Anything else that is wrong fails the
//! request with VIRTIO_BLK_S_IOERR (or S_UNSUPP for unknown types): buffers outside guest RAM, data in
//! the wrong direction, sizes not a multiple of the sector, ranges past the end of the disk, writes to
//! a read-only disk, and requests over [`MAX_REQUEST_BYTES`]. The file is the only host object touched,
//! and only inside its current size.

use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress};

use crate::virtio::block::{Disk, ID_BYTES, MAX_DISCARD_SECTORS};
use crate::virtio::chain::{check_segment, parse_chain, ChainError, ParsedChain, Segment};
use crate::virtio::GuestMemory;
use crate::warn_ratelimited;

pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer of one request.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
const HEADER_LEN: u64 = 16;
const DISCARD_SEGMENT_LEN: u64 = 16;

// Request types and status values (§5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("data length {0} is not a multiple of the sector size")]
    Unaligned(u64),
    #[error("sectors {sector}+{len} bytes are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the {0}")]
    Direction(&'static str),
    #[error("discard/write-zeroes segment: {0}")]
    Segment(&'static str),
    #[error("disk I/O")]
    Io(#[source] std::io::Error),
    #[error("guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Runs the request in `chain` and returns the used length (bytes written to the guest).
pub(crate) fn process<M>(dev: &mut Disk, mem: &GuestMemory, chain: DescriptorChain<M>) -> u32
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let parsed = match parse_chain(chain) {
        Ok(p) => p,
        Err(e) => {
            warn_ratelimited!("virtio-blk: request dropped: {e}");
            return 0;
        }
    };
    let Some(status_at) = status_address(mem, &parsed) else {
        warn_ratelimited!(
            "virtio-blk: request without a writable status byte in guest RAM: dropped"
        );
        return 0;
    };
    let (status, written) = match execute(dev, mem, &parsed) {
        Ok(n) => (VIRTIO_BLK_S_OK, n),
        Err(RequestError::Unsupported(t)) => {
            warn_ratelimited!("virtio-blk: unsupported request type {t}");
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
        Err(e) => {
            warn_ratelimited!("virtio-blk: request failed: {e}");
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    if mem.write_obj(status, status_at).is_err() {
        return 0;
    }
    written + 1
}

/// The last writable byte, if it is in guest RAM.
fn status_address(mem: &GuestMemory, parsed: &ParsedChain) -> Option<GuestAddress> {
    let len = parsed.writable_len();
    let (addr, _) = *parsed.writable_pieces(len.checked_sub(1)?, 1).first()?;
    check_segment(mem, &Segment { addr, len: 1 }).ok()?;
    Some(addr)
}

fn check_data_len(len: u64) -> Result<(), RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(ChainError::TooLarge {
            len,
            max: MAX_REQUEST_BYTES,
        }
        .into());
    }
    Ok(())
}

/// Byte offset of `sector` if `sector..sector + len` lies on the disk.
fn disk_offset(dev: &Disk, sector: u64, len: u64) -> Result<u64, RequestError> {
    sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| Some((start, start.checked_add(len)?)))
        .filter(|&(_, end)| end <= dev.capacity_sectors * SECTOR_SIZE)
        .map(|(start, _)| start)
        .ok_or(RequestError::OutOfRange {
            sector,
            len,
            capacity: dev.capacity_sectors,
        })
}

/// Executes a structurally valid request; returns the data bytes written to the guest.
fn execute(dev: &mut Disk, mem: &GuestMemory, parsed: &ParsedChain) -> Result<u32, RequestError> {
    parsed.check_memory(mem)?;
    let mut header = [0u8; HEADER_LEN as usize];
    parsed
        .read_at(mem, 0, &mut header)
        .map_err(|_| RequestError::Direction("header is not 16 device-readable bytes"))?;
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let readable = parsed.readable_len();
    // The status byte is the last writable byte; what precedes it is the writable data.
    let writable = parsed.writable_len() - 1;

    match kind {
        VIRTIO_BLK_T_IN => {
            if readable != HEADER_LEN {
                return Err(RequestError::Direction("read buffer is device-readable"));
            }
            check_data_len(writable)?;
            let start = disk_offset(dev, sector, writable)?;
            dev.file
                .seek(SeekFrom::Start(start))
                .map_err(RequestError::Io)?;
            for (addr, len) in parsed.writable_pieces(0, writable) {
                mem.read_exact_volatile_from(addr, &mut dev.file, len)
                    .map_err(RequestError::Memory)?;
            }
            Ok(writable as u32)
        }
        VIRTIO_BLK_T_OUT => {
            if dev.readonly {
                return Err(RequestError::ReadOnly);
            }
            if writable != 0 {
                return Err(RequestError::Direction("write buffer is device-writable"));
            }
            let len = readable - HEADER_LEN;
            check_data_len(len)?;
            let start = disk_offset(dev, sector, len)?;
            dev.file
                .seek(SeekFrom::Start(start))
                .map_err(RequestError::Io)?;
            for (addr, n) in parsed.readable_pieces(HEADER_LEN, len) {
                mem.write_all_volatile_to(addr, &mut dev.file, n)
                    .map_err(RequestError::Memory)?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !dev.readonly {
                dev.file.sync_data().map_err(RequestError::Io)?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = writable.min(ID_BYTES as u64) as usize;
            parsed.write_at(mem, 0, &dev.serial[..n])?;
            Ok(n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if dev.readonly {
                return Err(RequestError::ReadOnly);
            }
            // max_discard_seg and max_write_zeroes_seg are 1.
            if readable != HEADER_LEN + DISCARD_SEGMENT_LEN {
                return Err(RequestError::Segment("exactly one segment expected"));
            }
            let mut seg = [0u8; DISCARD_SEGMENT_LEN as usize];
            parsed.read_at(mem, HEADER_LEN, &mut seg)?;
            let start_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            if sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::Segment("too many sectors"));
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let start = disk_offset(dev, start_sector, len)?;
            if kind == VIRTIO_BLK_T_DISCARD {
                if flags != 0 {
                    return Err(RequestError::Unsupported(kind));
                }
                // Advisory: a file system that cannot punch holes just keeps the data.
                let _ = punch_hole(&dev.file, start, len);
            } else {
                if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
                    return Err(RequestError::Segment("unknown flags"));
                }
                write_zeroes(&mut dev.file, start, len).map_err(RequestError::Io)?;
            }
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn fallocate(file: &std::fs::File, mode: i32, start: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own, with in-range offsets checked by the caller.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, start as i64, len as i64) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn punch_hole(file: &std::fs::File, start: u64, len: u64) -> std::io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        start,
        len,
    )
}

/// Zeroes a range, cheapest first: ZERO_RANGE, a hole, then plain writes.
fn write_zeroes(file: &mut std::fs::File, start: u64, len: u64) -> std::io::Result<()> {
    if fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        start,
        len,
    )
    .is_ok()
        || punch_hole(file, start, len).is_ok()
    {
        return Ok(());
    }
    use std::io::Write;
    const CHUNK: u64 = 64 << 10;
    let zeroes = vec![0u8; CHUNK as usize];
    file.seek(SeekFrom::Start(start))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        file.write_all(&zeroes[..n as usize])?;
        left -= n;
    }
    Ok(())
}
