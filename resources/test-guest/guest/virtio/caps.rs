//! The virtio-pci vendor capabilities (virtio 1.2 §4.1.4) and the common configuration layout (pure logic
//! over a `pci::ConfigSpace`, `core` only; also compiled host-side for unit tests).

use crate::pci::{self, ConfigSpace};

// cfg_type values (§4.1.4).
pub const CAP_COMMON_CFG: u8 = 1;
pub const CAP_NOTIFY_CFG: u8 = 2;
pub const CAP_ISR_CFG: u8 = 3;
pub const CAP_DEVICE_CFG: u8 = 4;
pub const CAP_PCI_CFG: u8 = 5;

/// struct virtio_pci_cap is 16 bytes; virtio_pci_notify_cap adds notify_off_multiplier.
const CAP_LEN: u8 = 16;
const NOTIFY_CAP_LEN: u8 = 20;
/// BAR numbers 0x0-0x5 are valid; the driver ignores capabilities naming others (§4.1.4).
const MAX_BAR: u8 = 5;

// struct virtio_pci_common_cfg (§4.1.4.3): byte offsets.
pub const COMMON_DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const COMMON_DEVICE_FEATURE: u64 = 0x04;
pub const COMMON_DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const COMMON_DRIVER_FEATURE: u64 = 0x0c;
pub const COMMON_CONFIG_MSIX_VECTOR: u64 = 0x10;
pub const COMMON_NUM_QUEUES: u64 = 0x12;
pub const COMMON_DEVICE_STATUS: u64 = 0x14;
pub const COMMON_CONFIG_GENERATION: u64 = 0x15;
pub const COMMON_QUEUE_SELECT: u64 = 0x16;
pub const COMMON_QUEUE_SIZE: u64 = 0x18;
pub const COMMON_QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const COMMON_QUEUE_ENABLE: u64 = 0x1c;
pub const COMMON_QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const COMMON_QUEUE_DESC: u64 = 0x20;
pub const COMMON_QUEUE_DRIVER: u64 = 0x28;
pub const COMMON_QUEUE_DEVICE: u64 = 0x30;
/// The fields above, through queue_device: what a virtio 1.0 device must provide.
pub const COMMON_CFG_MIN_LEN: u32 = 0x38;

// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Reserved feature bits (§6).
pub const F_VERSION_1: u64 = 1 << 32;
/// "No vector" for config_msix_vector / queue_msix_vector (§4.1.5.1.2).
pub const MSI_NO_VECTOR: u16 = 0xffff;

/// Where one structure lives: `offset`, `length` bytes inside BAR `bar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

impl Region {
    /// One past the last byte inside the BAR (no overflow: both are u32).
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.length)
    }
}

/// The structures a driver needs; the first capability of each type wins (§4.1.4: "the driver SHOULD use
/// the first instance of each virtio structure type they can support").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub common: Region,
    pub notify: Region,
    pub notify_off_multiplier: u32,
    pub isr: Region,
    /// Absent for device types without configuration (e.g. rng).
    pub device: Option<Region>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    /// A required structure has no usable capability.
    Missing(&'static str),
    /// The common configuration capability is shorter than the fields every driver uses.
    CommonTooShort(u32),
}

impl core::fmt::Display for CapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CapError::Missing(what) => write!(f, "no usable {what} capability"),
            CapError::CommonTooShort(len) => write!(
                f,
                "common configuration is {len} bytes, need {COMMON_CFG_MIN_LEN}"
            ),
        }
    }
}

/// One virtio vendor capability as read from configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    pub cfg_type: u8,
    pub region: Region,
    /// Only for CAP_NOTIFY_CFG with cap_len >= 20.
    pub notify_off_multiplier: Option<u32>,
}

/// Decodes the vendor capability at `offset`: `None` if it is too short or names a reserved BAR, which a
/// driver must ignore.
pub fn read_cap(cfg: &impl ConfigSpace, offset: u8) -> Option<VirtioCap> {
    let at = u16::from(offset);
    if at + u16::from(CAP_LEN) > pci::CONFIG_SPACE_SIZE {
        return None;
    }
    // cap_vndr, cap_next, cap_len, cfg_type | bar, id, padding[2] | offset | length
    let head = cfg.read32(at);
    let cap_len = (head >> 16) as u8;
    let cfg_type = (head >> 24) as u8;
    let bar = cfg.read32(at + 4) as u8;
    if cap_len < CAP_LEN || bar > MAX_BAR {
        return None;
    }
    let region = Region {
        bar,
        offset: cfg.read32(at + 8),
        length: cfg.read32(at + 12),
    };
    let notify_off_multiplier = (cfg_type == CAP_NOTIFY_CFG
        && cap_len >= NOTIFY_CAP_LEN
        && at + u16::from(NOTIFY_CAP_LEN) <= pci::CONFIG_SPACE_SIZE)
        .then(|| cfg.read32(at + 16));
    Some(VirtioCap {
        cfg_type,
        region,
        notify_off_multiplier,
    })
}

/// Finds the common, notify, ISR and device structures in the capability list.
pub fn parse(cfg: &impl ConfigSpace) -> Result<Layout, CapError> {
    let mut common = None;
    let mut notify = None;
    let mut isr = None;
    let mut device = None;
    for cap in pci::capabilities(cfg).filter(|c| c.id == pci::CAP_ID_VENDOR) {
        let Some(v) = read_cap(cfg, cap.offset) else {
            continue;
        };
        match v.cfg_type {
            CAP_COMMON_CFG if common.is_none() => common = Some(v.region),
            CAP_NOTIFY_CFG if notify.is_none() => {
                // A notify capability without its multiplier cannot be used.
                if let Some(m) = v.notify_off_multiplier {
                    notify = Some((v.region, m));
                }
            }
            CAP_ISR_CFG if isr.is_none() => isr = Some(v.region),
            CAP_DEVICE_CFG if device.is_none() => device = Some(v.region),
            _ => {}
        }
    }
    let common = common.ok_or(CapError::Missing("common configuration"))?;
    if common.length < COMMON_CFG_MIN_LEN {
        return Err(CapError::CommonTooShort(common.length));
    }
    let (notify, notify_off_multiplier) = notify.ok_or(CapError::Missing("notification"))?;
    Ok(Layout {
        common,
        notify,
        notify_off_multiplier,
        isr: isr.ok_or(CapError::Missing("ISR status"))?,
        device,
    })
}

/// Offset of queue `notify_off`'s notification address inside the notify region (§4.1.4.4:
/// `cap.offset + queue_notify_off * notify_off_multiplier`, relative to the capability's offset here), if
/// the 16-bit write still fits inside the region.
pub fn notify_offset(layout: &Layout, queue_notify_off: u16) -> Option<u64> {
    let off = u64::from(queue_notify_off) * u64::from(layout.notify_off_multiplier);
    (off + 2 <= u64::from(layout.notify.length)).then_some(off)
}
