//! A type 0 PCI configuration header with a capability list (PCI Local Bus 3.0, §6.1-6.7).
//!
//! Every dword has a mask of the bits the guest may write; everything else is read-only. BARs implement
//! the sizing protocol through their masks: writing all ones reads back `!(size - 1)` plus the type bits.
//! BARs are placed by the VMM: a write of any other address than the assigned one is refused.

use crate::pci::PciError;
use crate::warn_ratelimited;

/// Configuration space dwords (256 bytes). ECAM exposes 4 KiB; the extended part reads as zero, which
/// means "no extended capabilities".
pub const NUM_REGS: usize = 64;
pub const NUM_BARS: usize = 6;
const BAR0_REG: usize = 4;
const COMMAND_REG: usize = 1;
const CAP_PTR_REG: usize = 0xd;
const INTERRUPT_REG: usize = 0xf;
const FIRST_CAP_OFFSET: usize = 0x40;
const CONFIG_SIZE: usize = NUM_REGS * 4;

/// Command register bits the guest may set: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// BAR type bits: 32-bit, non-prefetchable memory.
const BAR_MEM_TYPE_BITS: u32 = 0xf;

pub const HEADER_TYPE_DEVICE: u8 = 0;

/// Why saved configuration registers cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigStateError {
    #[error("saved configuration space has {0} registers, expected {NUM_REGS}")]
    Length(usize),
    #[error("saved BAR {index} holds {value:#x}, but the BAR is fixed at {addr:#x}")]
    BarMoved { index: usize, value: u32, addr: u64 },
}

/// What identifies a function in its header.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class code, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// A memory BAR the device decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarInfo {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
}

pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: [Option<PciBarInfo>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    pub fn new(header: &PciHeader) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        let (class, subclass, prog_if) = header.class;
        regs[2] = u32::from(class) << 24
            | u32::from(subclass) << 16
            | u32::from(prog_if) << 8
            | u32::from(header.revision);
        regs[3] = u32::from(HEADER_TYPE_DEVICE) << 16;
        regs[0xb] = u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        writable[COMMAND_REG] = COMMAND_WRITABLE;
        // Cache line size and latency timer are scratch registers to software.
        writable[3] = 0x0000_ffff;
        // Interrupt line is scratch; interrupt pin stays 0: these functions have no INTx.
        writable[INTERRUPT_REG] = 0xff;
        Self {
            regs,
            writable,
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        }
    }

    /// Places a 32-bit memory BAR at `addr` (which must be aligned to `size`, a power of two).
    pub fn add_bar(&mut self, index: usize, addr: u64, size: u64) -> Result<(), PciError> {
        if index >= NUM_BARS || self.bars[index].is_some() {
            return Err(PciError::InvalidBar(index));
        }
        if size < 16 || !size.is_power_of_two() || size > 1 << 31 {
            return Err(PciError::InvalidBarSize(size));
        }
        if !addr.is_multiple_of(size) || addr.checked_add(size).is_none_or(|end| end > 1 << 32) {
            return Err(PciError::InvalidBar(index));
        }
        self.regs[BAR0_REG + index] = addr as u32;
        self.writable[BAR0_REG + index] = !(size as u32 - 1) & !BAR_MEM_TYPE_BITS;
        self.bars[index] = Some(PciBarInfo { index, addr, size });
        Ok(())
    }

    pub fn bars(&self) -> Vec<PciBarInfo> {
        self.bars.iter().flatten().copied().collect()
    }

    /// Appends a capability: `data[0]` is its ID, `data[1]` (the next pointer) is filled in here.
    /// Returns the capability's offset in configuration space.
    pub fn add_capability(&mut self, data: &[u8]) -> Result<usize, PciError> {
        let offset = self.next_cap;
        let end = offset + data.len();
        if data.len() < 2 || end > CONFIG_SIZE {
            return Err(PciError::CapabilitySpace(data.len()));
        }
        for (i, b) in data.iter().enumerate() {
            self.set_byte(offset + i, *b);
        }
        self.set_byte(offset + 1, 0);
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[CAP_PTR_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = (end + 3) & !3;
        Ok(offset)
    }

    /// Lets the guest write the bits of `mask` in the `len`-byte field at byte `offset`.
    pub fn set_writable(&mut self, offset: usize, mask: u32, len: usize) {
        for i in 0..len.min(4) {
            let byte = offset + i;
            if byte < CONFIG_SIZE {
                let bits = (mask >> (8 * i)) & 0xff;
                self.writable[byte / 4] |= bits << (8 * (byte % 4));
            }
        }
    }

    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Reads `len` (1..=4) bytes at `offset` as a little-endian integer; outside the header reads 0.
    pub fn read_field(&self, offset: usize, len: usize) -> u32 {
        (0..len.min(4)).fold(0, |acc, i| {
            acc | u32::from(self.byte(offset + i)) << (8 * i)
        })
    }

    /// Sets a field regardless of the writable mask (device-side update).
    pub fn write_field(&mut self, offset: usize, len: usize, value: u32) {
        for i in 0..len.min(4) {
            self.set_byte(offset + i, (value >> (8 * i)) as u8);
        }
    }

    /// A guest write of `data` at byte `offset` within dword `reg`.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg >= NUM_REGS || offset >= 4 || data.is_empty() || offset as usize + data.len() > 4 {
            return;
        }
        let old = self.regs[reg];
        let mut merged = old;
        for (i, b) in data.iter().enumerate() {
            let shift = 8 * (offset as usize + i);
            merged = (merged & !(0xff << shift)) | u32::from(*b) << shift;
        }
        let mask = self.writable[reg];
        let new = (old & !mask) | (merged & mask);
        if let Some(bar) = reg
            .checked_sub(BAR0_REG)
            .and_then(|i| self.bars.get(i).copied().flatten())
        {
            let addr_mask = self.writable[reg];
            let assigned = bar.addr as u32 & addr_mask;
            let written = new & addr_mask;
            // All ones (sizing) and the assigned address are the only values a BAR takes.
            if written != addr_mask && written != assigned {
                warn_ratelimited!(
                    "pci: guest tried to move BAR {} from {:#x} to {:#x}; BARs are fixed",
                    bar.index,
                    bar.addr,
                    written
                );
                return;
            }
        }
        self.regs[reg] = new;
    }

    /// Every register, for snapshots (only the guest-writable bits are ever loaded back).
    pub fn registers(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Whether [`Self::load_writable`] would accept `saved`; changes nothing.
    pub fn check_writable(&self, saved: &[u32]) -> Result<(), ConfigStateError> {
        self.writable_image(saved).map(|_| ())
    }

    /// Loads the guest-writable bits of `saved` (registers from [`Self::registers`], untrusted), with the
    /// checks guest writes get: read-only bits keep this function's values, and a BAR must hold its
    /// assigned address or the sizing pattern. Nothing changes if `saved` is refused.
    pub fn load_writable(&mut self, saved: &[u32]) -> Result<(), ConfigStateError> {
        self.regs = self.writable_image(saved)?;
        Ok(())
    }

    fn writable_image(&self, saved: &[u32]) -> Result<[u32; NUM_REGS], ConfigStateError> {
        if saved.len() != NUM_REGS {
            return Err(ConfigStateError::Length(saved.len()));
        }
        let mut regs = self.regs;
        for (reg, (&value, &mask)) in saved.iter().zip(&self.writable).enumerate() {
            let new = (regs[reg] & !mask) | (value & mask);
            if let Some(bar) = reg
                .checked_sub(BAR0_REG)
                .and_then(|i| self.bars.get(i).copied().flatten())
            {
                let written = new & mask;
                if written != mask && written != bar.addr as u32 & mask {
                    return Err(ConfigStateError::BarMoved {
                        index: bar.index,
                        value,
                        addr: bar.addr,
                    });
                }
            }
            regs[reg] = new;
        }
        Ok(regs)
    }

    fn byte(&self, offset: usize) -> u8 {
        self.regs
            .get(offset / 4)
            .map_or(0, |r| (r >> (8 * (offset % 4))) as u8)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        if let Some(r) = self.regs.get_mut(offset / 4) {
            let shift = 8 * (offset % 4);
            *r = (*r & !(0xff << shift)) | u32::from(value) << shift;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: (0x01, 0x80, 0),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    #[test]
    fn header_fields_and_read_only_bits() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2), 0x0180_0001);
        assert_eq!(c.read_reg(0xb), 0x0040_1af4);
        // Vendor/device are read-only.
        c.write_reg(0, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        // Command: only the defined bits stick; status is read-only.
        c.write_reg(1, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(1), 0x0407);
        c.write_reg(1, 0, &[0x06]);
        assert_eq!(c.read_reg(1) & 0xffff, 0x0406);
        // Interrupt line writable, pin not.
        c.write_reg(0xf, 0, &[0x0b, 0x01]);
        assert_eq!(c.read_reg(0xf), 0x0b);
        // Out-of-range registers and lengths are ignored.
        c.write_reg(64, 0, &[1]);
        c.write_reg(1, 3, &[1, 2]);
        assert_eq!(c.read_reg(64), 0);
    }

    #[test]
    fn bar_sizing_and_refused_moves() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(0, 0xc000_8000, 0x8000).unwrap();
        assert_eq!(c.read_reg(4), 0xc000_8000);
        c.write_reg(4, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(4), !(0x8000 - 1) & !0xf);
        c.write_reg(4, 0, &0xc000_8000u32.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xc000_8000);
        // A move is refused.
        c.write_reg(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xc000_8000);
        // Unused BARs size as zero (not implemented).
        c.write_reg(5, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(5), 0);
        assert_eq!(
            c.bars(),
            vec![PciBarInfo {
                index: 0,
                addr: 0xc000_8000,
                size: 0x8000
            }]
        );
        assert!(c.add_bar(0, 0xc001_0000, 0x8000).is_err());
        assert!(c.add_bar(1, 0xc001_0000, 0x3000).is_err());
        assert!(c.add_bar(1, 0xc000_1000, 0x8000).is_err(), "misaligned");
        assert!(c.add_bar(6, 0xc001_0000, 0x8000).is_err());
    }

    #[test]
    fn writable_bits_round_trip_and_bars_stay_fixed() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(0, 0xc000_8000, 0x8000).unwrap();
        c.write_reg(1, 0, &[0x06]);
        c.write_reg(0xf, 0, &[0x0b]);
        let saved = c.registers();
        let mut fresh = PciConfiguration::new(&header());
        fresh.add_bar(0, 0xc000_8000, 0x8000).unwrap();
        fresh.load_writable(&saved).unwrap();
        assert_eq!(fresh.registers(), saved);
        // Read-only bits of a hostile state are ignored: the identity stays.
        let mut hostile = saved.clone();
        hostile[0] = 0xdead_beef;
        hostile[1] |= 0xffff_0000;
        fresh.load_writable(&hostile).unwrap();
        assert_eq!(fresh.read_reg(0), 0x1042_1af4);
        assert_eq!(fresh.read_reg(1), saved[1]);
        // A BAR elsewhere than its assigned address, or a truncated state, is refused untouched.
        let mut moved = saved.clone();
        moved[4] = 0xd000_0000;
        assert!(matches!(
            fresh.load_writable(&moved),
            Err(ConfigStateError::BarMoved { index: 0, .. })
        ));
        assert!(matches!(
            fresh.check_writable(&saved[..10]),
            Err(ConfigStateError::Length(10))
        ));
        assert_eq!(fresh.registers(), saved);
        // The sizing pattern is a value the guest may leave behind.
        let mut sizing = saved;
        sizing[4] = u32::MAX;
        fresh.load_writable(&sizing).unwrap();
        assert_eq!(fresh.read_reg(4), !(0x8000 - 1) & !0xf);
    }

    #[test]
    fn capability_list_links() {
        let mut c = PciConfiguration::new(&header());
        let a = c.add_capability(&[0x09, 0xaa, 16, 1, 0, 0, 0, 0]).unwrap();
        let b = c.add_capability(&[0x11, 0, 0, 0]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(c.read_reg(1) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read_field(0x34, 1), 0x40);
        assert_eq!(c.read_field(0x40, 4), 0x0110_4809);
        assert_eq!(
            c.read_field(0x48, 2),
            0x0011,
            "last capability ends the list"
        );
        // Capability bytes are read-only unless made writable.
        c.write_reg(0x48 / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.read_field(0x4a, 2), 0);
        c.set_writable(0x4a, 0xc000, 2);
        c.write_reg(0x48 / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.read_field(0x4a, 2), 0xc000);
        assert!(c.add_capability(&[0; 200]).is_err());
    }
}
