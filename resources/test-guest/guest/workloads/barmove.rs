//! `barmove to=A restore=0|1`: moves BAR 0 of the first virtio-rng device on PCI bus 0 to address A
//! (default 0xd0000000, inside the VMM's BAR window) and uses the device there, as Linux does when it
//! reassigns a BAR: memory decoding off, new address, decoding on.
//!
//! First two moves the VMM must refuse (onto another function's BAR, and outside the window): the BAR must
//! read back its old address. Then the real move: the BAR reads back A, the old range answers nothing
//! (all ones), the virtio capabilities are mapped again at the new address and the device is brought up
//! there. A notification written at the old notify address must not reach the device (no stale
//! ioeventfd); one at the new address must. With restore=1 the guest then waits for a restore (a new
//! generation ID) and uses the same queue again, without re-initialising: the restored VMM must decode the
//! BAR, and deliver notifications, at the moved address.

use super::Context;
use crate::cmdline::{self, Tokens};
use crate::pci::{self, ConfigSpace, VIRTIO_TYPE_RNG};
use crate::protocol::*;
use crate::serial::println;
use crate::signal;
use crate::virtio::caps::{self, COMMON_NUM_QUEUES};
use crate::virtio::mmio::{Ecam, Regs};
use crate::virtio::ring::Buffer;
use crate::virtio::{self, dma_slice, Device, Dma, Queue};

const DEFAULT_TO: u64 = 0xd000_0000;
/// Outside the VMM's BAR window [0xc0000000, 0xe0000000) but inside the guest's uncached MMIO hole.
const OUTSIDE_WINDOW: u64 = 0xf000_0000;
const RNG_BYTES: u32 = 32;
/// How long a notification at the old address gets to (wrongly) reach the device.
const STALE_WAIT_NS: u64 = 50_000_000;
/// Without a clock, polls of the used ring instead.
const STALE_WAIT_POLLS: u64 = 1 << 20;
/// Time for the device to go back to waiting for notifications after a request: a device may look at
/// the ring again without one (virtio 1.2 §2.7.10), right after it returned a buffer.
const SETTLE_NS: u64 = 20_000_000;

fn fail(what: &str) -> u64 {
    println!("barmove: error: {what}");
    FAIL_DEVICE
}

fn device_error(e: virtio::Error) -> u64 {
    println!("barmove: error: rng: {e}");
    FAIL_DEVICE
}

/// BAR 0's address as its registers say.
fn bar0(cfg: &Ecam) -> Option<u64> {
    match pci::read_bar(cfg, 0) {
        pci::Bar::Memory { addr, .. } => Some(addr),
        _ => None,
    }
}

/// Linux's way: decoding off, the new address (both halves of a 64-bit BAR), decoding on. Returns what
/// the BAR reads back afterwards.
fn program_bar0(cfg: &Ecam, addr: u64) -> Option<u64> {
    let is_64 = matches!(pci::read_bar(cfg, 0), pci::Bar::Memory { is_64: true, .. });
    pci::disable(cfg, pci::COMMAND_MEMORY);
    let low = cfg.read32(pci::REG_BAR0) & 0xf;
    cfg.write32(pci::REG_BAR0, addr as u32 & !0xf | low);
    if is_64 {
        cfg.write32(pci::REG_BAR0 + 4, (addr >> 32) as u32);
    }
    pci::enable(cfg, pci::COMMAND_MEMORY);
    bar0(cfg)
}

/// BAR 0 of the first function other than (`dev`, `func`) with one, to collide with.
fn another_bar(dev: u8, func: u8) -> Option<u64> {
    pci::scan(Ecam::new)
        .filter(|&(d, f, _)| (d, f) != (dev, func))
        .find_map(|(d, f, _)| bar0(&Ecam::new(d, f)).filter(|&a| a != 0))
}

/// One rng request: reads RNG_BYTES into `buf`, checks they are not all zero.
fn read_random(device: &Device, queue: &mut Queue, buf: u64) -> Result<(), u64> {
    // SAFETY: `buf` is a DMA allocation of RNG_BYTES; no chain of ours is in flight.
    let bytes = unsafe { dma_slice(buf, RNG_BYTES as usize) };
    bytes.fill(0);
    let chain = [Buffer {
        addr: buf,
        len: RNG_BYTES,
        device_writes: true,
    }];
    let used = device.transact(queue, &chain).map_err(device_error)?;
    if used.len != RNG_BYTES || bytes.iter().all(|&b| b == 0) {
        return Err(fail("rng returned short or all-zero bytes"));
    }
    Ok(())
}

/// Ok(the new BAR address).
pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let param = |key, default| {
        cmdline::param_u64(params.clone(), key, default).map_err(|e| {
            println!("barmove: error: {e}");
            FAIL_BAD_PARAMETER
        })
    };
    let (to, restore) = (param("to", DEFAULT_TO)?, param("restore", 0)?);
    if restore > 1 {
        println!("barmove: error: restore={restore} must be 0 or 1");
        return Err(FAIL_BAD_PARAMETER);
    }
    let mut generation = signal::generation();
    let Some((dev, func, _)) = virtio::find(VIRTIO_TYPE_RNG) else {
        println!("barmove: error: no virtio-rng device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    let cfg = Ecam::new(dev, func);
    let layout = caps::parse(&cfg).map_err(|e| {
        println!("barmove: error: capabilities: {e}");
        FAIL_DEVICE
    })?;
    let Some(old) = bar0(&cfg).filter(|&a| a != 0) else {
        return Err(fail("BAR 0 is not an assigned memory BAR"));
    };
    pci::disable(&cfg, pci::COMMAND_MEMORY);
    let size = pci::size_memory_bar(&cfg, 0);
    pci::enable(&cfg, pci::COMMAND_MEMORY);
    if size == 0 || !to.is_multiple_of(size) || to == old {
        println!("barmove: error: to={to:#x} is not a new, {size:#x}-aligned address");
        return Err(FAIL_BAD_PARAMETER);
    }
    println!("barmove: 00:{dev:02x}.{func} bar0={old:#x} size={size:#x}");

    // Moves the VMM must refuse: the BAR stays, and its registers say so.
    let mut refused = [OUTSIDE_WINDOW, 0];
    if let Some(other) = another_bar(dev, func) {
        refused[1] = other;
    }
    for bad in refused.into_iter().filter(|&a| a != 0) {
        let now = program_bar0(&cfg, bad);
        if now != Some(old) {
            println!("barmove: error: a move to {bad:#x} left BAR 0 at {now:x?}, not {old:#x}");
            return Err(FAIL_DEVICE);
        }
        println!("barmove: refused to={bad:#x} kept={old:#x}");
    }

    // The move.
    let now = program_bar0(&cfg, to);
    if now != Some(to) {
        println!("barmove: error: BAR 0 reads {now:x?} after the move to {to:#x}");
        return Err(FAIL_DEVICE);
    }
    let stale = Regs { base: old }.read16(COMMON_NUM_QUEUES);
    if stale != 0xffff {
        println!("barmove: error: the old BAR address still answers ({stale:#x})");
        return Err(FAIL_DEVICE);
    }
    // The driver starts over at the new address: capabilities mapped there, device initialised there.
    let Some(mut dma) = Dma::new(ctx.e820, 64 << 10) else {
        println!("barmove: error: no usable RAM for the virtqueue");
        return Err(FAIL_NO_MEMORY);
    };
    let mut device = Device::open(dev, func).map_err(device_error)?;
    device.init(0).map_err(device_error)?;
    let mut queue = device.setup_queue(0, &mut dma).map_err(device_error)?;
    device.driver_ok().map_err(device_error)?;
    let buf = dma.alloc(u64::from(RNG_BYTES), 64).map_err(device_error)?;
    read_random(&device, &mut queue, buf)?;

    // A notification at the old notify address reaches nothing; at the new one, the device.
    let Some(notify) = caps::notify_offset(&layout, 0) else {
        return Err(fail("queue 0 has no notify address"));
    };
    let notify = u64::from(layout.notify.offset) + notify;
    let settle = signal::now_ns().map(|t| t + SETTLE_NS);
    let mut polls = 0u64;
    while settle.is_some_and(|end| signal::now_ns().is_some_and(|t| t < end)) || polls < 1 << 16 {
        polls += 1;
        core::hint::spin_loop();
    }
    queue
        .ring
        .add(&[Buffer {
            addr: buf,
            len: RNG_BYTES,
            device_writes: true,
        }])
        .map_err(|e| device_error(e.into()))?;
    queue.ring.publish();
    Regs { base: old + notify }.write16(0, queue.index);
    let start = signal::now_ns();
    let mut polls = 0u64;
    loop {
        if queue
            .ring
            .poll_used()
            .map_err(|e| device_error(e.into()))?
            .is_some()
        {
            return Err(fail(
                "a notification at the old BAR address reached the device",
            ));
        }
        polls += 1;
        let waited = match (start, signal::now_ns()) {
            (Some(t0), Some(now)) => now.saturating_sub(t0) > STALE_WAIT_NS,
            _ => polls > STALE_WAIT_POLLS,
        };
        if waited {
            break;
        }
        core::hint::spin_loop();
    }
    Regs { base: to + notify }.write16(0, queue.index);
    device.wait(&mut queue).map_err(device_error)?;
    println!("barmove: moved from={old:#x} to={to:#x} rng=ok old-notify=ignored");
    if restore == 0 {
        println!("barmove: ok");
        return Ok(to);
    }

    println!("barmove: ready");
    signal::send(SIGNAL_BARMOVE_READY, to);
    while signal::generation() == generation {
        signal::idle();
    }
    generation = signal::generation();
    // A restored copy: same queue, same BAR, nothing initialised again.
    let now = bar0(&cfg);
    if now != Some(to) {
        println!("barmove: error: after the restore BAR 0 reads {now:x?}, not {to:#x}");
        return Err(FAIL_DEVICE);
    }
    read_random(&device, &mut queue, buf)?;
    println!("barmove: restored generation={generation:#034x} bar0={to:#x} rng=ok");
    println!("barmove: ok");
    Ok(to)
}
