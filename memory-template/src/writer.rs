//! Writing a template directory atomically: everything goes into `<parent>/.tmp-<name>-<random>`, which
//! `finish` fsyncs and renames to `<parent>/<name>`. A writer dropped before `finish` (any error on the way)
//! removes its temporary directory, so no partial template is ever visible under its final name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::format::{
    self, FileDigest, Manifest, ManifestDraft, RegionImage, TemplateError, FORMAT_VERSION,
    MANIFEST_FILE, MANIFEST_SUM_FILE, STATE_FILE, WORKING_SET_FILE,
};
use crate::util::{self, RegionHasher, IMAGE_PAGE};

/// Largest single pwrite of a run of non-zero pages.
const MAX_RUN: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("I/O error on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "invalid template name {0:?}: use letters, digits, '.', '_' and '-', not starting with '.'"
    )]
    InvalidName(String),
    #[error("{} already exists", path.display())]
    Exists { path: PathBuf },
    #[error("region at guest {guest_addr:#x} is not page aligned (host {host:#x}, {len} bytes)")]
    Unaligned {
        guest_addr: u64,
        host: usize,
        len: usize,
    },
    #[error("{0} was already written")]
    Twice(&'static str),
    #[error("the template has no {0}")]
    Incomplete(&'static str),
    #[error("the manifest would be invalid")]
    Manifest(#[source] TemplateError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WriterError + '_ {
    move |source| WriterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Template and store names: a plain, portable file name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Builds one template directory. See the module documentation for the atomicity guarantee.
#[derive(Debug)]
pub struct TemplateWriter {
    tmp: PathBuf,
    final_path: PathBuf,
    parent: PathBuf,
    regions: Vec<RegionImage>,
    state: Option<FileDigest>,
    working_set: Option<FileDigest>,
    durable: bool,
    finished: bool,
}

impl TemplateWriter {
    /// Starts a template that `finish` will publish as `<parent>/<name>`; creates `parent` if needed.
    pub fn create(parent: &Path, name: &str) -> Result<Self, WriterError> {
        if !valid_name(name) {
            return Err(WriterError::InvalidName(name.to_string()));
        }
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        let final_path = parent.join(name);
        if final_path.exists() {
            return Err(WriterError::Exists { path: final_path });
        }
        let tmp = parent.join(format!(".tmp-{name}-{}", util::random_hex(8)));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        Ok(TemplateWriter {
            tmp,
            final_path,
            parent: parent.to_path_buf(),
            regions: Vec::new(),
            state: None,
            working_set: None,
            durable: true,
            finished: false,
        })
    }

    /// With `false`, skips the fsyncs (for tmpfs, tests and benchmarks); the rename stays atomic but a host
    /// crash may leave a template with missing data. Default: durable.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// The temporary directory being written (removed on drop unless finished).
    pub fn temp_dir(&self) -> &Path {
        &self.tmp
    }

    fn create_file(&self, name: &str) -> Result<(File, PathBuf), WriterError> {
        let path = self.tmp.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok((file, path))
    }

    fn write_whole(&self, name: &str, bytes: &[u8]) -> Result<FileDigest, WriterError> {
        let (file, path) = self.create_file(name)?;
        file.write_all_at(bytes, 0).map_err(io_err(&path))?;
        if self.durable {
            file.sync_all().map_err(io_err(&path))?;
        }
        Ok(format::file_digest(name, bytes))
    }

    /// Writes a guest RAM region from the live mapping `host` (`len` bytes) as `mem-<i>.img`. Zero pages,
    /// and pages of an anonymous private mapping that were never touched (nor swapped out), become holes;
    /// the file is exactly `len` bytes so it can be mapped 1:1 over the region. Returns the manifest entry,
    /// whose digest is over the logical contents.
    ///
    /// # Safety
    /// `[host, host + len)` must be mapped and readable, and nothing may write to it during the call (the
    /// VM is paused and its devices quiesced).
    pub unsafe fn write_region(
        &mut self,
        guest_addr: u64,
        host: *const u8,
        len: usize,
    ) -> Result<RegionImage, WriterError> {
        let page = util::host_page_size().max(IMAGE_PAGE);
        if len == 0
            || !len.is_multiple_of(page)
            || !(host as usize).is_multiple_of(page)
            || !guest_addr.is_multiple_of(page as u64)
        {
            return Err(WriterError::Unaligned {
                guest_addr,
                host: host as usize,
                len,
            });
        }
        let name = format!("mem-{}.img", self.regions.len());
        let (file, path) = self.create_file(&name)?;
        file.set_len(len as u64).map_err(io_err(&path))?;
        let untouched = untouched_pages(host as usize, len, page);

        let mut hasher = RegionHasher::new(len as u64);
        // A pending run of non-zero bytes [run_start, run_end) still to be written.
        let mut run: Option<(usize, usize)> = None;
        let flush = |run: (usize, usize)| -> Result<(), WriterError> {
            // SAFETY: the run lies inside the caller-guaranteed readable range.
            let bytes = unsafe { std::slice::from_raw_parts(host.add(run.0), run.1 - run.0) };
            file.write_all_at(bytes, run.0 as u64)
                .map_err(io_err(&path))
        };
        let pages = len / page;
        for p in 0..pages {
            let off = p * page;
            let skip = untouched.as_ref().is_some_and(|u| u[p]);
            let mut data = false;
            if !skip {
                // SAFETY: inside the caller-guaranteed readable range, not written concurrently.
                let bytes = unsafe { std::slice::from_raw_parts(host.add(off), page) };
                for (i, sub) in bytes.chunks_exact(IMAGE_PAGE).enumerate() {
                    data |= hasher.page((off + i * IMAGE_PAGE) as u64, sub);
                }
            }
            run = match (run, data) {
                (Some((s, e)), true) if e == off && e - s < MAX_RUN => Some((s, off + page)),
                (Some(r), true) => {
                    flush(r)?;
                    Some((off, off + page))
                }
                (None, true) => Some((off, off + page)),
                (Some(r), false) => {
                    flush(r)?;
                    None
                }
                (None, false) => None,
            };
        }
        if let Some(r) = run {
            flush(r)?;
        }
        if self.durable {
            file.sync_all().map_err(io_err(&path))?;
        }
        let (digest, data_pages) = hasher.finish();
        let image = RegionImage {
            guest_addr,
            size: len as u64,
            file: name,
            data_pages,
            digest,
        };
        self.regions.push(image.clone());
        Ok(image)
    }

    /// Writes the VMM's serialized state (`state.json`).
    pub fn write_state(&mut self, bytes: &[u8]) -> Result<FileDigest, WriterError> {
        if self.state.is_some() {
            return Err(WriterError::Twice("state"));
        }
        let digest = self.write_whole(STATE_FILE, bytes)?;
        self.state = Some(digest.clone());
        Ok(digest)
    }

    /// Writes the working set: guest physical addresses of pages (rounded down to 4 KiB, sorted, deduped).
    pub fn write_working_set(&mut self, pages: &[u64]) -> Result<FileDigest, WriterError> {
        if self.working_set.is_some() {
            return Err(WriterError::Twice("working set"));
        }
        let mut sorted: Vec<u64> = pages.iter().map(|p| p & !(IMAGE_PAGE as u64 - 1)).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let bytes: Vec<u8> = sorted.iter().flat_map(|p| p.to_le_bytes()).collect();
        let digest = self.write_whole(WORKING_SET_FILE, &bytes)?;
        self.working_set = Some(digest.clone());
        Ok(digest)
    }

    /// Writes the manifest and its checksum, fsyncs, and renames the directory to its final name.
    pub fn finish(mut self, draft: ManifestDraft) -> Result<PathBuf, WriterError> {
        let state = self.state.clone().ok_or(WriterError::Incomplete("state"))?;
        if self.regions.is_empty() {
            return Err(WriterError::Incomplete("memory region"));
        }
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            created_unix_ms,
            trenv_version: draft.trenv_version,
            vm_config: draft.vm_config,
            fingerprint: draft.fingerprint,
            regions: self.regions.clone(),
            state,
            working_set: self.working_set.clone(),
            extra: draft.extra,
        };
        manifest.validate().map_err(WriterError::Manifest)?;
        let mut json = serde_json::to_vec_pretty(&manifest).map_err(|e| WriterError::Io {
            path: self.tmp.join(MANIFEST_FILE),
            source: io::Error::other(e),
        })?;
        json.push(b'\n');
        self.write_whole(MANIFEST_FILE, &json)?;
        let sum = format!("{}\n", util::sha256_hex(&json));
        self.write_whole(MANIFEST_SUM_FILE, sum.as_bytes())?;
        if self.durable {
            util::fsync_dir(&self.tmp).map_err(io_err(&self.tmp))?;
        }
        util::rename_noreplace(&self.tmp, &self.final_path).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                WriterError::Exists {
                    path: self.final_path.clone(),
                }
            } else {
                WriterError::Io {
                    path: self.final_path.clone(),
                    source,
                }
            }
        })?;
        self.finished = true;
        if self.durable {
            util::fsync_dir(&self.parent).map_err(io_err(&self.parent))?;
        }
        Ok(self.final_path.clone())
    }
}

impl Drop for TemplateWriter {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                log::warn!(
                    "cannot remove unfinished template {}: {e}",
                    self.tmp.display()
                );
            }
        }
    }
}

/// For each `page`-sized page of `[host, host + len)`: true when it is known to read as zero without
/// looking, i.e. it lies in an anonymous private mapping and is neither present nor swapped out
/// (/proc/self/pagemap). Pages of file or shared mappings are never skipped: their contents live in the
/// file even when not resident. None when the information is unavailable (then every page is read).
fn untouched_pages(host: usize, len: usize, page: usize) -> Option<Vec<bool>> {
    let anon = anonymous_private_ranges(host, host + len)?;
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let pages = len / page;
    let mut entries = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut entries, (host / page * 8) as u64)
        .ok()?;
    let mut out = vec![false; pages];
    for (p, slot) in out.iter_mut().enumerate() {
        let addr = host + p * page;
        if !anon.iter().any(|&(s, e)| addr >= s && addr + page <= e) {
            continue;
        }
        let e = u64::from_le_bytes(entries[p * 8..p * 8 + 8].try_into().ok()?);
        let present = e & (1 << 63) != 0;
        let swapped = e & (1 << 62) != 0;
        *slot = !present && !swapped;
    }
    Some(out)
}

/// The parts of `[start, end)` covered by anonymous private mappings, from /proc/self/smaps. Ranges
/// registered with a userfaultfd for missing faults (VmFlags "um": an on-demand restored VM) are left out:
/// their missing pages are not zero but not fetched yet, and reading them makes the handler fetch them.
fn anonymous_private_ranges(start: usize, end: usize) -> Option<Vec<(usize, usize)>> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut out = Vec::new();
    // The VMA whose counter lines are being read: its overlap with [start, end) if anonymous and private.
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(range) = current.take() {
                if !flags.split_whitespace().any(|f| f == "um") {
                    out.push(range);
                }
            }
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some((s, e)) = fields.next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) else {
            continue;
        };
        let perms = fields.next().unwrap_or("");
        let _offset = fields.next();
        let _dev = fields.next();
        let inode = fields.next().unwrap_or("");
        let path = fields.next().unwrap_or("");
        let private = perms.as_bytes().get(3) == Some(&b'p');
        let anonymous = inode == "0" && (path.is_empty() || path.starts_with("[anon"));
        current =
            (e > start && s < end && private && anonymous).then(|| (s.max(start), e.min(end)));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{read_manifest, verify_images_full, verify_images_quick, verify_state};
    use crate::test_util::{anon_region, scratch_dir};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn names() {
        assert!(valid_name("fn-python_3.12"));
        assert!(!valid_name(".tmp-x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }

    #[test]
    fn round_trip_is_sparse_and_stable() {
        let dir = scratch_dir("writer-rt");
        let len = 8 << 20;
        let mem = anon_region(len);
        // A few non-zero pages, one page touched but zero (must become a hole too).
        mem.write(0, b"first page");
        mem.write(3 * 4096 + 100, b"fourth");
        mem.write(len - 1, b"z");
        mem.write(20 * 4096, &[0u8; 16]);

        let mut digests = Vec::new();
        for name in ["a", "b"] {
            let mut w = TemplateWriter::create(&dir, name).unwrap();
            w.set_durable(false);
            // SAFETY: the test owns the mapping and does not write it during the call.
            let region = unsafe { w.write_region(0x10_0000, mem.ptr, len) }.unwrap();
            assert_eq!(region.data_pages, 3);
            w.write_state(b"{\"vcpus\":[]}").unwrap();
            w.write_working_set(&[0x10_3000, 0x10_0000, 0x10_0010])
                .unwrap();
            let path = w.finish(ManifestDraft::default()).unwrap();
            assert_eq!(path, dir.join(name));
            digests.push(region.digest);
        }
        assert_eq!(digests[0], digests[1]);

        let t = dir.join("a");
        let m = read_manifest(&t).unwrap();
        let meta = std::fs::metadata(t.join("mem-0.img")).unwrap();
        assert_eq!(meta.len(), len as u64);
        // 3 data pages; allow filesystem metadata/preallocation slack but far below the 8 MiB logical size.
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let mut contents = vec![0u8; len];
        File::open(t.join("mem-0.img"))
            .unwrap()
            .read_exact_at(&mut contents, 0)
            .unwrap();
        assert_eq!(&contents[..10], b"first page");
        assert_eq!(&contents[3 * 4096 + 100..3 * 4096 + 106], b"fourth");
        assert_eq!(contents[len - 1], b'z');
        assert_eq!(verify_state(&t, &m).unwrap(), b"{\"vcpus\":[]}");
        verify_images_quick(&t, &m).unwrap();
        verify_images_full(&t, &m).unwrap();
        let ws = crate::format::read_working_set(&t, &m).unwrap().unwrap();
        assert_eq!(ws, vec![0x10_0000, 0x10_3000]);
        assert!(!std::fs::read_dir(&dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp")));
    }

    #[test]
    fn file_backed_pages_are_read_even_when_not_resident() {
        let dir = scratch_dir("writer-file");
        let src = dir.join("src.img");
        let len = 1 << 20;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src)
            .unwrap();
        f.set_len(len as u64).unwrap();
        f.write_all_at(b"from the file", 5 * 4096).unwrap();
        // A private file mapping never touched: its pages are not present in this process.
        // SAFETY: a fresh mapping, unmapped at the end of the test.
        let ptr = unsafe { crate::image::map_cow(&f, len, None) }.unwrap();
        let mut w = TemplateWriter::create(&dir, "t").unwrap();
        w.set_durable(false);
        // SAFETY: mapped above, nobody writes it.
        let r = unsafe { w.write_region(0, ptr, len) }.unwrap();
        assert_eq!(r.data_pages, 1);
        // SAFETY: mapping created above and no longer used.
        unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
    }

    #[test]
    fn on_demand_pages_not_yet_fetched_are_read() {
        use crate::uffd::OnDemandServer;
        let dir = scratch_dir("writer-uffd");
        let len = 1 << 20;
        let src = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("src.img"))
            .unwrap();
        src.set_len(len as u64).unwrap();
        src.write_all_at(b"not fetched yet", 9 * 4096).unwrap();
        let mem = anon_region(len);
        let _server = OnDemandServer::start(src, vec![(mem.ptr, len, 0)], None).unwrap();
        let mut w = TemplateWriter::create(&dir, "t").unwrap();
        w.set_durable(false);
        // SAFETY: mapped by the test and served by the handler; nobody writes it.
        let r = unsafe { w.write_region(0, mem.ptr, len) }.unwrap();
        assert_eq!(r.data_pages, 1);
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = scratch_dir("writer-fail");
        let mem = anon_region(4096 * 4);
        {
            let mut w = TemplateWriter::create(&dir, "t").unwrap();
            w.write_state(b"x").unwrap();
            // SAFETY: mapped by the test; the length is deliberately unaligned and rejected.
            let err = unsafe { w.write_region(0, mem.ptr, 4096 + 1) }.unwrap_err();
            assert!(matches!(err, WriterError::Unaligned { .. }));
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

        // finish refusing an existing name also removes the temporary directory.
        std::fs::create_dir(dir.join("t")).unwrap();
        std::fs::write(dir.join("t/other"), b"keep").unwrap();
        let mut w = TemplateWriter::create(&dir, "u").unwrap();
        w.final_path = dir.join("t");
        w.write_state(b"x").unwrap();
        // SAFETY: as above.
        unsafe { w.write_region(0, mem.ptr, 4096) }.unwrap();
        assert!(matches!(
            w.finish(ManifestDraft::default()),
            Err(WriterError::Exists { .. })
        ));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("t")]);
        assert_eq!(std::fs::read(dir.join("t/other")).unwrap(), b"keep");

        // finish without state is refused and leaves nothing.
        let w = TemplateWriter::create(&dir, "v").unwrap();
        assert!(matches!(
            w.finish(ManifestDraft::default()),
            Err(WriterError::Incomplete("state"))
        ));
        assert!(!dir.join("v").exists());
    }

    #[test]
    fn manifest_errors_are_specific() {
        let dir = scratch_dir("writer-errors");
        let mem = anon_region(1 << 20);
        mem.write(4096, b"data");
        let make = |name: &str| {
            let mut w = TemplateWriter::create(&dir, name).unwrap();
            w.set_durable(false);
            w.write_state(b"state bytes").unwrap();
            // SAFETY: mapped by the test, not written during the call.
            unsafe { w.write_region(0, mem.ptr, 1 << 20) }.unwrap();
            w.finish(ManifestDraft::default()).unwrap()
        };

        let t = make("missing");
        std::fs::remove_file(t.join(MANIFEST_FILE)).unwrap();
        let e = read_manifest(&t).unwrap_err();
        assert!(matches!(e, TemplateError::ManifestMissing { .. }), "{e}");

        let t = make("corrupt");
        std::fs::write(t.join(MANIFEST_FILE), b"{ not json").unwrap();
        let sum = util::sha256_hex(b"{ not json");
        std::fs::write(t.join(MANIFEST_SUM_FILE), sum).unwrap();
        let e = read_manifest(&t).unwrap_err();
        assert!(matches!(e, TemplateError::CorruptManifest { .. }), "{e}");

        let t = make("flipped");
        let mut bytes = std::fs::read(t.join(MANIFEST_FILE)).unwrap();
        let pos = bytes
            .windows(4)
            .position(|w| w == b"\"mem")
            .expect("region file name")
            + 4;
        bytes[pos] ^= 0x01; // "mem" -> "mel": still valid JSON
        std::fs::write(t.join(MANIFEST_FILE), &bytes).unwrap();
        let e = read_manifest(&t).unwrap_err();
        assert!(matches!(e, TemplateError::ManifestChecksum { .. }), "{e}");

        let t = make("newer");
        let text = std::fs::read_to_string(t.join(MANIFEST_FILE)).unwrap();
        let text = text.replace("\"format_version\": 1", "\"format_version\": 2");
        std::fs::write(t.join(MANIFEST_FILE), &text).unwrap();
        let e = read_manifest(&t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "template format v2 is newer than this trenv supports (v1)"
        );

        let t = make("truncated");
        let m = read_manifest(&t).unwrap();
        let img = OpenOptions::new()
            .write(true)
            .open(t.join("mem-0.img"))
            .unwrap();
        img.set_len((1 << 20) - 4096).unwrap();
        let e = verify_images_quick(&t, &m).unwrap_err();
        assert!(matches!(e, TemplateError::SizeMismatch { .. }), "{e}");
        std::fs::remove_file(t.join("mem-0.img")).unwrap();
        let e = verify_images_quick(&t, &m).unwrap_err();
        assert!(matches!(e, TemplateError::FileMissing { .. }), "{e}");

        let t = make("state");
        let m = read_manifest(&t).unwrap();
        let mut state = std::fs::read(t.join(STATE_FILE)).unwrap();
        state[3] ^= 0x20;
        std::fs::write(t.join(STATE_FILE), &state).unwrap();
        let e = verify_state(&t, &m).unwrap_err();
        assert!(matches!(e, TemplateError::DigestMismatch { .. }), "{e}");

        let t = make("image-bytes");
        let m = read_manifest(&t).unwrap();
        let img = OpenOptions::new()
            .write(true)
            .open(t.join("mem-0.img"))
            .unwrap();
        img.write_all_at(b"X", 4096).unwrap();
        verify_images_quick(&t, &m).unwrap();
        let e = verify_images_full(&t, &m).unwrap_err();
        assert!(matches!(e, TemplateError::DigestMismatch { .. }), "{e}");
    }
}
