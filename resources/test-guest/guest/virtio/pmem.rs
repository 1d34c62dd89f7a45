//! virtio-pmem (virtio 1.2 §5.19) for the test guest: the device names a guest-physical range holding a
//! host file; the guest maps it into its page tables and loads from it directly. FLUSH asks the host to
//! make earlier writes durable.
//!
//! The range lies in the VMM's 64-bit pmem window (64 GiB and up), outside the 0..4 GiB identity map the
//! boot code builds, so `map_range` extends the page tables at CPL3: the tables are ordinary user-writable
//! pages of the image, and a PDPT entry that was not present cannot be cached by the TLB, so filling one in
//! needs no flush. Each GiB gets a page directory of 2 MiB pages from a small static pool.

use crate::global::Global;
use crate::virtio::ring::Buffer;
use crate::virtio::{self, Device, Dma, Queue};

/// virtio device type (§5.19).
pub const TYPE_PMEM: u16 = 27;
/// struct virtio_pmem_config: le64 start, le64 size.
pub const CONFIG_START: u64 = 0;
pub const CONFIG_SIZE: u64 = 8;
/// Request types and responses (§5.19.6).
pub const REQ_FLUSH: u32 = 0;
pub const RESP_OK: u32 = 0;

const GIB: u64 = 1 << 30;
const PAGE_2M: u64 = 2 << 20;
/// The boot PML4's first entry covers 512 GiB, all the window this driver maps.
const MAPPABLE_END: u64 = 512 * GIB;
/// GiBs below this are the boot identity map (RAM and the MMIO hole).
const IDENTITY_GIBS: u64 = 4;
/// Page directories for at most this many GiB of pmem ranges.
const POOL_PDS: usize = 8;
/// Present | writable | user | 2 MiB page (write-back cached).
const PDE_2M: u64 = 0x87;
/// Present | writable | user.
const PDPTE_TABLE: u64 = 0x7;

#[repr(C, align(4096))]
struct PageTable([u64; 512]);

/// Page directories handed out to pmem ranges, in .bss (zeroed at start).
static mut PD_POOL: [PageTable; POOL_PDS] = [const { PageTable([0; 512]) }; POOL_PDS];
static PDS_USED: Global<usize> = Global::new(0);

extern "C" {
    /// The boot page-directory-pointer table (boot.rs): entry i maps GiB i.
    static mut boot_pdpt: [u64; 512];
}

#[derive(Clone, Copy, Debug)]
pub enum MapError {
    /// The range is not 2 MiB aligned, empty, or overflows.
    Unaligned,
    /// The range is below 4 GiB (the identity map) or past 512 GiB.
    OutOfWindow,
    /// More GiB than the page-directory pool covers.
    PoolExhausted,
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            MapError::Unaligned => "range is empty or not 2 MiB aligned",
            MapError::OutOfWindow => "range is outside [4 GiB, 512 GiB)",
            MapError::PoolExhausted => "no page directory left (ranges span more than 8 GiB)",
        })
    }
}

/// Identity-maps `[start, start + size)` with 2 MiB pages (whole GiBs at a time).
pub fn map_range(start: u64, size: u64) -> Result<(), MapError> {
    if size == 0 || !start.is_multiple_of(PAGE_2M) {
        return Err(MapError::Unaligned);
    }
    let end = start.checked_add(size).ok_or(MapError::Unaligned)?;
    if start < IDENTITY_GIBS * GIB || end > MAPPABLE_END {
        return Err(MapError::OutOfWindow);
    }
    for gib in start / GIB..=(end - 1) / GIB {
        // SAFETY: an entry of the live PDPT (index < 512); volatile because the CPU walks it.
        let pdpte = unsafe { (&raw mut boot_pdpt[gib as usize]).read_volatile() };
        if pdpte & 1 != 0 {
            continue;
        }
        let used = PDS_USED.get();
        if used >= POOL_PDS {
            return Err(MapError::PoolExhausted);
        }
        PDS_USED.set(used + 1);
        // SAFETY: pool entry `used` is handed out once, here; single vCPU, no interrupts.
        let pd = unsafe { &raw mut PD_POOL[used] };
        for i in 0..512u64 {
            // SAFETY: entry i of that page directory, not yet reachable by the CPU.
            unsafe {
                (&raw mut (*pd).0[i as usize]).write_volatile((gib * GIB + i * PAGE_2M) | PDE_2M)
            };
        }
        // Identity mapping: the table's virtual address is its physical one.
        // SAFETY: as above; this store makes the GiB reachable.
        unsafe { (&raw mut boot_pdpt[gib as usize]).write_volatile(pd as u64 | PDPTE_TABLE) };
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
pub enum OpenError {
    Virtio(virtio::Error),
    /// The device has no configuration structure, or it never held still.
    NoConfig,
}

impl From<virtio::Error> for OpenError {
    fn from(e: virtio::Error) -> Self {
        OpenError::Virtio(e)
    }
}

impl core::fmt::Display for OpenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OpenError::Virtio(e) => write!(f, "{e}"),
            OpenError::NoConfig => f.write_str("no stable device configuration"),
        }
    }
}

/// A driven virtio-pmem device.
pub struct Pmem {
    pub device: Device,
    pub queue: Queue,
    /// Guest-physical range of the host file.
    pub start: u64,
    pub size: u64,
    /// 8 bytes of DMA memory: the request type, then the response.
    request: u64,
}

impl Pmem {
    /// Initialises function `dev.func` and reads its range (§5.19.5: the driver reads start and size).
    pub fn open(dev: u8, func: u8, dma: &mut Dma) -> Result<Pmem, OpenError> {
        let mut device = Device::open(dev, func)?;
        device.init(0)?;
        let Some((start, size)) =
            device.read_config(|c| (c.read64(CONFIG_START), c.read64(CONFIG_SIZE)))
        else {
            device.fail();
            return Err(OpenError::NoConfig);
        };
        let queue = device.setup_queue(0, dma)?;
        device.driver_ok()?;
        let request = dma.alloc(8, 8)?;
        Ok(Pmem {
            device,
            queue,
            start,
            size,
            request,
        })
    }

    /// Sends FLUSH and returns the device's response (0 = OK).
    pub fn flush(&mut self) -> Result<u32, virtio::Error> {
        let (req, resp) = (self.request as *mut u32, (self.request + 4) as *mut u32);
        // SAFETY: the request's 8 bytes of DMA memory; the device holds no chain using them.
        unsafe {
            req.write_volatile(REQ_FLUSH);
            resp.write_volatile(u32::MAX);
        }
        let chain = [
            Buffer {
                addr: self.request,
                len: 4,
                device_writes: false,
            },
            Buffer {
                addr: self.request + 4,
                len: 4,
                device_writes: true,
            },
        ];
        let used = self.device.transact(&mut self.queue, &chain)?;
        if used.len < 4 {
            return Ok(u32::MAX);
        }
        // SAFETY: written by the device before it returned the chain.
        Ok(unsafe { resp.read_volatile() })
    }
}
