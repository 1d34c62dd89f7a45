//! MMIO accessors for PCI: configuration space through ECAM and device registers inside BARs. Every
//! access is a VM exit (~30 us at CPL3 here), so callers keep them few. Guest only.

use crate::pci::{self, ConfigSpace};

/// Configuration space of one function on bus 0, through the ECAM window (identity-mapped, uncached).
#[derive(Clone, Copy)]
pub struct Ecam {
    base: u64,
}

impl Ecam {
    pub fn new(device: u8, function: u8) -> Ecam {
        Ecam {
            base: pci::ECAM_BASE + pci::ecam_offset(0, device, function, 0),
        }
    }
}

impl ConfigSpace for Ecam {
    fn read32(&self, reg: u16) -> u32 {
        // SAFETY: inside the ECAM window of the identity-mapped MMIO hole; without a PCI root the VMM
        // answers reads of unclaimed MMIO with ones or zeros, both of which read as "no function".
        unsafe { ((self.base + u64::from(reg & 0xffc)) as *const u32).read_volatile() }
    }

    fn write32(&self, reg: u16, value: u32) {
        // SAFETY: as for `read32`; only this function's configuration space is written.
        unsafe { ((self.base + u64::from(reg & 0xffc)) as *mut u32).write_volatile(value) }
    }
}

/// A register block inside a BAR (identity-mapped: the BAR address is the virtual address).
#[derive(Clone, Copy)]
pub struct Regs {
    pub base: u64,
}

impl Regs {
    fn at<T>(&self, offset: u64) -> *mut T {
        (self.base + offset) as *mut T
    }

    pub fn read8(&self, offset: u64) -> u8 {
        // SAFETY: `base` is a BAR region checked to lie in the identity-mapped MMIO hole (virtio::map_region)
        // and offsets come from the spec's layout of that region; the same holds for every accessor below.
        unsafe { self.at::<u8>(offset).read_volatile() }
    }

    pub fn read16(&self, offset: u64) -> u16 {
        // SAFETY: see `read8`.
        unsafe { self.at::<u16>(offset).read_volatile() }
    }

    pub fn read32(&self, offset: u64) -> u32 {
        // SAFETY: see `read8`.
        unsafe { self.at::<u32>(offset).read_volatile() }
    }

    pub fn write8(&self, offset: u64, value: u8) {
        // SAFETY: see `read8`.
        unsafe { self.at::<u8>(offset).write_volatile(value) }
    }

    pub fn write16(&self, offset: u64, value: u16) {
        // SAFETY: see `read8`.
        unsafe { self.at::<u16>(offset).write_volatile(value) }
    }

    pub fn write32(&self, offset: u64, value: u32) {
        // SAFETY: see `read8`.
        unsafe { self.at::<u32>(offset).write_volatile(value) }
    }

    /// A 64-bit field as two 32-bit writes, low half first (§4.1.3.1: 64-bit fields are accessed as two
    /// 32-bit halves).
    pub fn write64(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}
