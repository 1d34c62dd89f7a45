//! A type 0 PCI configuration header with a capability list (PCI Local Bus 3.0, §6.1-6.7).
//!
//! Every dword has a mask of the bits the guest may write; everything else is read-only.
//!
//! Memory BARs behave as on hardware (§6.2.5.1): the address bits above the BAR's size are writable, the
//! type bits (memory, 32/64-bit, prefetchable) are not, so writing all ones reads back `!(size - 1)` plus
//! the type bits (sizing). A 64-bit BAR spans two registers, low dword first.
//!
//! The guest may move a BAR. A BAR has two addresses here: what its registers hold (the guest's latest
//! writes) and where it decodes (the owner's mapping, [`PciBarInfo::addr`]). They part only while the
//! guest reprograms the BAR; the new address takes effect, and is reported to the caller as a [`BarMove`]
//! (the owner then moves its mapping, see [`PciConfiguration::set_bar_addr`]), when:
//! - the guest writes a BAR register while memory decoding (command bit 1) is on, or
//! - the guest turns memory decoding on while a BAR register holds another address (the usual way:
//!   decoding off, write the BAR, decoding on; Linux does so for 64-bit BARs).
//!
//! A write to the low dword of a 64-bit BAR with decoding on waits for the high dword (or for decoding to
//! be turned on again), so the half-written address is never reported. A BAR holding the sizing pattern
//! (either dword's address bits all ones) is mid-probe, not moved.

use crate::pci::PciError;

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
/// Memory space enable: the function decodes its memory BARs.
pub const COMMAND_MEMORY: u32 = 1 << 1;
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// The read-only low bits of a memory BAR: I/O indicator, type, prefetchable.
const BAR_MEM_TYPE_BITS: u32 = 0xf;
const BAR_TYPE_64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;

pub const HEADER_TYPE_DEVICE: u8 = 0;

/// Why saved configuration registers cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigStateError {
    #[error("saved configuration space has {0} registers, expected {NUM_REGS}")]
    Length(usize),
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
    /// Where the BAR decodes (the owner's mapping), not necessarily what its registers hold right now.
    pub addr: u64,
    pub size: u64,
}

/// The guest moved memory BAR `bar` of `size` bytes from `old` to `new` (where it decoded before and
/// where its registers now say it decodes). The owner moves whatever maps the BAR, or puts it back with
/// [`PciConfiguration::set_bar_addr`]`(bar, old)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub old: u64,
    pub new: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    info: PciBarInfo,
    is_64: bool,
}

pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    /// By the BAR's (low) index; the upper register of a 64-bit BAR has no entry of its own.
    bars: [Option<Bar>; NUM_BARS],
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

    /// Places a 32-bit non-prefetchable memory BAR at `addr` (aligned to `size`, a power of two of at
    /// least 16 bytes; below 4 GiB).
    pub fn add_bar(&mut self, index: usize, addr: u64, size: u64) -> Result<(), PciError> {
        self.add_memory_bar(index, addr, size, false, false)
    }

    /// Places a 64-bit memory BAR at `addr` (aligned to `size`), in registers `index` and `index + 1`.
    pub fn add_bar64(
        &mut self,
        index: usize,
        addr: u64,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        self.add_memory_bar(index, addr, size, true, prefetchable)
    }

    fn add_memory_bar(
        &mut self,
        index: usize,
        addr: u64,
        size: u64,
        is_64: bool,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        let last = if is_64 { index + 1 } else { index };
        if last >= NUM_BARS || (index..=last).any(|i| self.bar_slot(i).is_some()) {
            return Err(PciError::InvalidBar(index));
        }
        let max_size = if is_64 { 1 << 63 } else { 1 << 31 };
        if size < 16 || !size.is_power_of_two() || size > max_size {
            return Err(PciError::InvalidBarSize(size));
        }
        if !placeable(addr, size, is_64) {
            return Err(PciError::InvalidBar(index));
        }
        let mask = !(size - 1);
        let mut type_bits = 0;
        if is_64 {
            type_bits |= BAR_TYPE_64;
        }
        if prefetchable {
            type_bits |= BAR_PREFETCHABLE;
        }
        let low = BAR0_REG + index;
        self.regs[low] = addr as u32 | type_bits;
        self.writable[low] = mask as u32 & !BAR_MEM_TYPE_BITS;
        if is_64 {
            self.regs[low + 1] = (addr >> 32) as u32;
            self.writable[low + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(Bar {
            info: PciBarInfo { index, addr, size },
            is_64,
        });
        Ok(())
    }

    /// Where each memory BAR decodes.
    pub fn bars(&self) -> Vec<PciBarInfo> {
        self.bars.iter().flatten().map(|b| b.info).collect()
    }

    /// Whether memory decoding (command register bit 1) is on.
    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] & COMMAND_MEMORY != 0
    }

    /// Sets where BAR `index` decodes, registers included (the owner's side: a move it refused and takes
    /// back, or a BAR it places itself). `addr` must be aligned to the BAR's size and, for a 32-bit BAR,
    /// below 4 GiB.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let Some(bar) = self.bars.get_mut(index).and_then(Option::as_mut) else {
            return Err(PciError::InvalidBar(index));
        };
        if !placeable(addr, bar.info.size, bar.is_64) {
            return Err(PciError::BarPlacement(
                addr,
                format!(
                    "not a place for a {:#x}-byte {}-bit BAR",
                    bar.info.size,
                    if bar.is_64 { 64 } else { 32 }
                ),
            ));
        }
        bar.info.addr = addr;
        let low = BAR0_REG + index;
        self.regs[low] = (self.regs[low] & BAR_MEM_TYPE_BITS) | (addr as u32 & !BAR_MEM_TYPE_BITS);
        if bar.is_64 {
            self.regs[low + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// The memory BAR whose registers include BAR register `i`: (its index, whether `i` is the upper half
    /// of a 64-bit BAR).
    fn bar_slot(&self, i: usize) -> Option<(usize, bool)> {
        if let Some(Some(_)) = self.bars.get(i) {
            return Some((i, false));
        }
        let low = i.checked_sub(1)?;
        matches!(self.bars.get(low), Some(Some(b)) if b.is_64).then_some((low, true))
    }

    /// The address the BAR's registers hold; None while either dword holds the sizing pattern.
    fn programmed(&self, bar: &Bar) -> Option<u64> {
        let low = BAR0_REG + bar.info.index;
        let sizing = |reg: usize| {
            let mask = self.writable[reg];
            mask != 0 && self.regs[reg] & mask == mask
        };
        if sizing(low) || (bar.is_64 && sizing(low + 1)) {
            return None;
        }
        let high = if bar.is_64 { self.regs[low + 1] } else { 0 };
        Some(u64::from(high) << 32 | u64::from(self.regs[low] & !BAR_MEM_TYPE_BITS))
    }

    /// With memory decoding on, every BAR (or only `only`) whose registers hold a new address takes it.
    fn detect_moves(&mut self, only: Option<usize>) -> Vec<BarMove> {
        if !self.memory_enabled() {
            return Vec::new();
        }
        let mut moves = Vec::new();
        for index in 0..NUM_BARS {
            if only.is_some_and(|o| o != index) {
                continue;
            }
            let Some(bar) = self.bars[index] else {
                continue;
            };
            let Some(new) = self.programmed(&bar) else {
                continue;
            };
            if new != bar.info.addr {
                moves.push(BarMove {
                    bar: index,
                    old: bar.info.addr,
                    new,
                    size: bar.info.size,
                });
                if let Some(b) = self.bars[index].as_mut() {
                    b.info.addr = new;
                }
            }
        }
        moves
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

    /// A guest write of `data` at byte `offset` within dword `reg`. Returns the BARs this write moved (see
    /// the module documentation); they already decode at their new address as far as this configuration
    /// is concerned.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        if reg >= NUM_REGS || offset >= 4 || data.is_empty() || offset as usize + data.len() > 4 {
            return Vec::new();
        }
        let old = self.regs[reg];
        let mut merged = old;
        for (i, b) in data.iter().enumerate() {
            let shift = 8 * (offset as usize + i);
            merged = (merged & !(0xff << shift)) | u32::from(*b) << shift;
        }
        let mask = self.writable[reg];
        self.regs[reg] = (old & !mask) | (merged & mask);
        if reg == COMMAND_REG {
            return self.detect_moves(None);
        }
        match reg.checked_sub(BAR0_REG).and_then(|i| self.bar_slot(i)) {
            // The low half of a 64-bit address alone is not where the guest means the BAR to go.
            Some((index, false)) if self.bars[index].is_some_and(|b| b.is_64) => Vec::new(),
            Some((index, _)) => self.detect_moves(Some(index)),
            None => Vec::new(),
        }
    }

    /// Every register, for snapshots (only the guest-writable bits are ever loaded back).
    pub fn registers(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Whether [`Self::load_writable`] would accept `saved`; changes nothing.
    pub fn check_writable(&self, saved: &[u32]) -> Result<(), ConfigStateError> {
        self.writable_image(saved).map(|_| ())
    }

    /// Loads the guest-writable bits of `saved` (registers from [`Self::registers`], untrusted): read-only
    /// bits keep this function's values. BAR registers are not loaded: where a BAR decodes is the owner's
    /// to set ([`Self::set_bar_addr`], before loading), so they keep their current address. Nothing
    /// changes if `saved` is refused.
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
            let is_bar = reg
                .checked_sub(BAR0_REG)
                .and_then(|i| self.bar_slot(i))
                .is_some();
            if !is_bar {
                regs[reg] = (regs[reg] & !mask) | (value & mask);
            }
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

/// Whether a `size`-byte BAR can decode at `addr`: naturally aligned, and below 4 GiB unless 64-bit.
fn placeable(addr: u64, size: u64, is_64: bool) -> bool {
    addr.is_multiple_of(size)
        && addr
            .checked_add(size)
            .is_some_and(|end| is_64 || end <= 1 << 32)
}

/// The address memory BAR `index` holds in saved registers (from [`PciConfiguration::registers`]): both
/// dwords of a 64-bit BAR, without the type bits. None if the registers are too short or name an I/O BAR.
pub fn saved_bar_address(registers: &[u32], index: usize) -> Option<u64> {
    if index >= NUM_BARS {
        return None;
    }
    let low = *registers.get(BAR0_REG + index)?;
    if low & 1 != 0 {
        return None;
    }
    let high = if low & 0b110 == BAR_TYPE_64 {
        *registers
            .get(BAR0_REG + index + 1)
            .filter(|_| index + 1 < NUM_BARS)?
    } else {
        0
    };
    Some(u64::from(high) << 32 | u64::from(low & !BAR_MEM_TYPE_BITS))
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

    fn write32(c: &mut PciConfiguration, reg: usize, value: u32) -> Vec<BarMove> {
        c.write_reg(reg, 0, &value.to_le_bytes())
    }

    fn set_memory(c: &mut PciConfiguration, on: bool) -> Vec<BarMove> {
        let command = if on { COMMAND_MEMORY } else { 0 };
        c.write_reg(COMMAND_REG, 0, &(command as u16).to_le_bytes())
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
        assert!(c.write_reg(64, 0, &[1]).is_empty());
        c.write_reg(1, 3, &[1, 2]);
        assert_eq!(c.read_reg(64), 0);
    }

    #[test]
    fn bar_sizing_alignment_and_read_only_type_bits() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(0, 0xc000_8000, 0x8000).unwrap();
        assert_eq!(c.read_reg(4), 0xc000_8000);
        // Sizing: all ones reads back the size mask; the type bits (32-bit memory) stay 0.
        assert!(write32(&mut c, 4, u32::MAX).is_empty());
        assert_eq!(c.read_reg(4), !(0x8000 - 1) & !0xf);
        write32(&mut c, 4, 0xc000_8000);
        assert_eq!(c.read_reg(4), 0xc000_8000);
        // Address bits below the size are not writable: a write lands aligned.
        write32(&mut c, 4, 0xd000_4abf);
        assert_eq!(c.read_reg(4), 0xd000_0000);
        // Byte writes merge into the dword.
        c.write_reg(4, 3, &[0xc1]);
        assert_eq!(c.read_reg(4), 0xc100_0000);
        // Unused BARs size as zero (not implemented).
        write32(&mut c, 5, u32::MAX);
        assert_eq!(c.read_reg(5), 0);
        assert!(c.add_bar(0, 0xc001_0000, 0x8000).is_err());
        assert!(c.add_bar(1, 0xc001_0000, 0x3000).is_err());
        assert!(c.add_bar(1, 0xc000_1000, 0x8000).is_err(), "misaligned");
        assert!(c.add_bar(1, 0xffff_8000, 0x10000).is_err(), "misaligned");
        assert!(c.add_bar(1, 0x1_0000_0000, 0x8000).is_err(), "above 4 GiB");
        assert!(c.add_bar(6, 0xc001_0000, 0x8000).is_err());
    }

    #[test]
    fn sixty_four_bit_bar_halves() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar64(2, 0x1_0000_0000, 0x4000, true).unwrap();
        // Type bits: 64-bit (0b100) and prefetchable (0b1000), read-only.
        assert_eq!(c.read_reg(6), 0x0000_000c);
        assert_eq!(c.read_reg(7), 1);
        write32(&mut c, 6, 0);
        assert_eq!(c.read_reg(6), 0xc, "type bits survive a write of 0");
        write32(&mut c, 6, 0);
        // Sizing, low then high, as Linux does.
        write32(&mut c, 6, u32::MAX);
        assert_eq!(c.read_reg(6), 0xffff_c00c);
        write32(&mut c, 7, u32::MAX);
        assert_eq!(c.read_reg(7), u32::MAX);
        write32(&mut c, 6, 0);
        write32(&mut c, 7, 1);
        assert_eq!(saved_bar_address(&c.registers(), 2), Some(0x1_0000_0000));
        // The register pair is one BAR: no other BAR fits in the upper half, and none at the end.
        assert!(c.add_bar(3, 0xc000_0000, 0x1000).is_err());
        assert!(c.add_bar64(5, 0x2_0000_0000, 0x1000, false).is_err());
        assert!(c.add_bar64(1, 0x2_0000_0000, 0x1000, false).is_err());
        // Big 64-bit BARs have no writable low address bits.
        c.add_bar64(4, 0x4_0000_0000, 0x4_0000_0000, false).unwrap();
        write32(&mut c, 8, u32::MAX);
        write32(&mut c, 9, u32::MAX);
        assert_eq!((c.read_reg(8), c.read_reg(9)), (0x4, 0xffff_fffc));
        assert_eq!(
            c.bars(),
            vec![
                PciBarInfo {
                    index: 2,
                    addr: 0x1_0000_0000,
                    size: 0x4000
                },
                PciBarInfo {
                    index: 4,
                    addr: 0x4_0000_0000,
                    size: 0x4_0000_0000
                }
            ]
        );
    }

    #[test]
    fn moves_take_effect_with_memory_decoding() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(0, 0xc000_8000, 0x8000).unwrap();
        // Decoding off: the registers change, the BAR does not move yet.
        assert!(write32(&mut c, 4, 0xd000_0000).is_empty());
        assert_eq!(c.bars()[0].addr, 0xc000_8000);
        assert_eq!(c.read_reg(4), 0xd000_0000);
        // Turning decoding on moves it.
        let moved = set_memory(&mut c, true);
        let expected = BarMove {
            bar: 0,
            old: 0xc000_8000,
            new: 0xd000_0000,
            size: 0x8000,
        };
        assert_eq!(moved, vec![expected]);
        assert_eq!(c.bars()[0].addr, 0xd000_0000);
        assert!(set_memory(&mut c, true).is_empty(), "reported once");
        // Decoding on: a write moves it at once, sizing does not.
        assert!(write32(&mut c, 4, u32::MAX).is_empty());
        assert!(write32(&mut c, 4, 0xd000_0000).is_empty());
        let moved = write32(&mut c, 4, 0xc001_0000);
        assert_eq!(
            moved,
            vec![BarMove {
                bar: 0,
                old: 0xd000_0000,
                new: 0xc001_0000,
                size: 0x8000
            }]
        );
        // The owner refuses and puts it back: registers and decoding agree again.
        c.set_bar_addr(0, 0xd000_0000).unwrap();
        assert_eq!(c.read_reg(4), 0xd000_0000);
        assert_eq!(c.bars()[0].addr, 0xd000_0000);
        assert!(set_memory(&mut c, true).is_empty());
        assert!(c.set_bar_addr(0, 0xd000_1000).is_err(), "misaligned");
        assert!(c.set_bar_addr(0, 0x1_0000_0000).is_err(), "a 32-bit BAR");
        assert!(c.set_bar_addr(1, 0xd000_0000).is_err(), "no BAR 1");
        assert_eq!(c.bars()[0].addr, 0xd000_0000);
    }

    #[test]
    fn sixty_four_bit_moves_wait_for_the_high_half() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar64(0, 0xc000_0000, 0x1000, false).unwrap();
        set_memory(&mut c, true);
        // Low half alone: not a move yet.
        assert!(write32(&mut c, 4, 0x2000_0000).is_empty());
        let moved = write32(&mut c, 5, 0x1);
        assert_eq!(
            moved,
            vec![BarMove {
                bar: 0,
                old: 0xc000_0000,
                new: 0x1_2000_0000,
                size: 0x1000
            }]
        );
        // Decoding off, both halves, decoding on: one move.
        set_memory(&mut c, false);
        write32(&mut c, 4, 0xd000_0000);
        write32(&mut c, 5, 0);
        assert_eq!(c.bars()[0].addr, 0x1_2000_0000);
        let moved = set_memory(&mut c, true);
        assert_eq!(moved.len(), 1);
        assert_eq!((moved[0].old, moved[0].new), (0x1_2000_0000, 0xd000_0000));
        // A low-half write with decoding on is taken by the next command write too.
        write32(&mut c, 4, 0xe000_0000);
        let moved = c.write_reg(COMMAND_REG, 0, &[0x06]);
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].new, 0xe000_0000);
        // The owner places 64-bit BARs above 4 GiB too.
        c.set_bar_addr(0, 0x8_0000_0000).unwrap();
        assert_eq!((c.read_reg(4), c.read_reg(5)), (0x4, 0x8));
    }

    #[test]
    fn writable_bits_round_trip_and_bars_are_the_owners() {
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
        // A BAR elsewhere is not loaded: the function keeps decoding where its owner put it.
        let mut moved = saved.clone();
        moved[4] = 0xd000_0000;
        assert_eq!(saved_bar_address(&moved, 0), Some(0xd000_0000));
        fresh.load_writable(&moved).unwrap();
        assert_eq!(fresh.read_reg(4), 0xc000_8000);
        assert_eq!(fresh.bars()[0].addr, 0xc000_8000);
        // A truncated state is refused untouched.
        assert!(matches!(
            fresh.check_writable(&saved[..10]),
            Err(ConfigStateError::Length(10))
        ));
        assert_eq!(fresh.registers(), saved);
        assert_eq!(saved_bar_address(&saved[..4], 0), None);
        assert_eq!(saved_bar_address(&saved, 6), None);
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
