//! MSI-X (PCI Local Bus 3.0, §6.8.2): the capability, the vector table and the pending bit array.
//!
//! Each vector has a GSI in the [`InterruptRouter`] and an irqfd registered with KVM for that GSI. The
//! route follows the guest's table entry; masking is done here: a masked (or function-masked) vector is not
//! signalled but marked pending, and delivered when the guest unmasks it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ioapic::MsiMessage;
use crate::pci::msi::{InterruptRouter, RouterError};
use crate::warn_ratelimited;

pub const MSIX_CAP_ID: u8 = 0x11;
pub const MSIX_CAP_LEN: usize = 12;
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Offset of Message Control within the capability.
pub const MSIX_CTRL_OFFSET: usize = 2;
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CTRL_MASKED: u32 = 1;
/// The table size field is 11 bits (N - 1).
pub const MAX_VECTORS: u16 = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTableEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub vector_ctrl: u32,
}

impl Default for MsixTableEntry {
    /// Masked, as after reset.
    fn default() -> Self {
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            vector_ctrl: VECTOR_CTRL_MASKED,
        }
    }
}

impl MsixTableEntry {
    fn masked(&self) -> bool {
        self.vector_ctrl & VECTOR_CTRL_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, v) in [self.addr_lo, self.addr_hi, self.data, self.vector_ctrl]
            .iter()
            .enumerate()
        {
            b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let word =
            |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        Self {
            addr_lo: word(0),
            addr_hi: word(1),
            data: word(2),
            vector_ctrl: word(3),
        }
    }
}

/// Saved MSI-X registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub table: Vec<MsixTableEntry>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("invalid MSI-X vector count {0} (1..={MAX_VECTORS})")]
    VectorCount(u16),
    #[error("cannot allocate a GSI for an MSI-X vector")]
    Gsi(#[source] RouterError),
    #[error("cannot create an irqfd")]
    Irqfd(#[source] std::io::Error),
    #[error("saved MSI-X state has {0} vectors, the device has {1}")]
    StateSize(usize, usize),
    #[error("saved MSI-X vector {0} sets reserved Vector Control bits")]
    StateReserved(usize),
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
}

pub struct MsixConfig {
    table: Vec<MsixTableEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<Vector>,
    router: Arc<InterruptRouter>,
}

impl MsixConfig {
    pub fn new(num_vectors: u16, router: Arc<InterruptRouter>) -> Result<Self, MsixError> {
        if num_vectors == 0 || num_vectors > MAX_VECTORS {
            return Err(MsixError::VectorCount(num_vectors));
        }
        let mut config = Self {
            table: vec![MsixTableEntry::default(); num_vectors.into()],
            pending: vec![false; num_vectors.into()],
            enabled: false,
            function_masked: false,
            vectors: Vec::new(),
            router,
        };
        for _ in 0..num_vectors {
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(MsixError::Irqfd)?;
            // On error, Drop frees the GSIs taken so far.
            let gsi = config.router.allocate_gsi().map_err(MsixError::Gsi)?;
            config.vectors.push(Vector { gsi, irqfd });
        }
        Ok(config)
    }

    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// (GSI, irqfd) per vector, to register with KVM.
    pub fn irqfds(&self) -> impl Iterator<Item = (u32, &EventFd)> {
        self.vectors.iter().map(|v| (v.gsi, &v.irqfd))
    }

    /// The capability bytes for a table and PBA in BAR `bar` at the given offsets.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; MSIX_CAP_LEN] {
        let mut cap = [0u8; MSIX_CAP_LEN];
        cap[0] = MSIX_CAP_ID;
        let ctrl = self.num_vectors() - 1;
        cap[2..4].copy_from_slice(&ctrl.to_le_bytes());
        cap[4..8].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        cap[8..12].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        cap
    }

    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote Message Control.
    pub fn set_control(&mut self, ctrl: u16) {
        let was_blocked = !self.enabled || self.function_masked;
        self.enabled = ctrl & MSIX_CTRL_ENABLE != 0;
        self.function_masked = ctrl & MSIX_CTRL_FUNCTION_MASK != 0;
        if was_blocked && self.enabled && !self.function_masked {
            for v in 0..self.table.len() {
                self.deliver_pending(v);
            }
        }
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            let entry = (at / MSIX_TABLE_ENTRY_SIZE) as usize;
            *b = self
                .table
                .get(entry)
                .map_or(0, |e| e.to_bytes()[(at % MSIX_TABLE_ENTRY_SIZE) as usize]);
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched: Vec<usize> = Vec::new();
        for (i, b) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            let index = (at / MSIX_TABLE_ENTRY_SIZE) as usize;
            let Some(entry) = self.table.get_mut(index) else {
                continue;
            };
            let mut bytes = entry.to_bytes();
            bytes[(at % MSIX_TABLE_ENTRY_SIZE) as usize] = *b;
            *entry = MsixTableEntry::from_bytes(&bytes);
            // Only bit 0 of Vector Control is defined; the rest is reserved and reads as zero.
            entry.vector_ctrl &= VECTOR_CTRL_MASKED;
            if !touched.contains(&index) {
                touched.push(index);
            }
        }
        for index in touched {
            self.update_route(index);
            self.deliver_pending(index);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let bit0 = offset.saturating_add(i as u64).saturating_mul(8);
            *b = (0..8u64).fold(0u8, |acc, bit| {
                let v = usize::try_from(bit0 + bit).unwrap_or(usize::MAX);
                acc | u8::from(self.pending.get(v).copied().unwrap_or(false)) << bit
            });
        }
    }

    /// Signals `vector`. Returns false if MSI-X is disabled (the caller has no other way to interrupt).
    pub fn trigger(&mut self, vector: u16) -> bool {
        if !self.enabled {
            return false;
        }
        let v = usize::from(vector);
        let Some(entry) = self.table.get(v) else {
            warn_ratelimited!("msix: interrupt on nonexistent vector {vector}");
            return true;
        };
        if self.function_masked || entry.masked() {
            self.pending[v] = true;
        } else {
            self.signal(v);
        }
        true
    }

    fn signal(&self, v: usize) {
        if let Err(e) = self.vectors[v].irqfd.write(1) {
            warn_ratelimited!("msix: cannot signal vector {v}: {e}");
        }
    }

    fn deliver_pending(&mut self, v: usize) {
        if self.pending[v] && self.enabled && !self.function_masked && !self.table[v].masked() {
            self.pending[v] = false;
            self.signal(v);
        }
    }

    fn update_route(&self, v: usize) {
        let Some(vector) = self.vectors.get(v) else {
            return;
        };
        if let Err(e) = self
            .router
            .set_msi_route(vector.gsi, Some(self.table[v].message()))
        {
            warn_ratelimited!("msix: cannot route vector {v}: {e}");
        }
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Whether `state` (untrusted) fits this table; changes nothing.
    pub fn check_state(&self, state: &MsixState) -> Result<(), MsixError> {
        if state.table.len() != self.table.len() || state.pending.len() != self.table.len() {
            return Err(MsixError::StateSize(state.table.len(), self.table.len()));
        }
        // A guest cannot set them (writes mask them off), so a state that has them was not made here.
        if let Some(v) = state
            .table
            .iter()
            .position(|e| e.vector_ctrl & !VECTOR_CTRL_MASKED != 0)
        {
            return Err(MsixError::StateReserved(v));
        }
        Ok(())
    }

    /// Restores the registers and the routes of the vectors whose entry changes (each route change rewrites
    /// KVM's whole routing table, so unchanged ones are left alone). Nothing is delivered.
    pub fn set_state(&mut self, state: &MsixState) -> Result<(), MsixError> {
        self.check_state(state)?;
        let old = std::mem::replace(&mut self.table, state.table.clone());
        self.pending = state.pending.clone();
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for (v, entry) in old.iter().enumerate() {
            if *entry != self.table[v] {
                self.update_route(v);
            }
        }
        Ok(())
    }
}

impl Drop for MsixConfig {
    fn drop(&mut self) {
        for v in &self.vectors {
            let _ = self.router.free_gsi(v.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msi::test_util::router;

    fn fired(m: &MsixConfig, v: usize) -> bool {
        m.vectors[v].irqfd.read().is_ok()
    }

    fn program(m: &mut MsixConfig, v: u64, addr: u64, data: u32, masked: bool) {
        let base = v * 16;
        m.write_table(base, &(addr as u32).to_le_bytes());
        m.write_table(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn capability_layout() {
        let (r, _) = router();
        let m = MsixConfig::new(3, r).unwrap();
        let cap = m.capability(0, 0x4000, 0x5000);
        assert_eq!(cap[0], MSIX_CAP_ID);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 2, "table size is N-1");
        assert_eq!(u32::from_le_bytes(cap[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(cap[8..12].try_into().unwrap()), 0x5000);
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
        assert!(MsixConfig::new(0, router().0).is_err());
        assert!(MsixConfig::new(MAX_VECTORS + 1, router().0).is_err());
    }

    #[test]
    fn table_programs_routes_and_reads_back() {
        let (r, backend) = router();
        let mut m = MsixConfig::new(2, r.clone()).unwrap();
        program(&mut m, 1, 0xfee0_1000, 0x4041, false);
        assert!(backend.last().contains(&(25, 0xfee0_1000, 0x4041)));
        let mut entry = [0u8; 16];
        m.read_table(16, &mut entry);
        assert_eq!(&entry[..4], &0xfee0_1000u32.to_le_bytes());
        assert_eq!(&entry[8..12], &0x4041u32.to_le_bytes());
        assert_eq!(&entry[12..], &0u32.to_le_bytes());
        // 8-byte access and reserved vector-control bits.
        m.write_table(24, &0xffff_ffff_0000_0042u64.to_le_bytes());
        let mut ctrl = [0u8; 4];
        m.read_table(28, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), 1);
        // Beyond the table: reads zero, writes ignored.
        let mut out = [0xaau8; 4];
        m.read_table(32, &mut out);
        assert_eq!(out, [0; 4]);
        m.write_table(u64::MAX - 1, &[1, 2, 3, 4]);
        // Dropping the config frees its GSIs.
        drop(m);
        assert_eq!(r.allocate_gsi().unwrap(), 24);
    }

    #[test]
    fn masking_pends_and_unmasking_delivers() {
        let (r, _) = router();
        let mut m = MsixConfig::new(2, r).unwrap();
        assert!(!m.trigger(0), "disabled MSI-X");
        m.set_control(MSIX_CTRL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x41, true);
        assert!(m.trigger(0));
        assert!(!fired(&m, 0));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        // Unmask the vector: the pending interrupt goes out.
        m.write_table(12, &0u32.to_le_bytes());
        assert!(fired(&m, 0));
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Function mask.
        m.set_control(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
        m.trigger(0);
        assert!(!fired(&m, 0));
        m.set_control(MSIX_CTRL_ENABLE);
        assert!(fired(&m, 0));
        m.trigger(0);
        assert!(fired(&m, 0));
        // A vector past the table is ignored.
        assert!(m.trigger(7));
    }

    #[test]
    fn state_round_trips() {
        let (r, backend) = router();
        let mut m = MsixConfig::new(2, r.clone()).unwrap();
        m.set_control(MSIX_CTRL_ENABLE);
        program(&mut m, 0, 0xfee0_2000, 0x51, true);
        m.trigger(0);
        let state = m.state();
        drop(m);
        let mut m2 = MsixConfig::new(2, r).unwrap();
        m2.set_state(&state).unwrap();
        assert_eq!(m2.state(), state);
        assert!(backend.last().contains(&(24, 0xfee0_2000, 0x51)));
        let mut bad = state.clone();
        bad.table.pop();
        assert!(matches!(
            m2.set_state(&bad),
            Err(MsixError::StateSize(1, 2))
        ));
        let mut bad = state.clone();
        bad.pending.push(false);
        assert!(m2.set_state(&bad).is_err());
        let mut bad = state.clone();
        bad.table[1].vector_ctrl = 0x8000_0001;
        assert!(matches!(
            m2.set_state(&bad),
            Err(MsixError::StateReserved(1))
        ));
        assert_eq!(m2.state(), state, "a refused state changes nothing");
    }
}
