//! The root bus (segment 0, bus 0) with its host bridge at 00:00.0, and the two ways to reach
//! configuration space: ECAM (PCI Express Base 4.0, §7.2.2; an MMIO window, described to the guest by the
//! ACPI MCFG table) and the legacy configuration mechanism #1 (ports 0xCF8 address / 0xCFC data); and
//! the BAR window, where the functions' memory BARs decode and where BAR moves the guest programs are
//! carried out (see [`PciRoot::config_write`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::pci::configuration::{BarMove, PciConfiguration, PciHeader};
use crate::pci::{BarAllocator, PciBdf, PciDevice, PciError};
use crate::warn_ratelimited;

/// Slots on bus 0 (device numbers 0..32); slot 0 is the host bridge.
pub const NUM_SLOTS: u8 = 32;
const ECAM_BUS_SHIFT: u64 = 20;
const ECAM_DEVICE_SHIFT: u64 = 15;
const ECAM_FUNCTION_SHIFT: u64 = 12;
const ECAM_REG_MASK: u64 = 0xfff;

/// Red Hat's PCIe host bridge ID (as QEMU's generic host uses); Linux needs nothing specific.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_BRIDGE: u8 = 0x06;
const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock(device: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

struct HostBridge {
    config: PciConfiguration,
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        self.config.write_reg(reg, offset, data)
    }
}

/// Bus 0 and the functions on it (function 0 of each slot).
pub struct PciRoot {
    devices: BTreeMap<u8, SharedPciDevice>,
    /// Where the functions' BARs decode; the moves the guest asks for are carried out there. Without it
    /// every move is refused.
    window: Option<Arc<Mutex<PciBarWindow>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    pub fn new() -> Self {
        let bridge = HostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                revision: 0,
                class: (CLASS_BRIDGE, SUBCLASS_HOST_BRIDGE, 0),
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        };
        let mut devices: BTreeMap<u8, SharedPciDevice> = BTreeMap::new();
        devices.insert(0, Arc::new(Mutex::new(bridge)));
        Self {
            devices,
            window: None,
        }
    }

    /// The window the functions' BARs decode in (guest moves of BARs are carried out there).
    pub fn set_bar_window(&mut self, window: Arc<Mutex<PciBarWindow>>) {
        self.window = Some(window);
    }

    /// The lowest free slot.
    pub fn free_slot(&self) -> Result<u8, PciError> {
        (1..NUM_SLOTS)
            .find(|s| !self.devices.contains_key(s))
            .ok_or(PciError::NoFreeSlot)
    }

    pub fn add_device(&mut self, slot: u8, device: SharedPciDevice) -> Result<PciBdf, PciError> {
        if slot == 0 || slot >= NUM_SLOTS {
            return Err(PciError::InvalidSlot(slot));
        }
        if self.devices.contains_key(&slot) {
            return Err(PciError::SlotTaken(slot));
        }
        self.devices.insert(slot, device);
        Ok(PciBdf::new(0, slot, 0))
    }

    pub fn has_device(&self, slot: u8) -> bool {
        self.devices.contains_key(&slot)
    }

    /// The function in `slot`, if any.
    pub fn device_at(&self, slot: u8) -> Option<SharedPciDevice> {
        self.devices.get(&slot).cloned()
    }

    pub fn remove_device(&mut self, slot: u8) -> Option<SharedPciDevice> {
        if slot == 0 {
            return None;
        }
        self.devices.remove(&slot)
    }

    fn device(&self, bus: u8, slot: u8, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(&slot)
    }

    /// The dword at `reg`; all ones where no function answers (a master abort).
    pub fn config_read(&self, bus: u8, slot: u8, function: u8, reg: usize) -> u32 {
        match self.device(bus, slot, function) {
            Some(d) => lock(d).config_read(reg),
            None => u32::MAX,
        }
    }

    /// A write to the function's configuration space; BAR moves it programs are carried out before it
    /// returns (the writing vCPU sees the BAR at its new address, or back at its old one, right after).
    pub fn config_write(
        &self,
        bus: u8,
        slot: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        let Some(d) = self.device(bus, slot, function) else {
            return;
        };
        // The function's lock is dropped before the move: BAR accesses take the window's lock, then the
        // function's.
        let moves = lock(d).config_write(reg, offset, data);
        for m in moves {
            self.relocate(slot, d, &m);
        }
    }

    /// Carries out a BAR move the guest asked for. Runs on the vCPU thread that wrote the register, with
    /// the root locked (config accesses wait, so moves never interleave). A move that cannot be done is
    /// put back: the BAR keeps decoding where it was and its registers say so again.
    fn relocate(&self, slot: u8, device: &SharedPciDevice, m: &BarMove) {
        let result = match &self.window {
            Some(window) => move_bar(window, device, m.bar, m.new).map(|_| ()),
            None => Err(PciError::BarPlacement(m.new, "no PCI window".into())),
        };
        match result {
            Ok(()) => {
                static MOVED: crate::RateLimit = crate::RateLimit::new();
                if MOVED.admit().is_some() {
                    log::info!(
                        "pci: 00:{slot:02x}.0 BAR {} moved {:#x} -> {:#x} ({:#x} bytes)",
                        m.bar,
                        m.old,
                        m.new,
                        m.size
                    );
                }
            }
            Err(e) => {
                warn_ratelimited!(
                    "pci: 00:{slot:02x}.0: the guest moved BAR {} from {:#x} to {:#x}; refused, it stays: {e}",
                    m.bar,
                    m.old,
                    m.new
                );
                if let Err(e) = lock(device).move_bar(m.bar, m.old) {
                    warn_ratelimited!(
                        "pci: 00:{slot:02x}.0: BAR {} cannot be put back at {:#x}: {e}",
                        m.bar,
                        m.old
                    );
                }
            }
        }
    }
}

/// Extracts `data.len()` bytes at byte `offset` of a dword.
fn read_bytes(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
    }
}

/// Accesses must be 1, 2 or 4 bytes and not cross a dword.
fn valid_access(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && (offset % 4) as usize + len <= 4
}

/// ECAM: offset = bus << 20 | device << 15 | function << 12 | register.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, u64) {
        let bus = (offset >> ECAM_BUS_SHIFT) as u8;
        let slot = ((offset >> ECAM_DEVICE_SHIFT) & 0x1f) as u8;
        let function = ((offset >> ECAM_FUNCTION_SHIFT) & 0x7) as u8;
        let reg = offset & ECAM_REG_MASK;
        (bus, slot, function, (reg / 4) as usize, reg % 4)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !valid_access(offset, data.len()) || offset >> ECAM_BUS_SHIFT > 0xff {
            data.fill(0xff);
            return;
        }
        let (bus, slot, function, reg, byte) = Self::decode(offset);
        let root = self.root.lock().unwrap_or_else(|e| e.into_inner());
        read_bytes(root.config_read(bus, slot, function, reg), byte, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !valid_access(offset, data.len()) || offset >> ECAM_BUS_SHIFT > 0xff {
            return;
        }
        let (bus, slot, function, reg, byte) = Self::decode(offset);
        let root = self.root.lock().unwrap_or_else(|e| e.into_inner());
        root.config_write(bus, slot, function, reg, byte, data);
    }
}

/// Configuration mechanism #1: a dword address register at 0xCF8 and a data window at 0xCFC-0xCFF.
/// Placed on the port bus at 0xCF8 with length 8.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

const CONFIG_ENABLE: u32 = 1 << 31;
const DATA_OFFSET: u64 = 4;

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    /// (bus, device, function, register) of the current address, if enabled.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        (self.address & CONFIG_ENABLE != 0).then_some((
            (self.address >> 16) as u8,
            ((self.address >> 11) & 0x1f) as u8,
            ((self.address >> 8) & 0x7) as u8,
            ((self.address & 0xfc) >> 2) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !valid_access(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        if offset < DATA_OFFSET {
            read_bytes(self.address, offset, data);
            return;
        }
        let value = match self.target() {
            Some((bus, slot, function, reg)) => self
                .root
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_read(bus, slot, function, reg),
            None => u32::MAX,
        };
        read_bytes(value, offset - DATA_OFFSET, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !valid_access(offset, data.len()) {
            return;
        }
        if offset < DATA_OFFSET {
            // Only whole-dword writes set the address; narrower ones at 0xCF8 belong to other
            // (legacy) mechanisms and are ignored.
            if data.len() == 4 {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & !0x3;
            }
            return;
        }
        if let Some((bus, slot, function, reg)) = self.target() {
            self.root
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(bus, slot, function, reg, offset - DATA_OFFSET, data);
        }
    }
}

/// The PCI memory window as one range of the VMM's MMIO bus, dispatching to the BARs inside it, and the
/// allocator that hands out its ranges.
///
/// The VMM's bus is shared read-only with the vCPU threads once they run; BARs of hot-plugged devices come
/// and go after that, and the guest may move BARs, so they live here, behind the window's own lock. An
/// access that hits no BAR reads as all ones (a master abort) and writes go nowhere, as for an empty
/// slot's BAR range on real hardware.
///
/// A BAR is known by its device and index, never by its address alone (two BARs may be programmed to the
/// same address for a moment; only the one that got there first decodes).
pub struct PciBarWindow {
    base: u64,
    size: u64,
    /// Keyed by guest-physical address.
    bars: BTreeMap<u64, WindowBar>,
    /// Every range in use: decoding BARs, and ranges held for devices not created yet or ejected and not
    /// released yet.
    allocator: BarAllocator,
}

struct WindowBar {
    size: u64,
    device: SharedPciDevice,
    bar: usize,
}

impl PciBarWindow {
    pub fn new(base: u64, size: u64) -> Result<Self, PciError> {
        Ok(Self {
            base,
            size,
            bars: BTreeMap::new(),
            allocator: BarAllocator::new(base, size)?,
        })
    }

    /// A free `size`-byte range aligned to `size` (see [`BarAllocator::allocate`]).
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        self.allocator.allocate(size)
    }

    /// The free `size`-byte range at `addr` exactly.
    pub fn allocate_at(&mut self, addr: u64, size: u64) -> Result<u64, PciError> {
        self.allocator.allocate_at(addr, size)
    }

    pub fn free(&mut self, addr: u64, size: u64) -> Result<(), PciError> {
        self.allocator.free(addr, size)
    }

    /// Whether `[addr, addr + size)` lies inside the window and no decoding BAR but the one at `except`
    /// overlaps it.
    fn check_room(&self, addr: u64, size: u64, except: Option<u64>) -> Result<(), PciError> {
        let end = addr.checked_add(size).filter(|_| size > 0);
        if addr < self.base || end.is_none_or(|end| end > self.base + self.size) {
            return Err(PciError::BarPlacement(
                addr,
                format!("outside the PCI window {:#x}+{:#x}", self.base, self.size),
            ));
        }
        let end = addr + size;
        let clash = self
            .bars
            .range(..end)
            .rev()
            .filter(|(&at, _)| Some(at) != except)
            .find(|(&at, b)| at + b.size > addr);
        match clash {
            Some((&at, _)) => Err(PciError::BarPlacement(
                addr,
                format!("overlaps the BAR at {at:#x}"),
            )),
            None => Ok(()),
        }
    }

    /// Decodes every memory BAR of `device` (as its `bars()` reports them) from now on. All or nothing.
    pub fn insert_device(&mut self, device: &SharedPciDevice) -> Result<(), PciError> {
        let bars = lock(device).bars();
        for (n, bar) in bars.iter().enumerate() {
            if let Err(e) = self.check_room(bar.addr, bar.size, None) {
                for earlier in &bars[..n] {
                    self.bars.remove(&earlier.addr);
                }
                return Err(e);
            }
            self.bars.insert(
                bar.addr,
                WindowBar {
                    size: bar.size,
                    device: device.clone(),
                    bar: bar.index,
                },
            );
        }
        Ok(())
    }

    /// Stops decoding the BARs of `device`; returns how many were removed. Their ranges stay allocated.
    pub fn remove_device(&mut self, device: &SharedPciDevice) -> usize {
        let before = self.bars.len();
        self.bars.retain(|_, b| !Arc::ptr_eq(&b.device, device));
        before - self.bars.len()
    }

    /// Where BAR `bar` of `device` decodes, if it does.
    pub fn bar_addr(&self, device: &SharedPciDevice, bar: usize) -> Option<u64> {
        self.bars
            .iter()
            .find(|(_, b)| b.bar == bar && Arc::ptr_eq(&b.device, device))
            .map(|(&at, _)| at)
    }

    /// Moves BAR `bar` of `device` to `addr`: the range must be inside the window, naturally aligned and
    /// free (in the allocator too: ranges held for other devices count). The old range is freed. Returns
    /// the old address; on error nothing changed. The device is not told (see [`move_bar`]).
    pub fn move_bar(
        &mut self,
        device: &SharedPciDevice,
        bar: usize,
        addr: u64,
    ) -> Result<u64, PciError> {
        let old = self.bar_addr(device, bar).ok_or_else(|| {
            PciError::BarPlacement(addr, format!("BAR {bar} of this device does not decode"))
        })?;
        if old == addr {
            return Ok(old);
        }
        let size = self.bars.get(&old).map_or(0, |b| b.size);
        self.check_room(addr, size, Some(old))?;
        self.allocator.allocate_at(addr, size)?;
        if let Some(entry) = self.bars.remove(&old) {
            self.bars.insert(addr, entry);
        }
        // A BAR inserted without an allocation (none of the VMM's) has nothing to free.
        let _ = self.allocator.free(old, size);
        Ok(old)
    }

    fn lookup(&self, addr: u64) -> Option<(&WindowBar, u64)> {
        let (&at, bar) = self.bars.range(..=addr).next_back()?;
        let offset = addr - at;
        (offset < bar.size).then_some((bar, offset))
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.lookup(self.base.wrapping_add(offset)) {
            Some((bar, at)) => lock(&bar.device).bar_read(bar.bar, at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bar, at)) = self.lookup(self.base.wrapping_add(offset)) {
            lock(&bar.device).bar_write(bar.bar, at, data);
        }
    }
}

/// Moves BAR `bar` of `device` to `addr`: in `window` first, then in the device ([`PciDevice::move_bar`]:
/// its configuration and notification ioeventfds). All or nothing: on error both are as they were. Returns
/// the old address. Neither lock is held while the other is taken.
pub fn move_bar(
    window: &Mutex<PciBarWindow>,
    device: &SharedPciDevice,
    bar: usize,
    addr: u64,
) -> Result<u64, PciError> {
    let old = lock_window(window).move_bar(device, bar, addr)?;
    if let Err(e) = lock(device).move_bar(bar, addr) {
        if let Err(back) = lock_window(window).move_bar(device, bar, old) {
            log::error!("pci: BAR {bar} cannot go back to {old:#x} in the window: {back}");
        }
        return Err(e);
    }
    Ok(old)
}

fn lock_window(window: &Mutex<PciBarWindow>) -> std::sync::MutexGuard<'_, PciBarWindow> {
    window.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciBarInfo;

    const WINDOW: u64 = 0xc000_0000;
    const WINDOW_SIZE: u64 = 0x2000_0000;

    /// A function with a scratch dword at 0x40 and one 4 KiB BAR whose reads return the BAR offset's low
    /// byte plus `tag`.
    struct Dummy {
        config: PciConfiguration,
        tag: u8,
        last_bar_write: Option<(usize, u64, Vec<u8>)>,
        /// Where `move_bar` was told the BAR goes, in order.
        moved_to: Vec<u64>,
        refuse_moves: bool,
    }

    impl Dummy {
        fn at(bar: u64, tag: u8) -> Self {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1044,
                revision: 1,
                class: (0xff, 0, 0),
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x40,
            });
            config.add_bar(0, bar, 0x1000).unwrap();
            config.set_writable(0x40, u32::MAX, 4);
            Self {
                config,
                tag,
                last_bar_write: None,
                moved_to: Vec::new(),
                refuse_moves: false,
            }
        }

        fn new() -> Self {
            Self::at(WINDOW, 0)
        }
    }

    impl PciDevice for Dummy {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
            self.config.write_reg(reg, offset, data)
        }
        fn bars(&self) -> Vec<PciBarInfo> {
            self.config.bars()
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((offset as u8).wrapping_add(self.tag));
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_bar_write = Some((bar, offset, data.to_vec()));
        }
        fn move_bar(&mut self, bar: usize, addr: u64) -> Result<(), PciError> {
            if self.refuse_moves && addr != self.moved_to.last().copied().unwrap_or(WINDOW) {
                return Err(PciError::InvalidBar(bar));
            }
            self.config.set_bar_addr(bar, addr)?;
            self.moved_to.push(addr);
            Ok(())
        }
    }

    fn root_with_dummy() -> (Arc<Mutex<PciRoot>>, Arc<Mutex<Dummy>>) {
        let mut root = PciRoot::new();
        let dummy = Arc::new(Mutex::new(Dummy::new()));
        let slot = root.free_slot().unwrap();
        assert_eq!(slot, 1);
        assert_eq!(
            root.add_device(slot, dummy.clone()).unwrap().to_string(),
            "0000:00:01.0"
        );
        (Arc::new(Mutex::new(root)), dummy)
    }

    fn ecam_read(e: &mut PciConfigMmio, slot: u64, reg: u64, len: usize) -> u32 {
        let mut data = vec![0u8; len];
        e.read(slot << 15 | reg, &mut data);
        data.iter().rev().fold(0, |a, b| a << 8 | u32::from(*b))
    }

    fn window_read(window: &Mutex<PciBarWindow>, addr: u64) -> u8 {
        let mut d = [0u8; 1];
        lock_window(window).read(addr - WINDOW, &mut d);
        d[0]
    }

    #[test]
    fn ecam_reaches_bridge_and_devices() {
        let (root, _) = root_with_dummy();
        let mut e = PciConfigMmio::new(root.clone());
        assert_eq!(ecam_read(&mut e, 0, 0, 4), 0x0008_1b36);
        assert_eq!(ecam_read(&mut e, 0, 0xa, 2), 0x0600, "host bridge class");
        assert_eq!(ecam_read(&mut e, 1, 0, 4), 0x1044_1af4);
        assert_eq!(ecam_read(&mut e, 1, 2, 2), 0x1044);
        assert_eq!(ecam_read(&mut e, 1, 1, 1), 0x1a);
        // Empty slots, other functions and other buses read all ones.
        assert_eq!(ecam_read(&mut e, 2, 0, 4), u32::MAX);
        let mut d = [0u8; 4];
        e.read(1 << 15 | 1 << 12, &mut d);
        assert_eq!(d, [0xff; 4]);
        e.read(1 << 20 | 1 << 15, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Extended config space of a present function reads zero (no extended capabilities).
        assert_eq!(ecam_read(&mut e, 1, 0x100, 4), 0);
        // Writes land, with byte granularity.
        e.write(1 << 15 | 0x40, &0x1234_5678u32.to_le_bytes());
        e.write(1 << 15 | 0x41, &[0xaa]);
        assert_eq!(ecam_read(&mut e, 1, 0x40, 4), 0x1234_aa78);
        // Misaligned or odd-sized accesses are dropped.
        e.write(1 << 15 | 0x43, &[1, 2]);
        e.write(1 << 15 | 0x40, &[1, 2, 3]);
        assert_eq!(ecam_read(&mut e, 1, 0x40, 4), 0x1234_aa78);
        let mut odd = [0u8; 8];
        e.read(1 << 15, &mut odd);
        assert_eq!(odd, [0xff; 8]);
        // Writes to missing functions go nowhere.
        e.write(5 << 15 | 0x40, &[1, 2, 3, 4]);
    }

    #[test]
    fn cf8_cfc_mechanism() {
        let (root, _) = root_with_dummy();
        let mut io = PciConfigIo::new(root);
        let addr = |slot: u32, reg: u32| (CONFIG_ENABLE | slot << 11 | reg).to_le_bytes();
        io.write(0, &addr(1, 0));
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), CONFIG_ENABLE | 1 << 11);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1044_1af4);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
        // BAR sizing through CF8.
        io.write(0, &addr(1, 0x10));
        io.write(4, &[0xff; 4]);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_f000);
        io.write(4, &0xc000_0000u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xc000_0000);
        // Disabled address: all ones, writes dropped.
        io.write(0, &(1u32 << 11 | 0x40).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(4, &[0; 4]);
        // A byte write to 0xCF8 does not change the address.
        io.write(0, &addr(1, 0x40));
        io.write(0, &[0]);
        io.write(4, &7u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
    }

    #[test]
    fn bar_window_dispatches_and_forgets_removed_devices() {
        let mut window = PciBarWindow::new(WINDOW, WINDOW_SIZE).unwrap();
        let dummy: SharedPciDevice = Arc::new(Mutex::new(Dummy::new()));
        window.insert_device(&dummy).unwrap();
        window.write(0x10, &[5, 6]);
        let mut d = [0xaau8; 2];
        window.read(0x10, &mut d);
        assert_eq!(d, [0x10, 0x10], "the dummy's BAR answers");
        let mut miss = [0u8; 4];
        window.read(0x1000, &mut miss);
        assert_eq!(miss, [0xff; 4], "no BAR there");
        // The same BAR twice overlaps.
        assert!(matches!(
            window.insert_device(&dummy),
            Err(PciError::BarPlacement(WINDOW, _))
        ));
        assert_eq!(window.bar_addr(&dummy, 0), Some(WINDOW));
        assert_eq!(window.remove_device(&dummy), 1);
        assert_eq!(window.remove_device(&dummy), 0);
        assert_eq!(window.bar_addr(&dummy, 0), None);
        window.read(0x10, &mut d);
        assert_eq!(d, [0xff; 2]);
        // A BAR outside the window is refused.
        let mut narrow = PciBarWindow::new(0xd000_0000, 0x1000).unwrap();
        assert!(matches!(
            narrow.insert_device(&dummy),
            Err(PciError::BarPlacement(WINDOW, _))
        ));
        assert!(PciBarWindow::new(WINDOW, 0).is_err());
    }

    /// A window with devices A (tag 0) and B (tag 0x80) at its first two pages, both allocated.
    fn two_devices() -> (Arc<Mutex<PciBarWindow>>, SharedPciDevice, SharedPciDevice) {
        let window = Arc::new(Mutex::new(PciBarWindow::new(WINDOW, WINDOW_SIZE).unwrap()));
        let a: SharedPciDevice = Arc::new(Mutex::new(Dummy::at(WINDOW, 0)));
        let b: SharedPciDevice = Arc::new(Mutex::new(Dummy::at(WINDOW + 0x1000, 0x80)));
        {
            let mut w = lock_window(&window);
            for d in [&a, &b] {
                let bar = lock(d).bars()[0];
                w.allocate_at(bar.addr, bar.size).unwrap();
                w.insert_device(d).unwrap();
            }
        }
        (window, a, b)
    }

    #[test]
    fn window_moves_refuse_overlaps_and_the_outside() {
        let (window, a, b) = two_devices();
        let mut w = lock_window(&window);
        // A free, aligned range: moved; the old range decodes nothing and is free again.
        assert_eq!(w.move_bar(&a, 0, WINDOW + 0x4000).unwrap(), WINDOW);
        assert_eq!(w.bar_addr(&a, 0), Some(WINDOW + 0x4000));
        drop(w);
        assert_eq!(window_read(&window, WINDOW + 0x4005), 5);
        assert_eq!(window_read(&window, WINDOW + 0x5), 0xff);
        assert_eq!(window_read(&window, WINDOW + 0x1005), 0x85, "B untouched");
        let mut w = lock_window(&window);
        assert!(w.allocate_at(WINDOW + 0x4000, 0x1000).is_err(), "new taken");
        assert_eq!(w.allocate(0x1000).unwrap(), WINDOW, "old freed");
        w.free(WINDOW, 0x1000).unwrap();
        // Refused, changing nothing: onto B, onto a range held for a device not created yet, outside
        // the window, straddling its end, misaligned, a BAR that does not exist.
        let refused = [
            WINDOW + 0x1000,
            WINDOW + 0x8000,
            0xb000_0000,
            0xe000_0000,
            WINDOW + WINDOW_SIZE - 0x800,
            WINDOW + 0x2800,
        ];
        w.allocate_at(WINDOW + 0x8000, 0x1000).unwrap();
        for addr in refused {
            assert!(w.move_bar(&a, 0, addr).is_err(), "{addr:#x}");
            assert_eq!(w.bar_addr(&a, 0), Some(WINDOW + 0x4000), "{addr:#x}");
        }
        assert!(w.move_bar(&a, 1, WINDOW + 0x2000).is_err());
        // Moving onto itself is no move.
        assert_eq!(w.move_bar(&a, 0, WINDOW + 0x4000).unwrap(), WINDOW + 0x4000);
        // A removed device has nothing to move.
        w.remove_device(&b);
        assert!(w.move_bar(&b, 0, WINDOW + 0x2000).is_err());
        // Its range is still held (until the VMM frees it): nobody moves onto it.
        assert!(w.move_bar(&a, 0, WINDOW + 0x1000).is_err());
    }

    /// The guest's view: ECAM on a root that knows the window.
    fn guest_root() -> (
        PciConfigMmio,
        Arc<Mutex<PciBarWindow>>,
        Arc<Mutex<Dummy>>,
        SharedPciDevice,
    ) {
        let window = Arc::new(Mutex::new(PciBarWindow::new(WINDOW, WINDOW_SIZE).unwrap()));
        let a = Arc::new(Mutex::new(Dummy::at(WINDOW, 0)));
        let b: SharedPciDevice = Arc::new(Mutex::new(Dummy::at(WINDOW + 0x1000, 0x80)));
        let mut root = PciRoot::new();
        root.set_bar_window(window.clone());
        let shared_a: SharedPciDevice = a.clone();
        for (slot, d) in [(1, &shared_a), (2, &b)] {
            let bar = lock(d).bars()[0];
            let mut w = lock_window(&window);
            w.allocate_at(bar.addr, bar.size).unwrap();
            w.insert_device(d).unwrap();
            drop(w);
            root.add_device(slot, d.clone()).unwrap();
        }
        (PciConfigMmio::new(Arc::new(Mutex::new(root))), window, a, b)
    }

    fn ecam_write(e: &mut PciConfigMmio, slot: u64, reg: u64, value: u32) {
        e.write(slot << 15 | reg, &value.to_le_bytes());
    }

    #[test]
    fn guest_moves_go_through_the_window() {
        let (mut e, window, a, _) = guest_root();
        let shared: SharedPciDevice = a.clone();
        // Decoding off, new address, decoding on: the BAR decodes there and nowhere else.
        ecam_write(&mut e, 1, 0x04, 0);
        ecam_write(&mut e, 1, 0x10, 0xd000_0000);
        assert_eq!(window_read(&window, WINDOW + 7), 7, "not moved yet");
        ecam_write(&mut e, 1, 0x04, 0x2);
        assert_eq!(ecam_read(&mut e, 1, 0x10, 4), 0xd000_0000);
        assert_eq!(window_read(&window, 0xd000_0007), 7);
        assert_eq!(window_read(&window, WINDOW + 7), 0xff);
        assert_eq!(a.lock().unwrap().moved_to, [0xd000_0000]);
        assert_eq!(lock_window(&window).bar_addr(&shared, 0), Some(0xd000_0000));
        // Decoding on: a write moves it at once; sizing in between does not.
        ecam_write(&mut e, 1, 0x10, u32::MAX);
        assert_eq!(ecam_read(&mut e, 1, 0x10, 4), 0xffff_f000);
        ecam_write(&mut e, 1, 0x10, 0xd000_0000);
        ecam_write(&mut e, 1, 0x10, 0xc010_0000);
        assert_eq!(window_read(&window, 0xc010_0001), 1);
        assert_eq!(window_read(&window, 0xd000_0001), 0xff);
        assert_eq!(a.lock().unwrap().moved_to, [0xd000_0000, 0xc010_0000]);
    }

    #[test]
    fn refused_guest_moves_leave_the_bar_where_it_was() {
        let (mut e, window, a, _) = guest_root();
        ecam_write(&mut e, 1, 0x04, 0x2);
        // Onto B, outside the window (into ECAM, below it), to 0: each put back at once.
        for addr in [WINDOW + 0x1000, 0xe000_0000, 0x8000_0000, 0] {
            ecam_write(&mut e, 1, 0x10, addr as u32);
            assert_eq!(ecam_read(&mut e, 1, 0x10, 4), WINDOW as u32, "{addr:#x}");
            assert_eq!(window_read(&window, WINDOW + 3), 3);
            assert_eq!(window_read(&window, WINDOW + 0x1003), 0x83, "B still there");
        }
        // With decoding off the registers hold the value, and enabling puts it back.
        ecam_write(&mut e, 1, 0x04, 0);
        ecam_write(&mut e, 1, 0x10, WINDOW as u32 + 0x1000);
        assert_eq!(ecam_read(&mut e, 1, 0x10, 4), WINDOW as u32 + 0x1000);
        ecam_write(&mut e, 1, 0x04, 0x2);
        assert_eq!(ecam_read(&mut e, 1, 0x10, 4), WINDOW as u32);
        // A device that cannot move its side: the window goes back too.
        a.lock().unwrap().refuse_moves = true;
        ecam_write(&mut e, 1, 0x10, 0xd000_0000);
        assert_eq!(ecam_read(&mut e, 1, 0x10, 4), WINDOW as u32);
        assert_eq!(window_read(&window, WINDOW + 3), 3);
        assert_eq!(window_read(&window, 0xd000_0003), 0xff);
        let mut w = lock_window(&window);
        assert_eq!(w.allocate_at(0xd000_0000, 0x1000).unwrap(), 0xd000_0000);
        assert!(w.allocate_at(WINDOW, 0x1000).is_err(), "still held");
    }

    #[test]
    fn without_a_window_moves_are_refused() {
        let (root, dummy) = root_with_dummy();
        let mut e = PciConfigMmio::new(root);
        ecam_write(&mut e, 1, 0x04, 0x2);
        ecam_write(&mut e, 1, 0x10, 0xd000_0000);
        assert_eq!(ecam_read(&mut e, 1, 0x10, 4), WINDOW as u32);
        assert_eq!(dummy.lock().unwrap().config.bars()[0].addr, WINDOW);
    }

    #[test]
    fn slots() {
        let (root, _) = root_with_dummy();
        let mut root = root.lock().unwrap();
        let d: SharedPciDevice = Arc::new(Mutex::new(Dummy::new()));
        assert!(matches!(
            root.add_device(1, d.clone()),
            Err(PciError::SlotTaken(1))
        ));
        assert!(matches!(
            root.add_device(0, d.clone()),
            Err(PciError::InvalidSlot(0))
        ));
        assert!(matches!(
            root.add_device(32, d.clone()),
            Err(PciError::InvalidSlot(32))
        ));
        for s in 2..32 {
            root.add_device(s, d.clone()).unwrap();
        }
        assert!(matches!(root.free_slot(), Err(PciError::NoFreeSlot)));
        assert!(root.remove_device(0).is_none());
        assert!(root.remove_device(5).is_some());
        assert_eq!(root.free_slot().unwrap(), 5);
    }
}
