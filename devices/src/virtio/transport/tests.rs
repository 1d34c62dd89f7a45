//! The transport driven through configuration space and BAR 0, as a driver would.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::pci::msi::test_util::{router, RecordingBackend};
use crate::pci::msix::{MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK};
use crate::virtio::rng::Rng;
use crate::virtio::test_util::{
    guest_memory, write_descs, Desc, TempDir, AVAIL_RING, DESC_TABLE, F_WRITE, MEM_SIZE, USED_RING,
};
use crate::virtio::{SnapshotError, TYPE_RNG};

const BAR: u64 = 0xc000_8000;

struct Driver {
    dev: VirtioPciDevice,
    mem: GuestMemory,
    backend: RecordingBackend,
    _dir: TempDir,
}

impl Driver {
    fn new() -> Self {
        Self::with_memory(guest_memory())
    }

    /// A fresh device on `mem` (another VM's device on a template's memory, for restores).
    fn with_memory(mem: GuestMemory) -> Self {
        let dir = TempDir::new();
        let source = dir.file("entropy", &[0x5a; 8192]);
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

/// A live rng function: MSI-X on, config vector 0, queue 0 (vector 1) of 16, DRIVER_OK.
fn live_driver() -> Driver {
    let mut d = Driver::new();
    d.enable_msix();
    d.negotiate();
    d.write(0x10, 2, 0);
    d.setup_queue(16, USED_RING);
    d.driver_ok();
    d
}

/// Makes descriptor `n` (64 device-writable bytes) available as the n-th chain and notifies.
fn request(d: &mut Driver, n: u16) {
    post(d, n);
    d.write(NOTIFY_OFFSET, 2, 0);
}

/// Makes descriptor `n` available as the n-th chain, without a notification.
fn post(d: &Driver, n: u16) {
    let buf = 0x10000 + 0x100 * u64::from(n);
    write_descs(&d.mem, DESC_TABLE, n, &[Desc::new(buf, 64, F_WRITE, 0)]);
    let slot = AVAIL_RING + 4 + 2 * u64::from(n);
    d.mem.write_obj(n, GuestAddress(slot)).unwrap();
    d.mem
        .write_obj(n + 1, GuestAddress(AVAIL_RING + 2))
        .unwrap();
}

fn used_idx(mem: &GuestMemory) -> u16 {
    mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
}

#[test]
fn a_paused_device_serves_nothing_until_resumed() {
    let mut d = live_driver();
    request(&mut d, 0);
    let mem = d.mem.clone();
    wait_for(|| used_idx(&mem) == 1);
    d.dev.pause().unwrap();
    request(&mut d, 1);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(used_idx(&mem), 1, "paused: the ring holds still");
    d.dev.resume();
    wait_for(|| used_idx(&mem) == 2);
    assert_eq!(d.status(), 0x0f);
}

#[test]
fn live_state_loads_into_a_new_device_which_carries_on() {
    let mut d = live_driver();
    request(&mut d, 0);
    let mem = d.mem.clone();
    wait_for(|| used_idx(&mem) == 1);
    d.write(0x16, 2, 0);
    assert!(
        matches!(d.dev.state(), Err(SnapshotError::NotPaused(_))),
        "a serving device must be paused first"
    );
    d.dev.pause().unwrap();
    let state = d.dev.state().unwrap();
    assert_eq!(state.status, 0x0f);
    assert_eq!(
        (state.config_msix_vector, state.queues[0].msix_vector),
        (0, 1)
    );
    assert!(state.msix.enabled);
    let q = state.device.queues[0];
    assert_eq!((q.next_avail, q.next_used, q.size), (1, 1, 16));
    let json = serde_json::to_string(&state).unwrap();
    assert_eq!(
        serde_json::from_str::<VirtioPciState>(&json).unwrap(),
        state
    );
    // A request the old device never saw: published and notified after the snapshot's pause.
    request(&mut d, 1);
    drop(d);

    let mut r = Driver::with_memory(mem.clone());
    r.dev.set_state(&state).unwrap();
    assert_eq!(r.status(), 0x0f);
    assert_eq!(
        (
            r.read(0x20, 8),
            r.read(0x30, 8),
            r.read(0x18, 2),
            r.read(0x10, 2)
        ),
        (DESC_TABLE, USED_RING, 16, 0),
        "transport registers as the driver left them"
    );
    assert!(
        r.backend
            .last()
            .iter()
            .any(|&(gsi, addr, data)| (gsi, addr, data) == (25, 0xfee0_0000, 0x41)),
        "MSI-X routes come back from the table"
    );
    // The restored device looks at the ring again and serves chain 1 in place, not chain 0 again.
    wait_for(|| used_idx(&mem) == 2);
    let irqfds = r.dev.irqfds().unwrap();
    wait_for(|| irqfds[1].1.read().is_ok());
    let id: u32 = mem.read_obj(GuestAddress(USED_RING + 4 + 8)).unwrap();
    assert_eq!(id, 1);
    r.dev.pause().unwrap();
    let again = r.dev.state().unwrap();
    assert_eq!(again.device.queues[0].next_used, 2);
    assert_eq!(again.config_space, state.config_space);
    r.dev.resume();
}

#[test]
fn an_inactive_function_round_trips() {
    let mut d = Driver::new();
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    d.write(0x08, 4, 1);
    d.write(0x0c, 4, 1);
    d.write(0x16, 2, 0);
    d.write(0x18, 2, 32);
    // Command register and MSI-X function mask: configuration-space state.
    d.dev.config_write(1, 0, &[0x06]);
    let cap = d.dev.msix_cap;
    d.dev.config_write(
        cap / 4,
        MSIX_CTRL_OFFSET as u64,
        &(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK).to_le_bytes(),
    );
    let state = d.dev.state().unwrap();
    assert!(state.device.queues.is_empty());
    let mut r = Driver::with_memory(d.mem.clone());
    r.dev.set_state(&state).unwrap();
    assert_eq!(r.dev.state().unwrap(), state);
    assert_eq!(r.cfg32(4) & 0xffff, 0x06);
    // Negotiation goes on where it stopped.
    assert_eq!(r.read(0x0c, 4), 1);
    r.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_ne!(r.status() & STATUS_FEATURES_OK, 0);
}

type Edit = fn(&mut VirtioPciState);

#[test]
fn hostile_states_are_refused_and_change_nothing() {
    let mut d = live_driver();
    d.dev.pause().unwrap();
    let state = d.dev.state().unwrap();
    let mem = d.mem.clone();
    drop(d);
    let mut r = Driver::with_memory(mem);
    let before = r.dev.state().unwrap();
    let cases: &[(&str, Edit)] = &[
        ("device type", |s| s.device_type = 1),
        ("queue count", |s| s.queues.push(Default::default())),
        ("queue size not a power of two", |s| {
            s.queues[0].size = 12;
            s.device.queues[0].size = 12;
        }),
        ("queue size above the maximum", |s| {
            s.queues[0].size = 512;
            s.device.queues[0].size = 512;
        }),
        ("used ring outside guest RAM", |s| {
            s.queues[0].used_ring = MEM_SIZE - 8;
            s.device.queues[0].used_ring = MEM_SIZE - 8;
        }),
        ("descriptor table far outside guest RAM", |s| {
            s.queues[0].desc_table = u64::MAX - 15;
            s.device.queues[0].desc_table = u64::MAX - 15;
        }),
        ("misaligned descriptor table", |s| {
            s.queues[0].desc_table += 8;
            s.device.queues[0].desc_table += 8;
        }),
        ("features not offered", |s| {
            s.driver_features |= 1 << 3;
            s.device.acked_features |= 1 << 3;
        }),
        ("FEATURES_OK without VERSION_1", |s| {
            s.driver_features = 0;
            s.device.acked_features = 0;
        }),
        ("device and transport disagree on features", |s| {
            s.device.acked_features = 0
        }),
        ("queue MSI-X vector past the table", |s| {
            s.queues[0].msix_vector = 2
        }),
        ("config MSI-X vector past the table", |s| {
            s.config_msix_vector = 0x7ff
        }),
        ("MSI-X table of another size", |s| {
            s.msix.table.push(Default::default());
            s.msix.pending.push(false);
        }),
        ("MSI-X state disagrees with its control register", |s| {
            s.msix.enabled = false
        }),
        ("reserved MSI-X vector control bits", |s| {
            s.msix.table[0].vector_ctrl = 2
        }),
        ("DRIVER_OK without FEATURES_OK", |s| {
            s.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK
        }),
        ("undefined status bit", |s| s.status |= 0x10),
        ("undefined ISR bit", |s| s.isr = 0x80),
        ("truncated configuration space", |s| {
            s.config_space.truncate(10)
        }),
        ("live device without queue positions", |s| {
            s.device.queues.clear()
        }),
        ("device queue disagrees with the transport", |s| {
            s.device.queues[0].avail_ring += 0x100
        }),
        ("more chains in flight than the queue holds", |s| {
            s.device.queues[0].next_avail = 100
        }),
        ("event indices not negotiated", |s| {
            s.device.queues[0].event_idx_enabled = true
        }),
        ("device-specific bytes", |s| s.device.device = vec![1, 2, 3]),
        ("queue positions for a device that is not live", |s| {
            s.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        }),
    ];
    for (what, edit) in cases {
        let mut bad = state.clone();
        edit(&mut bad);
        let err = r.dev.set_state(&bad);
        assert!(err.is_err(), "{what}: accepted");
        assert!(
            err.unwrap_err().to_string().contains("_rng") || what.contains("device-specific"),
            "{what}: the error names the device"
        );
        assert_eq!(r.dev.state().unwrap(), before, "{what}: the device changed");
    }
    // The untouched state still loads.
    r.dev.set_state(&state).unwrap();
    assert_eq!(r.status(), 0x0f);
}

#[test]
fn a_device_waiting_for_reset_round_trips_without_starting() {
    let mut d = live_driver();
    // The available index jumps more than a queue ahead: the device gives up on the ring.
    d.mem
        .write_obj(100u16, GuestAddress(AVAIL_RING + 2))
        .unwrap();
    d.write(NOTIFY_OFFSET, 2, 0);
    wait_for(|| d.status() & STATUS_DEVICE_NEEDS_RESET != 0);
    d.dev.pause().unwrap();
    let state = d.dev.state().unwrap();
    assert!(
        state.device.queues.is_empty(),
        "a broken device is not restarted"
    );
    let mut r = Driver::with_memory(d.mem.clone());
    drop(d);
    r.dev.set_state(&state).unwrap();
    assert_eq!(r.status(), 0x0f | STATUS_DEVICE_NEEDS_RESET);
    // The driver resets it, as it would have, and it works again.
    r.mem.write_obj(0u16, GuestAddress(AVAIL_RING + 2)).unwrap();
    r.set_status(0);
    r.negotiate();
    r.setup_queue(16, USED_RING);
    r.driver_ok();
    request(&mut r, 0);
    let mem = r.mem.clone();
    wait_for(|| used_idx(&mem) == 1);
}

#[test]
fn the_interrupt_observer_hears_interrupts_without_msix_and_not_suppressed_ones() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // MSI-X off, as the polling test guest drives it: nothing is delivered, but the observer (the VMM's
    // idle waker) still hears the device complete work.
    let mut d = Driver::new();
    let heard = Arc::new(AtomicUsize::new(0));
    let counter = heard.clone();
    d.dev.set_interrupt_observer(Arc::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    d.negotiate();
    d.setup_queue(16, USED_RING);
    d.driver_ok();
    request(&mut d, 0);
    let mem = d.mem.clone();
    wait_for(|| used_idx(&mem) == 1);
    wait_for(|| heard.load(Ordering::SeqCst) == 1);
    // A driver that suppresses interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT) is not interrupted.
    d.mem.write_obj(1u16, GuestAddress(AVAIL_RING)).unwrap();
    request(&mut d, 1);
    wait_for(|| used_idx(&mem) == 2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(heard.load(Ordering::SeqCst), 1);
}

#[test]
fn ioeventfds_follow_a_moved_bar() {
    use super::notify::test_util::RecordingRegistrar;
    const NEW: u64 = 0xd000_0000;
    let registrar = Arc::new(RecordingRegistrar::default());
    let mut d = live_driver();
    d.dev.register_ioeventfds(registrar.clone()).unwrap();
    assert_eq!(registrar.addresses(), [BAR + NOTIFY_OFFSET]);
    // The guest turns decoding on and moves BAR 0: the configuration reports it; the owner (after
    // moving its mapping) moves the device.
    assert!(d.dev.config_write(1, 0, &[0x06]).is_empty());
    let moves = d.dev.config_write(4, 0, &(NEW as u32).to_le_bytes());
    assert_eq!(
        moves,
        vec![BarMove {
            bar: 0,
            old: BAR,
            new: NEW,
            size: VIRTIO_PCI_BAR_SIZE
        }]
    );
    assert_eq!(d.dev.bar_addr(), BAR, "not moved until the owner says so");
    d.dev.move_bar(0, NEW).unwrap();
    assert_eq!(d.dev.bar_addr(), NEW);
    assert_eq!(d.cfg32(0x10), NEW as u32);
    assert_eq!(registrar.addresses(), [NEW + NOTIFY_OFFSET]);
    assert_eq!(d.dev.ioeventfds()[0].0, NEW + NOTIFY_OFFSET);

    // A notify at the old address reaches nothing; at the new one it reaches the queue.
    post(&d, 0);
    assert!(!registrar.guest_write(BAR + NOTIFY_OFFSET));
    std::thread::sleep(Duration::from_millis(30));
    let mem = d.mem.clone();
    assert_eq!(used_idx(&mem), 0);
    assert!(registrar.guest_write(NEW + NOTIFY_OFFSET));
    wait_for(|| used_idx(&mem) == 1);

    // A move whose ioeventfds cannot be registered changes nothing; nor do impossible moves.
    const OTHER: u64 = 0xd001_0000;
    *registrar.refuse.lock().unwrap() = Some(OTHER + NOTIFY_OFFSET);
    assert!(matches!(
        d.dev.move_bar(0, OTHER),
        Err(PciError::Ioeventfd { addr, .. }) if addr == OTHER + NOTIFY_OFFSET
    ));
    assert!(d.dev.move_bar(0, NEW + 0x1000).is_err(), "misaligned");
    assert!(d.dev.move_bar(1, OTHER).is_err(), "no BAR 1");
    assert_eq!(d.dev.bar_addr(), NEW);
    assert_eq!(d.cfg32(0x10), NEW as u32);
    assert_eq!(d.dev.bars()[0].addr, NEW);
    assert_eq!(registrar.addresses(), [NEW + NOTIFY_OFFSET]);
    // A refused guest move is put back with move_bar(old): registers and ioeventfds agree again.
    *registrar.refuse.lock().unwrap() = None;
    d.dev.config_write(4, 0, &(OTHER as u32).to_le_bytes());
    d.dev.move_bar(0, NEW).unwrap();
    assert_eq!(d.cfg32(0x10), NEW as u32);
    assert_eq!(registrar.addresses(), [NEW + NOTIFY_OFFSET]);

    // The saved state records the BAR where it is; unregistering leaves nothing behind.
    d.dev.pause().unwrap();
    assert_eq!(d.dev.state().unwrap().config_space[4], NEW as u32);
    d.dev.unregister_ioeventfds();
    assert!(registrar.addresses().is_empty());
    // Moves without registered ioeventfds just move the BAR.
    d.dev.move_bar(0, OTHER).unwrap();
    assert_eq!(d.dev.ioeventfds()[0].0, OTHER + NOTIFY_OFFSET);
    assert!(registrar.addresses().is_empty());
}

#[test]
fn registration_is_all_or_nothing() {
    use super::notify::test_util::RecordingRegistrar;
    let registrar = Arc::new(RecordingRegistrar::default());
    let mut d = Driver::new();
    *registrar.refuse.lock().unwrap() = Some(BAR + NOTIFY_OFFSET);
    assert!(d.dev.register_ioeventfds(registrar.clone()).is_err());
    assert!(registrar.addresses().is_empty());
    *registrar.refuse.lock().unwrap() = None;
    d.dev.register_ioeventfds(registrar.clone()).unwrap();
    // Registering again replaces the registration (KVM would refuse a duplicate).
    d.dev.register_ioeventfds(registrar.clone()).unwrap();
    assert_eq!(registrar.addresses(), [BAR + NOTIFY_OFFSET]);
}

#[test]
fn a_saved_bar_elsewhere_is_the_owners_business() {
    let mut d = live_driver();
    d.dev.pause().unwrap();
    let mut state = d.dev.state().unwrap();
    let mem = d.mem.clone();
    drop(d);
    // The owner places the BAR (where the template had it) before loading; a state naming another
    // address does not move the device behind the owner's back.
    state.config_space[4] = 0xd000_0000;
    let mut r = Driver::with_memory(mem);
    r.dev.set_state(&state).unwrap();
    assert_eq!(r.cfg32(0x10), BAR as u32);
    assert_eq!(r.dev.bar_addr(), BAR);
    assert_eq!(r.status(), 0x0f);
}
