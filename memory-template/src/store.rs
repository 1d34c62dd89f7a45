//! A content-addressed store of immutable templates, safe to share between hosts through a shared
//! filesystem (NFS, a DAX/CXL filesystem, a tmpfs shared between containers).
//!
//! ```text
//! <root>/objects/<digest>/   template directories (see the crate documentation), never written again
//! <root>/names/<name>        "<digest>\n", replaced atomically by temp file + rename
//! <root>/staging/            where TemplateWriters write before publishing (same filesystem: rename)
//! ```
//!
//! * Publishing renames a finished template into `objects/<content digest>` (or copies it, holes kept,
//!   into a temporary name and renames that, when staging is on another filesystem); if the object exists
//!   already the staged copy is discarded, so identical templates are stored once. Concurrent publishers
//!   of one digest race on a no-replace rename: one wins, the others discard their copies.
//! * Readers take no locks: objects appear complete (rename) and never change; names change atomically.
//! * Instances hold a shared flock on `objects/<d>/manifest.json` (`lock_shared`) while they map the
//!   template. `remove` refuses to delete an object while such a lock exists unless forced; forced
//!   removal only unlinks: mappings of running instances stay valid.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::format::{self, Manifest, TemplateError, MANIFEST_FILE};
use crate::util;
use crate::writer::{valid_name, TemplateWriter, WriterError};

/// Default store location when TRENV_STORE_DIR is not set.
pub const DEFAULT_ROOT: &str = "/var/lib/trenv/templates";
/// Environment variable overriding the store location.
pub const STORE_DIR_ENV: &str = "TRENV_STORE_DIR";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
    #[error("no template named {0:?} in the store")]
    NotFound(String),
    #[error(
        "template {name:?} ({digest}) is in use by running instances; stop them or force removal"
    )]
    InUse { name: String, digest: String },
    #[error("name {name:?} points to {digest}, which is missing from the store")]
    Dangling { name: String, digest: String },
    #[error("store object {digest} holds a template whose content digest is {actual}")]
    Corrupt { digest: String, actual: String },
    #[error("invalid template")]
    Template(#[from] TemplateError),
    #[error("cannot stage the template")]
    Writer(#[from] WriterError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A template found in the store.
#[derive(Debug, Clone)]
pub struct PublishedTemplate {
    /// The name it was resolved through (None when resolved by digest).
    pub name: Option<String>,
    pub digest: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// One line of `template list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateSummary {
    pub name: String,
    pub digest: String,
    pub created_unix_ms: u64,
    pub memory_bytes: u64,
    pub data_bytes: u64,
    pub in_use: bool,
}

/// A shared lock on a template, held by an instance that maps it; released on drop.
#[derive(Debug)]
pub struct TemplateLease {
    _file: File,
    digest: String,
}

impl TemplateLease {
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

#[derive(Debug, Clone)]
pub struct TemplateStore {
    root: PathBuf,
}

fn flock(file: &File, op: i32) -> io::Result<()> {
    loop {
        // SAFETY: flock on an fd we borrow.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl TemplateStore {
    /// Opens (creating the directories if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for sub in ["objects", "names", "staging"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(TemplateStore {
            root: root.to_path_buf(),
        })
    }

    /// `$TRENV_STORE_DIR`, else /var/lib/trenv/templates.
    pub fn default_root() -> PathBuf {
        std::env::var_os(STORE_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory on the store's filesystem for writing templates before `publish` (a rename away).
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// A writer staging a template for `name` in `staging_dir()` under a unique directory name.
    pub fn create_writer(&self, name: &str) -> Result<TemplateWriter, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        let unique = format!("{name}-{}", util::random_hex(6));
        Ok(TemplateWriter::create(&self.staging_dir(), &unique)?)
    }

    fn objects(&self) -> PathBuf {
        self.root.join("objects")
    }

    fn names(&self) -> PathBuf {
        self.root.join("names")
    }

    /// Moves the finished template at `staged_dir` into the store under its content digest and points
    /// `name` at it (replacing an older target of that name). The staged directory is consumed: renamed,
    /// or deleted when the store already has the same content.
    pub fn publish(&self, staged_dir: &Path, name: &str) -> Result<PublishedTemplate, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        let manifest = format::read_manifest(staged_dir)?;
        format::verify_images_quick(staged_dir, &manifest)?;
        format::verify_state(staged_dir, &manifest)?;
        let digest = manifest.content_digest();
        let object = self.objects().join(&digest);

        if object.exists() {
            self.check_object(&digest)?;
            remove_tree(staged_dir);
        } else {
            make_read_only(staged_dir)?;
            match util::rename_noreplace(staged_dir, &object) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Another publisher won the race with identical content.
                    remove_tree(staged_dir);
                }
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    let tmp = self
                        .objects()
                        .join(format!(".tmp-{digest}-{}", util::random_hex(6)));
                    if let Err(e) = copy_tree_sparse(staged_dir, &tmp) {
                        remove_tree(&tmp);
                        return Err(e);
                    }
                    match util::rename_noreplace(&tmp, &object) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => remove_tree(&tmp),
                        Err(e) => {
                            remove_tree(&tmp);
                            return Err(io_err(&object)(e));
                        }
                    }
                    remove_tree(staged_dir);
                }
                Err(e) => return Err(io_err(&object)(e)),
            }
            util::fsync_dir(&self.objects()).map_err(io_err(&self.objects()))?;
        }
        self.write_name(name, &digest)?;
        let mut published = self.resolve(&digest)?;
        published.name = Some(name.to_string());
        Ok(published)
    }

    /// Points `name` at `digest` atomically.
    fn write_name(&self, name: &str, digest: &str) -> Result<(), StoreError> {
        let names = self.names();
        let tmp = names.join(format!(".tmp-{name}-{}", util::random_hex(6)));
        let result = (|| {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all_at(format!("{digest}\n").as_bytes(), 0)?;
            f.sync_all()?;
            std::fs::rename(&tmp, names.join(name))?;
            util::fsync_dir(&names)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io_err(&names.join(name)))
    }

    /// The digest a name points to.
    fn read_name(&self, name: &str) -> Result<String, StoreError> {
        let path = self.names().join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(name.to_string()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let digest = text.trim().to_string();
        if !util::is_sha256_hex(&digest) {
            return Err(StoreError::Io {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, "not a sha256 digest"),
            });
        }
        Ok(digest)
    }

    /// Reads an object's manifest and checks that it matches its address.
    fn check_object(&self, digest: &str) -> Result<Manifest, StoreError> {
        let dir = self.objects().join(digest);
        let manifest = format::read_manifest(&dir)?;
        let actual = manifest.content_digest();
        if actual != digest {
            return Err(StoreError::Corrupt {
                digest: digest.to_string(),
                actual,
            });
        }
        Ok(manifest)
    }

    /// Finds a template by name or by full content digest, with its (checksummed) manifest.
    pub fn resolve(&self, name_or_digest: &str) -> Result<PublishedTemplate, StoreError> {
        let (name, digest) = if util::is_sha256_hex(name_or_digest)
            && self.objects().join(name_or_digest).is_dir()
        {
            (None, name_or_digest.to_string())
        } else {
            if !valid_name(name_or_digest) {
                return Err(StoreError::InvalidName(name_or_digest.to_string()));
            }
            (
                Some(name_or_digest.to_string()),
                self.read_name(name_or_digest)?,
            )
        };
        let dir = self.objects().join(&digest);
        let manifest = match self.check_object(&digest) {
            Err(StoreError::Template(TemplateError::ManifestMissing { .. })) if !dir.exists() => {
                return Err(StoreError::Dangling {
                    name: name_or_digest.to_string(),
                    digest,
                })
            }
            other => other?,
        };
        Ok(PublishedTemplate {
            name,
            digest,
            dir,
            manifest,
        })
    }

    /// Every name in the store with its template's summary (names whose object is broken are skipped
    /// with a warning).
    pub fn list(&self) -> Result<Vec<TemplateSummary>, StoreError> {
        let mut out = Vec::new();
        for name in self.name_entries()? {
            match self.resolve(&name) {
                Ok(t) => out.push(TemplateSummary {
                    in_use: object_in_use(&t.dir),
                    name,
                    digest: t.digest,
                    created_unix_ms: t.manifest.created_unix_ms,
                    memory_bytes: t.manifest.memory_bytes(),
                    data_bytes: t.manifest.data_bytes(),
                }),
                Err(e) => log::warn!("skipping template {name:?}: {e}"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn name_entries(&self) -> Result<Vec<String>, StoreError> {
        let names = self.names();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&names).map_err(io_err(&names))? {
            let entry = entry.map_err(io_err(&names))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_name(&name) {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Removes `name` (or, given a full digest that is not a name, the object and every name of it). The
    /// object is deleted once no name points to it; while an instance holds a lease on it that is refused
    /// unless `force` (then files are only unlinked: running instances keep their mappings).
    pub fn remove(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let by_name = valid_name(name) && self.names().join(name).exists();
        let (digest, names_to_unlink) = if by_name {
            (self.read_name(name)?, vec![name.to_string()])
        } else if util::is_sha256_hex(name) && self.objects().join(name).is_dir() {
            let all = self
                .name_entries()?
                .into_iter()
                .filter(|n| self.read_name(n).ok().as_deref() == Some(name))
                .collect();
            (name.to_string(), all)
        } else if valid_name(name) || util::is_sha256_hex(name) {
            return Err(StoreError::NotFound(name.to_string()));
        } else {
            return Err(StoreError::InvalidName(name.to_string()));
        };
        let remaining = self
            .name_entries()?
            .into_iter()
            .filter(|n| !names_to_unlink.contains(n))
            .any(|n| self.read_name(&n).ok().as_deref() == Some(digest.as_str()));

        let object = self.objects().join(&digest);
        // Held until the object is gone, so no lease can start in between (lock_shared then sees the
        // manifest unlinked and fails).
        let mut exclusive = None;
        if !remaining && object.exists() {
            if let Ok(f) = File::open(object.join(MANIFEST_FILE)) {
                match flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
                    Ok(()) => exclusive = Some(f),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if !force {
                            return Err(StoreError::InUse {
                                name: name.to_string(),
                                digest,
                            });
                        }
                        log::warn!("removing template {name:?} ({digest}) while instances use it");
                    }
                    Err(e) => return Err(io_err(&object)(e)),
                }
            }
        }
        for n in &names_to_unlink {
            let path = self.names().join(n);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        util::fsync_dir(&self.names()).map_err(io_err(&self.names()))?;
        if !remaining && object.exists() {
            // Rename first so readers never see a half-deleted object under its address.
            let trash = self
                .objects()
                .join(format!(".trash-{digest}-{}", util::random_hex(6)));
            std::fs::rename(&object, &trash).map_err(io_err(&object))?;
            remove_tree(&trash);
        }
        drop(exclusive);
        Ok(())
    }

    /// Takes a shared lock marking `t` as in use; hold the lease for as long as its files are mapped.
    pub fn lock_shared(&self, t: &PublishedTemplate) -> Result<TemplateLease, StoreError> {
        let path = t.dir.join(MANIFEST_FILE);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::NotFound(t.name.clone().unwrap_or_else(|| t.digest.clone()))
            } else {
                io_err(&path)(e)
            }
        })?;
        flock(&file, libc::LOCK_SH).map_err(io_err(&path))?;
        // A remover may have deleted the object between our open and our lock.
        let held = file.metadata().map_err(io_err(&path))?;
        match std::fs::metadata(&path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
            _ => {
                return Err(StoreError::NotFound(
                    t.name.clone().unwrap_or_else(|| t.digest.clone()),
                ))
            }
        }
        Ok(TemplateLease {
            _file: file,
            digest: t.digest.clone(),
        })
    }

    /// Deletes leftovers older than `min_age`: temporary and trash directories of crashed writers or
    /// removers, unpublished staging directories, and objects no name points to that nobody uses.
    /// Returns how many entries were removed.
    pub fn collect_garbage(&self, min_age: Duration) -> Result<usize, StoreError> {
        let named: Vec<String> = self
            .name_entries()?
            .iter()
            .filter_map(|n| self.read_name(n).ok())
            .collect();
        let old = |p: &Path| {
            std::fs::symlink_metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age >= min_age)
        };
        let mut removed = 0;
        for dir in [self.objects(), self.names(), self.staging_dir()] {
            for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let leftover = name.starts_with(".tmp-") || name.starts_with(".trash-");
                let staged = dir == self.staging_dir();
                let orphan = dir == self.objects()
                    && util::is_sha256_hex(&name)
                    && !named.contains(&name)
                    && !object_in_use(&path);
                if (leftover || staged || orphan) && old(&path) {
                    if path.is_dir() {
                        remove_tree(&path);
                    } else {
                        let _ = std::fs::remove_file(&path);
                    }
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// True while some instance holds a shared lease on the object at `dir`.
fn object_in_use(dir: &Path) -> bool {
    let Ok(f) = File::open(dir.join(MANIFEST_FILE)) else {
        return false;
    };
    match flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => {
            let _ = flock(&f, libc::LOCK_UN);
            false
        }
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

fn remove_tree(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

/// Marks every file of a template read-only (an accidental writer then fails instead of corrupting it).
fn make_read_only(dir: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err(&path))?;
    }
    Ok(())
}

/// Copies a flat template directory to `dst` (which must not exist), keeping holes, and fsyncs it.
pub fn copy_tree_sparse(src: &Path, dst: &Path) -> Result<(), StoreError> {
    std::fs::create_dir(dst).map_err(io_err(dst))?;
    let mut buf = vec![0u8; 1 << 20];
    for entry in std::fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let input = File::open(&from).map_err(io_err(&from))?;
        let len = input.metadata().map_err(io_err(&from))?.len();
        let output = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&to)
            .map_err(io_err(&to))?;
        output.set_len(len).map_err(io_err(&to))?;
        for (start, end) in util::data_segments(&input, len).map_err(io_err(&from))? {
            let mut pos = start;
            while pos < end {
                let n = ((end - pos) as usize).min(buf.len());
                util::read_exact_at(&input, &mut buf[..n], pos).map_err(io_err(&from))?;
                // Zero blocks inside data segments stay holes in the copy.
                if !util::is_zero(&buf[..n]) {
                    output.write_all_at(&buf[..n], pos).map_err(io_err(&to))?;
                }
                pos += n as u64;
            }
        }
        output.sync_all().map_err(io_err(&to))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err(&to))?;
    }
    util::fsync_dir(dst).map_err(io_err(dst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ManifestDraft;
    use crate::test_util::{anon_region, scratch_dir, AnonRegion};

    fn stage(store: &TemplateStore, mem: &AnonRegion, state: &[u8]) -> PathBuf {
        let mut w = store.create_writer("t").unwrap();
        w.set_durable(false);
        // SAFETY: the test's mapping, not written during the call.
        unsafe { w.write_region(0, mem.ptr, mem.len) }.unwrap();
        w.write_state(state).unwrap();
        w.finish(ManifestDraft {
            trenv_version: "test".into(),
            vm_config: serde_json::json!({"memory": {"size": mem.len}}),
            ..Default::default()
        })
        .unwrap()
    }

    fn object_count(store: &TemplateStore) -> usize {
        std::fs::read_dir(store.objects())
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count()
    }

    #[test]
    fn identical_content_is_stored_once() {
        let dir = scratch_dir("store-dedup");
        let store = TemplateStore::open(&dir).unwrap();
        let mem = anon_region(1 << 20);
        mem.write(8192, b"heap");
        let a = store.publish(&stage(&store, &mem, b"s"), "one").unwrap();
        let b = store.publish(&stage(&store, &mem, b"s"), "two").unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(object_count(&store), 1);
        assert_eq!(std::fs::read_dir(store.staging_dir()).unwrap().count(), 0);
        let c = store
            .publish(&stage(&store, &mem, b"other"), "three")
            .unwrap();
        assert_ne!(a.digest, c.digest);
        assert_eq!(object_count(&store), 2);

        assert_eq!(store.resolve("one").unwrap().digest, a.digest);
        let by_digest = store.resolve(&a.digest).unwrap();
        assert_eq!(by_digest.name, None);
        assert_eq!(by_digest.dir, store.root().join("objects").join(&a.digest));
        assert!(matches!(
            store.resolve("nope"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.resolve("../x"),
            Err(StoreError::InvalidName(_))
        ));

        let list = store.list().unwrap();
        let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["one", "three", "two"]);
        assert_eq!(list[0].memory_bytes, 1 << 20);
        assert_eq!(list[0].data_bytes, 4096);
        assert!(!list[0].in_use);

        // Re-pointing a name is allowed (a newer template under the same name).
        store
            .publish(&stage(&store, &mem, b"other"), "one")
            .unwrap();
        assert_eq!(store.resolve("one").unwrap().digest, c.digest);
        format::verify_images_full(&a.dir, &a.manifest).unwrap();
    }

    #[test]
    fn remove_respects_leases() {
        let dir = scratch_dir("store-rm");
        let store = TemplateStore::open(&dir).unwrap();
        let mem = anon_region(1 << 20);
        mem.write(0, b"x");
        let t = store.publish(&stage(&store, &mem, b"s"), "fn").unwrap();
        store.publish(&stage(&store, &mem, b"s"), "alias").unwrap();
        let lease = store.lock_shared(&t).unwrap();
        let second = store.lock_shared(&t).unwrap();
        assert_eq!(lease.digest(), t.digest);
        assert!(store.list().unwrap().iter().all(|s| s.in_use));

        // Removing one of two names only drops the name, even while in use.
        store.remove("alias", false).unwrap();
        assert!(store.resolve("alias").is_err());
        // The last name: refused while leased, and nothing changes.
        assert!(matches!(
            store.remove("fn", false),
            Err(StoreError::InUse { .. })
        ));
        assert!(store.resolve("fn").is_ok());
        drop(second);
        assert!(matches!(
            store.remove("fn", false),
            Err(StoreError::InUse { .. })
        ));
        // The instance's mapping survives a forced removal.
        let image = File::open(t.dir.join("mem-0.img")).unwrap();
        // SAFETY: fresh mapping, unmapped below.
        let p = unsafe { crate::image::map_cow(&image, 1 << 20, None) }.unwrap();
        store.remove("fn", true).unwrap();
        assert!(matches!(store.resolve("fn"), Err(StoreError::NotFound(_))));
        assert!(!t.dir.exists());
        assert_eq!(object_count(&store), 0);
        // SAFETY: the mapping is alive until the munmap below.
        assert_eq!(unsafe { *p }, b'x');
        // SAFETY: created above.
        unsafe { libc::munmap(p as *mut libc::c_void, 1 << 20) };
        drop(lease);
        // A lease on a removed object fails.
        assert!(matches!(
            store.lock_shared(&t),
            Err(StoreError::NotFound(_))
        ));

        let t = store.publish(&stage(&store, &mem, b"s"), "fn").unwrap();
        store.remove("fn", false).unwrap();
        assert!(!t.dir.exists());
        assert!(matches!(
            store.remove("fn", false),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn concurrent_publishers_of_one_digest() {
        let dir = scratch_dir("store-race");
        let store = TemplateStore::open(&dir).unwrap();
        let mem = anon_region(2 << 20);
        for page in 0..64 {
            mem.write(page * 8192, format!("page {page}").as_bytes());
        }
        let staged: Vec<PathBuf> = (0..6).map(|_| stage(&store, &mem, b"same")).collect();
        let threads: Vec<_> = staged
            .into_iter()
            .enumerate()
            .map(|(i, dir)| {
                let store = store.clone();
                std::thread::spawn(move || store.publish(&dir, &format!("n{i}")).unwrap().digest)
            })
            .collect();
        let digests: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(digests.iter().all(|d| d == &digests[0]));
        assert_eq!(object_count(&store), 1);
        for i in 0..6 {
            let t = store.resolve(&format!("n{i}")).unwrap();
            format::verify_images_full(&t.dir, &t.manifest).unwrap();
        }
        assert_eq!(std::fs::read_dir(store.staging_dir()).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(store.objects()).unwrap().count(),
            1,
            "no temporary leftovers"
        );
    }

    #[test]
    fn publish_across_filesystems_keeps_holes() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let staging_parent = shm.join(format!("trenv-mt-{}", util::random_hex(4)));
        let dir = scratch_dir("store-xdev");
        let store = TemplateStore::open(&dir).unwrap();
        let mem = anon_region(4 << 20);
        mem.write(4096, b"one page");
        let mut w = TemplateWriter::create(&staging_parent, "t").unwrap();
        w.set_durable(false);
        // SAFETY: the test's mapping.
        unsafe { w.write_region(0, mem.ptr, mem.len) }.unwrap();
        w.write_state(b"s").unwrap();
        let staged = w.finish(ManifestDraft::default()).unwrap();
        let t = store.publish(&staged, "x").unwrap();
        assert!(!staged.exists());
        let meta = std::fs::metadata(t.dir.join("mem-0.img")).unwrap();
        assert_eq!(meta.len(), 4 << 20);
        assert!(meta.blocks() * 512 <= 64 * 1024);
        format::verify_images_full(&t.dir, &t.manifest).unwrap();
        let _ = std::fs::remove_dir_all(&staging_parent);
    }

    #[test]
    fn garbage_collection_removes_leftovers_only() {
        let dir = scratch_dir("store-gc");
        let store = TemplateStore::open(&dir).unwrap();
        let mem = anon_region(1 << 20);
        mem.write(0, b"x");
        store
            .publish(&stage(&store, &mem, b"keep"), "keep")
            .unwrap();
        let orphan = store.publish(&stage(&store, &mem, b"orphan"), "o").unwrap();
        std::fs::remove_file(store.names().join("o")).unwrap();
        std::fs::create_dir(store.objects().join(".tmp-crashed")).unwrap();
        assert_eq!(store.collect_garbage(Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(store.collect_garbage(Duration::ZERO).unwrap(), 2);
        assert!(!orphan.dir.exists());
        assert!(store.resolve("keep").is_ok());
    }
}
