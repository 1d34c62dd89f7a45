//! x86_64 guest platform: memory map, kernel loading and boot protocols, boot vCPU state, CPUID,
//! MSRs, LAPIC setup and ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod msr;
pub mod regs;
pub mod vcpu_state;

use vm_memory::GuestAddress;

/// Guest RAM regions for `mem_size` bytes: [0, min(size, 3 GiB)) then [4 GiB, ...) for the rest, so
/// the 32-bit MMIO hole [3 GiB, 4 GiB) never holds RAM.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(layout::MEM_32BIT_GAP_START);
    let mut regions = Vec::with_capacity(2);
    if low > 0 {
        regions.push((GuestAddress(0), low as usize));
    }
    let high = mem_size - low;
    if high > 0 {
        regions.push((GuestAddress(layout::RAM_64BIT_START), high as usize));
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_regions_below_gap() {
        let r = ram_regions(256 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_regions(3 * GIB);
        assert_eq!(r, vec![(GuestAddress(0), (3 * GIB) as usize)]);
    }

    #[test]
    fn ram_regions_above_gap() {
        let r = ram_regions(5 * GIB);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (2 * GIB) as usize)
            ]
        );
    }

    #[test]
    fn ram_regions_empty() {
        assert!(ram_regions(0).is_empty());
    }
}
