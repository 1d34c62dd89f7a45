//! Boot-time MSR values.
//!
//! Only MSRs that KVM_GET_MSR_INDEX_LIST names are set in bulk: this host's kvm_pvm does not accept
//! every MSR a hardware KVM does, and one rejected entry would stop KVM_SET_MSRS at that point.
//! Wanted MSRs missing from the list are tried one by one and skipped (logged) when refused.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6).
pub const MTRR_ENABLE: u64 = 1 << 11;
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// Errors from setting the boot MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    GetIndexList(#[source] kvm_ioctls::Error),
    #[error("cannot build the MSR list")]
    Build(#[source] vmm_sys_util::fam::Error),
    #[error("KVM_SET_MSRS failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set {set} of {wanted} listed MSRs; it stopped at {index:#x}")]
    Partial {
        set: usize,
        wanted: usize,
        index: u32,
    },
}

/// An MSR index and its value.
pub type MsrValue = (u32, u64);

/// The boot MSR values.
pub fn boot_msr_entries() -> Vec<MsrValue> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

fn msrs(entries: &[(u32, u64)]) -> Result<Msrs, MsrError> {
    let raw: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&raw).map_err(MsrError::Build)
}

/// Sets the boot MSRs on `vcpu`: the ones KVM lists in one KVM_SET_MSRS (an error if it refuses
/// any), the unlisted ones individually, skipping those KVM refuses.
pub fn setup_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), MsrError> {
    let supported = kvm.get_msr_index_list().map_err(MsrError::GetIndexList)?;
    let supported = supported.as_slice();
    let (listed, unlisted): (Vec<MsrValue>, Vec<MsrValue>) = boot_msr_entries()
        .into_iter()
        .partition(|(index, _)| supported.contains(index));

    let set = vcpu.set_msrs(&msrs(&listed)?).map_err(MsrError::SetMsrs)?;
    if set != listed.len() {
        return Err(MsrError::Partial {
            set,
            wanted: listed.len(),
            index: listed[set].0,
        });
    }

    for entry in unlisted {
        // KVM_SET_MSRS returns how many entries it set: 0 means this one was refused.
        match vcpu.set_msrs(&msrs(&[entry])?) {
            Ok(1) => log::debug!("MSR {:#x} set although KVM does not list it", entry.0),
            Ok(_) | Err(_) => log::info!("KVM does not accept MSR {:#x}; left unset", entry.0),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::{BootProtocol, LoadedKernel};
    use crate::arch::x86_64::regs::setup_boot_vcpu;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn read_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
        let mut m = msrs(&[(index, 0)]).unwrap();
        match vcpu.get_msrs(&mut m) {
            Ok(1) => Some(m.as_slice()[0].data),
            _ => None,
        }
    }

    #[test]
    fn boot_vcpu_and_msrs_on_real_kvm() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let kernel = LoadedKernel {
            entry: GuestAddress(0x10_0000),
            protocol: BootProtocol::Linux64,
            kernel_end: GuestAddress(0x20_0000),
            setup_header: None,
        };
        setup_boot_vcpu(&vcpu, &mem, &kernel).unwrap();
        setup_msrs(&kvm, &vcpu).unwrap();

        let supported = kvm.get_msr_index_list().unwrap();
        for (index, value) in boot_msr_entries() {
            if index == MSR_IA32_TSC || !supported.as_slice().contains(&index) {
                continue;
            }
            assert_eq!(read_msr(&vcpu, index), Some(value), "MSR {index:#x}");
        }
        // Not in this host's index list, but KVM accepts it when set on its own.
        if let Some(v) = read_msr(&vcpu, MSR_MTRR_DEF_TYPE) {
            assert_eq!(v, MTRR_ENABLE | MTRR_MEM_TYPE_WB);
        }
        // The registers survive the MSR writes (EFER is not among them).
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.efer & (1 << 10), 1 << 10);
        assert_eq!(vcpu.get_regs().unwrap().rip, 0x10_0000);
    }
}
