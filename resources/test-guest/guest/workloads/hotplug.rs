//! `hotplug sectors=N count=K`: plays the part of ACPI and Linux's acpiphp for the VMM's PCI hotplug
//! controller (the test guest has no AML interpreter, and its interrupts stay off, so it polls).
//!
//! It reads the controller's "added" and "to eject" slot bitmaps (both clear when read) in a loop, waiting
//! in the guest-idle device between polls (the VMM wakes it on every hotplug event). For an added slot it
//! reads the function's header through ECAM; a virtio-blk function is driven at once: first N sectors read
//! and their checksum reported, then the device is reset, so it holds no guest memory while it stays
//! plugged. For a slot to eject it resets the virtio device, turns memory decoding and bus mastering off and
//! writes the slot's bit to the eject register. With K > 0 it ends after K ejections.

use super::Context;
use crate::cmdline::{self, Tokens};
use crate::pci::{self, VIRTIO_TYPE_BLOCK};
use crate::protocol::*;
use crate::serial::println;
use crate::signal;
use crate::virtio::blk::{self, SECTOR_SIZE};
use crate::virtio::mmio::Ecam;
use crate::virtio::ring::Buffer;
use crate::virtio::{self, dma_slice, Device, Dma};

const DEFAULT_SECTORS: u64 = 64;
/// 4 MiB: the most a hot-added disk is read.
const MAX_SECTORS: u64 = 8192;
const REQUEST_BYTES: u64 = 64 << 10;
/// Status value before the device writes one.
const STATUS_UNSET: u8 = 0xff;

fn reg(offset: u64) -> *mut u32 {
    (HOTPLUG_BASE + offset) as *mut u32
}

fn read_reg(offset: u64) -> u32 {
    // SAFETY: a register of the hotplug controller, in the identity-mapped MMIO hole; aligned dword.
    unsafe { reg(offset).read_volatile() }
}

fn write_reg(offset: u64, value: u32) {
    // SAFETY: as for `read_reg`.
    unsafe { reg(offset).write_volatile(value) }
}

fn device_error(e: virtio::Error) -> u64 {
    println!("hotplug: error: {e}");
    FAIL_DEVICE
}

/// Reads sectors [0, min(N, capacity)) of the virtio-blk function in `slot` and returns (sectors read,
/// checksum). The device is reset afterwards whatever happened, so its memory can be reused.
fn read_disk(ctx: &Context<'_>, slot: u8, sectors: u64) -> Result<(u64, u64), u64> {
    let Some(mut dma) = Dma::new(ctx.e820, sectors * SECTOR_SIZE + (64 << 10)) else {
        println!("hotplug: error: no usable RAM for {sectors} sectors of buffers");
        return Err(FAIL_NO_MEMORY);
    };
    let mut device = Device::open(slot, 0).map_err(device_error)?;
    let result = drive_disk(&mut device, &mut dma, sectors);
    device.reset();
    result
}

fn drive_disk(device: &mut Device, dma: &mut Dma, sectors: u64) -> Result<(u64, u64), u64> {
    let features = device.init(blk::F_SIZE_MAX).map_err(device_error)?;
    let Some((capacity, size_max)) = device.read_config(|c| {
        (
            c.read64(blk::CONFIG_CAPACITY),
            c.read32(blk::CONFIG_SIZE_MAX),
        )
    }) else {
        println!("hotplug: error: no stable device configuration");
        return Err(FAIL_DEVICE);
    };
    let mut queue = device.setup_queue(0, dma).map_err(device_error)?;
    device.driver_ok().map_err(device_error)?;
    let count = sectors.min(capacity);
    let request = dma.alloc(32, 64).map_err(device_error)?;
    let data = dma
        .alloc(count.max(1) * SECTOR_SIZE, virtio::dma::PAGE)
        .map_err(device_error)?;
    let size_max = (features & blk::F_SIZE_MAX != 0).then_some(size_max);
    let max = blk::max_request_sectors(size_max, REQUEST_BYTES);
    for (sector, n) in blk::chunks(0, count, max) {
        // SAFETY: the request slot (DMA memory); no chain in flight uses it.
        let bytes = unsafe { dma_slice(request, blk::HEADER_LEN + 1) };
        bytes[..blk::HEADER_LEN].copy_from_slice(&blk::header(blk::T_IN, sector));
        bytes[blk::HEADER_LEN] = STATUS_UNSET;
        let chain = [
            Buffer {
                addr: request,
                len: blk::HEADER_LEN as u32,
                device_writes: false,
            },
            Buffer {
                addr: data + sector * SECTOR_SIZE,
                len: (n * SECTOR_SIZE) as u32,
                device_writes: true,
            },
            Buffer {
                addr: request + blk::HEADER_LEN as u64,
                len: 1,
                device_writes: true,
            },
        ];
        device.transact(&mut queue, &chain).map_err(device_error)?;
        // SAFETY: the status byte, written by the device before it returned the chain.
        let status = unsafe { ((request + blk::HEADER_LEN as u64) as *const u8).read_volatile() };
        if status != blk::S_OK {
            println!(
                "hotplug: error: read of sector {sector} answered {status} ({})",
                blk::status_name(status)
            );
            return Err(FAIL_DEVICE);
        }
    }
    // SAFETY: the data buffer; every request on it has completed.
    let sum = blk::checksum(unsafe { dma_slice(data, (count * SECTOR_SIZE) as usize) });
    Ok((count, sum))
}

/// A device appeared in `slot`: name it, and read it if it is a disk.
fn added(ctx: &Context<'_>, slot: u8, sectors: u64) -> Result<(), u64> {
    let cfg = Ecam::new(slot, 0);
    let Some(header) = pci::read_header(&cfg) else {
        println!("hotplug: added slot={slot} empty");
        return Ok(());
    };
    println!(
        "hotplug: added slot={slot} {:04x}:{:04x} {}",
        header.vendor,
        header.device,
        pci::describe(&header)
    );
    signal::send(SIGNAL_HOTPLUG_ADDED, u64::from(slot));
    if pci::virtio_type(&header) == Some(VIRTIO_TYPE_BLOCK) {
        let (count, sum) = read_disk(ctx, slot, sectors)?;
        println!("hotplug: slot={slot} read sectors={count} checksum={sum:#018x}");
        signal::send(SIGNAL_HOTPLUG_BLK_READ, sum);
    }
    Ok(())
}

/// The VMM wants `slot` back: quiesce the function, then eject it.
fn eject(slot: u8) -> Result<(), u64> {
    let cfg = Ecam::new(slot, 0);
    match pci::read_header(&cfg) {
        Some(header) if pci::virtio_type(&header).is_some() => {
            let device = Device::open(slot, 0).map_err(device_error)?;
            device.reset();
            pci::disable(&cfg, pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER);
        }
        Some(_) => pci::disable(&cfg, pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER),
        None => println!("hotplug: slot={slot} is already empty"),
    }
    write_reg(HOTPLUG_REG_EJECT, 1 << slot);
    let gone = pci::read_header(&cfg).is_none();
    println!(
        "hotplug: ejected slot={slot}{}",
        if gone { "" } else { " (still present!)" }
    );
    if !gone {
        return Err(FAIL_DEVICE);
    }
    signal::send(SIGNAL_HOTPLUG_EJECTED, u64::from(slot));
    Ok(())
}

/// Ok(number of ejections).
pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let bad = |e| {
        println!("hotplug: error: {e}");
        FAIL_BAD_PARAMETER
    };
    let sectors = cmdline::param_u64(params.clone(), "sectors", DEFAULT_SECTORS).map_err(bad)?;
    let count = cmdline::param_u64(params, "count", 0).map_err(bad)?;
    if sectors == 0 || sectors > MAX_SECTORS {
        println!("hotplug: error: sectors={sectors} must be between 1 and {MAX_SECTORS}");
        return Err(FAIL_BAD_PARAMETER);
    }
    if read_reg(HOTPLUG_REG_MAGIC) != HOTPLUG_MAGIC {
        println!("hotplug: error: no hotplug controller at {HOTPLUG_BASE:#x}");
        return Err(FAIL_NO_DEVICE);
    }
    println!(
        "hotplug: controller v{} at {HOTPLUG_BASE:#x}, slots present {:#x}",
        read_reg(HOTPLUG_REG_VERSION),
        read_reg(HOTPLUG_REG_SLOTS_PRESENT)
    );
    signal::send(SIGNAL_READY, WORKLOAD_ID_HOTPLUG);
    let mut ejected = 0u64;
    loop {
        let added_slots = read_reg(HOTPLUG_REG_SLOTS_ADDED);
        let to_eject = read_reg(HOTPLUG_REG_SLOTS_TO_EJECT);
        for slot in 1..pci::DEVICES_PER_BUS {
            if added_slots & (1 << slot) != 0 {
                added(ctx, slot, sectors)?;
            }
        }
        for slot in 1..pci::DEVICES_PER_BUS {
            if to_eject & (1 << slot) != 0 {
                eject(slot)?;
                ejected += 1;
            }
        }
        if count != 0 && ejected >= count {
            println!("hotplug: ok ejected={ejected}");
            return Ok(ejected);
        }
        if added_slots == 0 && to_eject == 0 {
            signal::idle();
        }
    }
}
