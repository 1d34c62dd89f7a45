//! The root bus (segment 0, bus 0) with its host bridge at 00:00.0, and the two ways to reach
//! configuration space: ECAM (PCI Express Base 4.0, §7.2.2; an MMIO window, described to the guest by the
//! ACPI MCFG table) and the legacy configuration mechanism #1 (ports 0xCF8 address / 0xCFC data).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusDevice};
use crate::pci::configuration::{PciConfiguration, PciHeader};
use crate::pci::{PciBdf, PciDevice, PciError};

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
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }
}

/// Bus 0 and the functions on it (function 0 of each slot).
pub struct PciRoot {
    devices: BTreeMap<u8, SharedPciDevice>,
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
        Self { devices }
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

    pub fn config_write(
        &self,
        bus: u8,
        slot: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        if let Some(d) = self.device(bus, slot, function) {
            lock(d).config_write(reg, offset, data);
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

/// The PCI memory window as one range of the VMM's MMIO bus, dispatching to the BARs inside it.
///
/// The VMM's bus is shared read-only with the vCPU threads once they run; BARs of hot-plugged devices come
/// and go after that, so they live here, behind the window's own lock. An access that hits no BAR reads as
/// all ones (a master abort) and writes go nowhere, as for an empty slot's BAR range on real hardware.
pub struct PciBarWindow {
    base: u64,
    size: u64,
    /// Keyed by guest-physical address; the bus hands each BAR device its offset within the BAR.
    bars: Bus,
}

impl PciBarWindow {
    pub fn new(base: u64, size: u64) -> Self {
        Self {
            base,
            size,
            bars: Bus::new(),
        }
    }

    /// Decodes every memory BAR of `device` (as its `bars()` reports them) from now on.
    pub fn insert_device(&mut self, device: &SharedPciDevice) -> Result<(), PciError> {
        let bars = lock(device).bars();
        for (n, bar) in bars.iter().enumerate() {
            let inside = bar.addr >= self.base
                && bar
                    .addr
                    .checked_add(bar.size)
                    .is_some_and(|end| end <= self.base + self.size);
            let placed = if inside {
                let bar_device =
                    Arc::new(Mutex::new(PciBarBusDevice::new(device.clone(), bar.index)));
                self.bars
                    .insert(bar_device, bar.addr, bar.size)
                    .map_err(|e| PciError::BarPlacement(bar.addr, e.to_string()))
            } else {
                Err(PciError::BarPlacement(
                    bar.addr,
                    format!("outside the PCI window {:#x}+{:#x}", self.base, self.size),
                ))
            };
            if let Err(e) = placed {
                // All or nothing: the BARs placed so far go again.
                for earlier in &bars[..n] {
                    self.bars.remove(earlier.addr);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stops decoding the BARs of `device`; returns how many were removed.
    pub fn remove_device(&mut self, device: &SharedPciDevice) -> usize {
        let bars = lock(device).bars();
        bars.iter()
            .filter(|bar| self.bars.remove(bar.addr).is_some())
            .count()
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.bars.read(self.base + offset, data).is_err() {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let _ = self.bars.write(self.base + offset, data);
    }
}

/// Puts one BAR of a PCI device on the MMIO bus: bus offsets are BAR offsets.
pub struct PciBarBusDevice {
    device: SharedPciDevice,
    bar: usize,
}

impl PciBarBusDevice {
    pub fn new(device: SharedPciDevice, bar: usize) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for PciBarBusDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciBarInfo;

    /// A function with a scratch dword at 0x40 and one BAR.
    struct Dummy {
        config: PciConfiguration,
        last_bar_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl Dummy {
        fn new() -> Self {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1044,
                revision: 1,
                class: (0xff, 0, 0),
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x40,
            });
            config.add_bar(0, 0xc000_0000, 0x1000).unwrap();
            config.set_writable(0x40, u32::MAX, 4);
            Self {
                config,
                last_bar_write: None,
            }
        }
    }

    impl PciDevice for Dummy {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg, offset, data);
        }
        fn bars(&self) -> Vec<PciBarInfo> {
            self.config.bars()
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_bar_write = Some((bar, offset, data.to_vec()));
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
    fn bar_bus_device_forwards_offsets() {
        let (_, dummy) = root_with_dummy();
        let mut bar = PciBarBusDevice::new(dummy.clone(), 0);
        bar.write(0x10, &[1, 2]);
        assert_eq!(
            dummy.lock().unwrap().last_bar_write,
            Some((0, 0x10, vec![1, 2]))
        );
        let mut d = [0xaa; 4];
        bar.read(0, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn bar_window_dispatches_and_forgets_removed_devices() {
        let mut window = PciBarWindow::new(0xc000_0000, 0x2000_0000);
        let dummy: SharedPciDevice = Arc::new(Mutex::new(Dummy::new()));
        window.insert_device(&dummy).unwrap();
        window.write(0x10, &[5, 6]);
        let mut d = [0xaau8; 2];
        window.read(0x10, &mut d);
        assert_eq!(d, [0, 0], "the dummy's BAR reads zeros");
        let mut miss = [0u8; 4];
        window.read(0x1000, &mut miss);
        assert_eq!(miss, [0xff; 4], "no BAR there");
        // The same BAR twice overlaps.
        assert!(matches!(
            window.insert_device(&dummy),
            Err(PciError::BarPlacement(0xc000_0000, _))
        ));
        assert_eq!(window.remove_device(&dummy), 1);
        assert_eq!(window.remove_device(&dummy), 0);
        window.read(0x10, &mut d);
        assert_eq!(d, [0xff; 2]);
        // A BAR outside the window is refused.
        let mut narrow = PciBarWindow::new(0xd000_0000, 0x1000);
        assert!(matches!(
            narrow.insert_device(&dummy),
            Err(PciError::BarPlacement(0xc000_0000, _))
        ));
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
