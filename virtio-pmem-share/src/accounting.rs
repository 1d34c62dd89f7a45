//! Host memory behind pmem mappings.
//!
//! Per mapping (from `/proc/<pid>/smaps`, through memory-template's `sharing`): how much is resident, how
//! much of that the VM copied (anonymous copy-on-write pages of a discarded-writes mapping: private to it)
//! and how much is the file's page cache (shared with every other mapper; its PSS is this VM's share).
//! Per file (`mincore`): how much of it the host page cache holds, which is what all mappers together
//! cost, counted once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use memory_template::sharing::{self, MemoryUsage, SharingError};
use serde::Serialize;

use crate::mapping::PmemBacking;

/// One VM's view of one pmem mapping, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PmemUsage {
    /// The mapping's size.
    pub size: u64,
    /// Pages of the mapping present in this process.
    pub resident: u64,
    /// This process's proportional share (shared pages divided among their mappers).
    pub pss: u64,
    /// Pages this VM copied (guest writes to a discarded-writes mapping): memory only it pays for.
    pub copied: u64,
    /// Resident pages that are the file's page cache (resident - copied).
    pub page_cache: u64,
    /// smaps' Private_*: pages only this process maps (copies, and page cache no one else maps yet).
    pub private: u64,
    /// smaps' Shared_*: page-cache pages other processes map too.
    pub shared: u64,
}

impl PmemUsage {
    pub fn from_smaps(size: u64, u: &MemoryUsage) -> Self {
        Self {
            size,
            resident: u.rss,
            pss: u.pss,
            copied: u.anonymous,
            page_cache: u.rss.saturating_sub(u.anonymous),
            private: u.private(),
            shared: u.shared(),
        }
    }

    /// Name/value pairs for `vm.counters`.
    pub fn counters(&self) -> [(&'static str, u64); 7] {
        [
            ("size_bytes", self.size),
            ("resident_bytes", self.resident),
            ("pss_bytes", self.pss),
            ("copied_bytes", self.copied),
            ("page_cache_bytes", self.page_cache),
            ("private_bytes", self.private),
            ("shared_bytes", self.shared),
        ]
    }
}

/// The usage of `backing`'s mapping in this process.
pub fn usage(backing: &PmemBacking) -> Result<PmemUsage, SharingError> {
    mapping_usage(std::process::id(), backing.host_addr(), backing.size())
}

/// The usage of the mapping at `[addr, addr + size)` in process `pid`.
pub fn mapping_usage(pid: u32, addr: u64, size: u64) -> Result<PmemUsage, SharingError> {
    let u = sharing::mapping_memory(pid, addr, size)?;
    Ok(PmemUsage::from_smaps(size, &u))
}

/// The usage of every mapping of `file` in process `pid` (found by path in smaps), or `None` if it maps
/// none. For a process whose mapping addresses are unknown (a benchmark's VMM children).
pub fn file_mappings_usage(pid: u32, file: &Path) -> Result<Option<PmemUsage>, SharingError> {
    Ok(sharing::file_mappings_memory(pid, file)?.map(|(u, size)| PmemUsage::from_smaps(size, &u)))
}

/// Bytes of `file` in the host page cache (`mincore` over a fresh read-only mapping, which itself faults
/// nothing in).
pub fn file_cached_bytes(file: &Path) -> std::io::Result<u64> {
    let f = File::open(file)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let page = 4096u64;
    let size =
        usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: a new read-only shared mapping of a descriptor we own, unmapped below; never dereferenced.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut vec = vec![0u8; len.div_ceil(page) as usize];
    // SAFETY: `addr` is the mapping above and `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(addr, size, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: the mapping made above, unmapped once.
    unsafe { libc::munmap(addr, size) };
    if rc != 0 {
        return Err(err);
    }
    let pages = vec.iter().filter(|b| *b & 1 != 0).count() as u64;
    Ok((pages * page).min(len.next_multiple_of(page)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::tests::{spec, TempDir};

    fn touch(b: &PmemBacking, len: u64, write: bool) {
        for off in (0..len).step_by(4096) {
            let p = (b.host_addr() + off) as *mut u8;
            // SAFETY: test only: inside the live, writable mapping.
            unsafe {
                if write {
                    p.write_volatile(1);
                } else {
                    p.read_volatile();
                }
            }
        }
    }

    #[test]
    fn separates_copies_from_page_cache() {
        let dir = TempDir::new();
        let path = dir.image("img", 4 << 20);
        let a = PmemBacking::open(&spec(&path, None, true)).unwrap();
        let b = PmemBacking::open(&spec(&path, None, true)).unwrap();
        touch(&a, 4 << 20, false);
        touch(&b, 4 << 20, false);
        touch(&a, 1 << 20, true);
        // A CoW fault may unmap neighbours sharing a large folio; reading again maps them back.
        touch(&a, 4 << 20, false);
        let ua = usage(&a).unwrap();
        assert_eq!(ua.size, 4 << 20);
        assert_eq!(ua.resident, 4 << 20);
        assert_eq!(ua.copied, 1 << 20);
        assert_eq!(ua.page_cache, 3 << 20);
        assert!(ua.shared >= 3 << 20, "{ua:?}");
        let ub = usage(&b).unwrap();
        assert_eq!(ub.copied, 0);
        // Two mappers of 3 MiB of page cache plus 1 MiB only `b` still maps from the file.
        assert!(ub.pss < 4 << 20, "{ub:?}");

        let by_path = file_mappings_usage(std::process::id(), &path)
            .unwrap()
            .unwrap();
        assert_eq!(by_path.size, 8 << 20);
        assert_eq!(by_path.copied, 1 << 20);
        assert_eq!(by_path.resident, ua.resident + ub.resident);
        assert_eq!(
            file_mappings_usage(std::process::id(), &dir.0.join("nope")).unwrap(),
            None
        );
        assert_eq!(file_cached_bytes(&path).unwrap(), 4 << 20);
        assert!(ua.counters().contains(&("copied_bytes", 1 << 20)));
    }
}
