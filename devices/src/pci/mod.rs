//! PCI: configuration space, a root bus with a host bridge, config access through ECAM and the legacy
//! 0xCF8/0xCFC ports, MSI-X, the GSI routing table that MSI-X vectors (and the IOAPIC's pins) are
//! delivered through, and the hotplug controller through which devices come and go while the guest runs.
//!
//! There is one segment and one bus (bus 0), function 0 of each slot only. BARs are memory BARs placed by
//! the VMM in the 32-bit window; a guest may size them (the all-ones protocol) and move them within the
//! window (see [`configuration`] for when a move takes effect and [`root`] for how it is carried out).

pub mod configuration;
pub mod hotplug;
pub mod msi;
pub mod msix;
pub mod root;

use std::fmt;

pub use configuration::{BarMove, PciBarInfo, PciConfiguration, PciHeader};
pub use hotplug::PciHotplug;
pub use msi::{GsiRoutingBackend, InterruptRouter, IoapicRouteSender, RouterError};
pub use msix::{MsixConfig, MsixState, MsixTableEntry};
pub use root::{PciBarWindow, PciConfigIo, PciConfigMmio, PciRoot, SharedPciDevice};

/// Bus/device/function of a device on segment 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciBdf {
    pub fn new(bus: u8, device: u8, function: u8) -> Self {
        Self {
            bus,
            device,
            function,
        }
    }
}

/// The form Cloud Hypervisor reports hot-added devices in: `0000:00:05.0`.
impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("PCI slot {0} is already taken")]
    SlotTaken(u8),
    #[error("PCI slot {0} is out of range (1..=31)")]
    InvalidSlot(u8),
    #[error("no free PCI slot left on bus 0")]
    NoFreeSlot,
    #[error("the PCI configuration space has no room for a {0}-byte capability")]
    CapabilitySpace(usize),
    #[error("BAR {0} does not exist or is already set")]
    InvalidBar(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    InvalidBarSize(u64),
    #[error("cannot decode a BAR at {0:#x}: {1}")]
    BarPlacement(u64, String),
    #[error("no room for a {size:#x}-byte BAR in the PCI window")]
    BarSpace {
        size: u64,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("cannot register the notification ioeventfd at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Hands out naturally aligned BAR ranges from the 32-bit PCI window.
pub struct BarAllocator {
    inner: vm_allocator::AddressAllocator,
}

impl BarAllocator {
    pub fn new(base: u64, size: u64) -> Result<Self, PciError> {
        vm_allocator::AddressAllocator::new(base, size)
            .map(|inner| Self { inner })
            .map_err(|source| PciError::BarSpace { size, source })
    }

    /// A `size`-byte range aligned to `size` (BARs decode naturally aligned addresses).
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        self.inner
            .allocate(size, size, vm_allocator::AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|source| PciError::BarSpace { size, source })
    }

    /// The `size`-byte range at `addr` exactly (a BAR a restored guest already knows).
    pub fn allocate_at(&mut self, addr: u64, size: u64) -> Result<u64, PciError> {
        self.inner
            .allocate(size, size, vm_allocator::AllocPolicy::ExactMatch(addr))
            .map(|r| r.start())
            .map_err(|source| PciError::BarSpace { size, source })
    }

    pub fn free(&mut self, addr: u64, size: u64) -> Result<(), PciError> {
        let last = size
            .checked_sub(1)
            .and_then(|s| addr.checked_add(s))
            .ok_or(PciError::InvalidBarSize(size))?;
        let range = vm_allocator::RangeInclusive::new(addr, last)
            .map_err(|source| PciError::BarSpace { size, source })?;
        self.inner
            .free(&range)
            .map_err(|source| PciError::BarSpace { size, source })
    }
}

/// A device function on the PCI bus.
///
/// `reg` is a dword index into configuration space (offset / 4); `offset` is the byte within that dword.
/// All inputs come from the guest: implementations must accept any index, offset and length.
pub trait PciDevice: Send {
    fn config_read(&mut self, reg: usize) -> u32;
    /// Returns the BARs the write moved (as [`PciConfiguration::write_reg`] reports them): the device's
    /// configuration already says they decode at their new address; the caller moves the BARs' mapping
    /// and then calls [`Self::move_bar`], or puts a refused move back with `move_bar(bar, old)`.
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarMove>;
    /// The memory BARs the device decodes, as (index, guest address, size).
    fn bars(&self) -> Vec<PciBarInfo> {
        Vec::new()
    }
    /// BAR `bar` decodes at `addr` from now on: the device updates its configuration (registers
    /// included) and moves whatever else it keeps at BAR addresses (a virtio-pci function's notification
    /// ioeventfds). The caller has already moved the BAR's mapping. On error nothing changed.
    fn move_bar(&mut self, bar: usize, _addr: u64) -> Result<(), PciError> {
        Err(PciError::InvalidBar(bar))
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_format() {
        assert_eq!(PciBdf::new(0, 5, 0).to_string(), "0000:00:05.0");
        assert_eq!(PciBdf::new(0x12, 0x1f, 7).to_string(), "0000:12:1f.7");
    }

    #[test]
    fn bars_are_naturally_aligned_and_bounded() {
        let mut a = BarAllocator::new(0xc000_0000, 0x2000_0000).unwrap();
        assert_eq!(a.allocate(0x1000).unwrap(), 0xc000_0000);
        assert_eq!(a.allocate(0x8000).unwrap(), 0xc000_8000);
        assert_eq!(a.allocate(0x1000).unwrap(), 0xc000_1000);
        a.free(0xc000_8000, 0x8000).unwrap();
        assert_eq!(a.allocate(0x8000).unwrap(), 0xc000_8000);
        assert!(a.allocate(0x4000_0000).is_err());
        // Exact placement: free, aligned and inside the window only.
        assert_eq!(a.allocate_at(0xc001_0000, 0x8000).unwrap(), 0xc001_0000);
        assert!(a.allocate_at(0xc001_0000, 0x8000).is_err(), "taken");
        assert!(a.allocate_at(0xc002_1000, 0x8000).is_err(), "unaligned");
        assert!(a.allocate_at(0xe000_0000, 0x8000).is_err(), "outside");
        assert_eq!(a.allocate(0x8000).unwrap(), 0xc001_8000);
    }
}
