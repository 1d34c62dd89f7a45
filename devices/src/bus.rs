//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A vCPU exit names an address; the bus finds the device whose range covers it and hands it the offset
//! within that range. Devices sit behind their own mutex so that exits on different devices from
//! different vCPUs do not serialise on one lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus range.
///
/// `offset` is relative to the base of the range the device was inserted at. Accesses come from the guest,
/// so an implementation must accept any offset and any length without panicking (unknown registers read
/// as zero, writes to them are ignored).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("no device at bus address {0:#x}")]
    NoDevice(u64),
}

pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

struct BusEntry {
    len: u64,
    device: SharedBusDevice,
}

/// One address space (port I/O or MMIO) mapping non-overlapping ranges to devices.
#[derive(Default)]
pub struct Bus {
    entries: BTreeMap<u64, BusEntry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::InvalidRange { base, len });
        };
        // The only candidates for overlap are the last range starting before `end`.
        if let Some((&other, entry)) = self.entries.range(..end).next_back() {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.entries.insert(base, BusEntry { len, device });
        Ok(())
    }

    pub fn remove(&mut self, base: u64) -> Option<SharedBusDevice> {
        self.entries.remove(&base).map(|e| e.device)
    }

    /// The device covering `addr` and the offset of `addr` within its range.
    pub fn resolve(&self, addr: u64) -> Option<(SharedBusDevice, u64)> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then(|| (entry.device.clone(), offset))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (device, offset) = self.resolve(addr).ok_or(BusError::NoDevice(addr))?;
        // A poisoned lock means a device thread panicked earlier; keep serving rather than cascading.
        device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data);
        Ok(())
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (device, offset) = self.resolve(addr).ok_or(BusError::NoDevice(addr))?;
        device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(Vec<u8>);

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.0.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
    }

    fn scratch(len: usize) -> SharedBusDevice {
        Arc::new(Mutex::new(Scratch(vec![0; len])))
    }

    #[test]
    fn dispatches_by_offset_within_range() {
        let mut bus = Bus::new();
        bus.insert(scratch(16), 0x1000, 16).unwrap();
        bus.write(0x1004, &[7, 8]).unwrap();
        let mut out = [0u8; 2];
        bus.read(0x1004, &mut out).unwrap();
        assert_eq!(out, [7, 8]);
        assert_eq!(bus.read(0x1010, &mut out), Err(BusError::NoDevice(0x1010)));
        assert_eq!(bus.read(0xfff, &mut out), Err(BusError::NoDevice(0xfff)));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(scratch(16), 0x1000, 0x10).unwrap();
        assert!(matches!(
            bus.insert(scratch(16), 0x100f, 0x10),
            Err(BusError::Overlap { other: 0x1000, .. })
        ));
        assert!(matches!(
            bus.insert(scratch(16), 0xff8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(scratch(16), 0x1010, 0x10).unwrap();
        bus.insert(scratch(16), 0xff0, 0x10).unwrap();
        assert!(bus.insert(scratch(1), 0x2000, 0).is_err());
        assert!(bus.insert(scratch(1), u64::MAX, 2).is_err());
    }
}
