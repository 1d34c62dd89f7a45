//! Helpers for the unit tests.

use std::path::PathBuf;

/// A fresh, empty directory for one test (under the system temp dir; removed when the test passes).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "trenv-mt-{name}-{}-{}",
        std::process::id(),
        crate::util::random_hex(4)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
