//! virtio-pmem for TrEnv: one host copy of a read-only image for every guest.
//!
//! Agents and functions read the same large files (language runtimes, packages, the rootfs). Through
//! virtio-blk every guest copies what it reads into its own page cache; through virtio-pmem the host file
//! is mapped into the guest's physical address space and a DAX-capable guest loads from it directly, so
//! every VM that maps the same file reads the same host page-cache pages.
//!
//! ## Pieces
//! - [`mapping::PmemBacking`]: opens and checks the file (size defaults to the file's, must be a multiple of
//!   2 MiB and no larger than the file), maps it, flushes it, and notices a file that shrank under it.
//! - [`device::Pmem`]: the virtio-pmem device (virtio 1.2 §5.19): configuration `{start, size}` naming the
//!   guest-physical range, one request queue, FLUSH -> `fsync`.
//! - [`accounting`]: how much of a mapping is resident, copied (private) or shared page cache, from smaps,
//!   and how much of a file the host page cache holds (counted once, whoever maps it).
//! - [`place`]: where each device's range goes in the VMM's pmem window.
//!
//! ## Mapping modes (decided here, documented for operators)
//! | `discard_writes` | file opened | mapping | guest writes |
//! | --- | --- | --- | --- |
//! | off | read-write | `MAP_SHARED`, read-write | reach the file (page cache); FLUSH makes them durable |
//! | on  | read-only  | `MAP_PRIVATE`, read-write, `MAP_NORESERVE` | copy-on-write into this VM's anonymous memory |
//!
//! With `discard_writes=on` the file may be read-only (a shared rootfs image). A `MAP_SHARED` read-only
//! mapping behind a `KVM_MEM_READONLY` memslot was considered and rejected: every guest store to such a
//! slot is an MMIO exit to the VMM (Cloud Hypervisor hit exactly this, issue #1795), and a guest filesystem
//! that writes (journal replay, atime) would then read back stale data. A private mapping shares clean
//! pages with the page cache exactly like a shared one (smaps shows them as `Shared_Clean` once two VMs
//! map them), gives the guest a coherent writable disk, and keeps its writes in pages only it can see:
//! they never reach the file and never leak to another VM.
//!
//! ## Placement
//! Linux needs a pmem range aligned for DAX: 128 MiB (a memory section) for its struct pages and a size in
//! 2 MiB steps for huge-page mappings. Each device's range starts on a 1 GiB boundary ([`ALIGNMENT`])
//! inside a window above guest RAM, which covers both and lets a guest map it with 1 GiB pages.
//!
//! ## A file that shrinks while mapped
//! A guest access to a mapped page past the new end of file cannot be served. The VMM itself never loads
//! from or stores to a pmem mapping (the device only calls `fsync`; accounting reads smaps), so no VMM
//! thread takes the SIGBUS; the fault happens inside KVM on a vCPU's behalf, and `KVM_RUN` fails with
//! `EFAULT`. The VMM then fails the VM, and [`mapping::PmemBacking::check_file`] names the cause (which
//! file shrank, from what to what) in the failure message instead of a bare "Bad address".
//!
//! ## Templates
//! A pmem range is not guest RAM: it is not part of a template's memory images. A restore re-creates the
//! devices from the template's VM config and maps the same files again, so restored instances share the
//! image's page cache with everything else that maps it.

pub mod accounting;
pub mod device;
pub mod mapping;

pub use accounting::PmemUsage;
pub use device::{Pmem, PmemCounters};
pub use mapping::{PmemBacking, PmemError, PmemSpec};

use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What the VMM keeps of a pmem device besides the virtio device itself: the mapping (which must outlive
/// the VM's memslot on it), where the guest sees it, and the device's counters.
#[derive(Clone, Debug)]
pub struct PmemHandle {
    pub id: String,
    pub guest_addr: u64,
    pub backing: Arc<PmemBacking>,
    pub counters: Arc<PmemCounters>,
}

impl PmemHandle {
    /// Counters for `vm.counters` under "pmem <id>": the device's activity, then the mapping's memory
    /// (resident, copied, page cache, PSS) from smaps; memory counters are left out if smaps is unreadable.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut out = vec![
            ("guest_addr", self.guest_addr),
            ("discard_writes", u64::from(self.backing.discard_writes())),
            ("flushes", self.counters.flushes.load(Ordering::Relaxed)),
            (
                "flush_errors",
                self.counters.flush_errors.load(Ordering::Relaxed),
            ),
            (
                "bad_requests",
                self.counters.bad_requests.load(Ordering::Relaxed),
            ),
        ];
        match accounting::usage(&self.backing) {
            Ok(u) => out.extend(u.counters()),
            Err(e) => log::warn!("pmem {}: no memory accounting: {e}", self.id),
        }
        out
    }
}

/// virtio device ID of virtio-pmem (§5.19).
pub const TYPE_PMEM: u32 = 27;
/// A pmem size must be a multiple of this (Linux maps DAX ranges with 2 MiB pages).
pub const SIZE_ALIGNMENT: u64 = 2 << 20;
/// Every device's range starts on this boundary (a multiple of Linux's 128 MiB memory section).
pub const ALIGNMENT: u64 = 1 << 30;

/// Guest-physical start of each range of `sizes`, packed from `window_start` on [`ALIGNMENT`] boundaries;
/// `None` if the addresses overflow.
pub fn place(window_start: u64, sizes: &[u64]) -> Option<Vec<u64>> {
    let mut next = window_start.checked_next_multiple_of(ALIGNMENT)?;
    let mut starts = Vec::with_capacity(sizes.len());
    for &size in sizes {
        starts.push(next);
        next = next
            .checked_add(size)?
            .checked_next_multiple_of(ALIGNMENT)?;
    }
    Some(starts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn places_ranges_on_gib_boundaries() {
        assert_eq!(
            place(64 * GIB, &[256 << 20, GIB, 3 * GIB + (2 << 20)]),
            Some(vec![64 * GIB, 65 * GIB, 66 * GIB])
        );
        // An unaligned window start is rounded up.
        assert_eq!(place(GIB + 1, &[2 << 20]), Some(vec![2 * GIB]));
        assert_eq!(place(0, &[]), Some(vec![]));
        assert_eq!(place(u64::MAX - GIB, &[GIB]), None);
        assert_eq!(place(4 * GIB, &[u64::MAX - GIB]), None);
    }
}
