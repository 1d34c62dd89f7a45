//! Guest physical address map of a TrEnv x86_64 VM.
//!
//! Everything a guest (Linux or the test guest) may rely on is fixed here; the guest learns the rest from
//! boot_params, the e820 map and the ACPI tables.
//!
//! ```text
//! 0x0000_0500  boot GDT                     0x0000_9000  boot PML4 / PDPT / PD (identity, 1 GiB)
//! 0x0000_0540  boot IDT (empty)             0x0002_0000  kernel command line
//! 0x0000_6000  PVH hvm_start_info + memmap  0x0009_fc00  EBDA (reserved) .. 0x10_0000
//! 0x0000_7000  boot_params (zero page)      0x000e_0000  ACPI RSDP, then XSDT/FADT/MADT/DSDT
//! 0x0000_8ff0  boot stack top               0x000f_f000  VMGenID buffer (16 bytes)
//!                                           0x0010_0000  kernel / test guest load address
//! RAM: [0, min(size, 3 GiB)) and, for larger guests, [4 GiB, 4 GiB + rest)
//! 32-bit MMIO hole [3 GiB, 4 GiB):
//!   0xc000_0000 .. 0xe000_0000  PCI 32-bit BAR window (virtio-pci BARs: placed by the VMM, movable by the guest)
//!   0xe000_0000 .. 0xf000_0000  PCI ECAM
//!   0xfe00_0000                 guest-signal device (4 KiB)
//!   0xfe00_1000                 16550 UART MMIO alias of ttyS0 (1-byte registers, regshift 0)
//!   0xfe00_2000                 guest-idle device (a blocking read for guests that cannot halt)
//!   0xfe00_3000                 PCI hotplug controller (slot bitmaps and eject register, see
//!                               `devices::pci::hotplug`; the DSDT's `\_SB_.PCI0.PHPR` region)
//!   0xfec0_0000                 IOAPIC (emulated by the VMM: split irqchip)
//!   0xfee0_0000                 LAPIC (in KVM)
//! 64-bit pmem window from PMEM_WINDOW_START (64 GiB, or the end of RAM rounded up to 1 GiB if higher):
//!   virtio-pmem ranges, each on a 1 GiB boundary (see `virtio_pmem_share::place`)
//! Port I/O: 0x3f8-0x3ff UART (IRQ 4), 0x60-0x64 i8042 (reset), 0x3c0 ACPI sleep control, 0x3c1 sleep status
//! IOAPIC pins: 4 UART, 5 ACPI GED (PCI hotplug events), 9 SCI (named in the FADT, unused)
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x540;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// PVH module list (the initramfs), after room for 80 memory map entries.
pub const PVH_MODLIST_START: u64 = 0x6800;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Linux accepts up to 2048 bytes by default (COMMAND_LINE_SIZE); newer kernels say more in the setup header.
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9_fc00;
pub const RSDP_START: u64 = 0xe_0000;
/// The ACPI tables live in the BIOS area, reserved in the e820 map, below the VMGenID buffer.
pub const ACPI_AREA_END: u64 = 0xf_f000;
/// The 16-byte VM generation ID (ACPI VMGenID's buffer, named by the DSDT's `VGEN.ADDR`), in reserved memory.
pub const VMGENID_START: u64 = 0xf_f000;
pub const HIGH_RAM_START: u64 = 0x10_0000;

pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
pub const MEM_32BIT_GAP_SIZE: u64 = 0x4000_0000;
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

/// virtio-pmem ranges live above guest RAM, far from it so RAM can grow without moving them: Linux wants
/// them 128 MiB (memory section) aligned for DAX; 1 GiB alignment covers that and 1 GiB guest pages.
pub const PMEM_WINDOW_START: u64 = 64 << 30;
pub const PMEM_WINDOW_ALIGNMENT: u64 = 1 << 30;

/// Where the pmem window starts for a guest with `mem_size` bytes of RAM.
pub fn pmem_window_start(mem_size: u64) -> u64 {
    let ram_end = if mem_size <= MEM_32BIT_GAP_START {
        mem_size
    } else {
        RAM_64BIT_START.saturating_add(mem_size - MEM_32BIT_GAP_START)
    };
    PMEM_WINDOW_START.max(
        ram_end
            .checked_next_multiple_of(PMEM_WINDOW_ALIGNMENT)
            .unwrap_or(u64::MAX),
    )
}

pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;

pub const GUEST_SIGNAL_START: u64 = 0xfe00_0000;
pub const GUEST_SIGNAL_SIZE: u64 = 0x1000;
pub const SERIAL_MMIO_START: u64 = 0xfe00_1000;
pub const SERIAL_MMIO_SIZE: u64 = 0x1000;
pub const GUEST_IDLE_START: u64 = 0xfe00_2000;
pub const GUEST_IDLE_SIZE: u64 = 0x1000;
pub const PCI_HOTPLUG_START: u64 = 0xfe00_3000;
pub const PCI_HOTPLUG_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const APIC_START: u64 = 0xfee0_0000;

pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_PORT_SIZE: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_SIZE: u64 = 5;
pub const ACPI_SLEEP_CONTROL_PORT: u64 = 0x3c0;
pub const ACPI_SLEEP_STATUS_PORT: u64 = 0x3c1;
pub const ACPI_PM_PORT_SIZE: u64 = 2;
/// SLP_TYP value of \_S5_ in our DSDT: the guest writes (S5_SLP_TYP << 2) | SLP_EN to sleep control.
pub const S5_SLP_TYP: u8 = 5;
/// FADT SCI interrupt (unused by a hardware-reduced platform but must be valid).
pub const SCI_IRQ: u32 = 9;
/// The ACPI Generic Event Device's interrupt (edge, active high): raised on every PCI hotplug event.
pub const GED_IRQ: u32 = 5;
/// Pins of the emulated IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
