//! What the VMM handed over: boot_params (the Linux zero page) and guest-physical memory through the
//! guest's identity map.

use crate::acpi::PhysMem;
use crate::protocol::GUEST_IDENTITY_MAP_END;

/// boot_params offsets (Linux arch/x86/include/uapi/asm/bootparam.h).
const BP_ACPI_RSDP_ADDR: usize = 0x070;
const BP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const BP_CMD_LINE_PTR: usize = 0x228;
const BP_CMDLINE_SIZE: usize = 0x238;
pub const ZERO_PAGE_SIZE: usize = 4096;
/// Longest command line read when the header gives no size.
const CMDLINE_MAX: usize = 4096;

/// Guest-physical memory below 4 GiB, read through the identity map.
pub struct Identity;

impl Identity {
    /// `len` bytes at `addr` as a slice, if the range is inside the identity map.
    pub fn slice(addr: u64, len: usize) -> Option<&'static [u8]> {
        let end = addr.checked_add(len as u64)?;
        if addr == 0 || end > GUEST_IDENTITY_MAP_END {
            return None;
        }
        // SAFETY: identity-mapped; the guest never frees or remaps memory. Reading MMIO-hole addresses is
        // harmless (devices answer or the VMM returns zeros).
        Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
    }
}

impl PhysMem for Identity {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        match Identity::slice(addr, buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

#[derive(Clone, Copy)]
pub struct BootInfo {
    pub zero_page: &'static [u8],
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

impl BootInfo {
    pub fn new(boot_params: u64) -> Option<BootInfo> {
        Identity::slice(boot_params, ZERO_PAGE_SIZE).map(|zero_page| BootInfo { zero_page })
    }

    pub fn rsdp_hint(&self) -> u64 {
        u64::from(u32_at(self.zero_page, BP_ACPI_RSDP_ADDR))
            | (u64::from(u32_at(self.zero_page, BP_ACPI_RSDP_ADDR + 4)) << 32)
    }

    pub fn cmdline_addr(&self) -> u64 {
        u64::from(u32_at(self.zero_page, BP_CMD_LINE_PTR))
            | (u64::from(u32_at(self.zero_page, BP_EXT_CMD_LINE_PTR)) << 32)
    }

    /// The command line bytes up to the NUL (empty if there is none or it is unreachable).
    pub fn cmdline(&self) -> &'static [u8] {
        let addr = self.cmdline_addr();
        let size = match u32_at(self.zero_page, BP_CMDLINE_SIZE) as usize {
            0 => CMDLINE_MAX,
            n => n.min(CMDLINE_MAX),
        };
        // The size field is the maximum the kernel accepts, not the length: stop at the NUL.
        let max = (GUEST_IDENTITY_MAP_END.saturating_sub(addr) as usize).min(size + 1);
        match Identity::slice(addr, max) {
            Some(bytes) => {
                let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
                &bytes[..len]
            }
            None => &[],
        }
    }
}
