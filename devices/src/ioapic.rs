//! IOAPIC emulated in the VMM (KVM split irqchip: the LAPICs are in KVM, the IOAPIC is here).
//!
//! An 82093AA-style IOAPIC, version 0x20 (with the EOI register), 24 pins, at MMIO `0xfec0_0000`:
//! IOREGSEL at 0x00, IOWIN at 0x10, EOI at 0x40. Indirect registers: 0x00 ID (bits 27:24), 0x01 version,
//! 0x02 arbitration ID, 0x10 + 2n / 0x11 + 2n the low / high dword of redirection entry n.
//!
//! A pin's redirection entry is turned into an x86 MSI (Intel SDM vol. 3, "Message Signalled Interrupts")
//! and sent through an [`MsiSender`]; with KVM that is `KVM_SIGNAL_MSI` into the in-kernel LAPICs.
//!
//! Interrupt semantics:
//! - Pin levels given to [`Ioapic::set_irq`] are logical (asserted or not); the polarity bit is stored for
//!   the guest but does not invert them, as the emulated devices signal logically.
//! - Edge: a rising edge is delivered if the entry is unmasked; while masked it is latched and delivered
//!   when the guest unmasks (as QEMU does; Linux tolerates the spurious interrupt this may cause).
//! - Level: delivered while asserted, unmasked and Remote IRR is clear; delivery sets Remote IRR, which
//!   the guest clears by an EOI (the EOI register, or the LAPIC EOI that KVM reports as
//!   `KVM_EXIT_IOAPIC_EOI`, see [`Ioapic::end_of_interrupt`]); a line still asserted is then re-delivered.
//!
//! KVM only reports LAPIC EOIs of vectors it knows belong to the IOAPIC: under a split irqchip it learns
//! them from MSI routes in the GSI routing table for the first `KVM_CAP_SPLIT_IRQCHIP` pins. The VMM gets
//! those routes from [`MsiSender::update_routes`] (called whenever they change) or [`Ioapic::msi_routes`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::warn_ratelimited;

pub const NUM_PINS: usize = 24;
pub const IOAPIC_VERSION: u32 = 0x20;

// MMIO offsets.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;

// Indirect register indices.
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION_BASE: u8 = 0x10;

const ID_SHIFT: u32 = 24;
const ID_MASK: u32 = 0xf;

// Redirection entry fields.
const RTE_VECTOR_MASK: u64 = 0xff;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DEST_MODE_LOGICAL: u64 = 1 << 11;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Bits 55:49: destination ID bits 14:8 under KVM's extended destination ID (KVM_FEATURE_MSI_EXT_DEST_ID).
const RTE_EXT_DEST_SHIFT: u32 = 49;
const RTE_DEST_SHIFT: u32 = 56;
const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;

const DELIVERY_FIXED: u8 = 0;
const DELIVERY_LOWEST_PRIORITY: u8 = 1;
const DELIVERY_SMI: u8 = 2;
const DELIVERY_NMI: u8 = 4;
const DELIVERY_INIT: u8 = 5;

// MSI format.
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDR_DEST_SHIFT: u32 = 12;
const MSI_ADDR_EXT_DEST_SHIFT: u32 = 5;
const MSI_ADDR_DEST_MODE_LOGICAL: u64 = 1 << 2;
const MSI_DATA_DELIVERY_MODE_SHIFT: u32 = 8;
const MSI_DATA_LEVEL_ASSERT: u32 = 1 << 14;
const MSI_DATA_TRIGGER_LEVEL: u32 = 1 << 15;

/// Vectors 0-15 are reserved for exceptions; a LAPIC flags them as illegal.
const FIRST_VALID_VECTOR: u8 = 16;

const PIN_BITS: u32 = (1 << NUM_PINS) - 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IoapicError {
    #[error("IOAPIC state has {0} redirection entries, expected {NUM_PINS}")]
    EntryCount(usize),
    #[error("IOAPIC state has ID {0:#x}, which does not fit in 4 bits")]
    Id(u8),
}

/// An x86 MSI: the address and data a device (here the IOAPIC) writes to the LAPIC window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where the IOAPIC delivers its messages.
pub trait MsiSender: Send + Sync {
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()>;

    /// The pin -> message mapping changed (`routes[pin]` is `None` for pins whose entry cannot be
    /// delivered). A KVM split irqchip needs these as GSI routes to report EOIs of level-triggered
    /// vectors; the default ignores them.
    fn update_routes(&self, _routes: &[Option<MsiMessage>]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends through `KVM_SIGNAL_MSI` to the in-kernel LAPICs.
pub struct KvmMsiSender(pub Arc<kvm_ioctls::VmFd>);

impl MsiSender for KvmMsiSender {
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // Ok(0) means the guest blocked it (e.g. its LAPIC is disabled): not our error.
        self.0.signal_msi(msi).map(|_| ()).map_err(Into::into)
    }
}

/// Saved IOAPIC registers and pin state, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    pub id: u8,
    pub ioregsel: u8,
    pub redirection_table: Vec<u64>,
    /// Bit n: pin n is asserted.
    pub line_levels: u32,
    /// Bit n: an edge on pin n is latched, awaiting an unmask.
    pub pending_edges: u32,
}

pub struct Ioapic {
    id: u8,
    ioregsel: u8,
    redirection_table: [u64; NUM_PINS],
    line_levels: u32,
    pending_edges: u32,
    msi: Box<dyn MsiSender>,
}

fn pin_bit(pin: usize) -> u32 {
    1 << pin
}

/// The message an entry sends, or `None` if it cannot be delivered (reserved delivery mode, ExtINT,
/// which needs a PIC we do not have, or an exception vector).
fn entry_to_msi(entry: u64) -> Option<MsiMessage> {
    let vector = (entry & RTE_VECTOR_MASK) as u8;
    let delivery_mode = ((entry >> RTE_DELIVERY_MODE_SHIFT) & 0x7) as u8;
    match delivery_mode {
        DELIVERY_FIXED | DELIVERY_LOWEST_PRIORITY if vector < FIRST_VALID_VECTOR => return None,
        DELIVERY_FIXED | DELIVERY_LOWEST_PRIORITY | DELIVERY_SMI | DELIVERY_NMI | DELIVERY_INIT => {
        }
        _ => return None,
    }
    let dest = (entry >> RTE_DEST_SHIFT) & 0xff;
    let ext_dest = (entry >> RTE_EXT_DEST_SHIFT) & 0x7f;
    let mut address =
        MSI_ADDRESS_BASE | (dest << MSI_ADDR_DEST_SHIFT) | (ext_dest << MSI_ADDR_EXT_DEST_SHIFT);
    if entry & RTE_DEST_MODE_LOGICAL != 0 {
        address |= MSI_ADDR_DEST_MODE_LOGICAL;
    }
    let mut data = u32::from(vector)
        | (u32::from(delivery_mode) << MSI_DATA_DELIVERY_MODE_SHIFT)
        | MSI_DATA_LEVEL_ASSERT;
    if entry & RTE_TRIGGER_LEVEL != 0 {
        data |= MSI_DATA_TRIGGER_LEVEL;
    }
    Some(MsiMessage { address, data })
}

impl Ioapic {
    pub fn new(msi: Box<dyn MsiSender>) -> Self {
        Self {
            id: 0,
            ioregsel: 0,
            // Firmware-less boot: every pin starts masked, edge, fixed, vector 0, like after RESET.
            redirection_table: [RTE_MASKED; NUM_PINS],
            line_levels: 0,
            pending_edges: 0,
            msi,
        }
    }

    /// Sets the logical level of `pin`. Edge entries fire on a rising edge, level entries while high.
    pub fn set_irq(&mut self, pin: u32, level: bool) {
        let Some(pin) = usize::try_from(pin).ok().filter(|&p| p < NUM_PINS) else {
            warn_ratelimited!("ioapic: interrupt on nonexistent pin {pin}");
            return;
        };
        let bit = pin_bit(pin);
        let was_high = self.line_levels & bit != 0;
        if level {
            self.line_levels |= bit;
        } else {
            self.line_levels &= !bit;
            return;
        }
        if self.redirection_table[pin] & RTE_TRIGGER_LEVEL == 0 {
            if was_high {
                return;
            }
            self.pending_edges |= bit;
        }
        self.service(pin);
    }

    /// An EOI for `vector`: clears Remote IRR of the level entries using it and re-delivers those whose
    /// line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..NUM_PINS {
            let entry = self.redirection_table[pin];
            if entry & RTE_REMOTE_IRR != 0 && (entry & RTE_VECTOR_MASK) as u8 == vector {
                self.redirection_table[pin] &= !RTE_REMOTE_IRR;
                self.service(pin);
            }
        }
    }

    /// The message each pin would send now (masked pins included), as installed by [`MsiSender::update_routes`].
    pub fn msi_routes(&self) -> Vec<Option<MsiMessage>> {
        self.redirection_table
            .iter()
            .map(|&e| entry_to_msi(e))
            .collect()
    }

    pub fn state(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            ioregsel: self.ioregsel,
            redirection_table: self.redirection_table.to_vec(),
            line_levels: self.line_levels,
            pending_edges: self.pending_edges,
        }
    }

    /// Restores registers and pin state. Nothing is delivered: what was in flight at snapshot time is
    /// in the LAPIC state, restored separately.
    pub fn set_state(&mut self, state: &IoapicState) -> Result<(), IoapicError> {
        let table: [u64; NUM_PINS] = state
            .redirection_table
            .as_slice()
            .try_into()
            .map_err(|_| IoapicError::EntryCount(state.redirection_table.len()))?;
        if u32::from(state.id) > ID_MASK {
            return Err(IoapicError::Id(state.id));
        }
        self.id = state.id;
        self.ioregsel = state.ioregsel;
        self.redirection_table = table;
        self.line_levels = state.line_levels & PIN_BITS;
        self.pending_edges = state.pending_edges & PIN_BITS;
        self.publish_routes();
        Ok(())
    }

    /// Delivers what `pin` has pending, if its entry allows.
    fn service(&mut self, pin: usize) {
        let entry = self.redirection_table[pin];
        if entry & RTE_MASKED != 0 {
            return;
        }
        let bit = pin_bit(pin);
        if entry & RTE_TRIGGER_LEVEL != 0 {
            if self.line_levels & bit != 0
                && entry & RTE_REMOTE_IRR == 0
                && self.deliver(pin, entry)
            {
                self.redirection_table[pin] |= RTE_REMOTE_IRR;
            }
        } else if self.pending_edges & bit != 0 {
            // An edge that fails to send is lost, as on a bus error; retrying could storm the log.
            self.pending_edges &= !bit;
            self.deliver(pin, entry);
        }
    }

    fn deliver(&self, pin: usize, entry: u64) -> bool {
        let Some(msg) = entry_to_msi(entry) else {
            warn_ratelimited!("ioapic: pin {pin} has an undeliverable entry {entry:#018x}");
            return false;
        };
        match self.msi.send_msi(msg.address, msg.data) {
            Ok(()) => true,
            Err(e) => {
                warn_ratelimited!(
                    "ioapic: pin {pin}: sending MSI {:#x}/{:#x} failed: {e}",
                    msg.address,
                    msg.data
                );
                false
            }
        }
    }

    fn publish_routes(&self) {
        if let Err(e) = self.msi.update_routes(&self.msi_routes()) {
            warn_ratelimited!("ioapic: updating MSI routes failed: {e}");
        }
    }

    fn read_register(&self) -> u32 {
        match self.ioregsel {
            REG_ID | REG_ARBITRATION => u32::from(self.id) << ID_SHIFT,
            REG_VERSION => ((NUM_PINS as u32 - 1) << 16) | IOAPIC_VERSION,
            index => match Self::redirection_index(index) {
                Some((pin, false)) => self.redirection_table[pin] as u32,
                Some((pin, true)) => (self.redirection_table[pin] >> 32) as u32,
                None => 0,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.ioregsel {
            REG_ID => self.id = ((value >> ID_SHIFT) & ID_MASK) as u8,
            REG_VERSION | REG_ARBITRATION => {}
            index => {
                let Some((pin, high)) = Self::redirection_index(index) else {
                    warn_ratelimited!("ioapic: write to unknown register {index:#x}");
                    return;
                };
                let old = self.redirection_table[pin];
                let mut new = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                new = (new & !RTE_READ_ONLY) | (old & RTE_READ_ONLY);
                // Remote IRR only means something for level entries.
                if new & RTE_TRIGGER_LEVEL == 0 {
                    new &= !RTE_REMOTE_IRR;
                }
                self.redirection_table[pin] = new;
                if entry_to_msi(old) != entry_to_msi(new) {
                    self.publish_routes();
                }
                // An unmask delivers a latched edge or a still-asserted level.
                self.service(pin);
            }
        }
    }

    /// (pin, high dword) for a redirection-table register index.
    fn redirection_index(index: u8) -> Option<(usize, bool)> {
        let n = usize::from(index.checked_sub(REG_REDIRECTION_BASE)?);
        let pin = n / 2;
        (pin < NUM_PINS).then_some((pin, n % 2 == 1))
    }

    /// The 32-bit MMIO register containing `offset`, if any.
    fn mmio_register(offset: u64) -> Option<u64> {
        let base = offset & !3;
        matches!(base, IOREGSEL | IOWIN | EOI).then_some(base)
    }

    fn mmio_value(&self, register: u64) -> u32 {
        match register {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_register(),
            _ => 0, // EOI is write-only
        }
    }
}

impl crate::BusDevice for Ioapic {
    /// Registers are 32 bits; narrower or unaligned reads return the matching bytes, bytes past the
    /// register read 0.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(register) = Self::mmio_register(offset) else {
            return;
        };
        let bytes = self.mmio_value(register).to_le_bytes();
        let start = (offset - register) as usize;
        for (dst, src) in data.iter_mut().zip(&bytes[start..]) {
            *dst = *src;
        }
    }

    /// Narrow or unaligned writes merge into the register's current value; bytes past it are dropped.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(register) = Self::mmio_register(offset) else {
            return;
        };
        if data.is_empty() {
            return;
        }
        let mut bytes = self.mmio_value(register).to_le_bytes();
        let start = (offset - register) as usize;
        for (dst, src) in bytes[start..].iter_mut().zip(data) {
            *dst = *src;
        }
        let value = u32::from_le_bytes(bytes);
        match register {
            IOREGSEL => self.ioregsel = value as u8,
            IOWIN => self.write_register(value),
            _ => self.end_of_interrupt(value as u8),
        }
    }
}

/// A line of the IOAPIC that a device raises.
#[derive(Clone)]
pub struct IrqLine {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: u32,
}

impl IrqLine {
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pin: u32) -> Self {
        Self { ioapic, pin }
    }

    pub fn pin(&self) -> u32 {
        self.pin
    }

    /// An edge: assert then deassert.
    pub fn pulse(&self) {
        let mut ioapic = self.lock();
        ioapic.set_irq(self.pin, true);
        ioapic.set_irq(self.pin, false);
    }

    /// Holds the line at `level` (level-triggered devices).
    pub fn set_level(&self, level: bool) {
        self.lock().set_irq(self.pin, level);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ioapic> {
        // A panicked holder leaves plain register state behind; keep interrupts flowing.
        self.ioapic.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.pulse();
        Ok(())
    }
}

/// Test double: records every message instead of interrupting a vCPU.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    #[derive(Clone, Default)]
    pub struct RecordingMsi {
        pub sent: Arc<Mutex<Vec<MsiMessage>>>,
        pub routes: Arc<Mutex<Vec<Vec<Option<MsiMessage>>>>>,
        pub fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl RecordingMsi {
        pub fn take(&self) -> Vec<MsiMessage> {
            std::mem::take(&mut self.sent.lock().unwrap())
        }
    }

    impl MsiSender for RecordingMsi {
        fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.sent.lock().unwrap().push(MsiMessage { address, data });
            Ok(())
        }

        fn update_routes(&self, routes: &[Option<MsiMessage>]) -> std::io::Result<()> {
            self.routes.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    pub fn ioapic() -> (Ioapic, RecordingMsi) {
        let msi = RecordingMsi::default();
        (Ioapic::new(Box::new(msi.clone())), msi)
    }

    fn write32(ioapic: &mut Ioapic, offset: u64, value: u32) {
        crate::BusDevice::write(ioapic, offset, &value.to_le_bytes());
    }

    pub fn write_reg(ioapic: &mut Ioapic, index: u32, value: u32) {
        write32(ioapic, IOREGSEL, index);
        write32(ioapic, IOWIN, value);
    }

    pub fn read_reg(ioapic: &mut Ioapic, index: u32) -> u32 {
        write32(ioapic, IOREGSEL, index);
        let mut b = [0u8; 4];
        crate::BusDevice::read(ioapic, IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    /// Programs redirection entry `pin` (high dword first, as Linux does).
    pub fn program(ioapic: &mut Ioapic, pin: u32, entry: u64) {
        write_reg(ioapic, 0x11 + 2 * pin, (entry >> 32) as u32);
        write_reg(ioapic, 0x10 + 2 * pin, entry as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::BusDevice;

    const LEVEL: u64 = RTE_TRIGGER_LEVEL;

    fn fixed(vector: u8, dest: u8) -> u64 {
        u64::from(vector) | (u64::from(dest) << 56)
    }

    fn msg(vector: u8, dest: u8, level: bool) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000 | (u64::from(dest) << 12),
            data: u32::from(vector) | (1 << 14) | if level { 1 << 15 } else { 0 },
        }
    }

    #[test]
    fn identification_registers() {
        let (mut ioapic, _) = ioapic();
        assert_eq!(read_reg(&mut ioapic, 1), 0x0017_0020);
        write_reg(&mut ioapic, 0, 0xff00_0000);
        assert_eq!(read_reg(&mut ioapic, 0), 0x0f00_0000);
        assert_eq!(read_reg(&mut ioapic, 2), 0x0f00_0000);
        write_reg(&mut ioapic, 1, 0);
        assert_eq!(
            read_reg(&mut ioapic, 1),
            0x0017_0020,
            "version is read-only"
        );
        let mut sel = [0u8; 4];
        ioapic.read(IOREGSEL, &mut sel);
        assert_eq!(sel, [1, 0, 0, 0]);
    }

    #[test]
    fn redirection_entries_start_masked_and_read_back() {
        let (mut ioapic, _) = ioapic();
        for pin in 0..NUM_PINS as u32 {
            assert_eq!(read_reg(&mut ioapic, 0x10 + 2 * pin), 1 << 16);
            assert_eq!(read_reg(&mut ioapic, 0x11 + 2 * pin), 0);
        }
        // Read-only bits (delivery status, remote IRR) are not writable.
        write_reg(&mut ioapic, 0x10 + 2 * 5, 0x0001_f0ff);
        write_reg(&mut ioapic, 0x11 + 2 * 5, 0x0300_0000);
        assert_eq!(read_reg(&mut ioapic, 0x10 + 2 * 5), 0x0001_a0ff);
        assert_eq!(read_reg(&mut ioapic, 0x11 + 2 * 5), 0x0300_0000);
        // Registers past the table read 0 and ignore writes.
        write_reg(&mut ioapic, 0x40, 0x1234);
        assert_eq!(read_reg(&mut ioapic, 0x40), 0);
        assert_eq!(read_reg(&mut ioapic, 0xff), 0);
        assert_eq!(read_reg(&mut ioapic, 0x03), 0);
    }

    #[test]
    fn edge_delivers_programmed_message_on_rising_edge_only() {
        let (mut ioapic, msi) = ioapic();
        program(&mut ioapic, 4, fixed(0x24, 3));
        ioapic.set_irq(4, true);
        ioapic.set_irq(4, true);
        ioapic.set_irq(4, false);
        ioapic.set_irq(4, true);
        assert_eq!(msi.take(), vec![msg(0x24, 3, false); 2]);
    }

    #[test]
    fn logical_mode_and_delivery_modes() {
        let (mut ioapic, msi) = ioapic();
        // Lowest priority, logical destination 0x0f.
        program(
            &mut ioapic,
            1,
            fixed(0x31, 0x0f) | (1 << 8) | RTE_DEST_MODE_LOGICAL,
        );
        ioapic.set_irq(1, true);
        // NMI: the vector field is irrelevant, even if it is an exception vector.
        program(&mut ioapic, 2, fixed(0x02, 1) | (4 << 8));
        ioapic.set_irq(2, true);
        assert_eq!(
            msi.take(),
            vec![
                MsiMessage {
                    address: 0xfee0_f004,
                    data: 0x4131
                },
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x4402
                },
            ]
        );
    }

    #[test]
    fn masked_edge_is_latched_until_unmask() {
        let (mut ioapic, msi) = ioapic();
        program(&mut ioapic, 3, fixed(0x40, 0) | RTE_MASKED);
        ioapic.set_irq(3, true);
        ioapic.set_irq(3, false);
        assert!(msi.take().is_empty());
        program(&mut ioapic, 3, fixed(0x40, 0));
        assert_eq!(msi.take(), vec![msg(0x40, 0, false)]);
        program(&mut ioapic, 3, fixed(0x40, 0));
        assert!(msi.take().is_empty(), "the latched edge is delivered once");
    }

    #[test]
    fn level_holds_remote_irr_until_eoi_and_redelivers() {
        let (mut ioapic, msi) = ioapic();
        program(&mut ioapic, 9, fixed(0x50, 1) | LEVEL);
        ioapic.set_irq(9, true);
        ioapic.set_irq(9, true);
        assert_eq!(msi.take(), vec![msg(0x50, 1, true)]);
        assert_ne!(
            read_reg(&mut ioapic, 0x10 + 18) & (1 << 14),
            0,
            "remote IRR set"
        );

        // EOI of another vector changes nothing.
        ioapic.end_of_interrupt(0x51);
        assert!(msi.take().is_empty());

        // Still asserted: EOI re-delivers.
        ioapic.end_of_interrupt(0x50);
        assert_eq!(msi.take(), vec![msg(0x50, 1, true)]);

        // Deasserted before the EOI (through the EOI register this time): nothing more.
        ioapic.set_irq(9, false);
        ioapic.write(EOI, &[0x50, 0, 0, 0]);
        assert!(msi.take().is_empty());
        assert_eq!(
            read_reg(&mut ioapic, 0x10 + 18) & (1 << 14),
            0,
            "remote IRR clear"
        );

        ioapic.set_irq(9, true);
        assert_eq!(msi.take(), vec![msg(0x50, 1, true)]);
    }

    #[test]
    fn level_asserted_while_masked_fires_on_unmask() {
        let (mut ioapic, msi) = ioapic();
        program(&mut ioapic, 10, fixed(0x60, 0) | LEVEL | RTE_MASKED);
        ioapic.set_irq(10, true);
        assert!(msi.take().is_empty());
        write_reg(&mut ioapic, 0x10 + 20, (fixed(0x60, 0) | LEVEL) as u32);
        assert_eq!(msi.take(), vec![msg(0x60, 0, true)]);
        // Masking keeps Remote IRR; switching to edge clears it.
        write_reg(
            &mut ioapic,
            0x10 + 20,
            (fixed(0x60, 0) | LEVEL | RTE_MASKED) as u32,
        );
        assert_ne!(read_reg(&mut ioapic, 0x10 + 20) & (1 << 14), 0);
        write_reg(&mut ioapic, 0x10 + 20, (fixed(0x60, 0) | RTE_MASKED) as u32);
        assert_eq!(read_reg(&mut ioapic, 0x10 + 20) & (1 << 14), 0);
    }

    #[test]
    fn failed_level_delivery_is_retried_on_next_assert() {
        let (mut ioapic, msi) = ioapic();
        program(&mut ioapic, 5, fixed(0x70, 0) | LEVEL);
        msi.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        ioapic.set_irq(5, true);
        assert_eq!(read_reg(&mut ioapic, 0x10 + 10) & (1 << 14), 0);
        msi.fail.store(false, std::sync::atomic::Ordering::Relaxed);
        ioapic.set_irq(5, true);
        assert_eq!(msi.take(), vec![msg(0x70, 0, true)]);
    }

    #[test]
    fn guest_garbage_does_not_panic_or_deliver() {
        let (mut ioapic, msi) = ioapic();
        // Exception vector, ExtINT, reserved delivery mode.
        program(&mut ioapic, 0, fixed(0x05, 0));
        program(&mut ioapic, 1, fixed(0x30, 0) | (7 << 8));
        program(&mut ioapic, 2, fixed(0x30, 0) | (3 << 8) | LEVEL);
        for pin in 0..3 {
            ioapic.set_irq(pin, true);
        }
        assert_eq!(read_reg(&mut ioapic, 0x10 + 4) & (1 << 14), 0);
        ioapic.set_irq(24, true);
        ioapic.set_irq(u32::MAX, true);
        ioapic.end_of_interrupt(0);
        assert!(msi.take().is_empty());
        // Odd MMIO accesses.
        let mut buf = [0xffu8; 8];
        ioapic.read(0x12, &mut buf);
        assert_eq!(&buf[2..], &[0; 6]);
        ioapic.read(0x20, &mut buf);
        assert_eq!(buf, [0; 8]);
        ioapic.read(u64::MAX, &mut buf);
        ioapic.write(u64::MAX, &[1; 8]);
        ioapic.write(0x03, &[0xff]);
        ioapic.write(IOWIN, &[]);
        ioapic.read(IOWIN, &mut []);
    }

    #[test]
    fn narrow_writes_merge_into_registers() {
        let (mut ioapic, msi) = ioapic();
        ioapic.write(IOREGSEL, &[0x10 + 8]); // pin 4, low dword
        ioapic.write(IOWIN, &[0x24]); // vector, still masked
        assert!(msi.take().is_empty());
        ioapic.write(IOWIN + 2, &[0x00]); // clear the mask bit
        let mut b = [0u8; 4];
        ioapic.read(IOWIN, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x24);
        ioapic.set_irq(4, true);
        assert_eq!(msi.take(), vec![msg(0x24, 0, false)]);
    }

    #[test]
    fn routes_published_when_messages_change() {
        let (mut ioapic, msi) = ioapic();
        program(&mut ioapic, 4, fixed(0x24, 1) | RTE_MASKED);
        let published = msi.routes.lock().unwrap().len();
        assert!(published >= 1);
        assert_eq!(
            msi.routes.lock().unwrap().last().unwrap()[4],
            Some(msg(0x24, 1, false))
        );
        // Unmasking changes no message: no republish.
        program(&mut ioapic, 4, fixed(0x24, 1));
        assert_eq!(msi.routes.lock().unwrap().len(), published);
        assert_eq!(ioapic.msi_routes()[0], None);
    }

    #[test]
    fn state_round_trip() {
        let (mut ioapic, _) = ioapic();
        write_reg(&mut ioapic, 0, 0x0200_0000);
        program(&mut ioapic, 7, fixed(0x77, 2) | LEVEL);
        ioapic.set_irq(7, true);
        let state = ioapic.state();
        let json = serde_json::to_string(&state).unwrap();
        let parsed: IoapicState = serde_json::from_str(&json).unwrap();

        let (mut restored, msi) = testing::ioapic();
        restored.set_state(&parsed).unwrap();
        assert!(msi.take().is_empty(), "restore delivers nothing");
        assert_eq!(restored.state(), state);
        assert_eq!(read_reg(&mut restored, 0), 0x0200_0000);
        restored.end_of_interrupt(0x77);
        assert_eq!(msi.take(), vec![msg(0x77, 2, true)]);

        let mut bad = state.clone();
        bad.redirection_table.pop();
        assert_eq!(restored.set_state(&bad), Err(IoapicError::EntryCount(23)));
        let mut bad = state;
        bad.id = 0x10;
        assert_eq!(restored.set_state(&bad), Err(IoapicError::Id(0x10)));
    }

    #[test]
    fn irq_line_pulses_an_edge() {
        let (mut ioapic, msi) = ioapic();
        program(&mut ioapic, 4, fixed(0x24, 0));
        let ioapic = Arc::new(Mutex::new(ioapic));
        // The VMM puts the same Arc on the MMIO bus and in the lines.
        let _on_bus: crate::SharedBusDevice = ioapic.clone();
        let line = IrqLine::new(ioapic.clone(), 4);
        line.pulse();
        vm_superio::Trigger::trigger(&line).unwrap();
        assert_eq!(msi.take(), vec![msg(0x24, 0, false); 2]);
        assert_eq!(ioapic.lock().unwrap().state().line_levels, 0);
    }
}
