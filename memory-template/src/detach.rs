//! Moving a live guest RAM range's pages out of the way, so that the range can be mapped anew at once and
//! the old pages freed off the critical path.
//!
//! Replacing a guest RAM mapping in place (MAP_FIXED over it, as a repurpose does) first unmaps the old
//! one, which costs time per resident page: rmap removal, freeing private copies, and KVM's MMU notifier
//! dropping every translation. `mremap` to another address instead moves whole page tables when source
//! and destination share their offset within a 2 MiB page table (the kernel's PMD moves), so it costs
//! per page table, not per page; the range is left empty for the new mapping. The moved pages are then
//! unmapped by a reaper thread while the guest already runs its new tenant. KVM still drops the old
//! translations (the move invalidates the source range), so no guest can reach the old pages.

use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

use crate::image::ImageError;

/// The reaper thread's nice value: freeing memory is background work, which must not take a CPU from
/// vCPUs or the API (it still progresses on a busy host, unlike SCHED_IDLE).
pub const REAPER_NICE: i32 = 19;

/// Page tables that `mremap` can move whole cover this much.
const PMD_SIZE: usize = 2 << 20;

/// The pages of a range, moved to an address of their own. Unmapped on [`Detached::release`] (by the
/// reaper thread) or on drop (inline).
#[derive(Debug)]
pub struct Detached {
    addr: usize,
    len: usize,
}

impl Detached {
    /// Moves the pages of `[addr, addr + len)` to a fresh address; afterwards the range is unmapped (a
    /// hole that the caller maps anew, e.g. with `image::map_cow`). Fails without changing anything if
    /// mremap cannot move the range (before Linux 6.17, one that spans more than one mapping).
    ///
    /// # Safety
    /// The range must be a mapping the caller owns, and nothing may access it until it is mapped again
    /// (for guest RAM: every vCPU and device paused).
    pub unsafe fn take(addr: *mut u8, len: usize) -> Result<Detached, ImageError> {
        let src = addr as usize;
        let page = crate::util::IMAGE_PAGE;
        if !src.is_multiple_of(page) || !len.is_multiple_of(page) || len == 0 {
            return Err(ImageError::Unaligned { addr: src, len });
        }
        let reserve_len = len
            .checked_add(PMD_SIZE)
            .ok_or(ImageError::Unaligned { addr: src, len })?;
        // SAFETY: a fresh inaccessible reservation, at an address the kernel picks.
        let reserve = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserve == libc::MAP_FAILED {
            return Err(ImageError::Mmap {
                len: reserve_len,
                source: std::io::Error::last_os_error(),
            });
        }
        let reserve = reserve as usize;
        // Same offset within a 2 MiB page table as the source, so that full page tables move whole.
        let skew = (src % PMD_SIZE + PMD_SIZE - reserve % PMD_SIZE) % PMD_SIZE;
        let dst = reserve + skew;
        let unreserve = |from: usize, to: usize| {
            if to > from {
                // SAFETY: parts of our own reservation, outside what the pages move into.
                unsafe { libc::munmap(from as *mut libc::c_void, to - from) };
            }
        };
        unreserve(reserve, dst);
        unreserve(dst + len, reserve + reserve_len);
        // SAFETY: the source is the caller's (see above); the destination is our reservation, which
        // MREMAP_FIXED replaces.
        let moved = unsafe {
            libc::mremap(
                src as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            let source = std::io::Error::last_os_error();
            unreserve(dst, dst + len);
            return Err(ImageError::Mmap { len, source });
        }
        Ok(Detached { addr: dst, len })
    }

    /// Moves the pages back to `addr` (the range they were taken from, still empty): undoes
    /// [`Detached::take`] when the new mapping could not be made.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be the range they were taken from; whatever was mapped there since is
    /// replaced.
    pub unsafe fn put_back(self, addr: *mut u8) -> Result<(), ImageError> {
        // SAFETY: our own pages, moved back to the caller's range (MREMAP_FIXED replaces its contents).
        let moved = unsafe {
            libc::mremap(
                self.addr as *mut libc::c_void,
                self.len,
                self.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                addr as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(ImageError::Mmap {
                len: self.len,
                source: std::io::Error::last_os_error(),
            });
        }
        std::mem::forget(self);
        Ok(())
    }

    /// Frees the pages on the reaper thread (inline if it cannot be started).
    pub fn release(self) {
        let job = (self.addr, self.len);
        if let Some(reaper) = reaper() {
            let sent = reaper
                .lock()
                .map(|tx| tx.send(job).is_ok())
                .unwrap_or(false);
            if sent {
                std::mem::forget(self);
            }
        }
        // Not sent: dropped here, unmapped inline.
    }

    /// Bytes moved.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        unmap((self.addr, self.len));
    }
}

fn unmap((addr, len): Job) {
    // SAFETY: pages moved out by `Detached::take`, owned by nobody else.
    if unsafe { libc::munmap(addr as *mut libc::c_void, len) } != 0 {
        log::warn!(
            "cannot unmap {len} detached bytes at {addr:#x}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A range for the reaper to unmap: (address, length).
type Job = (usize, usize);

/// The reaper thread's queue, started on first use; None if the thread cannot be started.
fn reaper() -> Option<&'static Mutex<Sender<Job>>> {
    static REAPER: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    REAPER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("mem-reaper".into())
                .spawn(move || {
                    // SAFETY: lowers this thread's own priority; no memory is involved.
                    let tid = unsafe { libc::gettid() } as libc::id_t;
                    // SAFETY: as above.
                    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, REAPER_NICE) } != 0 {
                        log::debug!(
                            "memory reaper keeps its priority: {}",
                            std::io::Error::last_os_error()
                        );
                    }
                    for job in rx {
                        unmap(job);
                    }
                })
                .map_err(|e| {
                    log::warn!("no memory reaper thread ({e}): detached pages are freed inline")
                })
                .ok()?;
            Some(Mutex::new(tx))
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MIB: usize = 1 << 20;

    /// An anonymous mapping, PMD-misaligned on purpose so that the skew computation is exercised.
    fn anonymous(len: usize, skew: usize) -> *mut u8 {
        // SAFETY: fresh mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + PMD_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = (p as usize).div_ceil(PMD_SIZE) * PMD_SIZE + skew;
        base as *mut u8
    }

    fn resident(addr: *mut u8, len: usize) -> usize {
        let mut vec = vec![0u8; len / 4096];
        // SAFETY: queries residency of a range we mapped; writes into `vec`, sized for it.
        let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        if rc != 0 {
            return usize::MAX; // unmapped
        }
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn pages_move_out_and_the_range_is_left_empty() {
        for skew in [0, 4096, PMD_SIZE - 4096] {
            let len = 8 * MIB;
            let addr = anonymous(len, skew);
            for i in (0..len).step_by(4096) {
                // SAFETY: inside our mapping.
                unsafe { addr.add(i).write(i as u8 ^ 0x5a) };
            }
            // SAFETY: our own mapping, not used by anything else.
            let detached = unsafe { Detached::take(addr, len) }.unwrap();
            assert_eq!(detached.len(), len);
            assert_eq!(
                resident(addr, len),
                usize::MAX,
                "the range must be unmapped"
            );
            let moved = detached.addr as *const u8;
            assert_eq!(moved as usize % PMD_SIZE, addr as usize % PMD_SIZE);
            for i in (0..len).step_by(4096) {
                // SAFETY: the moved pages, still mapped until released.
                assert_eq!(unsafe { moved.add(i).read() }, i as u8 ^ 0x5a);
            }
            // SAFETY: the range they came from, empty.
            unsafe { detached.put_back(addr) }.unwrap();
            // SAFETY: back in place.
            assert_eq!(unsafe { addr.add(4096).read() }, 4096u32 as u8 ^ 0x5a);
            // SAFETY: ours again.
            let detached = unsafe { Detached::take(addr, len) }.unwrap();
            let moved = detached.addr;
            detached.release();
            // The reaper unmaps them soon.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while resident(moved as *mut u8, len) != usize::MAX {
                assert!(std::time::Instant::now() < deadline, "never unmapped");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn file_backed_copy_on_write_pages_move_with_their_contents() {
        let dir = crate::test_util::scratch_dir("detach-cow");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("image"))
            .unwrap();
        file.write_all(&vec![0xabu8; 4 * MIB]).unwrap();
        let addr = anonymous(4 * MIB, 0);
        // SAFETY: replaces our own mapping with the file.
        let p = unsafe { crate::image::map_cow(&file, 4 * MIB, Some(addr)) }.unwrap();
        // SAFETY: inside the mapping: one private copy, one shared page.
        unsafe { p.write(1) };
        // SAFETY: ours.
        let detached = unsafe { Detached::take(p, 4 * MIB) }.unwrap();
        let moved = detached.addr as *const u8;
        // SAFETY: moved pages, mapped until dropped.
        assert_eq!(unsafe { (moved.read(), moved.add(4096).read()) }, (1, 0xab));
        drop(detached);
    }

    #[test]
    fn unaligned_ranges_are_refused() {
        let addr = anonymous(MIB, 0);
        // SAFETY: refused before anything is touched.
        assert!(matches!(
            unsafe { Detached::take(addr.wrapping_add(1), MIB) },
            Err(ImageError::Unaligned { .. })
        ));
        // SAFETY: as above.
        assert!(unsafe { Detached::take(addr, 0) }.is_err());
    }
}
