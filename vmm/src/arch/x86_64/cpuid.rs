//! Per-vCPU CPUID, derived from KVM_GET_SUPPORTED_CPUID.
//!
//! Take the supported CPUID once per VM (`Kvm::get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)`) and pass
//! it to [`vcpu_cpuid`] for each vCPU; the result goes to `VcpuFd::set_cpuid2`. APIC ids are the vCPU
//! indexes (KVM's default LAPIC id is the vCPU id, and the MADT uses the same numbering); the
//! topology leaves describe how those ids split into threads, cores, dies and packages.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Guest CPU topology. The product of the four counts must cover every vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTopology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

impl CpuTopology {
    /// One package, one die, one thread per core, `vcpus` cores.
    pub fn flat(vcpus: u8) -> Self {
        CpuTopology {
            threads_per_core: 1,
            cores_per_die: vcpus.max(1),
            dies_per_package: 1,
            packages: 1,
        }
    }

    fn threads_per_die(&self) -> u32 {
        u32::from(self.threads_per_core) * u32::from(self.cores_per_die)
    }

    fn threads_per_package(&self) -> u32 {
        self.threads_per_die() * u32::from(self.dies_per_package)
    }

    fn total_threads(&self) -> u32 {
        self.threads_per_package() * u32::from(self.packages)
    }

    /// Bits of the APIC id taken by threads, cores and dies.
    fn widths(&self) -> (u32, u32, u32) {
        (
            id_width(self.threads_per_core.into()),
            id_width(self.cores_per_die.into()),
            id_width(self.dies_per_package.into()),
        )
    }
}

/// Errors from building a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("vCPU {vcpu_id} is out of range for {vcpu_count} vCPUs")]
    VcpuIdOutOfRange { vcpu_id: u8, vcpu_count: u8 },
    #[error("invalid CPU topology {0:?}: every count must be at least 1")]
    ZeroInTopology(CpuTopology),
    #[error("CPU topology {topo:?} holds {threads} threads, fewer than the {vcpu_count} vCPUs")]
    TopologyTooSmall {
        topo: CpuTopology,
        threads: u32,
        vcpu_count: u8,
    },
    #[error("too many CPUID entries")]
    TooManyEntries(#[source] vmm_sys_util::fam::Error),
}

/// Bits needed to number `n` items (0 for one item).
fn id_width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

const LEAF_VENDOR: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_THERMAL_POWER: u32 = 6;
const LEAF_PMU: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 ECX: hypervisor present.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: perfmon and debug capability MSR (none without a PMU).
const ECX_PDCM: u32 = 1 << 15;
/// Leaf 1 EDX: the logical processor count in EBX[23:16] is valid.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 1 EBX[15:8]: CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;
/// Leaf 6 EAX: APIC timer always running (KVM's LAPIC timer is).
const EAX_ARAT: u32 = 1 << 2;

/// Topology level types of leaves 0xB / 0x1F (ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
const LEVEL_DIE: u32 = 5;

/// "AuthenticAMD" in EBX, EDX, ECX of leaf 0.
const AMD_VENDOR: (u32, u32, u32) = (0x6874_7541, 0x6974_6e65, 0x444d_4163);

/// Logical processors sharing a cache of `level`: L1/L2 are per core, L3 per package.
fn cache_sharing(topo: &CpuTopology, level: u32) -> u32 {
    let n = if level >= 3 {
        topo.threads_per_package()
    } else {
        u32::from(topo.threads_per_core)
    };
    n.clamp(1, 0x1000)
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == AMD_VENDOR)
}

fn max_basic_leaf(entries: &[kvm_cpuid_entry2]) -> u32 {
    entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map_or(0, |e| e.eax)
}

/// One subleaf of leaf 0xB / 0x1F.
fn topology_entry(
    function: u32,
    index: u32,
    level: Option<(u32, u32, u32)>,
    apic_id: u32,
) -> kvm_cpuid_entry2 {
    let (eax, ebx, level_type) = level.unwrap_or((0, 0, 0));
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | (index & 0xff),
        edx: apic_id,
        ..Default::default()
    }
}

/// Subleaves of leaf 0xB (`v2` false: SMT, core) or 0x1F (`v2` true: SMT, core, die when there are
/// several), each as (shift to the next level's id, logical processors at this level, level type),
/// followed by an invalid terminating subleaf.
fn topology_leaf(topo: &CpuTopology, apic_id: u32, v2: bool) -> Vec<kvm_cpuid_entry2> {
    let function = if v2 {
        LEAF_V2_EXT_TOPOLOGY
    } else {
        LEAF_EXT_TOPOLOGY
    };
    let (tw, cw, dw) = topo.widths();
    let mut levels = vec![(tw, u32::from(topo.threads_per_core), LEVEL_SMT)];
    if v2 && topo.dies_per_package > 1 {
        levels.push((tw + cw, topo.threads_per_die(), LEVEL_CORE));
        levels.push((tw + cw + dw, topo.threads_per_package(), LEVEL_DIE));
    } else {
        // Leaf 0xB has no die level: its core level spans the whole package.
        levels.push((tw + cw + dw, topo.threads_per_package(), LEVEL_CORE));
    }
    let mut entries: Vec<kvm_cpuid_entry2> = levels
        .iter()
        .enumerate()
        .map(|(i, l)| topology_entry(function, i as u32, Some(*l), apic_id))
        .collect();
    entries.push(topology_entry(function, levels.len() as u32, None, apic_id));
    entries
}

/// The CPUID for vCPU `vcpu_id` of `vcpu_count`, derived from KVM's supported CPUID `base`.
pub fn vcpu_cpuid(
    base: &CpuId,
    vcpu_id: u8,
    vcpu_count: u8,
    topo: &CpuTopology,
) -> Result<CpuId, CpuidError> {
    if vcpu_id >= vcpu_count {
        return Err(CpuidError::VcpuIdOutOfRange {
            vcpu_id,
            vcpu_count,
        });
    }
    if topo.threads_per_core == 0
        || topo.cores_per_die == 0
        || topo.dies_per_package == 0
        || topo.packages == 0
    {
        return Err(CpuidError::ZeroInTopology(*topo));
    }
    if topo.total_threads() < u32::from(vcpu_count) {
        return Err(CpuidError::TopologyTooSmall {
            topo: *topo,
            threads: topo.total_threads(),
            vcpu_count,
        });
    }

    let apic_id = u32::from(vcpu_id);
    let per_package = topo.threads_per_package().min(0xff);
    let (tw, cw, dw) = topo.widths();
    let amd = is_amd(base.as_slice());
    let max_leaf = max_basic_leaf(base.as_slice());

    let mut entries: Vec<kvm_cpuid_entry2> = base
        .as_slice()
        .iter()
        .filter(|e| e.function != LEAF_EXT_TOPOLOGY && e.function != LEAF_V2_EXT_TOPOLOGY)
        .copied()
        .collect();

    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (per_package << 16) | (CLFLUSH_LINE_SIZE << 8);
                e.ecx = (e.ecx | ECX_HYPERVISOR) & !ECX_PDCM;
                if vcpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if !amd && e.eax & 0x1f != 0 => {
                let sharing = cache_sharing(topo, (e.eax >> 5) & 0x7);
                let cores =
                    (u32::from(topo.cores_per_die) * u32::from(topo.dies_per_package)).clamp(1, 64);
                e.eax = (e.eax & 0x3fff) | ((sharing - 1) << 14) | ((cores - 1) << 26);
            }
            LEAF_THERMAL_POWER => {
                // No power management or frequency control reaches the guest; ARAT holds.
                e.eax &= EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_PMU => {
                // No virtual PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_AMD_CACHE_TOPOLOGY if amd && e.eax & 0x1f != 0 => {
                // EAX[25:14]: logical processors sharing this cache - 1.
                let sharing = cache_sharing(topo, (e.eax >> 5) & 0x7);
                e.eax = (e.eax & !(0xfff << 14)) | ((sharing - 1) << 14);
            }
            LEAF_AMD_ADDR_SIZES if amd => {
                // ECX[7:0]: threads per package - 1; ECX[15:12]: APIC id bits for them.
                e.ecx = (e.ecx & !0xf0ff) | ((tw + cw + dw) << 12) | (per_package - 1);
            }
            LEAF_AMD_EXT_APIC_ID if amd => {
                e.eax = apic_id;
                let core_id = (apic_id >> tw) & 0xff;
                e.ebx = (u32::from(topo.threads_per_core - 1) << 8) | core_id;
                // ECX: node (die) id, nodes per package - 1.
                e.ecx = ((apic_id >> (tw + cw)) & 0xff)
                    | (u32::from(topo.dies_per_package - 1).min(7) << 8);
                e.edx = 0;
            }
            _ => {}
        }
    }

    if max_leaf >= LEAF_EXT_TOPOLOGY {
        entries.extend(topology_leaf(topo, apic_id, false));
    }
    if max_leaf >= LEAF_V2_EXT_TOPOLOGY {
        entries.extend(topology_leaf(topo, apic_id, true));
    }
    CpuId::from_entries(&entries).map_err(CpuidError::TooManyEntries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::Kvm;

    fn leaf(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
    }

    /// A synthetic Intel-like base with the leaves we patch.
    fn fake_base() -> CpuId {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            e(1, 0, 0x806f8, 0xff00_0800, ECX_PDCM, 0),
            e(4, 0, 0x121, 0, 0, 0),
            e(4, 1, 0x163, 0, 0, 0),
            e(4, 2, 0, 0, 0, 0),
            e(6, 0, 0x77, 1, 9, 0),
            e(0xa, 0, 0x0703_0105, 0, 0, 0),
            e(0xb, 0, 1, 2, 0x100, 7),
            e(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ])
        .unwrap()
    }

    #[test]
    fn topology_for_1_2_4_vcpus() {
        let base = fake_base();
        for count in [1u8, 2, 4] {
            let topo = CpuTopology::flat(count);
            for id in 0..count {
                let c = vcpu_cpuid(&base, id, count, &topo).unwrap();
                let l1 = leaf(&c, 1, 0).unwrap();
                assert_eq!(l1.ebx >> 24, u32::from(id), "APIC id");
                assert_eq!((l1.ebx >> 16) & 0xff, u32::from(count));
                assert_eq!((l1.ebx >> 8) & 0xff, 8);
                assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
                assert_eq!(l1.ecx & ECX_PDCM, 0);
                assert_eq!(l1.edx & EDX_HTT != 0, count > 1);

                let smt = leaf(&c, 0xb, 0).unwrap();
                assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8), (0, 1, LEVEL_SMT));
                assert_eq!(smt.edx, u32::from(id));
                let core = leaf(&c, 0xb, 1).unwrap();
                assert_eq!(core.ebx, u32::from(count));
                assert_eq!(core.eax, id_width(count.into()));
                assert_eq!(core.ecx, (LEVEL_CORE << 8) | 1);
                let end = leaf(&c, 0xb, 2).unwrap();
                assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));
                assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
                assert_eq!(leaf(&c, 0x1f, 1).unwrap().ebx, u32::from(count));

                let l4 = leaf(&c, 4, 1).unwrap();
                assert_eq!(l4.eax >> 26, u32::from(count) - 1);
                assert_eq!(l4.eax & 0x3fff, 0x163);
                let l6 = leaf(&c, 6, 0).unwrap();
                assert_eq!((l6.eax, l6.ebx, l6.ecx), (EAX_ARAT, 0, 0));
                let pmu = leaf(&c, 0xa, 0).unwrap();
                assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
                // KVM leaves untouched.
                assert_eq!(
                    leaf(&c, 0x4000_0000, 0).unwrap().ebx,
                    leaf(&base, 0x4000_0000, 0).unwrap().ebx
                );
            }
        }
    }

    #[test]
    fn smt_and_dies_topology() {
        let base = fake_base();
        let topo = CpuTopology {
            threads_per_core: 2,
            cores_per_die: 2,
            dies_per_package: 2,
            packages: 1,
        };
        let c = vcpu_cpuid(&base, 5, 8, &topo).unwrap();
        let smt = leaf(&c, 0xb, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx), (1, 2));
        let core = leaf(&c, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx), (3, 8));
        let die = leaf(&c, 0x1f, 2).unwrap();
        assert_eq!((die.eax, die.ebx, die.ecx >> 8), (3, 8, LEVEL_DIE));
        assert_eq!(leaf(&c, 0x1f, 1).unwrap().ebx, 4);
        assert_eq!(leaf(&c, 0x1f, 3).unwrap().ecx, 3);
        // L1 shared by the 2 threads of a core, L3 (none here) by the package.
        assert_eq!((leaf(&c, 4, 0).unwrap().eax >> 14) & 0xfff, 1);
    }

    #[test]
    fn amd_topology_leaves() {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let (vb, vd, vc) = AMD_VENDOR;
        let base = CpuId::from_entries(&[
            e(0, 0, 0x1c, vb, vc, vd),
            e(1, 0, 0xa10f11, 0, 0, 0),
            e(0xb, 0, 0, 0, 0, 1),
            e(0x8000_0008, 0, 0x3030, 0, 0x7001, 0),
            e(0x8000_001d, 0, 0x121, 0x1c0_003f, 0x3f, 0),
            e(0x8000_001d, 3, 0x4163, 0x3c0_003f, 0x7fff, 1),
            e(0x8000_001e, 0, 0, 0, 0, 0),
        ])
        .unwrap();
        let topo = CpuTopology {
            threads_per_core: 2,
            cores_per_die: 2,
            dies_per_package: 1,
            packages: 1,
        };
        let c = vcpu_cpuid(&base, 3, 4, &topo).unwrap();
        let sizes = leaf(&c, 0x8000_0008, 0).unwrap();
        assert_eq!((sizes.ecx & 0xff, (sizes.ecx >> 12) & 0xf), (3, 2));
        let ext = leaf(&c, 0x8000_001e, 0).unwrap();
        assert_eq!((ext.eax, ext.ebx), (3, (1 << 8) | 1));
        let l1 = leaf(&c, 0x8000_001d, 0).unwrap();
        assert_eq!((l1.eax >> 14) & 0xfff, 1);
        let l3 = leaf(&c, 0x8000_001d, 3).unwrap();
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3fff, 0x163);
        // No leaf 0x1F below max leaf 0x1c.
        assert!(leaf(&c, 0x1f, 0).is_none());
        assert_eq!(leaf(&c, 0xb, 1).unwrap().ebx, 4);
    }

    #[test]
    fn bad_topology() {
        let base = fake_base();
        assert!(matches!(
            vcpu_cpuid(&base, 2, 2, &CpuTopology::flat(2)),
            Err(CpuidError::VcpuIdOutOfRange { .. })
        ));
        assert!(matches!(
            vcpu_cpuid(&base, 0, 4, &CpuTopology::flat(2)),
            Err(CpuidError::TopologyTooSmall { .. })
        ));
        let mut zero = CpuTopology::flat(1);
        zero.packages = 0;
        assert!(matches!(
            vcpu_cpuid(&base, 0, 1, &zero),
            Err(CpuidError::ZeroInTopology(_))
        ));
    }

    #[test]
    fn real_kvm_cpuid_is_accepted() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let base = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = kvm.create_vm().unwrap();
        for id in 0..2u8 {
            let vcpu = vm.create_vcpu(id.into()).unwrap();
            let c = vcpu_cpuid(&base, id, 2, &CpuTopology::flat(2)).unwrap();
            vcpu.set_cpuid2(&c).unwrap();
            let l1 = leaf(&c, 1, 0).unwrap();
            assert_eq!(l1.ebx >> 24, u32::from(id));
            if max_basic_leaf(base.as_slice()) >= 0xb {
                assert_eq!(leaf(&c, 0xb, 1).unwrap().ebx, 2);
            }
        }
    }
}
