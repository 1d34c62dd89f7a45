//! The transport driven through configuration space and BAR 0, as a driver would.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::pci::msi::test_util::{router, RecordingBackend};
use crate::pci::msix::MSIX_CTRL_ENABLE;
use crate::virtio::rng::Rng;
use crate::virtio::test_util::{
    guest_memory, write_descs, Desc, TempDir, AVAIL_RING, DESC_TABLE, F_WRITE, MEM_SIZE, USED_RING,
};
use crate::virtio::TYPE_RNG;

const BAR: u64 = 0xc000_8000;

struct Driver {
    dev: VirtioPciDevice,
    mem: GuestMemory,
    backend: RecordingBackend,
    _dir: TempDir,
}

impl Driver {
    fn new() -> Self {
        let dir = TempDir::new();
        let source = dir.file("entropy", &[0x5a; 8192]);
        let mem = guest_memory();
        let (router, backend) = router();
        let rng = Rng::new(&source).unwrap();
        let dev =
            VirtioPciDevice::new("_rng".into(), Box::new(rng), mem.clone(), BAR, router).unwrap();
        Self {
            dev,
            mem,
            backend,
            _dir: dir,
        }
    }

    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut buf = [0u8; 8];
        self.dev.bar_read(0, offset, &mut buf[..len]);
        u64::from_le_bytes(buf)
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.dev.bar_write(0, offset, &value.to_le_bytes()[..len]);
    }

    fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }

    fn set_status(&mut self, s: u8) {
        self.write(0x14, 1, s.into());
    }

    fn cfg8(&mut self, offset: usize) -> u8 {
        (self.dev.config_read(offset / 4) >> (8 * (offset % 4))) as u8
    }

    fn cfg32(&mut self, offset: usize) -> u32 {
        self.dev.config_read(offset / 4)
    }

    /// ACKNOWLEDGE, DRIVER, VERSION_1 and FEATURES_OK.
    fn negotiate(&mut self) {
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(0x08, 4, 1);
        self.write(0x0c, 4, 1);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(self.status() & STATUS_FEATURES_OK, 0);
    }

    fn setup_queue(&mut self, size: u16, used: u64) {
        self.write(0x16, 2, 0);
        self.write(0x18, 2, size.into());
        self.write(0x20, 4, DESC_TABLE);
        self.write(0x24, 4, 0);
        self.write(0x28, 8, AVAIL_RING);
        self.write(0x30, 4, used);
        self.write(0x34, 4, used >> 32);
        self.write(0x1a, 2, 1);
        self.write(0x1c, 2, 1);
    }

    fn driver_ok(&mut self) {
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    fn enable_msix(&mut self) {
        let cap = self.dev.msix_cap;
        self.dev.config_write(
            cap / 4,
            MSIX_CTRL_OFFSET as u64,
            &MSIX_CTRL_ENABLE.to_le_bytes(),
        );
        for v in 0..2u64 {
            let e = MSIX_TABLE_OFFSET + 16 * v;
            self.write(e, 4, 0xfee0_0000);
            self.write(e + 4, 4, 0);
            self.write(e + 8, 4, 0x40 + v);
            self.write(e + 12, 4, 0);
        }
    }
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn pci_identity_and_capabilities() {
    let mut d = Driver::new();
    assert_eq!(d.cfg32(0), 0x1044_1af4, "virtio 1.x rng: 0x1040 + 4");
    assert_eq!(d.cfg8(8), 1, "revision 1: modern only");
    assert_eq!(d.cfg32(0x2c) >> 16, 0x40);
    assert_eq!(d.cfg32(0x3c) >> 8 & 0xff, 0, "no INTx pin");
    assert_eq!(d.cfg32(0x10), BAR as u32);
    // BAR sizing.
    d.dev.config_write(4, 0, &[0xff; 4]);
    assert_eq!(d.cfg32(0x10), !(VIRTIO_PCI_BAR_SIZE as u32 - 1));
    d.dev.config_write(4, 0, &(BAR as u32).to_le_bytes());
    assert_eq!(
        d.dev.bars(),
        vec![PciBarInfo {
            index: 0,
            addr: BAR,
            size: VIRTIO_PCI_BAR_SIZE
        }]
    );

    // Walk the capability list.
    let mut caps = Vec::new();
    let mut at = d.cfg8(0x34) as usize;
    while at != 0 {
        let id = d.cfg8(at);
        let kind = if id == PCI_CAP_ID_VENDOR {
            d.cfg8(at + 3)
        } else {
            0
        };
        caps.push((id, kind, at));
        at = d.cfg8(at + 1) as usize;
    }
    let kinds: Vec<(u8, u8)> = caps.iter().map(|c| (c.0, c.1)).collect();
    assert_eq!(
        kinds,
        vec![(9, 1), (9, 2), (9, 3), (9, 4), (9, 5), (0x11, 0)]
    );
    let notify = caps[1].2;
    assert_eq!(d.cfg32(notify + 8), NOTIFY_OFFSET as u32);
    assert_eq!(d.cfg32(notify + 16), NOTIFY_OFF_MULTIPLIER);
    let msix = caps[5].2;
    assert_eq!(
        d.cfg32(msix) >> 16 & 0x7ff,
        1,
        "2 vectors: config + 1 queue"
    );
    assert_eq!(d.cfg32(msix + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(d.cfg32(msix + 8), MSIX_PBA_OFFSET as u32);
}

#[test]
fn negotiation_and_queue_setup() {
    let mut d = Driver::new();
    assert_eq!(d.read(0x12, 2), 1, "num_queues");
    d.write(0x00, 4, 1);
    assert_eq!(d.read(0x04, 4), 1, "VERSION_1 is bit 32");
    d.write(0x00, 4, 0);
    assert_eq!(d.read(0x04, 4), 0);
    d.write(0x00, 4, 7);
    assert_eq!(d.read(0x04, 4), 0, "out-of-range feature select");
    d.negotiate();
    d.write(0x16, 2, 0);
    assert_eq!(d.read(0x18, 2), u64::from(crate::virtio::rng::QUEUE_SIZE));
    assert_eq!(d.read(0x1e, 2), 0, "queue_notify_off");
    assert_eq!(d.read(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    d.setup_queue(16, USED_RING);
    assert_eq!(d.read(0x18, 2), 16);
    assert_eq!(d.read(0x20, 8), DESC_TABLE);
    assert_eq!(d.read(0x28, 4), AVAIL_RING);
    assert_eq!(d.read(0x30, 8), USED_RING);
    assert_eq!(d.read(0x1a, 2), 1);
    assert_eq!(d.read(0x1c, 2), 1);
    d.driver_ok();
    assert_eq!(d.status(), 0x0f);
}

#[test]
fn a_request_end_to_end_with_msix() {
    let mut d = Driver::new();
    d.enable_msix();
    assert!(d
        .backend
        .last()
        .iter()
        .any(|&(gsi, addr, data)| (gsi, addr, data) == (25, 0xfee0_0000, 0x41)));
    d.negotiate();
    d.setup_queue(16, USED_RING);
    d.driver_ok();
    let irqfds = d.dev.irqfds().unwrap();
    assert_eq!(irqfds.iter().map(|i| i.0).collect::<Vec<_>>(), vec![24, 25]);
    let ioevents = d.dev.ioeventfds();
    assert_eq!(ioevents[0].0, BAR + NOTIFY_OFFSET);

    write_descs(&d.mem, DESC_TABLE, 0, &[Desc::new(0x10000, 64, F_WRITE, 0)]);
    d.mem.write_obj(0u16, GuestAddress(AVAIL_RING + 4)).unwrap();
    d.mem.write_obj(1u16, GuestAddress(AVAIL_RING + 2)).unwrap();
    // The notify write (what KVM's ioeventfd would catch).
    d.write(NOTIFY_OFFSET, 2, 0);
    let mem = d.mem.clone();
    wait_for(|| mem.read_obj::<u16>(GuestAddress(USED_RING + 2)).unwrap() == 1);
    let len: u32 = mem.read_obj(GuestAddress(USED_RING + 8)).unwrap();
    assert_eq!(len, 64);
    let byte: u8 = mem.read_obj(GuestAddress(0x10000)).unwrap();
    assert_eq!(byte, 0x5a);
    // Queue vector 1 fired.
    wait_for(|| irqfds[1].1.read().is_ok());
    assert!(irqfds[0].1.read().is_err());
}

#[test]
fn reset_returns_everything_to_initial_state() {
    let mut d = Driver::new();
    d.negotiate();
    d.setup_queue(16, USED_RING);
    d.write(0x10, 2, 0);
    d.driver_ok();
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.read(0x18, 2), u64::from(crate::virtio::rng::QUEUE_SIZE));
    assert_eq!(d.read(0x1c, 2), 0);
    assert_eq!(d.read(0x20, 8), 0);
    assert_eq!(d.read(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    assert_eq!(d.read(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    d.write(0x08, 4, 1);
    assert_eq!(d.read(0x0c, 4), 0, "driver features forgotten");
    // And it works again after a second initialisation.
    d.negotiate();
    d.setup_queue(16, USED_RING);
    d.driver_ok();
    assert_eq!(d.status(), 0x0f);
}

#[test]
fn feature_negotiation_refusals() {
    let mut d = Driver::new();
    // Driver features before DRIVER are ignored.
    d.write(0x08, 4, 1);
    d.write(0x0c, 4, 1);
    assert_eq!(d.read(0x0c, 4), 0);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Without VERSION_1: FEATURES_OK stays clear.
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(d.status() & STATUS_FEATURES_OK, 0);
    // A feature not offered: refused too.
    d.write(0x08, 4, 1);
    d.write(0x0c, 4, 1 | 1 << 3);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(d.status() & STATUS_FEATURES_OK, 0);
    d.write(0x0c, 4, 1);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_ne!(d.status() & STATUS_FEATURES_OK, 0);
    // After FEATURES_OK the features are frozen.
    d.write(0x0c, 4, 3);
    assert_eq!(d.read(0x0c, 4), 1);
}

#[test]
fn status_state_machine_refusals() {
    let mut d = Driver::new();
    // DRIVER before ACKNOWLEDGE, FEATURES_OK before DRIVER, DRIVER_OK before FEATURES_OK.
    d.set_status(STATUS_DRIVER);
    assert_eq!(d.status(), 0);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Clearing bits without a reset is ignored.
    d.set_status(STATUS_ACKNOWLEDGE);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // The driver cannot set NEEDS_RESET.
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DEVICE_NEEDS_RESET);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED);
    assert_ne!(d.status() & STATUS_FAILED, 0);
}

#[test]
fn out_of_range_queue_and_bad_queue_config() {
    let mut d = Driver::new();
    d.negotiate();
    d.write(0x16, 2, 99);
    assert_eq!(d.read(0x18, 2), 0, "absent queue has size 0");
    assert_eq!(d.read(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    d.write(0x18, 2, 8);
    d.write(0x1c, 2, 1);
    d.write(0x20, 8, 0x1000);
    assert_eq!(d.read(0x18, 2), 0);
    d.write(0x16, 2, 0xffff);
    d.write(0x1c, 2, 1);
    d.write(0x16, 2, 0);
    // Size: not a power of two, zero, above the maximum.
    for bad in [3u64, 0, 1024] {
        d.write(0x18, 2, bad);
        assert_eq!(d.read(0x18, 2), 256, "size {bad}");
    }
    // Misaligned rings.
    d.write(0x20, 4, 0x1001);
    assert_eq!(d.read(0x20, 4), 0);
    d.write(0x30, 4, 0x6002);
    assert_eq!(d.read(0x30, 4), 0);
    // A vector beyond the MSI-X table reads back as NO_VECTOR.
    d.write(0x1a, 2, 5);
    assert_eq!(d.read(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    d.write(0x10, 2, 2);
    assert_eq!(d.read(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    // queue_enable 0 is ignored; once enabled the configuration is frozen.
    d.setup_queue(16, USED_RING);
    d.write(0x18, 2, 32);
    d.write(0x20, 4, 0x2000);
    d.write(0x1c, 2, 0);
    assert_eq!(
        (d.read(0x18, 2), d.read(0x20, 4), d.read(0x1c, 2)),
        (16, DESC_TABLE, 1)
    );
    // Odd accesses anywhere in the BAR do not panic.
    for off in [
        0x37u64,
        0x3f,
        0xfff,
        0x1001,
        0x2fff,
        0x3ffe,
        0x5fff,
        0x7fff,
        0x8000,
        u64::MAX,
    ] {
        d.write(off, 8, u64::MAX);
        d.read(off, 8);
    }
}

#[test]
fn used_ring_outside_ram_needs_reset() {
    let mut d = Driver::new();
    d.enable_msix();
    d.negotiate();
    d.write(0x10, 2, 0);
    d.setup_queue(16, MEM_SIZE - 8);
    d.driver_ok();
    assert_ne!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    let irqfds = d.dev.irqfds().unwrap();
    assert!(irqfds[0].1.read().is_ok(), "config interrupt announces it");
    // Reset clears it.
    d.set_status(0);
    assert_eq!(d.status(), 0);
}

#[test]
fn a_broken_ring_at_runtime_needs_reset() {
    let mut d = Driver::new();
    d.negotiate();
    d.setup_queue(16, USED_RING);
    d.driver_ok();
    // The available index jumps more than a queue ahead.
    d.mem
        .write_obj(100u16, GuestAddress(AVAIL_RING + 2))
        .unwrap();
    d.write(NOTIFY_OFFSET, 2, 0);
    wait_for(|| d.status() & STATUS_DEVICE_NEEDS_RESET != 0);
    // Other writes do not clear it; a reset does.
    d.driver_ok();
    assert_ne!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    d.set_status(0);
    assert_eq!(d.status(), 0);
}

#[test]
fn isr_reads_clear() {
    let mut d = Driver::new();
    d.dev.interrupt.trigger(VirtioInterruptType::Config);
    assert_eq!(d.read(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
    assert_eq!(d.read(ISR_OFFSET, 1), 0);
}

#[test]
fn pci_cfg_window_reaches_the_bar() {
    let mut d = Driver::new();
    let cap = d.dev.pci_cfg_cap;
    d.dev.config_write((cap + 4) / 4, 0, &[0]);
    d.dev.config_write((cap + 8) / 4, 0, &0x14u32.to_le_bytes());
    d.dev.config_write((cap + 12) / 4, 0, &1u32.to_le_bytes());
    d.dev
        .config_write((cap + 16) / 4, 0, &[STATUS_ACKNOWLEDGE, 0, 0, 0]);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE);
    assert_eq!(d.dev.config_read((cap + 16) / 4) & 0xff, 1);
    // A bad window (length 3) does nothing.
    d.dev.config_write((cap + 12) / 4, 0, &3u32.to_le_bytes());
    d.dev.config_write((cap + 16) / 4, 0, &[0, 0, 0, 0]);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE);
}

#[test]
fn device_config_writes_need_driver_status() {
    let mut d = Driver::new();
    d.write(DEVICE_CFG_OFFSET, 4, 0xffff_ffff);
    assert_eq!(d.read(DEVICE_CFG_OFFSET, 4), 0);
    assert_eq!(d.dev.device_type(), TYPE_RNG);
    assert_eq!(d.dev.id(), "_rng");
}
