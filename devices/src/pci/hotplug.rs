//! The PCI hotplug controller: how the VMM tells the guest that devices were added to or should be removed
//! from bus 0, and how the guest confirms a removal.
//!
//! The guest's ACPI tables drive it: a Generic Event Device (ACPI0013) whose interrupt the VMM raises on
//! every hotplug event runs `\_SB_.PCI0.PSCN`, which reads the two slot bitmaps below and notifies each
//! slot's ACPI device (Device Check for added slots, Eject Request for slots to remove, as Linux's acpiphp
//! expects); the slot's `_EJ0` writes the eject register once the OS has let go of the device. A guest
//! without an AML interpreter (TrEnv's test guest) polls the same registers directly.
//!
//! MMIO, 4 KiB (`layout::PCI_HOTPLUG_START`). 32-bit little-endian registers, accessed as aligned dwords
//! (other accesses read 0 and write nothing: a partial read of a read-to-clear register would lose bits).
//! Bit n of a slot bitmap is slot (device number) n of bus 0; there is one segment and one bus, so no
//! selector register.
//!
//! | offset | access | meaning |
//! | ------ | ------ | ------- |
//! | 0x00 | R | magic `0x5048_5254` (bytes "TRHP") |
//! | 0x04 | R | version, 1 |
//! | 0x08 | R, read clears | slots whose device was added since the last read (ACPI `PCIU`) |
//! | 0x0c | R, read clears | slots whose device the VMM asks the guest to eject (ACPI `PCID`) |
//! | 0x10 | W | eject: the devices in these slots are gone from the guest's view at once (config space reads all ones, BARs stop decoding); the VMM then tears them down. Reads 0 (ACPI `B0EJ`) |
//! | 0x14 | R | slots that hold a device now, the host bridge's slot 0 included |
//!
//! Any slot but 0 (the host bridge) may be ejected, whether or not the VMM asked: the guest's OS may
//! power a slot off on its own, as on real hardware.

use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::pci::root::{PciBarWindow, PciRoot, NUM_SLOTS};
use crate::warn_ratelimited;

pub const MAGIC: u32 = u32::from_le_bytes(*b"TRHP");
pub const VERSION: u32 = 1;

pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_SLOTS_ADDED: u64 = 0x08;
pub const REG_SLOTS_TO_EJECT: u64 = 0x0c;
pub const REG_EJECT: u64 = 0x10;
pub const REG_SLOTS_PRESENT: u64 = 0x14;
/// Length of the register block (the device's MMIO range is a whole page).
pub const REGS_LEN: u64 = 0x18;

/// Slot 0 holds the host bridge, which never comes or goes.
const HOTPLUG_SLOTS: u32 = !1;

/// Raises the guest's hotplug interrupt (the GED's GSI) and wakes a guest that polls.
pub type HotplugNotifier = Box<dyn Fn() + Send>;

pub struct PciHotplug {
    root: Arc<Mutex<PciRoot>>,
    window: Arc<Mutex<PciBarWindow>>,
    added: u32,
    to_eject: u32,
    /// Slots the guest ejected and the VMM has not taken down yet.
    ejected: u32,
    notify: HotplugNotifier,
    /// Readable while `ejected` is non-zero, for the VMM's event loop.
    ejected_event: EventFd,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn slot_bit(slot: u8) -> u32 {
    if slot < NUM_SLOTS {
        (1u32 << slot) & HOTPLUG_SLOTS
    } else {
        0
    }
}

impl PciHotplug {
    /// A controller for the devices of `root` whose BARs `window` decodes.
    pub fn new(
        root: Arc<Mutex<PciRoot>>,
        window: Arc<Mutex<PciBarWindow>>,
        notify: HotplugNotifier,
    ) -> std::io::Result<Self> {
        Ok(Self {
            root,
            window,
            added: 0,
            to_eject: 0,
            ejected: 0,
            notify,
            ejected_event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// An eventfd that becomes readable when the guest ejects a device; call [`Self::take_ejected`] then.
    pub fn ejected_eventfd(&self) -> std::io::Result<EventFd> {
        self.ejected_event.try_clone()
    }

    /// Tells the guest that `slot` now holds a device (already on the bus and decoding its BARs).
    pub fn device_added(&mut self, slot: u8) {
        let bit = slot_bit(slot);
        if bit == 0 {
            return;
        }
        self.added |= bit;
        self.to_eject &= !bit;
        (self.notify)();
    }

    /// Asks the guest to let go of the device in `slot` and eject it. Asking again notifies again.
    pub fn request_eject(&mut self, slot: u8) {
        let bit = slot_bit(slot);
        if bit == 0 {
            return;
        }
        self.to_eject |= bit;
        (self.notify)();
    }

    /// Whether an eject request for `slot` is waiting for the guest to read it.
    pub fn eject_requested(&self, slot: u8) -> bool {
        self.to_eject & slot_bit(slot) != 0
    }

    /// The slots the guest ejected since the last call, as a bitmap; their devices are already off the bus
    /// and out of the window, for the VMM to release.
    pub fn take_ejected(&mut self) -> u32 {
        let _ = self.ejected_event.read();
        std::mem::take(&mut self.ejected)
    }

    fn present(&self) -> u32 {
        let root = lock(&self.root);
        (0..NUM_SLOTS)
            .filter(|&s| root.has_device(s))
            .fold(0, |acc, s| acc | 1 << s)
    }

    fn eject(&mut self, slots: u32) {
        let mut done = 0;
        for slot in 0..NUM_SLOTS {
            let bit = slot_bit(slot);
            if slots & bit == 0 {
                continue;
            }
            // Out of config space first, then out of the window: from here on the guest sees an empty slot.
            let Some(device) = lock(&self.root).remove_device(slot) else {
                continue;
            };
            lock(&self.window).remove_device(&device);
            done |= bit;
        }
        if done != 0 {
            self.added &= !done;
            self.to_eject &= !done;
            self.ejected |= done;
            let _ = self.ejected_event.write(1);
        }
    }
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn_ratelimited!(
                "pci hotplug: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_SLOTS_ADDED => std::mem::take(&mut self.added),
            REG_SLOTS_TO_EJECT => std::mem::take(&mut self.to_eject),
            REG_SLOTS_PRESENT => self.present(),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_ratelimited!(
                "pci hotplug: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset == REG_EJECT {
            self.eject(u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::configuration::{PciBarInfo, PciConfiguration, PciHeader};
    use crate::pci::PciDevice;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const WINDOW: u64 = 0xc000_0000;

    struct Dev {
        config: PciConfiguration,
    }

    impl Dev {
        fn shared(bar: u64) -> Arc<Mutex<Dev>> {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1042,
                revision: 1,
                class: (1, 0x80, 0),
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x40,
            });
            config.add_bar(0, bar, 0x1000).unwrap();
            Arc::new(Mutex::new(Dev { config }))
        }
    }

    impl PciDevice for Dev {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn config_write(
            &mut self,
            reg: usize,
            offset: u64,
            data: &[u8],
        ) -> Vec<crate::pci::BarMove> {
            self.config.write_reg(reg, offset, data)
        }
        fn bars(&self) -> Vec<PciBarInfo> {
            self.config.bars()
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
    }

    struct Fixture {
        root: Arc<Mutex<PciRoot>>,
        window: Arc<Mutex<PciBarWindow>>,
        hp: PciHotplug,
        notified: Arc<AtomicUsize>,
        ejected_fd: EventFd,
    }

    fn fixture() -> Fixture {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let window = Arc::new(Mutex::new(PciBarWindow::new(WINDOW, 0x2000_0000).unwrap()));
        let notified = Arc::new(AtomicUsize::new(0));
        let count = notified.clone();
        let hp = PciHotplug::new(
            root.clone(),
            window.clone(),
            Box::new(move || {
                count.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        let ejected_fd = hp.ejected_eventfd().unwrap();
        Fixture {
            root,
            window,
            hp,
            notified,
            ejected_fd,
        }
    }

    fn plug(f: &Fixture, slot: u8, bar: u64) {
        let dev: crate::pci::SharedPciDevice = Dev::shared(bar);
        f.root
            .lock()
            .unwrap()
            .add_device(slot, dev.clone())
            .unwrap();
        f.window.lock().unwrap().insert_device(&dev).unwrap();
    }

    fn read(hp: &mut PciHotplug, reg: u64) -> u32 {
        let mut d = [0u8; 4];
        hp.read(reg, &mut d);
        u32::from_le_bytes(d)
    }

    fn window_read(f: &Fixture, addr: u64) -> u8 {
        let mut d = [0u8; 1];
        f.window.lock().unwrap().read(addr - WINDOW, &mut d);
        d[0]
    }

    #[test]
    fn identifies_itself() {
        let mut f = fixture();
        assert_eq!(read(&mut f.hp, REG_MAGIC), 0x5048_5254);
        assert_eq!(read(&mut f.hp, REG_VERSION), 1);
        assert_eq!(read(&mut f.hp, REG_SLOTS_PRESENT), 1, "the host bridge");
        assert_eq!(read(&mut f.hp, 0x800), 0);
    }

    #[test]
    fn added_slots_are_reported_once_and_notify() {
        let mut f = fixture();
        plug(&f, 3, WINDOW + 0x8000);
        f.hp.device_added(3);
        plug(&f, 5, WINDOW + 0x9000);
        f.hp.device_added(5);
        assert_eq!(f.notified.load(Ordering::SeqCst), 2);
        assert_eq!(read(&mut f.hp, REG_SLOTS_PRESENT), 1 | 1 << 3 | 1 << 5);
        assert_eq!(read(&mut f.hp, REG_SLOTS_ADDED), 1 << 3 | 1 << 5);
        assert_eq!(read(&mut f.hp, REG_SLOTS_ADDED), 0, "read clears");
        // Slot 0 and out-of-range slots are not hotplug slots.
        f.hp.device_added(0);
        f.hp.device_added(32);
        f.hp.request_eject(0);
        assert_eq!(f.notified.load(Ordering::SeqCst), 2);
        assert_eq!(read(&mut f.hp, REG_SLOTS_ADDED), 0);
        assert_eq!(read(&mut f.hp, REG_SLOTS_TO_EJECT), 0);
    }

    #[test]
    fn eject_request_then_guest_eject_takes_the_device_off_the_bus() {
        let mut f = fixture();
        let bar = WINDOW + 0x8000;
        plug(&f, 4, bar);
        assert_eq!(window_read(&f, bar + 7), 7, "the BAR decodes");
        f.hp.request_eject(4);
        assert!(f.hp.eject_requested(4));
        assert_eq!(f.notified.load(Ordering::SeqCst), 1);
        assert_eq!(read(&mut f.hp, REG_SLOTS_TO_EJECT), 1 << 4);
        assert_eq!(read(&mut f.hp, REG_SLOTS_TO_EJECT), 0, "read clears");
        assert!(f.ejected_fd.read().is_err(), "nothing ejected yet");

        f.hp.write(REG_EJECT, &(1u32 << 4).to_le_bytes());
        assert!(!f.root.lock().unwrap().has_device(4));
        assert_eq!(f.root.lock().unwrap().config_read(0, 4, 0, 0), u32::MAX);
        assert_eq!(window_read(&f, bar + 7), 0xff, "the BAR no longer decodes");
        assert_eq!(read(&mut f.hp, REG_SLOTS_PRESENT), 1);
        assert_eq!(f.ejected_fd.read().unwrap(), 1);
        assert_eq!(f.hp.take_ejected(), 1 << 4);
        assert_eq!(f.hp.take_ejected(), 0);
        // The slot is free again.
        assert_eq!(f.root.lock().unwrap().free_slot().unwrap(), 1);
        plug(&f, 4, bar);
    }

    #[test]
    fn guest_may_eject_unrequested_slots_but_not_the_bridge_or_empty_ones() {
        let mut f = fixture();
        plug(&f, 2, WINDOW);
        f.hp.device_added(2);
        // Ejecting before reading PCIU drops the stale added bit too.
        f.hp.write(REG_EJECT, &(1u32 | 1 << 2 | 1 << 9).to_le_bytes());
        assert_eq!(f.hp.take_ejected(), 1 << 2);
        assert_eq!(read(&mut f.hp, REG_SLOTS_ADDED), 0);
        assert!(
            f.root.lock().unwrap().has_device(0),
            "the host bridge stays"
        );
        // Nothing ejected: no event.
        f.hp.write(REG_EJECT, &(1u32 << 9).to_le_bytes());
        assert!(f.ejected_fd.read().is_err());
    }

    #[test]
    fn odd_accesses_have_no_effect() {
        let mut f = fixture();
        plug(&f, 6, WINDOW);
        f.hp.device_added(6);
        let mut b = [0xaau8; 2];
        f.hp.read(REG_SLOTS_ADDED, &mut b);
        assert_eq!(b, [0, 0]);
        let mut q = [0xaau8; 4];
        f.hp.read(REG_SLOTS_ADDED + 1, &mut q);
        assert_eq!(q, [0; 4]);
        f.hp.write(REG_EJECT, &[0x40]);
        f.hp.write(REG_EJECT, &[0x40, 0, 0, 0, 0, 0, 0, 0]);
        assert!(f.root.lock().unwrap().has_device(6));
        assert_eq!(read(&mut f.hp, REG_SLOTS_ADDED), 1 << 6, "still pending");
        // Writes to read-only registers are ignored.
        f.hp.write(REG_SLOTS_TO_EJECT, &u32::MAX.to_le_bytes());
        assert_eq!(read(&mut f.hp, REG_SLOTS_TO_EJECT), 0);
        assert_eq!(read(&mut f.hp, REG_EJECT), 0);
    }
}
