//! Helpers for the unit tests.

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A fresh, empty directory for one test under the system temp dir, removed on drop (open files in it
/// stay usable: unlinking does not revoke them).
pub struct ScratchDir(PathBuf);

impl Deref for ScratchDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn scratch_dir(name: &str) -> ScratchDir {
    let dir = std::env::temp_dir().join(format!(
        "trenv-mt-{name}-{}-{}",
        std::process::id(),
        crate::util::random_hex(4)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    ScratchDir(dir)
}

/// An anonymous private mapping owned by a test.
pub struct AnonRegion {
    pub ptr: *mut u8,
    pub len: usize,
}

pub fn anon_region(len: usize) -> AnonRegion {
    // SAFETY: a fresh anonymous mapping; checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    AnonRegion {
        ptr: ptr as *mut u8,
        len,
    }
}

impl AnonRegion {
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: within the mapping this struct owns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
    }
}

impl Drop for AnonRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by anon_region and is not used after drop.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}
