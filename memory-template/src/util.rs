//! Small helpers shared by the modules: hashing, sparse-file walking, randomness, fsync.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Page granularity of region images and their digest; fixed so images do not depend on the writer's host.
pub const IMAGE_PAGE: usize = 4096;

/// Domain separator of the region digest (see the crate documentation).
const REGION_DIGEST_TAG: &[u8] = b"trenv-region-v1\0";

pub fn host_page_size() -> usize {
    // SAFETY: sysconf has no side effects.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps <= 0 {
        IMAGE_PAGE
    } else {
        ps as usize
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True when every byte is zero. Compares word-wise; the compiler vectorizes the fold.
pub fn is_zero(buf: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { buf.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0)
        && words.iter().fold(0u64, |acc, &w| acc | w) == 0
        && suffix.iter().all(|&b| b == 0)
}

/// Incremental region digest over non-zero pages (see the crate documentation).
pub struct RegionHasher {
    sha: Sha256,
    pages: u64,
}

impl RegionHasher {
    pub fn new(size: u64) -> Self {
        let mut sha = Sha256::new();
        sha.update(REGION_DIGEST_TAG);
        sha.update(size.to_le_bytes());
        RegionHasher { sha, pages: 0 }
    }

    /// Feeds one `IMAGE_PAGE`-sized page at `offset`; zero pages are skipped. Returns whether it was data.
    /// Pages must be fed in ascending offset order.
    pub fn page(&mut self, offset: u64, page: &[u8]) -> bool {
        debug_assert_eq!(page.len(), IMAGE_PAGE);
        if is_zero(page) {
            return false;
        }
        self.sha.update(offset.to_le_bytes());
        self.sha.update(page);
        self.pages += 1;
        true
    }

    pub fn finish(self) -> (String, u64) {
        (hex(&self.sha.finalize()), self.pages)
    }
}

/// Data segments `[start, end)` of `file` within `[0, len)`, found with SEEK_DATA/SEEK_HOLE. Filesystems
/// without hole support report one segment covering everything, which is still correct.
pub fn data_segments(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut segments = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on an fd we borrow; it does not touch memory.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            if err.raw_os_error() == Some(libc::EINVAL) {
                // SEEK_DATA unsupported: treat the rest as data.
                segments.push((pos, len));
                break;
            }
            return Err(err);
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = (hole as u64).min(len);
        segments.push((data, end));
        pos = end;
    }
    Ok(segments)
}

/// Reads exactly `buf.len()` bytes at `offset`; a short file is an UnexpectedEof error.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// Random lowercase hex string of `n` bytes of entropy, for temporary names.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: getrandom writes at most n - filled bytes into our buffer.
        let rc = unsafe {
            libc::getrandom(
                buf[filled..].as_mut_ptr() as *mut libc::c_void,
                n - filled,
                0,
            )
        };
        if rc <= 0 {
            // getrandom cannot fail on a kernel that has it; fall back to time and pid to stay unique.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let seed = sha2::Sha256::digest(format!("{t}-{}", std::process::id()));
            buf[filled..].copy_from_slice(&seed[..n - filled]);
            break;
        }
        filled += rc as usize;
    }
    hex(&buf)
}

/// fsyncs a directory so renames and new entries in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Renames `from` to `to`, failing with AlreadyExists instead of replacing `to`. Uses renameat2
/// RENAME_NOREPLACE; where the filesystem lacks it (older NFS), falls back to rename(2), which still
/// refuses to replace a non-empty directory.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cfrom = CString::new(from.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let cto = CString::new(to.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if to.exists() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            std::fs::rename(from, to)
        }
        Some(libc::ENOTEMPTY) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; IMAGE_PAGE + 3];
        assert!(is_zero(&page[1..]));
        page[IMAGE_PAGE + 2] = 1;
        assert!(!is_zero(&page[1..]));
    }

    #[test]
    fn region_digest_ignores_zero_pages_but_not_positions() {
        let zero = vec![0u8; IMAGE_PAGE];
        let mut data = vec![0u8; IMAGE_PAGE];
        data[7] = 9;
        let mut a = RegionHasher::new(3 * IMAGE_PAGE as u64);
        a.page(0, &zero);
        a.page(4096, &data);
        let mut b = RegionHasher::new(3 * IMAGE_PAGE as u64);
        b.page(4096, &data);
        let mut c = RegionHasher::new(3 * IMAGE_PAGE as u64);
        c.page(8192, &data);
        let (da, pa) = a.finish();
        let (db, _) = b.finish();
        let (dc, _) = c.finish();
        assert_eq!(pa, 1);
        assert_eq!(da, db);
        assert_ne!(da, dc);
    }

    #[test]
    fn random_names_differ() {
        assert_ne!(random_hex(8), random_hex(8));
        assert_eq!(random_hex(8).len(), 16);
    }
}
