//! The host side of a pmem device: the file, checked and mapped (see the crate doc for the mapping modes).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::SIZE_ALIGNMENT;

/// What a pmem device is made from (the API's `PmemConfig` maps onto this).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PmemSpec {
    pub id: String,
    pub file: PathBuf,
    /// Bytes to map from the start of the file; the file's size when `None`.
    pub size: Option<u64>,
    /// Guest writes go to private copy-on-write pages instead of the file.
    pub discard_writes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("cannot open pmem file {} ({mode})", path.display())]
    Open {
        path: PathBuf,
        mode: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pmem file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("pmem {}: size is 0 (an empty file needs an explicit size, and the file must hold it)", path.display())]
    Empty { path: PathBuf },
    #[error(
        "pmem {}: size {size} is not a multiple of 2 MiB (Linux maps pmem for DAX in 2 MiB pages)",
        path.display()
    )]
    Unaligned { path: PathBuf, size: u64 },
    #[error("pmem file {} is {file_len} bytes, shorter than the requested size {size}", path.display())]
    TooShort {
        path: PathBuf,
        file_len: u64,
        size: u64,
    },
    #[error("cannot map pmem file {} ({size} bytes)", path.display())]
    Map {
        path: PathBuf,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pmem file {} shrank from {mapped} to {now} bytes while mapped: the guest's accesses past its end cannot be served",
        path.display()
    )]
    Shrunk {
        path: PathBuf,
        mapped: u64,
        now: u64,
    },
    #[error("cannot check pmem file {}", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A file mapped for a guest. The VMM never dereferences the mapping: the guest reaches it through its own
/// KVM memslot, so nothing in this process can fault on it.
#[derive(Debug)]
pub struct PmemBacking {
    id: String,
    path: PathBuf,
    file: File,
    host_addr: u64,
    size: u64,
    discard_writes: bool,
}

// SAFETY: the mapping's address is only handed to KVM and to smaps lookups; the file is a plain descriptor.
unsafe impl Send for PmemBacking {}
// SAFETY: as above; `flush` and `check_file` are system calls on the descriptor.
unsafe impl Sync for PmemBacking {}

impl PmemBacking {
    /// Opens, checks and maps `spec.file`.
    pub fn open(spec: &PmemSpec) -> Result<Self, PmemError> {
        let path = spec.file.clone();
        // A discarded-writes image may be read-only on the host: open it so, and never write through it.
        let mode = if spec.discard_writes {
            "read-only"
        } else {
            "read-write"
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!spec.discard_writes)
            .open(&path)
            .map_err(|source| PmemError::Open {
                path: path.clone(),
                mode,
                source,
            })?;
        let meta = file.metadata().map_err(|source| PmemError::Stat {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(PmemError::NotAFile { path });
        }
        let file_len = meta.len();
        let size = check_size(&path, spec.size, file_len)?;
        let len = usize::try_from(size).map_err(|_| PmemError::Map {
            path: path.clone(),
            size,
            source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
        })?;
        let flags = if spec.discard_writes {
            // No swap reservation for the whole image: only pages the guest writes get copied.
            libc::MAP_PRIVATE | libc::MAP_NORESERVE
        } else {
            libc::MAP_SHARED
        };
        // SAFETY: a new mapping chosen by the kernel (no fixed address), of a descriptor we own; the result
        // is checked and owned by the returned value, which unmaps it on drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(PmemError::Map {
                path,
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        log::info!(
            "pmem {}: {} mapped {} ({} MiB at {addr:p})",
            spec.id,
            path.display(),
            if spec.discard_writes {
                "private, writes discarded"
            } else {
                "shared, writes kept"
            },
            size >> 20
        );
        Ok(Self {
            id: spec.id.clone(),
            path,
            file,
            host_addr: addr as u64,
            size,
            discard_writes: spec.discard_writes,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Host virtual address of the mapping (for the KVM memslot and smaps lookups).
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn discard_writes(&self) -> bool {
        self.discard_writes
    }

    /// Makes the guest's writes durable. A shared mapping *is* the page cache, so `fsync` covers what
    /// the guest stored; with discarded writes there is nothing to persist.
    pub fn flush(&self) -> std::io::Result<()> {
        if self.discard_writes {
            return Ok(());
        }
        self.file.sync_all()
    }

    /// Fails if the file is now shorter than the mapping (the cause of a guest access that KVM cannot
    /// serve).
    pub fn check_file(&self) -> Result<(), PmemError> {
        let now = self
            .file
            .metadata()
            .map_err(|source| PmemError::Stat {
                path: self.path.clone(),
                source,
            })?
            .len();
        if now < self.size {
            return Err(PmemError::Shrunk {
                path: self.path.clone(),
                mapped: self.size,
                now,
            });
        }
        Ok(())
    }

    /// The file's current length.
    pub fn file_len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

impl Drop for PmemBacking {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, of this size, unmapped once. A VM still holding a memslot on
        // it faults into KVM (EFAULT), not into freed host memory.
        unsafe { libc::munmap(self.host_addr as *mut libc::c_void, self.size as usize) };
    }
}

/// The size to map: `requested` or the whole file, a non-zero multiple of 2 MiB the file can hold.
fn check_size(path: &Path, requested: Option<u64>, file_len: u64) -> Result<u64, PmemError> {
    let size = requested.unwrap_or(file_len);
    if size == 0 {
        return Err(PmemError::Empty {
            path: path.to_path_buf(),
        });
    }
    if !size.is_multiple_of(SIZE_ALIGNMENT) {
        return Err(PmemError::Unaligned {
            path: path.to_path_buf(),
            size,
        });
    }
    if file_len < size {
        return Err(PmemError::TooShort {
            path: path.to_path_buf(),
            file_len,
            size,
        });
    }
    Ok(size)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p =
                std::env::temp_dir().join(format!("trenv-pmem-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        /// A file of `len` bytes whose u64 word at offset `o` is `o`.
        pub fn image(&self, name: &str, len: u64) -> PathBuf {
            let path = self.0.join(name);
            let mut f = File::create(&path).unwrap();
            let bytes: Vec<u8> = (0..len / 8).flat_map(|i| (i * 8).to_le_bytes()).collect();
            f.write_all(&bytes).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub fn spec(file: &Path, size: Option<u64>, discard_writes: bool) -> PmemSpec {
        PmemSpec {
            id: "p0".into(),
            file: file.to_path_buf(),
            size,
            discard_writes,
        }
    }

    fn word(b: &PmemBacking, offset: u64) -> u64 {
        // SAFETY: test only: the mapping is live and `offset` is inside it.
        unsafe { ((b.host_addr() + offset) as *const u64).read_volatile() }
    }

    fn write_word(b: &PmemBacking, offset: u64, v: u64) {
        // SAFETY: as above; the mapping is writable.
        unsafe { ((b.host_addr() + offset) as *mut u64).write_volatile(v) }
    }

    fn file_word(path: &Path, offset: u64) -> u64 {
        let bytes = std::fs::read(path).unwrap();
        u64::from_le_bytes(
            bytes[offset as usize..offset as usize + 8]
                .try_into()
                .unwrap(),
        )
    }

    const MIB2: u64 = 2 << 20;

    #[test]
    fn maps_the_file_with_its_size_by_default() {
        let dir = TempDir::new();
        let path = dir.image("img", 2 * MIB2);
        let b = PmemBacking::open(&spec(&path, None, true)).unwrap();
        assert_eq!(b.size(), 2 * MIB2);
        assert_eq!(word(&b, 0x1238), 0x1238);
        assert_eq!(word(&b, 2 * MIB2 - 8), 2 * MIB2 - 8);
        // A prefix of a longer file is fine.
        let b = PmemBacking::open(&spec(&path, Some(MIB2), false)).unwrap();
        assert_eq!(b.size(), MIB2);
    }

    #[test]
    fn discarded_writes_stay_private_and_kept_writes_reach_the_file() {
        let dir = TempDir::new();
        let path = dir.image("img", MIB2);
        let a = PmemBacking::open(&spec(&path, None, true)).unwrap();
        let b = PmemBacking::open(&spec(&path, None, true)).unwrap();
        write_word(&a, 64, 0xdead);
        assert_eq!(word(&a, 64), 0xdead);
        assert_eq!(word(&b, 64), 64, "another mapping does not see it");
        a.flush().unwrap();
        assert_eq!(file_word(&path, 64), 64, "the file does not see it");

        let shared = PmemBacking::open(&spec(&path, None, false)).unwrap();
        write_word(&shared, 128, 0xbeef);
        shared.flush().unwrap();
        assert_eq!(file_word(&path, 128), 0xbeef);
        assert_eq!(word(&b, 128), 0xbeef, "clean private pages follow the file");
    }

    #[test]
    fn read_only_files_work_with_discarded_writes_only() {
        let dir = TempDir::new();
        let path = dir.image("ro", MIB2);
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&path, perms).unwrap();
        let b = PmemBacking::open(&spec(&path, None, true)).unwrap();
        write_word(&b, 0, 7);
        assert_eq!(file_word(&path, 0), 0);
        // root ignores file modes; elsewhere a read-write open must fail clearly.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let e = PmemBacking::open(&spec(&path, None, false)).unwrap_err();
            assert!(
                matches!(
                    e,
                    PmemError::Open {
                        mode: "read-write",
                        ..
                    }
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_files_and_sizes_give_clear_errors() {
        let dir = TempDir::new();
        let path = dir.image("img", MIB2);
        let msg = |e: PmemError| e.to_string();

        let e = PmemBacking::open(&spec(&dir.0.join("missing"), None, true)).unwrap_err();
        assert!(matches!(e, PmemError::Open { .. }));
        assert!(msg(e).contains("missing"));

        let e = PmemBacking::open(&spec(&path, Some(2 * MIB2), true)).unwrap_err();
        assert!(
            matches!(e, PmemError::TooShort { file_len, size, .. } if file_len == MIB2 && size == 2 * MIB2)
        );

        let e = PmemBacking::open(&spec(&path, Some(MIB2 - 4096), true)).unwrap_err();
        assert!(msg(e).contains("not a multiple of 2 MiB"));

        let odd = dir.image("odd", MIB2 + 4096);
        assert!(matches!(
            PmemBacking::open(&spec(&odd, None, true)),
            Err(PmemError::Unaligned { .. })
        ));

        let empty = dir.image("empty", 0);
        assert!(matches!(
            PmemBacking::open(&spec(&empty, None, true)),
            Err(PmemError::Empty { .. })
        ));

        assert!(matches!(
            PmemBacking::open(&spec(&dir.0, None, true)),
            Err(PmemError::NotAFile { .. }) | Err(PmemError::Open { .. })
        ));
    }

    #[test]
    fn notices_a_file_that_shrank() {
        let dir = TempDir::new();
        let path = dir.image("img", MIB2);
        let b = PmemBacking::open(&spec(&path, None, false)).unwrap();
        b.check_file().unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let e = b.check_file().unwrap_err();
        assert!(
            matches!(e, PmemError::Shrunk { mapped, now, .. } if mapped == MIB2 && now == 4096)
        );
        assert!(e.to_string().contains("shrank"));
        assert_eq!(b.file_len().unwrap(), 4096);
    }
}
