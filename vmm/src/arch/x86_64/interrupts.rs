//! Local APIC setup: LINT0 as ExtINT and LINT1 as NMI, the wiring a PC firmware leaves and the MADT's
//! LAPIC NMI entry describes. Needs the in-kernel LAPIC (KVM_CREATE_IRQCHIP or a split irqchip).

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// LVT register offsets in the APIC page.
pub const APIC_LVT0: usize = 0x350;
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery modes (bits 10:8).
pub const APIC_MODE_NMI: u32 = 0x4;
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors from programming the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("KVM_GET_LAPIC failed (is the in-kernel LAPIC created?)")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC failed")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// Reads a 32-bit APIC register from the KVM LAPIC state.
pub fn get_klapic_reg(klapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &klapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

/// Writes a 32-bit APIC register into the KVM LAPIC state.
pub fn set_klapic_reg(klapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in klapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets LVT LINT0 = ExtINT and LINT1 = NMI on `vcpu`.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), InterruptError> {
    let mut klapic = vcpu.get_lapic().map_err(InterruptError::GetLapic)?;
    let lvt0 = get_klapic_reg(&klapic, APIC_LVT0);
    set_klapic_reg(
        &mut klapic,
        APIC_LVT0,
        set_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_klapic_reg(&klapic, APIC_LVT1);
    set_klapic_reg(
        &mut klapic,
        APIC_LVT1,
        set_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&klapic).map_err(InterruptError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};
    use kvm_ioctls::Kvm;

    #[test]
    fn klapic_reg_roundtrip() {
        let mut k = kvm_lapic_state::default();
        set_klapic_reg(&mut k, APIC_LVT1, 0xdead_beef);
        assert_eq!(get_klapic_reg(&k, APIC_LVT1), 0xdead_beef);
        assert_eq!(set_delivery_mode(0x1_0000, APIC_MODE_NMI), 0x1_0400);
    }

    #[test]
    fn set_lint_with_split_irqchip() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            args: [24, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).unwrap();
        for id in 0..2 {
            let vcpu = vm.create_vcpu(id).unwrap();
            set_lint(&vcpu).unwrap();
            let k = vcpu.get_lapic().unwrap();
            assert_eq!((get_klapic_reg(&k, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
            assert_eq!((get_klapic_reg(&k, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
        }
    }
}
