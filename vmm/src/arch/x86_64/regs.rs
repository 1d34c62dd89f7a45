//! Boot vCPU register state for the kernel's entry protocol.
//!
//! Linux64 (Documentation/arch/x86/boot.rst, "64-bit boot protocol"): long mode with paging, a GDT
//! with flat __BOOT_CS (0x10) and __BOOT_DS (0x18), the kernel, zero page and command line identity
//! mapped, interrupts off, rsi = boot_params. PVH: 32-bit flat protected mode, paging off,
//! ebx = hvm_start_info.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{BootProtocol, LoadedKernel};
use super::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT slots, as the Linux boot protocol numbers them.
pub const GDT_CODE_SELECTOR: u16 = 0x10;
pub const GDT_DATA_SELECTOR: u16 = 0x18;
pub const GDT_TSS_SELECTOR: u16 = 0x20;
const GDT_ENTRIES: usize = 5;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
/// 512 2 MiB pages: the first 1 GiB.
const PDE_COUNT: u64 = 512;
const HUGE_PAGE_SIZE: u64 = 2 << 20;

const RFLAGS_RESERVED: u64 = 1 << 1;
/// FPU control word after FNINIT: all exceptions masked, 64-bit precision.
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset: all SIMD exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Errors from setting up the boot vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT to guest memory")]
    WriteGdt(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the boot page tables to guest memory")]
    WritePageTables(#[source] vm_memory::GuestMemoryError),
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
}

/// Builds a GDT descriptor from flags (access byte in bits 0-7, flags nibble in bits 12-15), base
/// and 20-bit limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes a GDT descriptor into the segment KVM expects, given its selector.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With G set the limit is in 4 KiB units; KVM wants bytes.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        s: ((entry >> 44) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        present: ((entry >> 47) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        db: ((entry >> 54) & 1) as u8,
        g,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The boot GDT for a protocol: null, null, code, data, TSS.
fn boot_gdt(protocol: BootProtocol) -> [u64; GDT_ENTRIES] {
    let code = match protocol {
        // Present, DPL0, code exec/read accessed; G and L (64-bit).
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        // Present, DPL0, code exec/read accessed; G and D (32-bit).
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    let tss = match protocol {
        // 64-bit busy TSS.
        BootProtocol::Linux64 => gdt_entry(0x808b, 0, 0xfffff),
        // 32-bit busy TSS, the minimal 0x67-byte limit PVH asks for.
        BootProtocol::Pvh => gdt_entry(0x008b, 0, 0x67),
    };
    [
        0,
        0,
        code,
        // Present, DPL0, data read/write accessed; G and B.
        gdt_entry(0xc093, 0, 0xfffff),
        tss,
    ]
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(layout::BOOT_GDT_START))
        .map_err(RegsError::WriteGdt)
}

/// Identity maps the first 1 GiB with 2 MiB pages: PML4[0] -> PDPT[0] -> 512 PDEs.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let table = |v: u64| v | PTE_PRESENT | PTE_WRITABLE;
    mem.write_obj(table(layout::PDPTE_START), GuestAddress(layout::PML4_START))
        .map_err(RegsError::WritePageTables)?;
    mem.write_obj(table(layout::PDE_START), GuestAddress(layout::PDPTE_START))
        .map_err(RegsError::WritePageTables)?;
    let pdes: Vec<u8> = (0..PDE_COUNT)
        .flat_map(|i| (table(i * HUGE_PAGE_SIZE) | PTE_HUGE).to_le_bytes())
        .collect();
    mem.write_slice(&pdes, GuestAddress(layout::PDE_START))
        .map_err(RegsError::WritePageTables)
}

/// The special registers for `protocol`, starting from the vCPU's current ones (which keep KVM's
/// APIC base and the like).
fn boot_sregs(mut sregs: kvm_sregs, protocol: BootProtocol) -> kvm_sregs {
    let gdt = boot_gdt(protocol);
    let code = segment_from_gdt(gdt[2], GDT_CODE_SELECTOR);
    let data = segment_from_gdt(gdt[3], GDT_DATA_SELECTOR);
    let tss = segment_from_gdt(gdt[4], GDT_TSS_SELECTOR);

    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    // Empty IDT: any exception before the kernel installs its own is a triple fault, which
    // surfaces as a shutdown exit instead of running garbage.
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 0;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

fn boot_regs(kernel: &LoadedKernel) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: kernel.entry.raw_value(),
        ..Default::default()
    };
    match kernel.protocol {
        BootProtocol::Linux64 => {
            regs.rsi = layout::ZERO_PAGE_START;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
        BootProtocol::Pvh => {
            regs.rbx = layout::PVH_INFO_START;
        }
    }
    regs
}

/// Writes the boot GDT (and, for Linux64, the identity page tables) and sets the BSP's FPU,
/// special and general registers for the kernel's entry protocol.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
) -> Result<(), RegsError> {
    write_gdt(mem, &boot_gdt(kernel.protocol))?;
    if kernel.protocol == BootProtocol::Linux64 {
        write_page_tables(mem)?;
    }

    let fpu = kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)?;

    let sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&boot_sregs(sregs, kernel.protocol))
        .map_err(RegsError::SetSregs)?;
    vcpu.set_regs(&boot_regs(kernel))
        .map_err(RegsError::SetRegs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    #[test]
    fn gdt_entries_decode() {
        let gdt = boot_gdt(BootProtocol::Linux64);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[2], GDT_CODE_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.s, cs.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(gdt[3], GDT_DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tss = segment_from_gdt(gdt[4], GDT_TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_, tss.present), (0, 0xb, 1));
        let pvh = boot_gdt(BootProtocol::Pvh);
        let cs32 = segment_from_gdt(pvh[2], GDT_CODE_SELECTOR);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        assert_eq!(segment_from_gdt(pvh[4], GDT_TSS_SELECTOR).limit, 0x67);
    }

    fn kvm_vcpu() -> (Kvm, kvm_ioctls::VmFd, VcpuFd) {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        (kvm, vm, vcpu)
    }

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn linux64_state_on_real_vcpu() {
        let (_kvm, _vm, vcpu) = kvm_vcpu();
        let mem = guest_mem();
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100_0000),
            protocol: BootProtocol::Linux64,
            kernel_end: GuestAddress(0x120_0000),
            setup_header: None,
        };
        setup_boot_vcpu(&vcpu, &mem, &kernel).unwrap();

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.selector, GDT_CODE_SELECTOR);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.ds.selector, GDT_DATA_SELECTOR);
        assert_eq!(sregs.ss.selector, GDT_DATA_SELECTOR);
        assert_eq!(sregs.tr.selector, GDT_TSS_SELECTOR);
        assert_eq!(sregs.gdt.base, layout::BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 39);

        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
        assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER);
        assert_eq!(regs.rbp, layout::BOOT_STACK_POINTER);
        assert_eq!(regs.rflags, 2);

        let fpu = vcpu.get_fpu().unwrap();
        assert_eq!(fpu.fcw, FPU_FCW_DEFAULT);
        // MXCSR read back from the XSAVE area (dword 6): this host's KVM_GET_FPU reports it as 0.
        assert_eq!(vcpu.get_xsave().unwrap().region[6], MXCSR_DEFAULT);

        // Page tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] maps i * 2 MiB.
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPTE_START);
        let pdpte: u64 = mem.read_obj(GuestAddress(layout::PDPTE_START)).unwrap();
        assert_eq!(pdpte & !0xfff, layout::PDE_START);
        let pde: u64 = mem
            .read_obj(GuestAddress(layout::PDE_START + 8 * 511))
            .unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        let gdt_code: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 0x10))
            .unwrap();
        assert_eq!(gdt_code, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn pvh_state_on_real_vcpu() {
        let (_kvm, _vm, vcpu) = kvm_vcpu();
        let mem = guest_mem();
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100_0200),
            protocol: BootProtocol::Pvh,
            kernel_end: GuestAddress(0x120_0000),
            setup_header: None,
        };
        setup_boot_vcpu(&vcpu, &mem, &kernel).unwrap();
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(sregs.cs.base, 0);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x100_0200);
        assert_eq!(regs.rbx, layout::PVH_INFO_START);
        assert_eq!(regs.rflags, 2);
    }
}
