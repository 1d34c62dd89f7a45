//! Host-side tests of the guest's PCI enumeration and virtio driver logic (guest/pci.rs, guest/virtio/):
//! configuration spaces are byte arrays, and a test plays the device side of a virtqueue.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::pci::*;
use crate::virtio::caps::{self, CapError, Layout, Region};
use crate::virtio::ring::{self, Buffer, QueueError, RingMemory, SplitQueue, Used};
use crate::virtio::{blk, dma::Arena};

/// A function's configuration space with BARs that decode like hardware: low type bits read-only,
/// address bits below the BAR's size read as zero (what BAR sizing relies on).
struct FakeCfg {
    bytes: RefCell<[u8; 256]>,
    /// Size of each BAR (0 = not implemented); a 64-bit BAR's size sits at its lower index.
    bar_sizes: [u64; 6],
    writes: RefCell<Vec<(u16, u32)>>,
}

impl FakeCfg {
    fn new() -> Self {
        FakeCfg {
            bytes: RefCell::new([0; 256]),
            bar_sizes: [0; 6],
            writes: RefCell::new(Vec::new()),
        }
    }

    fn function(vendor: u16, device: u16, class: u32, header_type: u8) -> Self {
        let cfg = FakeCfg::new();
        cfg.put32(0x00, u32::from(vendor) | u32::from(device) << 16);
        cfg.put32(0x08, class << 8 | 0x01);
        cfg.put32(0x0c, u32::from(header_type) << 16);
        cfg
    }

    fn put(&self, at: usize, data: &[u8]) {
        self.bytes.borrow_mut()[at..at + data.len()].copy_from_slice(data);
    }

    fn put32(&self, at: usize, value: u32) {
        self.put(at, &value.to_le_bytes());
    }

    fn get32(&self, at: usize) -> u32 {
        let b = self.bytes.borrow();
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Links capabilities `(offset, bytes)` in order from the capability pointer.
    fn set_caps(&self, caps: &[(u8, Vec<u8>)]) {
        self.put32(0x04, u32::from(STATUS_CAP_LIST) << 16);
        self.put(0x34, &[caps.first().map_or(0, |c| c.0)]);
        for (i, (offset, bytes)) in caps.iter().enumerate() {
            let mut bytes = bytes.clone();
            bytes[1] = caps.get(i + 1).map_or(0, |c| c.0);
            self.put(usize::from(*offset), &bytes);
        }
    }
}

impl ConfigSpace for FakeCfg {
    fn read32(&self, reg: u16) -> u32 {
        assert_eq!(reg % 4, 0, "unaligned dword read");
        self.get32(usize::from(reg))
    }

    fn write32(&self, reg: u16, value: u32) {
        assert_eq!(reg % 4, 0, "unaligned dword write");
        self.writes.borrow_mut().push((reg, value));
        let at = usize::from(reg);
        match reg {
            0x10..=0x27 => {
                let index = (at - 0x10) / 4;
                let old = self.get32(at);
                let upper_of_64 =
                    index > 0 && self.get32(at - 4) & 0b111 == 0b100 && self.bar_sizes[index] == 0;
                let (size, keep) = if upper_of_64 {
                    (self.bar_sizes[index - 1] >> 32, 0)
                } else {
                    (self.bar_sizes[index], old & 0xf)
                };
                let mask = if upper_of_64 {
                    !(size.max(1) - 1) as u32
                } else if size == 0 {
                    0
                } else {
                    !((size - 1) as u32) & !0xf
                };
                self.put32(at, (value & mask) | keep);
            }
            // Command only; the status half is write-1-to-clear and must be written as zeros.
            0x04 => {
                assert_eq!(value >> 16, 0, "status bits written");
                let status = self.get32(at) & 0xffff_0000;
                self.put32(at, status | (value & 0xffff));
            }
            _ => self.put32(at, value),
        }
    }
}

#[test]
fn ecam_offsets() {
    assert_eq!(ecam_offset(0, 0, 0, 0), 0);
    assert_eq!(ecam_offset(0, 3, 0, 0x10), 3 << 15 | 0x10);
    assert_eq!(
        ecam_offset(1, 31, 7, 0xffc),
        1 << 20 | 31 << 15 | 7 << 12 | 0xffc
    );
    // Registers are dword aligned; out-of-range device/function bits cannot spill into other fields.
    assert_eq!(ecam_offset(0, 0, 0, 0x13), 0x10);
    assert_eq!(ecam_offset(0, 32, 8, 0), 0);
    assert_eq!(
        ECAM_BASE + ecam_offset(255, 31, 7, 0xffc),
        ECAM_BASE + ECAM_SIZE - 4
    );
}

#[test]
fn header_fields_and_narrow_reads() {
    let cfg = FakeCfg::function(0x1af4, 0x1042, 0x01_80_00, 0x80);
    let h = read_header(&cfg).unwrap();
    assert_eq!(
        h,
        Header {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            header_type: 0,
            multifunction: true,
        }
    );
    assert_eq!(cfg.read16(0x02), 0x1042);
    assert_eq!(cfg.read8(0x0b), 0x01);
    assert_eq!(virtio_type(&h), Some(VIRTIO_TYPE_BLOCK));
    assert_eq!(describe(&h).to_string(), "virtio-blk");
    assert!(read_header(&FakeCfg::new()).is_none(), "vendor 0: empty");
    assert!(read_header(&FakeCfg::function(0xffff, 0xffff, 0, 0)).is_none());
    // Transitional (0x1000-0x103f) and foreign IDs are not modern virtio devices.
    let legacy = FakeCfg::function(0x1af4, 0x1001, 0x01_00_00, 0);
    assert_eq!(virtio_type(&read_header(&legacy).unwrap()), None);
    let bridge = read_header(&FakeCfg::function(0x1b36, 0x0008, 0x06_00_00, 0)).unwrap();
    assert_eq!(describe(&bridge).to_string(), "host-bridge");
    let odd = read_header(&FakeCfg::function(0x1af4, 0x1040 + 42, 0xff_00_00, 0)).unwrap();
    assert_eq!(describe(&odd).to_string(), "virtio-42");
}

#[test]
fn scan_visits_function_zero_and_multifunction_devices() {
    let mut bus: HashMap<(u8, u8), (u16, u16, u8)> = HashMap::new();
    bus.insert((0, 0), (0x1b36, 0x0008, 0));
    bus.insert((3, 0), (0x1af4, 0x1042, 0x80));
    bus.insert((3, 2), (0x1af4, 0x1044, 0));
    // Function 1 of a single-function device must not be probed (some devices alias fn 0 there).
    bus.insert((5, 0), (0x1af4, 0x1044, 0));
    bus.insert((5, 1), (0x1af4, 0x1044, 0));
    // Without function 0, the other functions of a device are not looked at.
    bus.insert((7, 1), (0x1af4, 0x1041, 0));
    bus.insert((31, 0), (0x8086, 0x1234, 0));
    let probed = RefCell::new(Vec::new());
    let found: Vec<(u8, u8, u16)> = scan(|d, f| {
        probed.borrow_mut().push((d, f));
        match bus.get(&(d, f)) {
            Some(&(v, id, ht)) => FakeCfg::function(v, id, 0, ht),
            None => FakeCfg::function(0xffff, 0xffff, 0, 0),
        }
    })
    .map(|(d, f, h)| (d, f, h.device))
    .collect();
    assert_eq!(
        found,
        vec![
            (0, 0, 0x0008),
            (3, 0, 0x1042),
            (3, 2, 0x1044),
            (5, 0, 0x1044),
            (31, 0, 0x1234)
        ]
    );
    // 32 function-0 probes plus functions 1-7 of the one multifunction device.
    assert_eq!(probed.borrow().len(), 32 + 7);
}

#[test]
fn capability_walk_ends_on_zero_bad_pointers_and_loops() {
    let cfg = FakeCfg::new();
    assert_eq!(capabilities(&cfg).count(), 0, "no capability list bit");
    cfg.set_caps(&[(0x40, vec![0x11, 0, 0, 0]), (0x50, vec![0x09, 0, 16, 1])]);
    let caps: Vec<Capability> = capabilities(&cfg).collect();
    assert_eq!(
        caps,
        vec![
            Capability {
                offset: 0x40,
                id: 0x11
            },
            Capability {
                offset: 0x50,
                id: 0x09
            }
        ]
    );
    // Reserved low pointer bits are masked.
    cfg.put(0x41, &[0x53]);
    assert_eq!(capabilities(&cfg).nth(1).unwrap().offset, 0x50);
    // A pointer into the header ends the walk.
    cfg.put(0x41, &[0x10]);
    assert_eq!(capabilities(&cfg).count(), 1);
    // A loop is cut off after as many entries as the space can hold.
    cfg.put(0x41, &[0x40]);
    assert_eq!(capabilities(&cfg).count(), 48);
    cfg.put(0x34, &[0x3c]);
    assert_eq!(
        capabilities(&cfg).count(),
        0,
        "first pointer inside the header"
    );
}

#[test]
fn bars_decode_and_size() {
    let mut cfg = FakeCfg::new();
    cfg.bar_sizes = [0x8000, 0, 0x10_0000, 0, 0, 0];
    cfg.put32(0x10, 0xc000_0000);
    cfg.put32(0x14, 0x0000_c001); // I/O BAR
    cfg.put32(0x18, 0x0000_000c); // 64-bit prefetchable
    cfg.put32(0x1c, 0x1);
    cfg.put32(0x24, 0x4); // 64-bit type in the last BAR: no room for its upper half
    assert_eq!(
        read_bar(&cfg, 0),
        Bar::Memory {
            addr: 0xc000_0000,
            is_64: false,
            prefetchable: false
        }
    );
    assert_eq!(read_bar(&cfg, 1), Bar::Io { port: 0xc000 });
    assert_eq!(
        read_bar(&cfg, 2),
        Bar::Memory {
            addr: 0x1_0000_0000,
            is_64: true,
            prefetchable: true
        }
    );
    assert_eq!(read_bar(&cfg, 5), Bar::None);
    assert_eq!(read_bar(&cfg, 6), Bar::None);

    assert_eq!(size_memory_bar(&cfg, 0), 0x8000);
    assert_eq!(cfg.get32(0x10), 0xc000_0000, "address restored");
    assert_eq!(size_memory_bar(&cfg, 2), 0x10_0000);
    assert_eq!((cfg.get32(0x18), cfg.get32(0x1c)), (0xc, 0x1));
    assert_eq!(size_memory_bar(&cfg, 1), 0, "I/O BARs are not sized");
    cfg.put32(0x20, 0);
    assert_eq!(size_memory_bar(&cfg, 4), 0, "unimplemented BAR");
}

#[test]
fn command_bits_leave_status_alone() {
    let cfg = FakeCfg::new();
    // Status has capability list and a W1C error bit set; command has I/O enabled.
    cfg.put32(0x04, 0x8010_0001);
    enable(&cfg, COMMAND_MEMORY | COMMAND_BUS_MASTER);
    assert_eq!(cfg.get32(0x04), 0x8010_0007);
    disable(&cfg, COMMAND_MEMORY);
    assert_eq!(cfg.get32(0x04), 0x8010_0005);
    assert!(cfg.writes.borrow().iter().all(|&(_, v)| v >> 16 == 0));
}

/// A virtio capability (struct virtio_pci_cap, plus notify_off_multiplier when `extra` is given).
fn vcap(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![0x09, 0, len, cfg_type, bar, 0, 0, 0];
    c.extend_from_slice(&offset.to_le_bytes());
    c.extend_from_slice(&length.to_le_bytes());
    if let Some(m) = extra {
        c.extend_from_slice(&m.to_le_bytes());
    }
    c
}

/// The layout TrEnv's transport uses (devices/src/virtio/transport.rs): everything in BAR 0.
fn transport_like() -> FakeCfg {
    let cfg = FakeCfg::function(0x1af4, 0x1042, 0x01_80_00, 0);
    cfg.set_caps(&[
        (
            0x40,
            vec![0x11, 0, 0x3f, 0x00, 0x00, 0x40, 0, 0, 0x00, 0x60, 0, 0],
        ),
        (0x4c, vcap(caps::CAP_COMMON_CFG, 0, 0x0000, 0x38, None)),
        (0x5c, vcap(caps::CAP_ISR_CFG, 0, 0x1000, 1, None)),
        (0x6c, vcap(caps::CAP_DEVICE_CFG, 0, 0x2000, 0x1000, None)),
        (0x7c, vcap(caps::CAP_NOTIFY_CFG, 0, 0x3000, 0x1000, Some(4))),
        (0x90, vcap(caps::CAP_PCI_CFG, 0, 0, 0, Some(0))),
    ]);
    cfg
}

#[test]
fn virtio_capabilities_parse() {
    let layout = caps::parse(&transport_like()).unwrap();
    assert_eq!(
        layout,
        Layout {
            common: Region {
                bar: 0,
                offset: 0,
                length: 0x38
            },
            notify: Region {
                bar: 0,
                offset: 0x3000,
                length: 0x1000
            },
            notify_off_multiplier: 4,
            isr: Region {
                bar: 0,
                offset: 0x1000,
                length: 1
            },
            device: Some(Region {
                bar: 0,
                offset: 0x2000,
                length: 0x1000
            }),
        }
    );
    assert_eq!(caps::notify_offset(&layout, 0), Some(0));
    assert_eq!(caps::notify_offset(&layout, 3), Some(12));
    assert_eq!(caps::notify_offset(&layout, 1023), Some(4092));
    assert_eq!(caps::notify_offset(&layout, 1024), None, "past the region");
    let zero_mult = Layout {
        notify_off_multiplier: 0,
        ..layout
    };
    assert_eq!(
        caps::notify_offset(&zero_mult, 7),
        Some(0),
        "all queues share one address"
    );
}

#[test]
fn virtio_capabilities_first_usable_wins_and_bad_ones_are_skipped() {
    let cfg = FakeCfg::function(0x1af4, 0x1044, 0xff_00_00, 0);
    cfg.set_caps(&[
        // Reserved BAR number: ignored.
        (0x40, vcap(caps::CAP_COMMON_CFG, 6, 0, 0x38, None)),
        (0x50, vcap(caps::CAP_COMMON_CFG, 2, 0x100, 0x40, None)),
        (0x60, vcap(caps::CAP_COMMON_CFG, 0, 0, 0x38, None)),
        // Too short to carry notify_off_multiplier: ignored.
        (0x70, vcap(caps::CAP_NOTIFY_CFG, 0, 0x3000, 0x1000, None)),
        (0x80, vcap(caps::CAP_NOTIFY_CFG, 0, 0x4000, 0x100, Some(2))),
        (0x94, vcap(caps::CAP_ISR_CFG, 0, 0x1000, 1, None)),
        // Not a virtio structure type.
        (0xa4, vcap(42, 0, 0, 0, None)),
    ]);
    let layout = caps::parse(&cfg).unwrap();
    assert_eq!(layout.common.bar, 2);
    assert_eq!(layout.common.offset, 0x100);
    assert_eq!(
        (layout.notify.offset, layout.notify_off_multiplier),
        (0x4000, 2)
    );
    assert_eq!(layout.device, None, "rng has no device configuration");

    let cfg = FakeCfg::new();
    cfg.set_caps(&[(0x40, vcap(caps::CAP_COMMON_CFG, 0, 0, 0x38, None))]);
    assert_eq!(caps::parse(&cfg), Err(CapError::Missing("notification")));
    cfg.set_caps(&[
        (0x40, vcap(caps::CAP_COMMON_CFG, 0, 0, 0x20, None)),
        (0x50, vcap(caps::CAP_NOTIFY_CFG, 0, 0x3000, 4, Some(0))),
        (0x64, vcap(caps::CAP_ISR_CFG, 0, 0x1000, 1, None)),
    ]);
    assert_eq!(caps::parse(&cfg), Err(CapError::CommonTooShort(0x20)));
    assert_eq!(
        caps::parse(&FakeCfg::new()),
        Err(CapError::Missing("common configuration"))
    );
    // A capability running off the end of configuration space is not read past it.
    let cfg = FakeCfg::new();
    cfg.set_caps(&[(0xf8, vec![0x09, 0, 16, caps::CAP_COMMON_CFG])]);
    assert_eq!(caps::read_cap(&cfg, 0xf8), None);
}

#[test]
fn ring_layout() {
    let l = ring::Layout::new(128).unwrap();
    assert_eq!((l.desc, l.avail, l.used), (0, 2048, 2312));
    assert_eq!(l.total, 2312 + 6 + 8 * 128);
    assert_eq!(l.avail % 2, 0);
    assert_eq!(l.used % 4, 0);
    let one = ring::Layout::new(1).unwrap();
    // 16 bytes of descriptor, avail ring 8 bytes (to 24), used ring 4-aligned at 24.
    assert_eq!((one.avail, one.used, one.total), (16, 24, 24 + 14));
    assert_eq!(l.avail_slot(0), l.avail_slot(128));
    assert_eq!(l.used_slot(65535), l.used + 4 + 8 * 127);
    for bad in [0, 3, 100, 65535] {
        assert_eq!(ring::Layout::new(bad), None, "{bad}");
    }
    assert!(ring::Layout::new(32768).is_some());
    assert_eq!(ring::choose_size(0), None);
    assert_eq!(ring::choose_size(1), Some(1));
    assert_eq!(ring::choose_size(100), Some(64));
    assert_eq!(ring::choose_size(128), Some(128));
    assert_eq!(ring::choose_size(32768), Some(ring::MAX_SIZE));
}

/// Ring memory as a byte array.
struct Bytes(Vec<u8>);

impl Bytes {
    fn u16_at(&self, at: u64) -> u16 {
        let a = at as usize;
        u16::from_le_bytes([self.0[a], self.0[a + 1]])
    }
    fn u32_at(&self, at: u64) -> u32 {
        let a = at as usize;
        u32::from_le_bytes(self.0[a..a + 4].try_into().unwrap())
    }
    fn u64_at(&self, at: u64) -> u64 {
        let a = at as usize;
        u64::from_le_bytes(self.0[a..a + 8].try_into().unwrap())
    }
    fn set(&mut self, at: u64, data: &[u8]) {
        let a = at as usize;
        self.0[a..a + data.len()].copy_from_slice(data);
    }
}

impl RingMemory for Bytes {
    fn read_u16(&self, offset: u64) -> u16 {
        self.u16_at(offset)
    }
    fn read_u32(&self, offset: u64) -> u32 {
        self.u32_at(offset)
    }
    fn write_u16(&mut self, offset: u64, value: u16) {
        self.set(offset, &value.to_le_bytes());
    }
    fn write_u32(&mut self, offset: u64, value: u32) {
        self.set(offset, &value.to_le_bytes());
    }
    fn write_u64(&mut self, offset: u64, value: u64) {
        self.set(offset, &value.to_le_bytes());
    }
}

/// The device side: what it reads from the rings and how it returns chains.
struct FakeDevice {
    last_avail: u16,
    used_idx: u16,
}

impl FakeDevice {
    /// Chains made available since the last call, as (head, buffers), walking descriptors as a device
    /// would (§2.7.5).
    fn pop_avail(&mut self, q: &SplitQueue<Bytes>) -> Vec<(u16, Vec<Buffer>)> {
        let l = *q.layout();
        let m = q.memory();
        let avail_idx = m.u16_at(l.avail_idx());
        let mut chains = Vec::new();
        while self.last_avail != avail_idx {
            let head = m.u16_at(l.avail_slot(self.last_avail));
            self.last_avail = self.last_avail.wrapping_add(1);
            let mut bufs = Vec::new();
            let mut i = head;
            loop {
                let d = l.desc_entry(i);
                let flags = m.u16_at(d + 12);
                bufs.push(Buffer {
                    addr: m.u64_at(d),
                    len: m.u32_at(d + 8),
                    device_writes: flags & ring::DESC_F_WRITE != 0,
                });
                assert!(bufs.len() <= usize::from(l.size), "descriptor loop");
                if flags & ring::DESC_F_NEXT == 0 {
                    break;
                }
                i = m.u16_at(d + 14);
            }
            chains.push((head, bufs));
        }
        chains
    }

    fn push_used(&mut self, q: &mut SplitQueue<Bytes>, id: u32, len: u32) {
        let l = *q.layout();
        let slot = l.used_slot(self.used_idx);
        let m = q.memory_mut();
        m.write_u32(slot, id);
        m.write_u32(slot + 4, len);
        self.used_idx = self.used_idx.wrapping_add(1);
        m.write_u16(l.used_idx(), self.used_idx);
    }
}

fn queue(size: u16) -> (SplitQueue<Bytes>, FakeDevice) {
    let l = ring::Layout::new(size).unwrap();
    let q = SplitQueue::new(Bytes(vec![0xaa; l.total as usize]), l).unwrap();
    (
        q,
        FakeDevice {
            last_avail: 0,
            used_idx: 0,
        },
    )
}

fn buf(addr: u64, len: u32, device_writes: bool) -> Buffer {
    Buffer {
        addr,
        len,
        device_writes,
    }
}

#[test]
fn queue_starts_clean_and_leaves_interrupts_on() {
    let (q, _) = queue(8);
    let l = *q.layout();
    // Interrupts (undelivered: no MSI-X vector) are what ends the guest's idle waits.
    assert_eq!(q.memory().u16_at(l.avail) & ring::AVAIL_F_NO_INTERRUPT, 0);
    assert_eq!(q.memory().u16_at(l.avail_idx()), 0);
    assert_eq!(q.memory().u16_at(l.used_idx()), 0);
    assert_eq!((q.num_free(), q.in_flight()), (8, 0));
}

#[test]
fn chains_reach_the_device_only_when_published() {
    let (mut q, mut dev) = queue(8);
    let request = [
        buf(0x1000, 16, false),
        buf(0x2000, 512, true),
        buf(0x1010, 1, true),
    ];
    let head = q.add(&request).unwrap();
    assert!(dev.pop_avail(&q).is_empty(), "not published yet");
    assert!(q.publish());
    assert!(!q.publish(), "nothing new: no second notification");
    let chains = dev.pop_avail(&q);
    assert_eq!(chains, vec![(head, request.to_vec())]);
    assert_eq!((q.num_free(), q.in_flight()), (5, 1));

    assert_eq!(q.poll_used(), Ok(None));
    dev.push_used(&mut q, u32::from(head), 513);
    assert_eq!(q.poll_used(), Ok(Some(Used { head, len: 513 })));
    assert_eq!(q.poll_used(), Ok(None));
    assert_eq!((q.num_free(), q.in_flight()), (8, 0));
}

#[test]
fn out_of_order_completion_and_wraparound() {
    let (mut q, mut dev) = queue(4);
    let mut next_addr = 0u64;
    // Far more than 65536 chains, so both u16 indices wrap; two chains of 2 in flight fill the queue.
    for round in 0..40_000u32 {
        let mut heads = Vec::new();
        for _ in 0..2 {
            next_addr += 0x100;
            heads.push(
                q.add(&[buf(next_addr, 8, false), buf(next_addr + 8, 8, true)])
                    .unwrap(),
            );
        }
        assert!(matches!(
            q.add(&[buf(0, 1, false)]),
            Err(QueueError::Full { needed: 1, free: 0 })
        ));
        q.publish();
        let chains = dev.pop_avail(&q);
        assert_eq!(chains.len(), 2);
        assert_eq!(chains[0].1[0].addr, next_addr - 0x100);
        assert_eq!(chains[1].1[1].addr, next_addr + 8);
        // The device completes the second first.
        dev.push_used(&mut q, u32::from(chains[1].0), round);
        dev.push_used(&mut q, u32::from(chains[0].0), 8);
        assert_eq!(
            q.poll_used().unwrap(),
            Some(Used {
                head: heads[1],
                len: round
            })
        );
        assert_eq!(q.poll_used().unwrap().map(|u| u.head), Some(heads[0]));
        assert_eq!(q.num_free(), 4);
    }
}

#[test]
fn hostile_used_ring_is_refused() {
    let (mut q, mut dev) = queue(8);
    let head = q.add(&[buf(0x1000, 4, true)]).unwrap();
    q.publish();
    // An id that is not a chain in flight (out of range, or a free descriptor).
    dev.push_used(&mut q, 1000, 4);
    assert_eq!(q.poll_used(), Err(QueueError::BadUsedId(1000)));
    let (mut q, mut dev) = queue(8);
    q.add(&[buf(0x1000, 4, true)]).unwrap();
    q.publish();
    dev.push_used(&mut q, u32::from(head) + 1, 4);
    assert_eq!(
        q.poll_used(),
        Err(QueueError::BadUsedId(u32::from(head) + 1))
    );
    // A used index ahead of everything published.
    let (mut q, mut dev) = queue(8);
    q.add(&[buf(0x1000, 4, true)]).unwrap();
    q.publish();
    dev.used_idx = 5;
    dev.push_used(&mut q, 0, 4);
    assert_eq!(
        q.poll_used(),
        Err(QueueError::UsedOverrun {
            used_idx: 6,
            avail_idx: 1
        })
    );
    // Unpublished chains do not count as available.
    let (mut q, mut dev) = queue(8);
    q.add(&[buf(0x1000, 4, true)]).unwrap();
    dev.push_used(&mut q, 0, 4);
    assert!(matches!(q.poll_used(), Err(QueueError::UsedOverrun { .. })));
}

#[test]
fn queue_rejects_empty_and_oversized_chains() {
    let (mut q, _) = queue(2);
    assert!(matches!(q.add(&[]), Err(QueueError::Full { .. })));
    let three = [buf(0, 1, false); 3];
    assert_eq!(q.add(&three), Err(QueueError::Full { needed: 3, free: 2 }));
    assert_eq!(q.num_free(), 2);
    let big = ring::Layout::new(512).unwrap();
    assert!(SplitQueue::new(Bytes(vec![0; big.total as usize]), big).is_none());
}

#[test]
fn dma_arena() {
    let mut a = Arena::new(0x13_8000, 0x3000);
    assert_eq!(a.alloc(10, 1), Some(0x13_8000));
    assert_eq!(a.alloc(16, 16), Some(0x13_8010));
    assert_eq!(a.alloc(0x1000, 4096), Some(0x13_9000));
    assert_eq!(a.remaining(), 0x1000);
    assert_eq!(a.alloc(0x1001, 1), None, "does not fit");
    assert_eq!(a.alloc(8, 3), None, "alignment not a power of two");
    assert_eq!(a.alloc(0x1000, 0), Some(0x13_a000));
    assert_eq!(a.alloc(1, 1), None);
    let mut top = Arena::new(u64::MAX - 8, 100);
    assert_eq!(top.alloc(4, 16), None, "alignment overflows");
    assert_eq!(top.alloc(u64::MAX, 1), None, "length overflows");
}

#[test]
fn blk_requests() {
    let h = blk::header(blk::T_OUT, 0x0102_0304_0506_0708);
    assert_eq!(
        h,
        [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1],
        "type le32, reserved, sector le64"
    );
    assert_eq!(blk::header(blk::T_GET_ID, 0)[0], 8);
    assert_eq!(
        blk::chunks(10, 300, 128).collect::<Vec<_>>(),
        vec![(10, 128), (138, 128), (266, 44)]
    );
    assert_eq!(blk::chunks(0, 128, 128).count(), 1);
    assert_eq!(blk::chunks(0, 0, 128).count(), 0);
    assert_eq!(
        blk::chunks(0, 3, 0).count(),
        3,
        "a zero bound still advances"
    );
    assert_eq!(blk::max_request_sectors(None, 64 << 10), 128);
    assert_eq!(blk::max_request_sectors(Some(4096), 64 << 10), 8);
    assert_eq!(blk::max_request_sectors(Some(0), 64 << 10), 128);
    assert_eq!(blk::max_request_sectors(Some(100), 64 << 10), 1);
    assert_eq!(blk::id_str(b"trenv-disk0\0\0\0\0\0\0\0\0\0"), "trenv-disk0");
    assert_eq!(blk::id_str(b"exactly-twenty-bytes"), "exactly-twenty-bytes");
    assert_eq!(
        blk::id_str(b"evil\x1b[2Jxx"),
        "evil",
        "no escape sequences on the console"
    );
    assert_eq!(blk::status_name(blk::S_IOERR), "IOERR");
}

#[test]
fn blk_checksum_and_pattern_match_the_host_view_of_the_file() {
    // What a host test does: checksum the image file's first N sectors.
    let file: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let expected = file
        .chunks(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .fold(0u64, u64::wrapping_add);
    assert_eq!(blk::checksum(&file), expected);
    assert_eq!(blk::checksum(&[0xff; 16]), 0xffff_ffff_ffff_fffe);
    assert_eq!(blk::checksum(&[1, 2, 3]), 0, "partial word ignored");
    assert_eq!(blk::checksum(&[0; 512]), 0);

    // write=on puts pattern::word(seed, byte offset) at sectors [N, 2N).
    let (seed, n) = (9u64, 64u64);
    let mut data = vec![0u8; (n * 512) as usize];
    blk::fill_pattern(seed, n * 512, &mut data);
    assert_eq!(
        u64::from_le_bytes(data[8..16].try_into().unwrap()),
        crate::pattern::word(seed, n * 512 + 8)
    );
    assert_eq!(crate::pattern::first_mismatch(seed, n * 512, &data), None);
    assert_eq!(
        blk::checksum(&data),
        crate::pattern::checksum(seed, n * 512, n * 512)
    );
    data[700] ^= 0x80;
    assert_eq!(blk::pattern_mismatch(seed, n * 512, &data), Some(696));
}
