//! PCI configuration space (pure logic over a `ConfigSpace`, `core` only; also compiled host-side for unit
//! tests): ECAM addressing, function headers, bus 0 enumeration, the capability list and BARs.
//!
//! Every access is a 32-bit read or write of an aligned dword (PCI Local Bus 3.0 §3.2.2.3.2 allows any
//! width through ECAM, but each one is an MMIO exit here, and whole dwords keep the VMM side simple);
//! narrower fields are extracted from the dword that holds them.

/// ECAM window (PCI Express Base 4.0 §7.2.2): bus << 20 | device << 15 | function << 12 | register.
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = 0x1000_0000;
pub const DEVICES_PER_BUS: u8 = 32;
pub const FUNCTIONS_PER_DEVICE: u8 = 8;
/// Size of the conventional configuration space (the capability list lives in it).
pub const CONFIG_SPACE_SIZE: u16 = 256;

// Type 0 header registers (PCI Local Bus 3.0 §6.1).
pub const REG_ID: u16 = 0x00;
pub const REG_COMMAND_STATUS: u16 = 0x04;
pub const REG_CLASS_REVISION: u16 = 0x08;
pub const REG_HEADER_TYPE_DWORD: u16 = 0x0c;
pub const REG_BAR0: u16 = 0x10;
pub const REG_CAP_PTR: u16 = 0x34;
pub const NUM_BARS: u8 = 6;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAP_LIST: u16 = 1 << 4;
const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;
/// Capabilities start after the 64-byte header; a pointer below it is invalid.
const FIRST_CAP_OFFSET: u8 = 0x40;
/// More links than fit in 192 bytes of 4-byte-aligned capabilities means a loop.
const MAX_CAPS: usize = 48;

const BAR_IO: u32 = 1 << 0;
const BAR_TYPE_MASK: u32 = 0b110;
const BAR_TYPE_64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 1 << 3;
const BAR_MEM_ADDR_MASK: u32 = !0xf;

/// Byte offset of a register in the ECAM window.
pub fn ecam_offset(bus: u8, device: u8, function: u8, reg: u16) -> u64 {
    (u64::from(bus) << 20)
        | (u64::from(device & 0x1f) << 15)
        | (u64::from(function & 0x7) << 12)
        | u64::from(reg & 0xffc)
}

/// One function's configuration space, accessed by aligned dwords.
pub trait ConfigSpace {
    /// The dword at `reg` (a multiple of 4).
    fn read32(&self, reg: u16) -> u32;
    /// Writes the dword at `reg` (a multiple of 4).
    fn write32(&self, reg: u16, value: u32);

    fn read16(&self, reg: u16) -> u16 {
        (self.read32(reg & !3) >> ((reg & 2) * 8)) as u16
    }

    fn read8(&self, reg: u16) -> u8 {
        (self.read32(reg & !3) >> ((reg & 3) * 8)) as u8
    }
}

/// What identifies a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    /// Header layout (0 = device, 1 = PCI bridge), without the multifunction bit.
    pub header_type: u8,
    pub multifunction: bool,
}

/// The function's header, or `None` if nothing answers (vendor 0xffff, or 0 from an empty window).
pub fn read_header(cfg: &impl ConfigSpace) -> Option<Header> {
    let id = cfg.read32(REG_ID);
    let vendor = id as u16;
    if vendor == 0xffff || vendor == 0 {
        return None;
    }
    let class = cfg.read32(REG_CLASS_REVISION);
    let header_type = (cfg.read32(REG_HEADER_TYPE_DWORD) >> 16) as u8;
    Some(Header {
        vendor,
        device: (id >> 16) as u16,
        revision: class as u8,
        class: class >> 8,
        header_type: header_type & !HEADER_TYPE_MULTIFUNCTION,
        multifunction: header_type & HEADER_TYPE_MULTIFUNCTION != 0,
    })
}

/// Functions on one bus, in device then function order: function 0 of each device, and functions 1-7 only
/// when function 0 says it is multifunction (PCI Local Bus 3.0 §6.2.1).
pub struct Scan<F> {
    open: F,
    device: u8,
    function: u8,
    multifunction: bool,
}

/// Scans a bus; `open(device, function)` gives a function's configuration space.
pub fn scan<C: ConfigSpace, F: Fn(u8, u8) -> C>(open: F) -> Scan<F> {
    Scan {
        open,
        device: 0,
        function: 0,
        multifunction: false,
    }
}

impl<C: ConfigSpace, F: Fn(u8, u8) -> C> Iterator for Scan<F> {
    /// (device, function, header)
    type Item = (u8, u8, Header);

    fn next(&mut self) -> Option<Self::Item> {
        while self.device < DEVICES_PER_BUS {
            let (device, function) = (self.device, self.function);
            if function == 0 || (self.multifunction && function < FUNCTIONS_PER_DEVICE) {
                self.function += 1;
                let header = read_header(&(self.open)(device, function));
                if function == 0 {
                    self.multifunction = header.is_some_and(|h| h.multifunction);
                }
                if let Some(header) = header {
                    return Some((device, function, header));
                }
            } else {
                self.device += 1;
                self.function = 0;
                self.multifunction = false;
            }
        }
        None
    }
}

/// One entry of the capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Offset of the capability in configuration space.
    pub offset: u8,
    pub id: u8,
}

/// Walks the capability list (PCI Local Bus 3.0 §6.7): pointers are dword aligned (low 2 bits reserved),
/// 0 ends the list, a pointer into the header or a list longer than the space allows ends it too.
pub struct Capabilities<'a, C> {
    cfg: &'a C,
    next: u8,
    seen: usize,
}

pub fn capabilities<C: ConfigSpace>(cfg: &C) -> Capabilities<'_, C> {
    let status = (cfg.read32(REG_COMMAND_STATUS) >> 16) as u16;
    let first = if status & STATUS_CAP_LIST != 0 {
        cfg.read8(REG_CAP_PTR) & !3
    } else {
        0
    };
    Capabilities {
        cfg,
        next: first,
        seen: 0,
    }
}

impl<C: ConfigSpace> Iterator for Capabilities<'_, C> {
    type Item = Capability;

    fn next(&mut self) -> Option<Capability> {
        if self.next < FIRST_CAP_OFFSET || self.seen >= MAX_CAPS {
            return None;
        }
        let offset = self.next;
        let head = self.cfg.read32(u16::from(offset));
        self.seen += 1;
        self.next = ((head >> 8) as u8) & !3;
        Some(Capability {
            offset,
            id: head as u8,
        })
    }
}

/// A decoded base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// Memory space; `addr` 0 means not assigned.
    Memory {
        addr: u64,
        is_64: bool,
        prefetchable: bool,
    },
    Io {
        port: u32,
    },
    /// The upper half of a 64-bit BAR, or an index past the last BAR.
    None,
}

fn bar_reg(index: u8) -> u16 {
    REG_BAR0 + 4 * u16::from(index)
}

/// Decodes BAR `index` (0..6) of a type 0 header.
pub fn read_bar(cfg: &impl ConfigSpace, index: u8) -> Bar {
    if index >= NUM_BARS {
        return Bar::None;
    }
    let low = cfg.read32(bar_reg(index));
    if low & BAR_IO != 0 {
        return Bar::Io { port: low & !3 };
    }
    let is_64 = low & BAR_TYPE_MASK == BAR_TYPE_64;
    if is_64 && index + 1 >= NUM_BARS {
        return Bar::None;
    }
    let high = if is_64 {
        cfg.read32(bar_reg(index + 1))
    } else {
        0
    };
    Bar::Memory {
        addr: (u64::from(high) << 32) | u64::from(low & BAR_MEM_ADDR_MASK),
        is_64,
        prefetchable: low & BAR_PREFETCHABLE != 0,
    }
}

/// Size of memory BAR `index` in bytes (0 if it is not an implemented memory BAR): writes all-ones and
/// reads the mask back (PCI Local Bus 3.0 §6.2.5.1), then restores the address. The caller must have
/// memory decoding off while this runs, so the device never decodes the all-ones address.
pub fn size_memory_bar(cfg: &impl ConfigSpace, index: u8) -> u64 {
    let Bar::Memory { is_64, .. } = read_bar(cfg, index) else {
        return 0;
    };
    let reg = bar_reg(index);
    let low = cfg.read32(reg);
    cfg.write32(reg, u32::MAX);
    let low_mask = cfg.read32(reg) & BAR_MEM_ADDR_MASK;
    cfg.write32(reg, low);
    let mut mask = u64::from(low_mask) | 0xffff_ffff_0000_0000;
    if is_64 {
        let high = cfg.read32(reg + 4);
        cfg.write32(reg + 4, u32::MAX);
        let high_mask = cfg.read32(reg + 4);
        cfg.write32(reg + 4, high);
        mask = (u64::from(high_mask) << 32) | u64::from(low_mask);
    }
    if low_mask == 0 && mask >> 32 == 0xffff_ffff {
        // No writable address bits: not implemented.
        return 0;
    }
    (!mask).wrapping_add(1)
}

/// Sets bits in the command register (read-modify-write of the command half only: status bits are
/// write-1-to-clear, so the status half is written as zeros).
pub fn enable(cfg: &impl ConfigSpace, bits: u16) {
    let command = cfg.read32(REG_COMMAND_STATUS) as u16;
    cfg.write32(REG_COMMAND_STATUS, u32::from(command | bits));
}

/// Clears bits in the command register.
pub fn disable(cfg: &impl ConfigSpace, bits: u16) {
    let command = cfg.read32(REG_COMMAND_STATUS) as u16;
    cfg.write32(REG_COMMAND_STATUS, u32::from(command & !bits));
}

/// Virtio over PCI (virtio 1.2 §4.1.2): vendor 0x1af4, modern device IDs 0x1040 + device type.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
pub const VIRTIO_DEVICE_ID_BASE: u16 = 0x1040;
pub const VIRTIO_TYPE_NET: u16 = 1;
pub const VIRTIO_TYPE_BLOCK: u16 = 2;
pub const VIRTIO_TYPE_CONSOLE: u16 = 3;
pub const VIRTIO_TYPE_RNG: u16 = 4;
pub const VIRTIO_TYPE_VSOCK: u16 = 19;

/// The virtio device type of a modern (non-transitional) virtio-pci function.
pub fn virtio_type(header: &Header) -> Option<u16> {
    (header.vendor == VIRTIO_VENDOR && (0x1040..=0x107f).contains(&header.device))
        .then(|| header.device - VIRTIO_DEVICE_ID_BASE)
}

/// A short name for the `pci` workload's listing.
pub fn describe(header: &Header) -> Name {
    match virtio_type(header) {
        Some(VIRTIO_TYPE_NET) => Name::Str("virtio-net"),
        Some(VIRTIO_TYPE_BLOCK) => Name::Str("virtio-blk"),
        Some(VIRTIO_TYPE_CONSOLE) => Name::Str("virtio-console"),
        Some(VIRTIO_TYPE_RNG) => Name::Str("virtio-rng"),
        Some(VIRTIO_TYPE_VSOCK) => Name::Str("virtio-vsock"),
        Some(other) => Name::Virtio(other),
        None => Name::Str(match header.class >> 8 {
            0x0600 => "host-bridge",
            0x0601 => "isa-bridge",
            0x0604 => "pci-bridge",
            _ => "other",
        }),
    }
}

/// A function's name: fixed, or `virtio-<type>` for device types without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name {
    Str(&'static str),
    Virtio(u16),
}

impl core::fmt::Display for Name {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Name::Str(s) => f.write_str(s),
            Name::Virtio(t) => write!(f, "virtio-{t}"),
        }
    }
}
