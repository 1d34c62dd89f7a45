//! A vCPU's complete architectural state, as saved in a template and loaded on restore: general and special
//! registers, FPU/SSE/AVX state (XSAVE), XCRs, debug registers, MSRs, the in-kernel LAPIC, pending events and
//! the multiprocessing state. Runtime objects (the vCPU fd) and this persisted state are separate types;
//! restore applies a state to a freshly created vCPU.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot read vCPU state ({what})")]
    Get {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot load vCPU state ({what})")]
    Set {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("cannot build an MSR or CPUID list")]
    Fam(#[source] vmm_sys_util::fam::Error),
    #[error("KVM accepted {set} of {wanted} saved MSRs; it refused {index:#x}")]
    MsrsPartial {
        set: usize,
        wanted: usize,
        index: u32,
    },
}

type Result<T> = std::result::Result<T, VcpuStateError>;

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs KVM lists as saveable: all must load again.
    pub msrs: Vec<kvm_msr_entry>,
    /// MSRs outside KVM's list that answered reads: loaded where the host accepts them.
    pub extra_msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

// kvm_xsave carries a flexible array member and so is not Clone; only its fixed region is state.
impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            id: self.id,
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            extra_msrs: self.extra_msrs.clone(),
            regs: self.regs,
            sregs: self.sregs,
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            events: self.events,
            mp_state: self.mp_state,
        }
    }
}

/// MSRs a guest may use that KVM_GET_MSR_INDEX_LIST does not name on every host: MTRRdefType, KVM's
/// paravirtual MSRs, and the private MSRs of the PVM hypervisor module (0x4b564d10..0x4b564d13), which
/// answer reads but are not listed.
const UNLISTED_MSRS: &[u32] = &[
    0x2ff,
    0x4b56_4d00,
    0x4b56_4d01,
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04,
    0x4b56_4d05,
    0x4b56_4d06,
    0x4b56_4d07,
    0x4b56_4d08,
    0x4b56_4d10,
    0x4b56_4d11,
    0x4b56_4d12,
    0x4b56_4d13,
];

/// Which MSRs to save, once per VM: (KVM's index list, readable MSRs outside it).
pub fn msrs_to_save(kvm: &Kvm) -> Result<MsrIndices> {
    let listed: Vec<u32> = kvm
        .get_msr_index_list()
        .map_err(VcpuStateError::MsrIndexList)?
        .as_slice()
        .to_vec();
    let extra = UNLISTED_MSRS
        .iter()
        .copied()
        .filter(|index| !listed.contains(index))
        .collect();
    Ok(MsrIndices { listed, extra })
}

#[derive(Debug, Clone)]
pub struct MsrIndices {
    pub listed: Vec<u32>,
    pub extra: Vec<u32>,
}

fn get<T>(what: &'static str, r: std::result::Result<T, kvm_ioctls::Error>) -> Result<T> {
    r.map_err(|source| VcpuStateError::Get { what, source })
}

fn set(what: &'static str, r: std::result::Result<(), kvm_ioctls::Error>) -> Result<()> {
    r.map_err(|source| VcpuStateError::Set { what, source })
}

/// Reads the MSRs in `indices`, dropping those this host refuses (KVM_GET_MSRS stops at the first one it
/// cannot read, so the refused entry is removed and the read retried).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut wanted: Vec<u32> = indices.to_vec();
    let mut saved = Vec::with_capacity(wanted.len());
    while !wanted.is_empty() {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(VcpuStateError::Fam)?;
        let read = get("MSRs", vcpu.get_msrs(&mut msrs))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the entry KVM stopped at, keep going with the rest.
        wanted.drain(..(read + 1).min(wanted.len()));
    }
    Ok(saved)
}

/// Saves a vCPU that is not running (its thread is parked or it was never started).
pub fn save(vcpu: &VcpuFd, id: u8, cpuid: &CpuId, msr_indices: &MsrIndices) -> Result<VcpuState> {
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        // MP state first: reading it makes KVM settle pending INIT/SIPI into the saved registers.
        mp_state: get("MP state", vcpu.get_mp_state())?,
        regs: get("registers", vcpu.get_regs())?,
        sregs: get("special registers", vcpu.get_sregs())?,
        xsave: get("XSAVE", vcpu.get_xsave())?,
        xcrs: get("XCRs", vcpu.get_xcrs())?,
        debugregs: get("debug registers", vcpu.get_debug_regs())?,
        lapic: get("LAPIC", vcpu.get_lapic())?,
        msrs: read_msrs(vcpu, &msr_indices.listed)?,
        extra_msrs: read_msrs(vcpu, &msr_indices.extra)?,
        events: get("vCPU events", vcpu.get_vcpu_events())?,
    })
}

/// Loads `state` into a freshly created vCPU. The order matters: CPUID before anything that depends on
/// features, the LAPIC before events (pending interrupts), MSRs after special registers (EFER).
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(VcpuStateError::Fam)?;
    // KVM refuses a CPUID change once a vCPU has run (a repurposed VM); the same CPUID is accepted.
    let current = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).ok();
    if current.as_ref().map(|c| c.as_slice()) != Some(cpuid.as_slice()) {
        set("CPUID", vcpu.set_cpuid2(&cpuid))?;
    }
    set("MP state", vcpu.set_mp_state(state.mp_state))?;
    set("registers", vcpu.set_regs(&state.regs))?;
    set("special registers", vcpu.set_sregs(&state.sregs))?;
    // SAFETY: the XSAVE area was produced by KVM_GET_XSAVE on a host with the same fingerprint.
    set("XSAVE", unsafe { vcpu.set_xsave(&state.xsave) })?;
    set("XCRs", vcpu.set_xcrs(&state.xcrs))?;
    set("debug registers", vcpu.set_debug_regs(&state.debugregs))?;
    set("LAPIC", vcpu.set_lapic(&state.lapic))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(VcpuStateError::Fam)?;
    let written = vcpu.set_msrs(&msrs).map_err(|source| VcpuStateError::Set {
        what: "MSRs",
        source,
    })?;
    if written != state.msrs.len() {
        return Err(VcpuStateError::MsrsPartial {
            set: written,
            wanted: state.msrs.len(),
            index: state.msrs[written].index,
        });
    }
    for entry in &state.extra_msrs {
        let one = Msrs::from_entries(std::slice::from_ref(entry)).map_err(VcpuStateError::Fam)?;
        if !matches!(vcpu.set_msrs(&one), Ok(1)) {
            log::debug!("MSR {:#x} outside KVM's list was not restored", entry.index);
        }
    }
    set("vCPU events", vcpu.set_vcpu_events(&state.events))?;
    Ok(())
}

/// KVM's supported CPUID, the base every vCPU's CPUID is derived from.
pub fn supported_cpuid(kvm: &Kvm) -> std::result::Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};

    fn vm_with_vcpu() -> (Kvm, kvm_ioctls::VmFd, VcpuFd) {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = 24;
        vm.enable_cap(&cap).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        (kvm, vm, vcpu)
    }

    #[test]
    fn save_restore_round_trip_through_json() {
        let (kvm, _vm, vcpu) = vm_with_vcpu();
        let cpuid = supported_cpuid(&kvm).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x10_0000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        let indices = msrs_to_save(&kvm).unwrap();
        let saved = save(&vcpu, 0, &cpuid, &indices).unwrap();
        assert!(!saved.msrs.is_empty());
        let json = serde_json::to_vec(&saved).unwrap();
        let loaded: VcpuState = serde_json::from_slice(&json).unwrap();

        let (_kvm2, _vm2, vcpu2) = vm_with_vcpu();
        restore(&vcpu2, &loaded).unwrap();
        let regs2 = vcpu2.get_regs().unwrap();
        assert_eq!(regs2.rax, 0x1234_5678);
        assert_eq!(regs2.rip, 0x10_0000);
        let again = save(&vcpu2, 0, &cpuid, &indices).unwrap();
        assert_eq!(again.sregs.cr0, saved.sregs.cr0);
        assert_eq!(again.msrs.len(), saved.msrs.len());
        let tsc = |s: &VcpuState| s.msrs.iter().find(|m| m.index == 0x10).map(|m| m.data);
        assert!(tsc(&again).is_some());
    }
}
