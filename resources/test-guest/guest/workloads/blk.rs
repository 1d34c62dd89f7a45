//! `blk sectors=N seed=S write=on|off`: drives the first virtio-blk device on PCI bus 0.
//!
//! Reads the capacity and the serial (GET_ID), reads sectors [0, N) and prints their checksum
//! (`virtio::blk::checksum`, so a host test computes the same over the image file); with `write=on`, writes
//! the seeded pattern (`virtio::blk::fill_pattern`) over sectors [N, 2N), flushes, reads them back and
//! verifies. Requests are at most 64 KiB each and go out in batches with one notification per batch.

use super::Context;
use crate::cmdline::{self, Token, Tokens};
use crate::pci::VIRTIO_TYPE_BLOCK;
use crate::protocol::*;
use crate::serial::println;
use crate::virtio::blk::{self, SECTOR_SIZE};
use crate::virtio::ring::Buffer;
use crate::virtio::{self, dma_slice, Device, Dma, Queue};

const DEFAULT_SECTORS: u64 = 64;
const DEFAULT_SEED: u64 = 1;
/// 32 MiB: the largest read the workload does.
const MAX_SECTORS: u64 = 65536;
/// Bytes per request (further bounded by the device's size_max).
const REQUEST_BYTES: u64 = 64 << 10;
/// Requests in flight at most (each takes 3 descriptors).
const MAX_BATCH: usize = 64;
/// Request table entry: 16-byte header, then the status byte.
const SLOT_BYTES: u64 = 32;
/// Status value before the device writes one: not a valid status, so an unwritten one shows.
const STATUS_UNSET: u8 = 0xff;

#[derive(Clone, Copy, Default)]
struct Request {
    kind: u32,
    sector: u64,
    /// Data buffer (0 bytes: no data descriptor, as for FLUSH).
    data: u64,
    len: u32,
}

struct Blk {
    device: Device,
    queue: Queue,
    /// MAX_BATCH request slots.
    table: u64,
    batch: usize,
}

fn device_error(e: virtio::Error) -> u64 {
    println!("blk: error: {e}");
    FAIL_DEVICE
}

impl Blk {
    /// Submits `reqs` (at most `self.batch`) at once, waits for all, checks every status.
    fn run(&mut self, reqs: &[Request]) -> Result<(), u64> {
        for (i, r) in reqs.iter().enumerate() {
            let slot = self.table + SLOT_BYTES * i as u64;
            // SAFETY: slot i of the request table (DMA memory); the device holds no chain that uses it.
            let bytes = unsafe { dma_slice(slot, blk::HEADER_LEN + 1) };
            bytes[..blk::HEADER_LEN].copy_from_slice(&blk::header(r.kind, r.sector));
            bytes[blk::HEADER_LEN] = STATUS_UNSET;
            let header = Buffer {
                addr: slot,
                len: blk::HEADER_LEN as u32,
                device_writes: false,
            };
            let data = Buffer {
                addr: r.data,
                len: r.len,
                device_writes: r.kind != blk::T_OUT,
            };
            let status = Buffer {
                addr: slot + blk::HEADER_LEN as u64,
                len: 1,
                device_writes: true,
            };
            let added = if r.len == 0 {
                self.queue.ring.add(&[header, status])
            } else {
                self.queue.ring.add(&[header, data, status])
            };
            added.map_err(|e| device_error(e.into()))?;
        }
        self.device.kick(&mut self.queue);
        for _ in reqs {
            self.device.wait(&mut self.queue).map_err(device_error)?;
        }
        for (i, r) in reqs.iter().enumerate() {
            let at = self.table + SLOT_BYTES * i as u64 + blk::HEADER_LEN as u64;
            // SAFETY: the status byte of slot i, written by the device before it returned the chain.
            let status = unsafe { (at as *const u8).read_volatile() };
            if status != blk::S_OK {
                println!(
                    "blk: error status={status} ({}) type={} sector={}",
                    blk::status_name(status),
                    r.kind,
                    r.sector
                );
                return Err(FAIL_DEVICE);
            }
        }
        Ok(())
    }

    /// `kind` (IN or OUT) over `count` sectors from `first`, data at `data`, in batches of requests.
    fn io(&mut self, kind: u32, first: u64, count: u64, data: u64, max: u64) -> Result<(), u64> {
        let mut batch = [Request::default(); MAX_BATCH];
        let mut n = 0;
        for (sector, sectors) in blk::chunks(first, count, max) {
            batch[n] = Request {
                kind,
                sector,
                data: data + (sector - first) * SECTOR_SIZE,
                len: (sectors * SECTOR_SIZE) as u32,
            };
            n += 1;
            if n == self.batch {
                self.run(&batch[..n])?;
                n = 0;
            }
        }
        if n > 0 {
            self.run(&batch[..n])?;
        }
        Ok(())
    }
}

fn params(params: Tokens<'_>) -> Result<(u64, u64, bool), u64> {
    let bad = |e| {
        println!("blk: error: {e}");
        FAIL_BAD_PARAMETER
    };
    let sectors = cmdline::param_u64(params.clone(), "sectors", DEFAULT_SECTORS).map_err(bad)?;
    let seed = cmdline::param_u64(params.clone(), "seed", DEFAULT_SEED).map_err(bad)?;
    let mut write = false;
    for token in params {
        if let Token::KeyValue("write", v) = token {
            write = match v {
                "on" | "1" | "yes" => true,
                "off" | "0" | "no" => false,
                _ => {
                    println!("blk: error: write={v} must be on or off");
                    return Err(FAIL_BAD_PARAMETER);
                }
            };
        }
    }
    if sectors == 0 || sectors > MAX_SECTORS {
        println!("blk: error: sectors={sectors} must be between 1 and {MAX_SECTORS}");
        return Err(FAIL_BAD_PARAMETER);
    }
    Ok((sectors, seed, write))
}

/// Ok(checksum of sectors [0, N)), or with mode=rand4k|seq1m|randw4k the benchmark's elapsed ns.
pub fn run(ctx: &Context<'_>, tokens: Tokens<'_>) -> Result<u64, u64> {
    let bench = bench_params(tokens.clone())?;
    let (sectors, seed, write) = params(tokens)?;
    let Some((dev, func, _)) = virtio::find(VIRTIO_TYPE_BLOCK) else {
        println!("blk: error: no virtio-blk device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    let bytes = if bench.is_some() {
        BENCH_BUFFER
    } else {
        sectors * SECTOR_SIZE
    };
    // Rings, the request table and the id buffer fit in 64 KiB; then the data buffer.
    let Some(mut dma) = Dma::new(ctx.e820, bytes + (64 << 10)) else {
        println!("blk: error: no usable RAM for {sectors} sectors of buffers");
        return Err(FAIL_NO_MEMORY);
    };
    let mut device = Device::open(dev, func).map_err(device_error)?;
    let wanted = blk::F_RO | blk::F_BLK_SIZE | blk::F_FLUSH | blk::F_SIZE_MAX | blk::F_SEG_MAX;
    let features = device.init(wanted).map_err(device_error)?;
    let Some((capacity, size_max)) = device.read_config(|c| {
        (
            c.read64(blk::CONFIG_CAPACITY),
            c.read32(blk::CONFIG_SIZE_MAX),
        )
    }) else {
        println!("blk: error: no stable device configuration");
        device.fail();
        return Err(FAIL_DEVICE);
    };
    let ro = features & blk::F_RO != 0;
    println!("blk: capacity={capacity} ro={}", u8::from(ro));
    let queue = device.setup_queue(0, &mut dma).map_err(device_error)?;
    device.driver_ok().map_err(device_error)?;
    let table = dma
        .alloc(SLOT_BYTES * MAX_BATCH as u64, 64)
        .map_err(device_error)?;
    let id = dma.alloc(blk::ID_BYTES as u64, 64).map_err(device_error)?;
    let data = dma.alloc(bytes, virtio::dma::PAGE).map_err(device_error)?;
    let batch = usize::from(queue.ring.num_free() / 3).clamp(1, MAX_BATCH);
    let mut disk = Blk {
        device,
        queue,
        table,
        batch,
    };
    let size_max = (features & blk::F_SIZE_MAX != 0).then_some(size_max);
    let max = blk::max_request_sectors(size_max, REQUEST_BYTES);

    disk.run(&[Request {
        kind: blk::T_GET_ID,
        sector: 0,
        data: id,
        len: blk::ID_BYTES as u32,
    }])?;
    // SAFETY: the id buffer, returned by the device.
    let serial = blk::id_str(unsafe { dma_slice(id, blk::ID_BYTES) });
    println!("blk: id={serial}");

    if let Some((mode, count)) = bench {
        return run_bench(&mut disk, mode, count, capacity, ro, data, max);
    }
    let needed = if write { 2 * sectors } else { sectors };
    if needed > capacity {
        println!("blk: error: {needed} sectors needed, the disk has {capacity}");
        return Err(FAIL_BAD_PARAMETER);
    }
    disk.io(blk::T_IN, 0, sectors, data, max)?;
    // SAFETY: the data buffer; every request on it has completed.
    let sum = blk::checksum(unsafe { dma_slice(data, bytes as usize) });
    println!("blk: read sectors={sectors} checksum={sum:#018x}");

    if write {
        if ro {
            println!("blk: error: write=on but the device is read-only");
            return Err(FAIL_BAD_PARAMETER);
        }
        let offset = sectors * SECTOR_SIZE;
        // SAFETY: as above.
        blk::fill_pattern(seed, offset, unsafe { dma_slice(data, bytes as usize) });
        disk.io(blk::T_OUT, sectors, sectors, data, max)?;
        if features & blk::F_FLUSH != 0 {
            disk.run(&[Request {
                kind: blk::T_FLUSH,
                ..Request::default()
            }])?;
        } else {
            println!("blk: flush not offered, skipped");
        }
        // SAFETY: as above.
        unsafe { dma_slice(data, bytes as usize) }.fill(0);
        disk.io(blk::T_IN, sectors, sectors, data, max)?;
        // SAFETY: as above.
        let back = unsafe { dma_slice(data, bytes as usize) };
        if let Some(at) = blk::pattern_mismatch(seed, offset, back) {
            println!(
                "blk: MISMATCH at byte {} (sector {}) after write and read-back",
                offset + at as u64,
                (offset + at as u64) / SECTOR_SIZE
            );
            return Err(FAIL_MISMATCH);
        }
        println!("blk: write ok");
    }
    println!("blk: ok");
    Ok(sum)
}

/// Data buffer of the benchmark modes: room for a batch of 4 KiB requests or one 1 MiB read.
const BENCH_BUFFER: u64 = 1 << 20;
const BENCH_MAX_COUNT: u64 = 1 << 24;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 4 KiB reads at random 4 KiB-aligned offsets, a batch of them in flight.
    Rand4k,
    /// 1 MiB sequential reads (wrapping at the end of the disk), one 1 MiB read per batch.
    Seq1m,
    /// 4 KiB writes at random offsets (with the seed's pattern; the disk is scratch).
    RandW4k,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Rand4k => "rand4k",
            Mode::Seq1m => "seq1m",
            Mode::RandW4k => "randw4k",
        }
    }
}

/// `mode=` and `count=` (number of 4 KiB requests, or of MiB for seq1m); None for the default `check`.
fn bench_params(params: Tokens<'_>) -> Result<Option<(Mode, u64)>, u64> {
    let mut mode = None;
    for token in params.clone() {
        if let Token::KeyValue("mode", v) = token {
            mode = match v {
                "check" => None,
                "rand4k" => Some(Mode::Rand4k),
                "seq1m" => Some(Mode::Seq1m),
                "randw4k" => Some(Mode::RandW4k),
                _ => {
                    println!("blk: error: mode={v} must be check, rand4k, seq1m or randw4k");
                    return Err(FAIL_BAD_PARAMETER);
                }
            };
        }
    }
    let count = cmdline::param_u64(params, "count", 1000).map_err(|e| {
        println!("blk: error: {e}");
        FAIL_BAD_PARAMETER
    })?;
    if count == 0 || count > BENCH_MAX_COUNT {
        println!("blk: error: count={count} must be between 1 and {BENCH_MAX_COUNT}");
        return Err(FAIL_BAD_PARAMETER);
    }
    Ok(mode.map(|m| (m, count)))
}

/// xorshift64: the random offsets.
fn next_random(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Runs `count` requests of `mode`, timed with the host clock; prints
/// `blk: bench mode=M count=N bytes=B ns=T` and returns T.
fn run_bench(
    disk: &mut Blk,
    mode: Mode,
    count: u64,
    capacity: u64,
    ro: bool,
    data: u64,
    max: u64,
) -> Result<u64, u64> {
    const PAGE_SECTORS: u64 = 4096 / SECTOR_SIZE;
    const MIB_SECTORS: u64 = (1 << 20) / SECTOR_SIZE;
    if mode == Mode::RandW4k && ro {
        println!("blk: error: mode=randw4k on a read-only device");
        return Err(FAIL_BAD_PARAMETER);
    }
    if capacity < MIB_SECTORS {
        println!("blk: error: the benchmark needs at least 1 MiB of disk");
        return Err(FAIL_BAD_PARAMETER);
    }
    let Some(start) = crate::signal::now_ns() else {
        println!("blk: error: the benchmark needs the guest-signal clock");
        return Err(FAIL_DEVICE);
    };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let pages = capacity / PAGE_SECTORS;
    let mut bytes = 0u64;
    match mode {
        Mode::Seq1m => {
            let mibs = capacity / MIB_SECTORS;
            for i in 0..count {
                disk.io(blk::T_IN, (i % mibs) * MIB_SECTORS, MIB_SECTORS, data, max)?;
                bytes += 1 << 20;
            }
        }
        Mode::Rand4k | Mode::RandW4k => {
            let kind = if mode == Mode::Rand4k {
                blk::T_IN
            } else {
                blk::T_OUT
            };
            let per_batch = disk.batch.min((BENCH_BUFFER / 4096) as usize);
            let mut batch = [Request::default(); MAX_BATCH];
            let mut left = count;
            while left > 0 {
                let n = (left as usize).min(per_batch);
                for (i, r) in batch[..n].iter_mut().enumerate() {
                    *r = Request {
                        kind,
                        sector: (next_random(&mut x) % pages) * PAGE_SECTORS,
                        data: data + 4096 * i as u64,
                        len: 4096,
                    };
                }
                disk.run(&batch[..n])?;
                left -= n as u64;
                bytes += 4096 * n as u64;
            }
        }
    }
    let ns = crate::signal::now_ns()
        .unwrap_or(start)
        .saturating_sub(start);
    println!(
        "blk: bench mode={} count={count} bytes={bytes} ns={ns}",
        mode.name()
    );
    println!("blk: ok");
    Ok(ns)
}
