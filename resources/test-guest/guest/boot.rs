//! CPL0 setup and the CPL0 side of the guest: entry, descriptor tables, page tables, exception stubs and
//! the int3 service. Everything at CPL0 is emulated instruction by instruction by this host's hypervisor
//! (~550 ns each), so the entry path is ~20 instructions and every table is static data built by the
//! assembler. Rust code only ever runs at CPL3.
//!
//! Descriptor fields that split an address (IDT gate offsets, the TSS base) are computed by the linker
//! script (`__isr_lo`, `__tss_mid`, ...): an assembler cannot shift a relocatable symbol.

use crate::protocol::{SERVICE_INB, SERVICE_OUTB};

core::arch::global_asm!(
    r#"
    /* Selectors (literal below: Intel syntax would read a bare symbol as memory): 0x08 kernel code,
       0x10 kernel data, 0x1b user data, 0x23 user code, 0x28 TSS. */
    .section .text.entry, "ax"
    .globl _start
_start:
    /* Linux 64-bit boot protocol: CPL0, long mode, rsi = boot_params, IF = 0. */
    mov rax, cr0
    or eax, 0x2                 /* MP */
    and eax, 0xfffffffb         /* clear EM: rustc emits SSE */
    mov cr0, rax
    mov rax, cr4
    or eax, 0x600               /* OSFXSR | OSXMMEXCPT */
    mov cr4, rax
    lea rax, [rip + boot_pml4]
    mov cr3, rax
    lgdt [rip + boot_gdt_ptr]
    lidt [rip + boot_idt_ptr]
    mov ax, 0x28
    ltr ax
    mov rdi, rsi
    push 0x1b                   /* ss */
    lea rax, [rip + user_stack_top]
    push rax                    /* rsp */
    push 0x2                    /* rflags: IF = 0, IOPL = 0 */
    push 0x23                   /* cs */
    lea rax, [rip + user_entry]
    push rax                    /* rip */
    iretq

    /* CPL3 from here: clear .bss natively, then Rust. */
    .section .text.user_entry, "ax"
user_entry:
    mov r12, rdi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    cld
    rep stosb
    mov rdi, r12
    call guest_main
    ud2

    /* Exception stubs, 16 bytes apart from a page-aligned base: the IDT points at isr_stubs + 16 * vector. */
    .macro isr_noerr vec
    .balign 16
    push 0
    push \vec
    jmp isr_common
    .endm
    .macro isr_err vec
    .balign 16
    push \vec
    jmp isr_common
    .endm

    .section .text.isr, "ax"
    .balign 4096
    .globl isr_stubs
isr_stubs:
    isr_noerr 0
    isr_noerr 1
    isr_noerr 2
    .balign 16
    jmp int3_service
    isr_noerr 4
    isr_noerr 5
    isr_noerr 6
    isr_noerr 7
    isr_err 8
    isr_noerr 9
    isr_err 10
    isr_err 11
    isr_err 12
    isr_err 13
    isr_err 14
    isr_noerr 15
    isr_noerr 16
    isr_err 17
    isr_noerr 18
    isr_noerr 19
    isr_noerr 20
    isr_err 21
    isr_noerr 22
    isr_noerr 23
    isr_noerr 24
    isr_noerr 25
    isr_noerr 26
    isr_noerr 27
    isr_noerr 28
    isr_err 29
    isr_err 30
    isr_noerr 31

    /* Record the fault, then iretq into the CPL3 reporter on its own stack. A second fault (the reporter
       itself faulting) resets the machine directly. */
isr_common:
    inc qword ptr [rip + fault_record + 48]
    cmp qword ptr [rip + fault_record + 48], 1
    jne fatal_reset
    pop qword ptr [rip + fault_record]          /* vector */
    pop qword ptr [rip + fault_record + 8]      /* error code */
    mov rax, [rsp]
    mov [rip + fault_record + 16], rax          /* rip */
    mov rax, [rsp + 8]
    mov [rip + fault_record + 24], rax          /* cs */
    mov rax, [rsp + 24]
    mov [rip + fault_record + 32], rax          /* rsp */
    mov rax, cr2
    mov [rip + fault_record + 40], rax          /* cr2 */
    lea rax, [rip + fault_entry]
    mov [rsp], rax
    mov qword ptr [rsp + 8], 0x23
    mov qword ptr [rsp + 16], 0x2
    lea rax, [rip + fault_stack_top - 8]
    mov [rsp + 24], rax
    mov qword ptr [rsp + 32], 0x1b
    iretq
fatal_reset:
    mov al, 0xfe
    out 0x64, al
fatal_spin:
    hlt
    jmp fatal_spin

    /* int3 from CPL3 (a DPL3 gate): rax = function, dx = port, ecx = value; result in rax. */
int3_service:
    cmp eax, {outb}
    je svc_outb
    cmp eax, {inb}
    je svc_inb
    cmp eax, {outw}
    je svc_outw
    cmp eax, {inw}
    je svc_inw
    cmp eax, {outl}
    je svc_outl
    cmp eax, {inl}
    je svc_inl
    push 0
    push 3
    jmp isr_common
svc_outb:
    mov eax, ecx
    out dx, al
    iretq
svc_inb:
    xor eax, eax
    in al, dx
    iretq
svc_outw:
    mov eax, ecx
    out dx, ax
    iretq
svc_inw:
    xor eax, eax
    in ax, dx
    iretq
svc_outl:
    mov eax, ecx
    out dx, eax
    iretq
svc_inl:
    in eax, dx
    iretq

    .section .data.boot, "aw"
    /* Identity map of 0..4 GiB with 2 MiB pages, present | rw | user; the 3-4 GiB MMIO hole uncached. */
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
    .balign 4096
    .globl boot_pdpt            /* virtio/pmem.rs maps ranges above 4 GiB into it */
boot_pdpt:
    .quad boot_pd + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
    .balign 4096
boot_pd:
    .set trenv_pde, 0
    .rept 1536
    .quad (trenv_pde << 21) | 0x87
    .set trenv_pde, trenv_pde + 1
    .endr
    .rept 512
    .quad (trenv_pde << 21) | 0x9f
    .set trenv_pde, trenv_pde + 1
    .endr

    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00cff2000000ffff    /* 0x18 user data */
    .quad 0x00affa000000ffff    /* 0x20 user code, 64-bit */
    .word 103                   /* 0x28 TSS: limit */
    .word __tss_lo
    .byte __tss_mid
    .byte 0x89                  /* present, available 64-bit TSS */
    .byte 0
    .byte __tss_hi
    .long 0
    .long 0
boot_gdt_end:

    .balign 16
    .globl boot_tss
boot_tss:
    .long 0
    .quad kernel_stack_top      /* rsp0: where exceptions from CPL3 land */
    .quad 0
    .quad 0
    .quad 0
    .fill 7, 8, 0               /* ist1-7 */
    .quad 0
    .word 0
    .word 104                   /* I/O bitmap base past the limit: no bitmap */

    .macro idt_gate vec, type
    .word __isr_lo + \vec * 16
    .word 0x08
    .byte 0
    .byte \type
    .word __isr_hi
    .long 0
    .long 0
    .endm

    .balign 16
boot_idt:
    idt_gate 0, 0x8e
    idt_gate 1, 0x8e
    idt_gate 2, 0x8e
    idt_gate 3, 0xee            /* DPL 3: int3 is the CPL3 -> CPL0 service call */
    .set trenv_vec, 4
    .rept 28
    idt_gate trenv_vec, 0x8e
    .set trenv_vec, trenv_vec + 1
    .endr
boot_idt_end:

    .balign 8
    .word 0
    .word 0
    .word 0
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .word 0
    .word 0
    .word 0
boot_idt_ptr:
    .word boot_idt_end - boot_idt - 1
    .quad boot_idt

    .section .bss.fault, "aw", @nobits
    .balign 8
    .globl fault_record
fault_record:
    .skip 56                    /* vector, error, rip, cs, rsp, cr2, count */

    .section .stacks, "aw", @nobits
    .balign 4096
user_stack:
    .skip 131072
user_stack_top:
fault_stack:
    .skip 16384
fault_stack_top:
kernel_stack:
    .skip 4096
kernel_stack_top:
"#,
    outb = const SERVICE_OUTB,
    inb = const SERVICE_INB,
    outw = const crate::protocol::SERVICE_OUTW,
    inw = const crate::protocol::SERVICE_INW,
    outl = const crate::protocol::SERVICE_OUTL,
    inl = const crate::protocol::SERVICE_INL,
);

/// What the CPL0 stub saved about the last exception (layout fixed by `isr_common`).
#[repr(C)]
pub struct FaultRecord {
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rsp: u64,
    pub cr2: u64,
    pub count: u64,
}

extern "C" {
    static fault_record: FaultRecord;
}

/// A copy of the fault record (volatile: written behind the compiler's back by the CPL0 stub).
pub fn last_fault() -> FaultRecord {
    // SAFETY: `fault_record` is a static in the image; reading it is always valid.
    unsafe { core::ptr::read_volatile(&raw const fault_record) }
}

/// Port output through the int3 service (port I/O faults at CPL3 on this host).
pub fn outb(port: u16, value: u8) {
    // SAFETY: the service only does the port access; the CPU switches to the kernel stack, so the user
    // stack (and its red zone) is untouched; iretq restores the flags.
    unsafe {
        core::arch::asm!("int3", inout("rax") SERVICE_OUTB => _, in("dx") port, in("ecx") u32::from(value),
            options(nostack, preserves_flags));
    }
}

/// Port input through the int3 service.
pub fn inb(port: u16) -> u8 {
    let value: u64;
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("int3", inout("rax") SERVICE_INB => value, in("dx") port,
            options(nostack, preserves_flags));
    }
    value as u8
}

/// Wider port output (for ACPI registers of other widths).
pub fn out_sized(port: u16, value: u32, width_bytes: u8) {
    let function = match width_bytes {
        2 => crate::protocol::SERVICE_OUTW,
        4 => crate::protocol::SERVICE_OUTL,
        _ => SERVICE_OUTB,
    };
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("int3", inout("rax") function => _, in("dx") port, in("ecx") value,
            options(nostack, preserves_flags));
    }
}
