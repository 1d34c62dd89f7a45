//! Guest RAM from region images: mapped copy-on-write (`cow`), copied into anonymous memory (`copy`), or
//! anonymous memory paged in on demand (`ondemand`, see `uffd`).
//!
//! The raw functions return bare mappings (the caller unmaps them) and can replace a live range in place
//! with MAP_FIXED, which swaps a running VM's RAM without touching its KVM memslots. The `*_guest_region`
//! functions build a `vm_memory::GuestRegionMmap` that owns its mapping (vm-memory unmaps it on drop).
//! vm-memory's `with_raw_mmap_pointer` does not take ownership of a pointer (the region would leak), so no
//! region is built around a raw pointer here.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::util::{self, IMAGE_PAGE};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("mapping of {len} bytes is not page aligned (address {addr:#x})")]
    Unaligned { addr: usize, len: usize },
    #[error("the image is {file_len} bytes, smaller than the {len}-byte region it must back")]
    ImageTooSmall { file_len: u64, len: usize },
    #[error("cannot inspect the image file")]
    Stat(#[source] io::Error),
    #[error("mmap of {len} bytes failed")]
    Mmap {
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the image into memory")]
    Read(#[source] io::Error),
    #[error("cannot build the guest memory region")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest region at {0:#x} overflows the address space")]
    RegionOverflow(u64),
    #[error("unknown memory restore mode {0:?} (expected cow, copy or ondemand)")]
    UnknownMode(String),
}

/// How a restored VM's RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum RestoreMode {
    /// The image mapped MAP_PRIVATE: clean pages are shared page cache, writes copy.
    #[default]
    #[serde(rename = "cow", alias = "Cow", alias = "CoW", alias = "COW")]
    Cow,
    /// Anonymous memory filled from the image (Cloud Hypervisor's default).
    #[serde(rename = "copy", alias = "Copy")]
    Copy,
    /// Anonymous memory filled by a userfaultfd handler as the guest touches it.
    #[serde(
        rename = "ondemand",
        alias = "OnDemand",
        alias = "on_demand",
        alias = "on-demand"
    )]
    OnDemand,
}

impl FromStr for RestoreMode {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, ImageError> {
        match s.to_ascii_lowercase().replace(['_', '-'], "").as_str() {
            "cow" => Ok(RestoreMode::Cow),
            "copy" => Ok(RestoreMode::Copy),
            "ondemand" => Ok(RestoreMode::OnDemand),
            _ => Err(ImageError::UnknownMode(s.to_string())),
        }
    }
}

impl fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestoreMode::Cow => "cow",
            RestoreMode::Copy => "copy",
            RestoreMode::OnDemand => "ondemand",
        })
    }
}

fn check_args(file: Option<&File>, len: usize, fixed: Option<*mut u8>) -> Result<(), ImageError> {
    let page = util::host_page_size().max(IMAGE_PAGE);
    let addr = fixed.map(|p| p as usize).unwrap_or(0);
    if len == 0 || !len.is_multiple_of(page) || !addr.is_multiple_of(page) {
        return Err(ImageError::Unaligned { addr, len });
    }
    if let Some(file) = file {
        // Pages past the end of the file would SIGBUS the VMM (or fault the guest) on access.
        let file_len = file.metadata().map_err(ImageError::Stat)?.len();
        if file_len < len as u64 {
            return Err(ImageError::ImageTooSmall { file_len, len });
        }
    }
    Ok(())
}

/// mmap wrapper: MAP_FIXED when `fixed` is given.
///
/// # Safety
/// With `fixed`, the range must be one the caller owns and may replace.
unsafe fn mmap(
    fixed: Option<*mut u8>,
    len: usize,
    flags: i32,
    fd: i32,
) -> Result<*mut u8, ImageError> {
    let (addr, flags) = match fixed {
        Some(p) => (p as *mut libc::c_void, flags | libc::MAP_FIXED),
        None => (std::ptr::null_mut(), flags),
    };
    // SAFETY: the caller vouches for a fixed range; otherwise the kernel picks a fresh one.
    let ptr = unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_NORESERVE,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(ImageError::Mmap {
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(ptr as *mut u8)
}

/// Maps `file` (a region image of at least `len` bytes) MAP_PRIVATE, read-write: reads share the file's
/// page cache pages with every other mapping of it, writes make private copies and never reach the file.
/// Maps at a fresh address, or over `fixed_addr` with MAP_FIXED (replacing what is there). The caller
/// unmaps the result.
///
/// # Safety
/// With `fixed_addr`, `[fixed_addr, fixed_addr + len)` must be a mapping the caller owns and may replace
/// (e.g. guest RAM); anything else there is silently discarded.
pub unsafe fn map_cow(
    file: &File,
    len: usize,
    fixed_addr: Option<*mut u8>,
) -> Result<*mut u8, ImageError> {
    check_args(Some(file), len, fixed_addr)?;
    // SAFETY: fixed ranges are vouched for by our caller.
    unsafe { mmap(fixed_addr, len, libc::MAP_PRIVATE, file.as_raw_fd()) }
}

/// Anonymous private memory filled from the image. Holes are skipped (SEEK_DATA/SEEK_HOLE), so zero pages
/// stay unallocated. At a fresh address or over `fixed_addr` (MAP_FIXED). The caller unmaps the result.
///
/// # Safety
/// As for `map_cow`.
pub unsafe fn map_copy(
    file: &File,
    len: usize,
    fixed_addr: Option<*mut u8>,
) -> Result<*mut u8, ImageError> {
    check_args(Some(file), len, fixed_addr)?;
    // SAFETY: fixed ranges are vouched for by our caller.
    let ptr = unsafe { mmap(fixed_addr, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)? };
    // SAFETY: the mapping was just created with `len` bytes and is ours to fill.
    if let Err(e) = unsafe { fill_from_image(file, ptr, len) } {
        if fixed_addr.is_none() {
            // SAFETY: our own fresh mapping, never handed out.
            unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
        }
        return Err(e);
    }
    Ok(ptr)
}

/// Anonymous private memory (for on-demand restore, before `uffd::OnDemandServer` registers it).
///
/// # Safety
/// As for `map_cow`.
pub unsafe fn map_anonymous(
    len: usize,
    fixed_addr: Option<*mut u8>,
) -> Result<*mut u8, ImageError> {
    check_args(None, len, fixed_addr)?;
    // SAFETY: fixed ranges are vouched for by our caller.
    unsafe { mmap(fixed_addr, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1) }
}

/// Copies the image's data segments into `[dst, dst + len)`.
///
/// # Safety
/// The range must be writable memory the caller owns.
unsafe fn fill_from_image(file: &File, dst: *mut u8, len: usize) -> Result<(), ImageError> {
    let segments = util::data_segments(file, len as u64).map_err(ImageError::Read)?;
    for (start, end) in segments {
        // SAFETY: `[start, end)` lies within `[0, len)` (data_segments clamps to len).
        let buf = unsafe {
            std::slice::from_raw_parts_mut(dst.add(start as usize), (end - start) as usize)
        };
        util::read_exact_at(file, buf, start).map_err(ImageError::Read)?;
    }
    Ok(())
}

/// A guest region whose mapping is the image mapped MAP_PRIVATE (copy-on-write). The region owns the
/// mapping and keeps a duplicate of the file descriptor.
pub fn cow_guest_region<B: NewBitmap>(
    file: &File,
    len: usize,
    guest_addr: u64,
) -> Result<GuestRegionMmap<B>, ImageError> {
    check_args(Some(file), len, None)?;
    let fd = file.try_clone().map_err(ImageError::Stat)?;
    let mapping = MmapRegionBuilder::new_with_bitmap(len, B::with_len(len))
        .with_file_offset(FileOffset::new(fd, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(ImageError::Region)?;
    GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
        .ok_or(ImageError::RegionOverflow(guest_addr))
}

/// A guest region of anonymous memory (owned by the region), for on-demand restore.
pub fn anonymous_guest_region<B: NewBitmap>(
    len: usize,
    guest_addr: u64,
) -> Result<GuestRegionMmap<B>, ImageError> {
    check_args(None, len, None)?;
    let mapping = MmapRegionBuilder::new_with_bitmap(len, B::with_len(len))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(ImageError::Region)?;
    GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
        .ok_or(ImageError::RegionOverflow(guest_addr))
}

/// A guest region of anonymous memory filled from the image (holes stay unallocated).
pub fn copy_guest_region<B: NewBitmap>(
    file: &File,
    len: usize,
    guest_addr: u64,
) -> Result<GuestRegionMmap<B>, ImageError> {
    check_args(Some(file), len, None)?;
    let region = anonymous_guest_region::<B>(len, guest_addr)?;
    // SAFETY: the region owns this fresh, writable mapping of `len` bytes and nobody else uses it yet.
    unsafe { fill_from_image(file, region.as_ptr(), len)? };
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharing::mapping_memory;
    use crate::test_util::scratch_dir;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryMmap, GuestMemoryRegion};

    const LEN: usize = 4 << 20;

    fn image(name: &str) -> (File, Vec<u8>) {
        let dir = scratch_dir(name);
        let path = dir.join("mem-0.img");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(LEN as u64).unwrap();
        let mut expect = vec![0u8; LEN];
        for page in (0..LEN / 4096).step_by(3) {
            let bytes = format!("page {page}");
            file.write_all_at(bytes.as_bytes(), (page * 4096) as u64)
                .unwrap();
            expect[page * 4096..page * 4096 + bytes.len()].copy_from_slice(bytes.as_bytes());
        }
        file.sync_all().unwrap();
        (file, expect)
    }

    fn slice<'a>(ptr: *mut u8, len: usize) -> &'a mut [u8] {
        // SAFETY: the tests only pass mappings they created and keep alive while the slice is used.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    #[test]
    fn modes_parse() {
        assert_eq!(
            "OnDemand".parse::<RestoreMode>().unwrap(),
            RestoreMode::OnDemand
        );
        assert_eq!(
            serde_json::from_str::<RestoreMode>("\"Copy\"").unwrap(),
            RestoreMode::Copy
        );
        assert_eq!(
            serde_json::from_str::<RestoreMode>("\"ondemand\"").unwrap(),
            RestoreMode::OnDemand
        );
        assert_eq!(serde_json::to_string(&RestoreMode::Cow).unwrap(), "\"cow\"");
        assert!("lazy".parse::<RestoreMode>().is_err());
    }

    #[test]
    fn cow_mappings_share_clean_pages_and_keep_writes_private() {
        let (file, expect) = image("cow");
        // SAFETY: fresh mappings, unmapped at the end of the test.
        let a = unsafe { map_cow(&file, LEN, None) }.unwrap();
        // SAFETY: as above.
        let b = unsafe { map_cow(&file, LEN, None) }.unwrap();
        assert_eq!(slice(a, LEN), &expect[..]);
        assert_eq!(slice(b, LEN), &expect[..]);

        let pid = std::process::id();
        let ua = mapping_memory(pid, a as u64, LEN as u64).unwrap();
        // The pages with data (a third of them) are file pages mapped twice.
        assert!(
            ua.shared_clean >= (LEN / 3) as u64 - 4096,
            "shared_clean {}",
            ua.shared_clean
        );
        assert_eq!(ua.private_dirty, 0);

        slice(a, LEN)[4096 * 3] = b'!';
        assert_eq!(slice(b, LEN)[4096 * 3], b'p');
        let mut on_disk = [0u8; 1];
        file.read_exact_at(&mut on_disk, 4096 * 3).unwrap();
        assert_eq!(on_disk[0], b'p');
        let ua = mapping_memory(pid, a as u64, LEN as u64).unwrap();
        assert_eq!(ua.private_dirty, 4096);

        // Replacing the written mapping in place restores the image's contents.
        // SAFETY: `a` is our own mapping of LEN bytes.
        let again = unsafe { map_cow(&file, LEN, Some(a)) }.unwrap();
        assert_eq!(again, a);
        assert_eq!(slice(a, LEN)[4096 * 3], b'p');
        // SAFETY: both mappings were created above.
        unsafe {
            libc::munmap(a as *mut libc::c_void, LEN);
            libc::munmap(b as *mut libc::c_void, LEN);
        }
    }

    #[test]
    fn copy_equals_image_and_skips_holes() {
        let (file, expect) = image("copy");
        // Inside an inaccessible reservation one page larger on each side: an anonymous mapping of
        // another test placed next to it would otherwise merge with it, and smaps would count both.
        let guarded = LEN + 2 * 4096;
        // SAFETY: a fresh reservation, unmapped below.
        let reserve = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                guarded,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(reserve, libc::MAP_FAILED);
        let inside = (reserve as *mut u8).wrapping_add(4096);
        // SAFETY: replaces the middle of our own reservation.
        let p = unsafe { map_copy(&file, LEN, Some(inside)) }.unwrap();
        assert_eq!(slice(p, LEN), &expect[..]);
        let usage = mapping_memory(std::process::id(), p as u64, LEN as u64).unwrap();
        // Comparing read the holes, which maps the shared zero page, not private memory.
        assert!(
            usage.private_dirty <= (LEN / 3 + 4096) as u64 * 2,
            "private_dirty {}",
            usage.private_dirty
        );
        // SAFETY: the reservation and the mapping inside it, created above.
        unsafe { libc::munmap(reserve, guarded) };
    }

    #[test]
    fn short_image_is_refused() {
        let (file, _) = image("short");
        // SAFETY: no fixed address; the call fails before mapping.
        let err = unsafe { map_cow(&file, LEN * 2, None) }.unwrap_err();
        assert!(matches!(err, ImageError::ImageTooSmall { .. }));
    }

    #[test]
    fn guest_regions_own_their_mappings() {
        let (file, expect) = image("region");
        let cow = cow_guest_region::<()>(&file, LEN, 0x10_0000).unwrap();
        let copy = copy_guest_region::<()>(&file, LEN, 0x10_0000).unwrap();
        let anon = anonymous_guest_region::<()>(LEN, 0).unwrap();
        assert_eq!(cow.len(), LEN as u64);
        assert_eq!(anon.len(), LEN as u64);
        let mem = GuestMemoryMmap::from_regions(vec![cow]).unwrap();
        let mut buf = vec![0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000 + 3 * 4096))
            .unwrap();
        assert_eq!(&buf[..], &expect[3 * 4096..3 * 4096 + 64]);
        mem.write_slice(b"guest write", GuestAddress(0x10_0000))
            .unwrap();
        let mut on_disk = [0u8; 6];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(&on_disk, b"page 0");
        assert_eq!(slice(copy.as_ptr(), LEN), &expect[..]);
    }
}
