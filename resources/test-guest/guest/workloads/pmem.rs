//! `pmem` and `blkread`: read one image through virtio-pmem (direct loads from the host file's mapping) or
//! through virtio-blk (copied into guest RAM), with the same checksum, so a host can compare what each
//! costs it.
//!
//! `pmem bytes=N write=on|off flush=on|off seed=S passes=P hold=SECS` (defaults: the whole range, off,
//! off, 1, 1, 0): maps the first virtio-pmem device's range, checksums its first N bytes
//! (`virtio::blk::checksum`, the host computes the same over the file) P times (0: until stopped), prints
//! `pmem: read bytes=N checksum=0x..` and signals PMEM_READ; with `write=on` stores the seeded pattern
//! (`virtio::blk::fill_pattern`, word at byte offset o = `pattern::word(S, o)`) over the same bytes and
//! verifies it by loads; with `flush=on` then sends FLUSH. `hold` keeps the guest (and its mapping) alive
//! that many seconds at the end.
//!
//! `blkread bytes=N hold=SECS` (defaults: the whole disk, 0): reads the first virtio-blk device's first N
//! bytes into guest RAM in 64 KiB requests, prints `blkread: read bytes=N checksum=0x..` and signals
//! BLKREAD_DONE.

use super::Context;
use crate::cmdline::{self, Token, Tokens};
use crate::pci::VIRTIO_TYPE_BLOCK;
use crate::protocol::*;
use crate::serial::println;
use crate::signal;
use crate::virtio::blk::{self, SECTOR_SIZE};
use crate::virtio::pmem::{self, Pmem};
use crate::virtio::ring::Buffer;
use crate::virtio::{self, dma_slice, Device, Dma};

/// Bytes per virtio-blk request.
const REQUEST_BYTES: u64 = 64 << 10;
/// Requests in flight at most (3 descriptors each).
const MAX_BATCH: usize = 64;
/// Request table slot: 16-byte header, then the status byte.
const SLOT_BYTES: u64 = 32;

fn bool_param(name: &str, params: Tokens<'_>, key: &str) -> Result<bool, u64> {
    for token in params {
        if let Token::KeyValue(k, v) = token {
            if k == key {
                return match v {
                    "on" | "1" | "yes" => Ok(true),
                    "off" | "0" | "no" => Ok(false),
                    _ => {
                        println!("{name}: error: {key}={v} must be on or off");
                        Err(FAIL_BAD_PARAMETER)
                    }
                };
            }
        }
    }
    Ok(false)
}

fn u64_param(name: &str, params: Tokens<'_>, key: &str, default: u64) -> Result<u64, u64> {
    cmdline::param_u64(params, key, default).map_err(|e| {
        println!("{name}: error: {e}");
        FAIL_BAD_PARAMETER
    })
}

/// Stays alive `secs` seconds (blocking in the VMM's idle device, not spinning).
fn hold(secs: u64) {
    if secs == 0 {
        return;
    }
    let Some(start) = signal::now_ns() else {
        return;
    };
    while signal::now_ns().unwrap_or(u64::MAX).saturating_sub(start) < secs * 1_000_000_000 {
        signal::idle();
    }
}

/// `blk::checksum` of `len` bytes at `addr` with volatile loads: every pass really reads the range (the
/// compiler may not keep a result from an earlier pass), so a host-side change or a vanished page shows.
fn checksum_loads(addr: u64, len: u64) -> u64 {
    (0..len / 8).fold(0u64, |acc, i| {
        // SAFETY: the caller's identity-mapped range; 8-byte aligned (the range starts 2 MiB aligned).
        acc.wrapping_add(unsafe { ((addr + 8 * i) as *const u64).read_volatile() })
    })
}

/// Ok(checksum of the first N bytes).
pub fn run_pmem(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    const NAME: &str = "pmem";
    let bytes = u64_param(NAME, params.clone(), "bytes", 0)?;
    let seed = u64_param(NAME, params.clone(), "seed", 1)?;
    let passes = u64_param(NAME, params.clone(), "passes", 1)?;
    let hold_secs = u64_param(NAME, params.clone(), "hold", 0)?;
    let write = bool_param(NAME, params.clone(), "write")?;
    let flush = bool_param(NAME, params, "flush")?;

    let Some((dev, func, _)) = virtio::find(pmem::TYPE_PMEM) else {
        println!("pmem: error: no virtio-pmem device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    let Some(mut dma) = Dma::new(ctx.e820, 64 << 10) else {
        println!("pmem: error: no usable RAM for the virtqueue");
        return Err(FAIL_NO_MEMORY);
    };
    let mut device = Pmem::open(dev, func, &mut dma).map_err(|e| {
        println!("pmem: error: 00:{dev:02x}.{func}: {e}");
        FAIL_DEVICE
    })?;
    println!("pmem: start={:#x} size={}", device.start, device.size);
    let bytes = if bytes == 0 { device.size } else { bytes };
    if bytes > device.size || !bytes.is_multiple_of(8) {
        println!(
            "pmem: error: bytes={bytes} must be a multiple of 8 and at most the size {}",
            device.size
        );
        return Err(FAIL_BAD_PARAMETER);
    }
    if let Err(e) = pmem::map_range(device.start, device.size) {
        println!(
            "pmem: error: cannot map {:#x}+{:#x}: {e}",
            device.start, device.size
        );
        return Err(FAIL_DEVICE);
    }
    // SAFETY: the device's range, identity-mapped just above; nothing else in the guest aliases it. The
    // host may change it (another writer of the file), which only changes the values read.
    let data = unsafe { core::slice::from_raw_parts_mut(device.start as *mut u8, bytes as usize) };

    let mut sum = checksum_loads(device.start, bytes);
    println!("pmem: read bytes={bytes} checksum={sum:#018x}");
    signal::send(SIGNAL_PMEM_READ, sum);
    let mut pass = 1;
    while passes == 0 || pass < passes {
        sum = checksum_loads(device.start, bytes);
        pass += 1;
    }

    if write {
        blk::fill_pattern(seed, 0, data);
        if let Some(at) = blk::pattern_mismatch(seed, 0, data) {
            println!("pmem: MISMATCH at byte {at} after writing the pattern");
            return Err(FAIL_MISMATCH);
        }
        println!("pmem: write ok");
    }
    if flush {
        match device.flush() {
            Ok(pmem::RESP_OK) => println!("pmem: flush ok"),
            Ok(status) => {
                println!("pmem: error: flush answered {status}");
                return Err(FAIL_DEVICE);
            }
            Err(e) => {
                println!("pmem: error: flush: {e}");
                return Err(FAIL_DEVICE);
            }
        }
    }
    if hold_secs > 0 {
        println!("pmem: holding for {hold_secs} s");
    }
    signal::send(SIGNAL_PMEM_DONE, sum);
    hold(hold_secs);
    // Keep the device alive (and its mapping in use) until the end.
    device.device.check_status().map_err(|e| {
        println!("pmem: error: {e}");
        FAIL_DEVICE
    })?;
    println!("pmem: ok");
    Ok(sum)
}

/// Ok(checksum of the first N bytes of the disk).
pub fn run_blkread(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    const NAME: &str = "blkread";
    let bytes = u64_param(NAME, params.clone(), "bytes", 0)?;
    let hold_secs = u64_param(NAME, params, "hold", 0)?;
    let Some((dev, func, _)) = virtio::find(VIRTIO_TYPE_BLOCK) else {
        println!("blkread: error: no virtio-blk device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    let fail = |e: virtio::Error| {
        println!("blkread: error: 00:{dev:02x}.{func}: {e}");
        FAIL_DEVICE
    };
    let mut device = Device::open(dev, func).map_err(fail)?;
    let features = device.init(blk::F_SIZE_MAX | blk::F_RO).map_err(fail)?;
    let Some((capacity, size_max)) = device.read_config(|c| {
        (
            c.read64(blk::CONFIG_CAPACITY),
            c.read32(blk::CONFIG_SIZE_MAX),
        )
    }) else {
        println!("blkread: error: no stable device configuration");
        device.fail();
        return Err(FAIL_DEVICE);
    };
    let disk_bytes = capacity.saturating_mul(SECTOR_SIZE);
    let bytes = if bytes == 0 { disk_bytes } else { bytes };
    if bytes > disk_bytes || !bytes.is_multiple_of(SECTOR_SIZE) || bytes == 0 {
        println!(
            "blkread: error: bytes={bytes} must be a non-zero multiple of 512, at most the disk's {disk_bytes}"
        );
        return Err(FAIL_BAD_PARAMETER);
    }
    let Some(mut dma) = Dma::new(ctx.e820, bytes + (1 << 20)) else {
        println!("blkread: error: no usable RAM for {bytes} bytes");
        return Err(FAIL_NO_MEMORY);
    };
    let mut queue = device.setup_queue(0, &mut dma).map_err(fail)?;
    device.driver_ok().map_err(fail)?;
    let table = dma.alloc(SLOT_BYTES * MAX_BATCH as u64, 64).map_err(fail)?;
    let data = dma.alloc(bytes, virtio::dma::PAGE).map_err(fail)?;
    let batch = usize::from(queue.ring.num_free() / 3).clamp(1, MAX_BATCH);
    let size_max = (features & blk::F_SIZE_MAX != 0).then_some(size_max);
    let max = blk::max_request_sectors(size_max, REQUEST_BYTES);

    let mut pending = 0usize;
    let mut chunks = blk::chunks(0, bytes / SECTOR_SIZE, max).peekable();
    while chunks.peek().is_some() || pending > 0 {
        // Fill a batch, kick once, then collect it.
        while pending < batch {
            let Some((sector, sectors)) = chunks.next() else {
                break;
            };
            let slot = table + SLOT_BYTES * pending as u64;
            // SAFETY: slot `pending` of the request table (DMA memory), not in any outstanding chain.
            let head = unsafe { dma_slice(slot, blk::HEADER_LEN + 1) };
            head[..blk::HEADER_LEN].copy_from_slice(&blk::header(blk::T_IN, sector));
            head[blk::HEADER_LEN] = 0xff;
            queue
                .ring
                .add(&[
                    Buffer {
                        addr: slot,
                        len: blk::HEADER_LEN as u32,
                        device_writes: false,
                    },
                    Buffer {
                        addr: data + sector * SECTOR_SIZE,
                        len: (sectors * SECTOR_SIZE) as u32,
                        device_writes: true,
                    },
                    Buffer {
                        addr: slot + blk::HEADER_LEN as u64,
                        len: 1,
                        device_writes: true,
                    },
                ])
                .map_err(|e| fail(e.into()))?;
            pending += 1;
        }
        device.kick(&mut queue);
        for _ in 0..pending {
            device.wait(&mut queue).map_err(fail)?;
        }
        for i in 0..pending {
            let at = table + SLOT_BYTES * i as u64 + blk::HEADER_LEN as u64;
            // SAFETY: the status byte of slot i, written by the device before it returned the chain.
            let status = unsafe { (at as *const u8).read_volatile() };
            if status != blk::S_OK {
                println!(
                    "blkread: error status={status} ({})",
                    blk::status_name(status)
                );
                return Err(FAIL_DEVICE);
            }
        }
        pending = 0;
    }
    // SAFETY: the data buffer; every request on it has completed.
    let sum = blk::checksum(unsafe { dma_slice(data, bytes as usize) });
    println!("blkread: read bytes={bytes} checksum={sum:#018x}");
    if hold_secs > 0 {
        println!("blkread: holding for {hold_secs} s");
    }
    signal::send(SIGNAL_BLKREAD_DONE, sum);
    hold(hold_secs);
    println!("blkread: ok");
    Ok(sum)
}
