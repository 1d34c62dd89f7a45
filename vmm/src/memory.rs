//! Guest RAM: created from the architecture's region list, backed by anonymous memory for a booted VM,
//! and registered with KVM as one memslot per region.
//!
//! Later backends (a template image mapped copy-on-write, a shared memfd) plug in here; the rest of the VMM
//! only sees a `GuestMemoryMmap`.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::FromRangesError;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch;
use crate::config::MemoryConfig;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {size_mib} MiB of guest memory")]
    Allocate {
        size_mib: u64,
        #[source]
        source: FromRangesError,
    },
    #[error("shared and hugepages guest memory are not supported yet")]
    Unsupported,
    #[error("KVM refused memory slot {slot} ({size_mib} MiB at {guest_addr:#x})")]
    RegisterSlot {
        slot: u32,
        guest_addr: u64,
        size_mib: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Creates anonymous guest RAM for `config`. Pages are allocated by the host on first touch.
pub fn create_guest_memory(config: &MemoryConfig) -> Result<GuestMemoryMmap, MemoryError> {
    if config.shared || config.hugepages {
        return Err(MemoryError::Unsupported);
    }
    let regions = arch::ram_regions(config.size);
    let memory =
        GuestMemoryMmap::from_ranges(&regions).map_err(|source| MemoryError::Allocate {
            size_mib: config.size >> 20,
            source,
        })?;
    for region in memory.iter() {
        let host = region.as_ptr() as *mut libc::c_void;
        let len = region.len() as usize;
        if config.thp {
            // Best effort: THP cuts first-touch faults ~10x where the host has huge pages to give.
            // SAFETY: the range is a mapping this process owns for the memory's lifetime.
            unsafe { libc::madvise(host, len, libc::MADV_HUGEPAGE) };
        }
        if config.prefault {
            // SAFETY: as above; MADV_POPULATE_WRITE only faults pages in.
            let rc = unsafe { libc::madvise(host, len, libc::MADV_POPULATE_WRITE) };
            if rc != 0 {
                log::warn!(
                    "prefaulting guest memory failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    Ok(memory)
}

/// Registers every region as a KVM memslot, in region order from slot 0.
pub fn register_with_kvm(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let guest_addr = region.start_addr().0;
        let size = region.len();
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range stays mapped for as long as the VM exists: both are owned by `Vm`, which
        // drops the VM file descriptor before the memory.
        unsafe { vm.set_user_memory_region(mem_region) }.map_err(|source| {
            MemoryError::RegisterSlot {
                slot,
                guest_addr,
                size_mib: size >> 20,
                source,
            }
        })?;
    }
    Ok(())
}

/// The first memslot number after guest RAM's (RAM takes 0..regions).
pub fn first_free_slot(memory: &GuestMemoryMmap) -> u32 {
    memory.num_regions() as u32
}

/// Registers a memslot outside guest RAM (a virtio-pmem range): `size` bytes at `host_addr` appear at
/// `guest_addr`.
///
/// # Safety
/// `[host_addr, host_addr + size)` must stay mapped for as long as the VM may run its vCPUs.
pub unsafe fn register_extra_slot(
    vm: &VmFd,
    slot: u32,
    guest_addr: u64,
    host_addr: u64,
    size: u64,
) -> Result<(), MemoryError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: guest_addr,
        memory_size: size,
        userspace_addr: host_addr,
    };
    // SAFETY: the caller keeps the host range mapped for the VM's life.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::RegisterSlot {
        slot,
        guest_addr,
        size_mib: size >> 20,
        source,
    })
}
