//! A virtio-pci (modern, virtio 1.2 §4.1) driver for the test guest: finds a device on bus 0, maps its
//! structures from the vendor capabilities, negotiates features, sets up split virtqueues in guest RAM and
//! completes requests by polling the used ring (the guest runs with interrupts off, so MSI-X stays
//! disabled and every vector is VIRTIO_MSI_NO_VECTOR).
//!
//! Cost model: each register access is an MMIO exit (~30 us), ring memory is plain RAM. Requests are
//! batched (one notification per batch) and completion polls the used index in RAM with `pause`.
//!
//! Submodules marked "shared" are pure logic that ../src/lib.rs also compiles for host-side tests.

#[allow(dead_code)]
pub mod blk;
#[allow(dead_code)]
pub mod caps;
#[allow(dead_code)]
pub mod console;
#[allow(dead_code)]
pub mod dma;
pub mod mmio;
#[allow(dead_code)]
pub mod net;
pub mod pmem;
#[allow(dead_code)]
pub mod ring;
#[allow(dead_code)]
pub mod vsock;

use crate::e820;
use crate::pci::{self, Header};
use crate::protocol::GUEST_IDENTITY_MAP_END;
use crate::signal;
use caps::*;
use dma::Arena;
use mmio::{Ecam, Regs};
use ring::{Buffer, Layout, RingMemory, SplitQueue, Used};

/// Start of the 32-bit MMIO hole: device-visible RAM lies below it, BARs inside it.
const MMIO_HOLE_START: u64 = 0xc000_0000;
/// How long a request may take before the driver gives up.
const REQUEST_TIMEOUT_NS: u64 = 10_000_000_000;
/// Without a clock (no signal device), a bound on polls instead (~seconds of `pause`).
const REQUEST_TIMEOUT_POLLS: u64 = 1 << 28;
/// Polls of RAM between reads of the host clock (each an MMIO exit).
const POLLS_PER_CLOCK_READ: u64 = 1 << 14;
/// Attempts at a consistent read of the device configuration.
const CONFIG_READ_TRIES: u32 = 16;
/// Reads of device_status while waiting for a reset to finish.
const RESET_POLLS: u32 = 1000;

#[derive(Clone, Copy, Debug)]
pub enum Error {
    Caps(CapError),
    /// A capability names a BAR that is not an assigned memory BAR, or a region outside it.
    BadBar {
        bar: u8,
        why: &'static str,
    },
    /// device_status did not read 0 after a reset.
    ResetTimeout(u8),
    /// The device does not offer VIRTIO_F_VERSION_1 (a legacy-only device).
    NotModern,
    /// FEATURES_OK did not stick: the device refused the feature subset.
    FeaturesRefused(u64),
    /// The device has no queue `0` (size 0) or it is already enabled.
    NoQueue(u16),
    /// The queue's notification address lies outside the notify region.
    BadNotifyOffset(u16),
    /// No RAM left for rings or buffers.
    NoMemory(u64),
    Queue(ring::QueueError),
    /// No used element within the timeout.
    Timeout,
    /// The device set DEVICE_NEEDS_RESET or FAILED.
    DeviceStatus(u8),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Caps(e) => write!(f, "capabilities: {e}"),
            Error::BadBar { bar, why } => write!(f, "BAR {bar}: {why}"),
            Error::ResetTimeout(s) => write!(f, "device_status {s:#x} after reset, expected 0"),
            Error::NotModern => f.write_str("device does not offer VIRTIO_F_VERSION_1"),
            Error::FeaturesRefused(fs) => write!(f, "device refused features {fs:#x}"),
            Error::NoQueue(q) => write!(f, "queue {q} is not available"),
            Error::BadNotifyOffset(q) => write!(f, "queue {q}: notify address outside its region"),
            Error::NoMemory(len) => write!(f, "no RAM left for {len} bytes of device memory"),
            Error::Queue(e) => write!(f, "virtqueue: {e}"),
            Error::Timeout => f.write_str("no completion within 10 s"),
            Error::DeviceStatus(s) => write!(f, "device status {s:#x} (needs reset / failed)"),
        }
    }
}

impl From<ring::QueueError> for Error {
    fn from(e: ring::QueueError) -> Self {
        Error::Queue(e)
    }
}

/// The first virtio function of `kind` on bus 0: (device, function, header).
pub fn find(kind: u16) -> Option<(u8, u8, Header)> {
    pci::scan(Ecam::new).find(|(_, _, h)| pci::virtio_type(h) == Some(kind))
}

/// Device-visible memory: a bump arena in usable RAM above the image, zeroed on allocation.
pub struct Dma {
    arena: Arena,
}

impl Dma {
    /// Claims `len` bytes of usable RAM above the image and below the MMIO hole.
    pub fn new(map: &e820::Map, len: u64) -> Option<Dma> {
        Self::new_above(map, 0, len)
    }

    /// Like [`Dma::new`], at or above `min`: for a second arena beside one claimed with `new`.
    pub fn new_above(map: &e820::Map, min: u64, len: u64) -> Option<Dma> {
        let image_end = crate::image_range().1;
        let base = map.find_usable(image_end.max(min), len, MMIO_HOLE_START)?;
        Some(Dma {
            arena: Arena::new(base, len),
        })
    }

    /// `len` zeroed bytes at `align`; returns the guest-physical (= virtual) address.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, Error> {
        let addr = self.arena.alloc(len, align).ok_or(Error::NoMemory(len))?;
        // SAFETY: [addr, addr + len) is inside the usable RAM this arena owns (checked against e820 in
        // `new`), identity-mapped, and handed out once.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
        Ok(addr)
    }
}

/// A byte slice over DMA memory.
///
/// # Safety
/// `[addr, addr + len)` must come from `Dma::alloc` and not be aliased by another live slice.
pub unsafe fn dma_slice<'a>(addr: u64, len: usize) -> &'a mut [u8] {
    core::slice::from_raw_parts_mut(addr as *mut u8, len)
}

/// Ring memory in guest RAM, accessed with volatile loads and stores (the device reads and writes it
/// concurrently from a host thread).
pub struct RawRing {
    base: u64,
}

impl RawRing {
    fn ptr<T>(&self, offset: u64) -> *mut T {
        (self.base + offset) as *mut T
    }
}

// SAFETY (all methods): `base` is a DMA allocation of the queue layout's size and offsets come from that
// layout; the fields are naturally aligned.
impl RingMemory for RawRing {
    fn read_u16(&self, offset: u64) -> u16 {
        // SAFETY: see above.
        unsafe { self.ptr::<u16>(offset).read_volatile() }
    }
    fn read_u32(&self, offset: u64) -> u32 {
        // SAFETY: see above.
        unsafe { self.ptr::<u32>(offset).read_volatile() }
    }
    fn write_u16(&mut self, offset: u64, value: u16) {
        // SAFETY: see above.
        unsafe { self.ptr::<u16>(offset).write_volatile(value) }
    }
    fn write_u32(&mut self, offset: u64, value: u32) {
        // SAFETY: see above.
        unsafe { self.ptr::<u32>(offset).write_volatile(value) }
    }
    fn write_u64(&mut self, offset: u64, value: u64) {
        // SAFETY: see above.
        unsafe { self.ptr::<u64>(offset).write_volatile(value) }
    }
}

/// One set-up virtqueue.
pub struct Queue {
    pub index: u16,
    pub ring: SplitQueue<RawRing>,
    notify: u64,
}

/// A virtio-pci device being driven.
pub struct Device {
    common: Regs,
    device_cfg: Option<(Regs, u32)>,
    notify_base: u64,
    layout: caps::Layout,
    /// Features both sides agreed on.
    pub features: u64,
}

/// The identity-mapped address of `region`, checked against BAR `region.bar`'s address and size.
fn map_region(
    bars: &[Option<(u64, u64)>; pci::NUM_BARS as usize],
    region: &Region,
) -> Result<Regs, Error> {
    let bad = |why| Error::BadBar {
        bar: region.bar,
        why,
    };
    let (addr, size) = bars[usize::from(region.bar)].ok_or(bad("not an assigned memory BAR"))?;
    if region.end() > size {
        return Err(bad("capability region extends past the BAR"));
    }
    let base = addr + u64::from(region.offset);
    // The guest maps [3 GiB, 4 GiB) uncached; a BAR anywhere else would alias RAM or be unmapped.
    if base < MMIO_HOLE_START || base + u64::from(region.length) > GUEST_IDENTITY_MAP_END {
        return Err(bad("region outside the 32-bit MMIO hole"));
    }
    Ok(Regs { base })
}

impl Device {
    /// Maps the device's structures and turns on memory decoding and bus mastering. Does not touch the
    /// device's status yet.
    pub fn open(device: u8, function: u8) -> Result<Device, Error> {
        let cfg = Ecam::new(device, function);
        let layout = caps::parse(&cfg).map_err(Error::Caps)?;
        // Size only the BARs the capabilities use, with decoding off while a BAR holds all-ones.
        pci::disable(&cfg, pci::COMMAND_MEMORY);
        let mut bars = [None; pci::NUM_BARS as usize];
        let regions = [
            Some(layout.common),
            Some(layout.notify),
            Some(layout.isr),
            layout.device,
        ];
        for region in regions.iter().flatten() {
            let i = usize::from(region.bar);
            if bars[i].is_some() {
                continue;
            }
            if let pci::Bar::Memory { addr, .. } = pci::read_bar(&cfg, region.bar) {
                let size = pci::size_memory_bar(&cfg, region.bar);
                if addr != 0 && size != 0 {
                    bars[i] = Some((addr, size));
                }
            }
        }
        // No INTx either: completions are polled.
        pci::enable(
            &cfg,
            pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER | pci::COMMAND_INTX_DISABLE,
        );
        let common = map_region(&bars, &layout.common)?;
        let notify_regs = map_region(&bars, &layout.notify)?;
        // The ISR byte is never read (no interrupts), but a device must still describe it correctly.
        map_region(&bars, &layout.isr)?;
        let device_cfg = match &layout.device {
            Some(r) => Some((map_region(&bars, r)?, r.length)),
            None => None,
        };
        Ok(Device {
            common,
            device_cfg,
            notify_base: notify_regs.base,
            layout,
            features: 0,
        })
    }

    pub fn status(&self) -> u8 {
        self.common.read8(COMMON_DEVICE_STATUS)
    }

    fn set_status(&self, status: u8) {
        self.common.write8(COMMON_DEVICE_STATUS, status);
    }

    /// Resets the device (status 0, §4.1.4.3.1): it stops using its queues and guest memory.
    pub fn reset(&self) {
        self.set_status(0);
    }

    /// Marks the device FAILED (the driver gave up, §3.1.1).
    pub fn fail(&self) {
        self.set_status(self.status() | STATUS_FAILED);
    }

    /// Reset and feature negotiation (§3.1.1 steps 1-6): accepts `wanted & offered | VERSION_1`.
    pub fn init(&mut self, wanted: u64) -> Result<u64, Error> {
        self.set_status(0);
        // §4.1.4.3.2: the reset is done when device_status reads 0.
        let mut status = self.status();
        for _ in 0..RESET_POLLS {
            if status == 0 {
                break;
            }
            core::hint::spin_loop();
            status = self.status();
        }
        if status != 0 {
            return Err(Error::ResetTimeout(status));
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);

        let c = self.common;
        c.write32(COMMON_DEVICE_FEATURE_SELECT, 0);
        let low = c.read32(COMMON_DEVICE_FEATURE);
        c.write32(COMMON_DEVICE_FEATURE_SELECT, 1);
        let high = c.read32(COMMON_DEVICE_FEATURE);
        let offered = (u64::from(high) << 32) | u64::from(low);
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err(Error::NotModern);
        }
        let accepted = offered & (wanted | F_VERSION_1);
        c.write32(COMMON_DRIVER_FEATURE_SELECT, 0);
        c.write32(COMMON_DRIVER_FEATURE, accepted as u32);
        c.write32(COMMON_DRIVER_FEATURE_SELECT, 1);
        c.write32(COMMON_DRIVER_FEATURE, (accepted >> 32) as u32);
        let driver = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        self.set_status(driver | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err(Error::FeaturesRefused(accepted));
        }
        // No configuration-change interrupts: MSI-X is never enabled.
        c.write16(COMMON_CONFIG_MSIX_VECTOR, MSI_NO_VECTOR);
        self.features = accepted;
        Ok(accepted)
    }

    /// Sets up queue `index` (§4.1.5.1.3) with rings from `dma`; the device uses it after `driver_ok`.
    pub fn setup_queue(&mut self, index: u16, dma: &mut Dma) -> Result<Queue, Error> {
        let c = self.common;
        c.write16(COMMON_QUEUE_SELECT, index);
        let max = c.read16(COMMON_QUEUE_SIZE);
        let Some(size) = ring::choose_size(max) else {
            return Err(Error::NoQueue(index));
        };
        if c.read16(COMMON_QUEUE_ENABLE) != 0 {
            return Err(Error::NoQueue(index));
        }
        let notify_off = c.read16(COMMON_QUEUE_NOTIFY_OFF);
        let notify =
            caps::notify_offset(&self.layout, notify_off).ok_or(Error::BadNotifyOffset(index))?;
        let layout = Layout::new(size).ok_or(Error::NoQueue(index))?;
        let base = dma.alloc(layout.total, dma::PAGE)?;
        let ring = SplitQueue::new(RawRing { base }, layout).ok_or(Error::NoQueue(index))?;
        if size != max {
            c.write16(COMMON_QUEUE_SIZE, size);
        }
        c.write16(COMMON_QUEUE_MSIX_VECTOR, MSI_NO_VECTOR);
        c.write64(COMMON_QUEUE_DESC, base + layout.desc);
        c.write64(COMMON_QUEUE_DRIVER, base + layout.avail);
        c.write64(COMMON_QUEUE_DEVICE, base + layout.used);
        c.write16(COMMON_QUEUE_ENABLE, 1);
        Ok(Queue {
            index,
            ring,
            notify: self.notify_base + notify,
        })
    }

    /// DRIVER_OK (§3.1.1 step 8): the device is live.
    pub fn driver_ok(&self) -> Result<(), Error> {
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(status | STATUS_DRIVER_OK);
        self.check_status()
    }

    /// Fails if the device asked for a reset or failed.
    pub fn check_status(&self) -> Result<(), Error> {
        let s = self.status();
        if s & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED) != 0 {
            return Err(Error::DeviceStatus(s));
        }
        Ok(())
    }

    /// Publishes what was added to `queue` and notifies the device (one MMIO write) if anything was new.
    pub fn kick(&self, queue: &mut Queue) {
        if queue.ring.publish() {
            // §4.1.5.2: without VIRTIO_F_NOTIFICATION_DATA the driver writes the queue index (16 bits).
            Regs { base: queue.notify }.write16(0, queue.index);
        }
    }

    /// Waits for the next used element of `queue`, polling the used index in RAM.
    pub fn wait(&self, queue: &mut Queue) -> Result<Used, Error> {
        let start = signal::now_ns();
        let mut polls = 0u64;
        loop {
            if let Some(used) = queue.ring.poll_used()? {
                return Ok(used);
            }
            core::hint::spin_loop();
            polls += 1;
            if polls.is_multiple_of(POLLS_PER_CLOCK_READ) {
                let expired = match (start, signal::now_ns()) {
                    (Some(t0), Some(now)) => now.saturating_sub(t0) > REQUEST_TIMEOUT_NS,
                    _ => polls > REQUEST_TIMEOUT_POLLS,
                };
                if expired {
                    // The device may have given up on the whole queue.
                    self.check_status()?;
                    return Err(Error::Timeout);
                }
            }
        }
    }

    /// Adds one chain, kicks, and waits for it (the simple synchronous path).
    pub fn transact(&self, queue: &mut Queue, buffers: &[Buffer]) -> Result<Used, Error> {
        queue.ring.add(buffers)?;
        self.kick(queue);
        self.wait(queue)
    }

    /// Reads the device configuration with `read`, retrying until config_generation is stable
    /// (§2.5.1: fields wider than 32 bits, or several fields, are not read atomically). `None` if the
    /// device has no configuration structure or it never held still.
    pub fn read_config<T>(&self, read: impl Fn(&DeviceConfig) -> T) -> Option<T> {
        let (regs, len) = self.device_cfg?;
        let cfg = DeviceConfig { regs, len };
        // A device that changes its configuration all the time gets a few tries, not a hang.
        for _ in 0..CONFIG_READ_TRIES {
            let before = self.common.read8(COMMON_CONFIG_GENERATION);
            let value = read(&cfg);
            if self.common.read8(COMMON_CONFIG_GENERATION) == before {
                return Some(value);
            }
        }
        None
    }
}

/// The device-specific configuration structure, bounds-checked against the capability's length.
pub struct DeviceConfig {
    regs: Regs,
    len: u32,
}

impl DeviceConfig {
    fn fits(&self, offset: u64, width: u64) -> bool {
        offset + width <= u64::from(self.len)
    }

    /// A 32-bit field; 0 if outside the structure.
    pub fn read32(&self, offset: u64) -> u32 {
        if self.fits(offset, 4) {
            self.regs.read32(offset)
        } else {
            0
        }
    }

    /// A 64-bit field as two 32-bit reads (§4.1.3.1), low half first.
    pub fn read64(&self, offset: u64) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }
}
