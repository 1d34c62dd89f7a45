//! The template manifest and its verification (on-disk layout: see the crate documentation).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::util::{self, RegionHasher, IMAGE_PAGE};

/// Version of the on-disk format written by this crate. Readers refuse anything else.
pub const FORMAT_VERSION: u32 = 1;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_SUM_FILE: &str = "manifest.json.sha256";
pub const STATE_FILE: &str = "state.json";
pub const WORKING_SET_FILE: &str = "working-set.bin";

/// Upper bound on a state blob read into memory; a larger one is a corrupt manifest, not an allocation.
const MAX_STATE_BYTES: u64 = 1 << 30;
/// Upper bound on a manifest read into memory.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{} is not a template: {MANIFEST_FILE} is missing", dir.display())]
    ManifestMissing { dir: PathBuf },
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{MANIFEST_SUM_FILE} is missing in {}: the template is incomplete", dir.display())]
    ManifestChecksumMissing { dir: PathBuf },
    #[error("{MANIFEST_FILE} was modified or corrupted: its sha256 is {actual}, {MANIFEST_SUM_FILE} says {expected}")]
    ManifestChecksum { expected: String, actual: String },
    #[error("{MANIFEST_FILE} is not valid template JSON")]
    CorruptManifest {
        #[source]
        source: serde_json::Error,
    },
    #[error("template format v{found} is newer than this trenv supports (v{supported})")]
    NewerFormat { found: u64, supported: u32 },
    #[error("template format v{found} is not supported by this trenv (v{supported})")]
    UnsupportedFormat { found: u64, supported: u32 },
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    #[error("template file {file} is missing")]
    FileMissing { file: String },
    #[error("template file {file} is {actual} bytes, the manifest says {expected} (truncated or replaced)")]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("template file {file} is corrupted: sha256 {actual}, the manifest says {expected}")]
    DigestMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("template file {file} has {actual} data pages, the manifest says {expected}")]
    DataPagesMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },
}

/// What makes a template restorable on a host: compared field by field before a restore. The VMM fills
/// the fields; this crate treats them as opaque values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Fingerprint {
    pub cpu_vendor: String,
    /// Family/model/stepping, e.g. "6/85/7".
    pub cpu_signature: String,
    pub kvm_api_version: i32,
    /// Digest of KVM_GET_SUPPORTED_CPUID (as the VMM normalizes it).
    pub supported_cpuid_digest: String,
    pub host_page_size: u64,
}

impl Fingerprint {
    /// Describes every field in which `other` (the host) differs from `self` (the template), or None when
    /// they match.
    pub fn mismatch(&self, other: &Fingerprint) -> Option<String> {
        let mut diffs = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{name} (template: {a}, host: {b})"));
            }
        };
        cmp(
            "cpu_vendor",
            self.cpu_vendor.clone(),
            other.cpu_vendor.clone(),
        );
        cmp(
            "cpu_signature",
            self.cpu_signature.clone(),
            other.cpu_signature.clone(),
        );
        cmp(
            "kvm_api_version",
            self.kvm_api_version.to_string(),
            other.kvm_api_version.to_string(),
        );
        cmp(
            "supported_cpuid_digest",
            self.supported_cpuid_digest.clone(),
            other.supported_cpuid_digest.clone(),
        );
        cmp(
            "host_page_size",
            self.host_page_size.to_string(),
            other.host_page_size.to_string(),
        );
        if diffs.is_empty() {
            None
        } else {
            Some(format!("CPU/KVM fingerprint differs: {}", diffs.join(", ")))
        }
    }
}

/// One guest RAM region's linear image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionImage {
    pub guest_addr: u64,
    /// Bytes; also the image file's exact length.
    pub size: u64,
    /// File name inside the template directory.
    pub file: String,
    /// Number of non-zero 4 KiB pages.
    pub data_pages: u64,
    /// Region digest (see the crate documentation).
    pub digest: String,
}

/// A whole-file digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

/// The template's manifest (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_unix_ms: u64,
    pub trenv_version: String,
    /// The VM's configuration, kept apart from the state blob.
    pub vm_config: serde_json::Value,
    pub fingerprint: Fingerprint,
    pub regions: Vec<RegionImage>,
    pub state: FileDigest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_set: Option<FileDigest>,
    /// Anything else the VMM wants to record (e.g. a VM generation ID policy); part of the content digest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The caller-supplied part of a manifest; `TemplateWriter::finish` adds the file entries.
#[derive(Debug, Clone, Default)]
pub struct ManifestDraft {
    pub trenv_version: String,
    pub vm_config: serde_json::Value,
    pub fingerprint: Fingerprint,
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// Total guest RAM bytes described by the regions.
    pub fn memory_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Bytes of non-zero pages stored in the images.
    pub fn data_bytes(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.data_pages * IMAGE_PAGE as u64)
            .sum()
    }

    /// Content address: SHA-256 of the canonical JSON of the fields that determine a restore (see the
    /// crate documentation). Independent of creation time, writer version and JSON formatting.
    pub fn content_digest(&self) -> String {
        let regions: Vec<serde_json::Value> = self
            .regions
            .iter()
            .map(|r| {
                serde_json::json!({
                    "guest_addr": r.guest_addr, "size": r.size, "file": r.file, "digest": r.digest,
                })
            })
            .collect();
        let content = serde_json::json!({
            "format_version": self.format_version,
            "vm_config": self.vm_config,
            "fingerprint": self.fingerprint,
            "regions": regions,
            "state": self.state,
            "working_set": self.working_set,
            "extra": self.extra,
        });
        let mut canon = String::new();
        canonical_json(&content, &mut canon);
        util::sha256_hex(canon.as_bytes())
    }

    /// Structural checks that do not touch the files: plain file names, page-aligned non-overlapping
    /// regions, plausible page counts.
    pub fn validate(&self) -> Result<(), TemplateError> {
        let invalid = |m: String| Err(TemplateError::InvalidManifest(m));
        let mut files = vec![&self.state.file];
        if let Some(ws) = &self.working_set {
            files.push(&ws.file);
        }
        files.extend(self.regions.iter().map(|r| &r.file));
        for f in &files {
            if !is_plain_file_name(f) {
                return invalid(format!("file name {f:?} is not a plain file name"));
            }
        }
        let mut sorted: Vec<&RegionImage> = self.regions.iter().collect();
        sorted.sort_by_key(|r| r.guest_addr);
        let mut prev_end = 0u64;
        for (i, r) in sorted.iter().enumerate() {
            let page = IMAGE_PAGE as u64;
            if r.size == 0 || r.size % page != 0 || r.guest_addr % page != 0 {
                return invalid(format!(
                    "region at {:#x} of {} bytes is not page aligned",
                    r.guest_addr, r.size
                ));
            }
            let Some(end) = r.guest_addr.checked_add(r.size) else {
                return invalid(format!("region at {:#x} overflows", r.guest_addr));
            };
            if i > 0 && r.guest_addr < prev_end {
                return invalid(format!("region at {:#x} overlaps another", r.guest_addr));
            }
            if r.data_pages > r.size / page {
                return invalid(format!(
                    "region at {:#x} claims {} data pages in {} bytes",
                    r.guest_addr, r.data_pages, r.size
                ));
            }
            if !util::is_sha256_hex(&r.digest) {
                return invalid(format!("region {} digest is not sha256 hex", r.file));
            }
            prev_end = end;
        }
        let mut names: Vec<&&String> = files.iter().collect();
        names.sort();
        names.dedup();
        if names.len() != files.len() {
            return invalid("two entries name the same file".into());
        }
        Ok(())
    }
}

/// A file name without directories, so a manifest cannot point outside its template.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255
}

/// Serializes `v` with object keys sorted and no whitespace, independent of serde_json's map features.
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String((*k).clone()).to_string());
                out.push(':');
                canonical_json(&map[*k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, TemplateError> {
    use std::io::Read;
    let mut data = Vec::new();
    File::open(path)
        .map_err(io_err(path))?
        .take(limit + 1)
        .read_to_end(&mut data)
        .map_err(io_err(path))?;
    if data.len() as u64 > limit {
        return Err(TemplateError::InvalidManifest(format!(
            "{} is larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(data)
}

/// Reads and checks `dir/manifest.json`: presence, format version (first, so a newer template is refused
/// as newer rather than as corrupt), checksum, JSON shape, and structure.
pub fn read_manifest(dir: &Path) -> Result<Manifest, TemplateError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match read_limited(&path, MAX_MANIFEST_BYTES) {
        Err(TemplateError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(TemplateError::ManifestMissing {
                dir: dir.to_path_buf(),
            })
        }
        other => other?,
    };
    let probe: Result<serde_json::Value, _> = serde_json::from_slice(&bytes);
    if let Ok(value) = &probe {
        match value.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if v > FORMAT_VERSION as u64 => {
                return Err(TemplateError::NewerFormat {
                    found: v,
                    supported: FORMAT_VERSION,
                })
            }
            Some(v) if v < FORMAT_VERSION as u64 => {
                return Err(TemplateError::UnsupportedFormat {
                    found: v,
                    supported: FORMAT_VERSION,
                })
            }
            _ => {}
        }
    }
    let sum_path = dir.join(MANIFEST_SUM_FILE);
    let expected = match std::fs::read_to_string(&sum_path) {
        Ok(s) => s.trim().to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TemplateError::ManifestChecksumMissing {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(&sum_path)(e)),
    };
    let actual = util::sha256_hex(&bytes);
    if actual != expected {
        return Err(TemplateError::ManifestChecksum { expected, actual });
    }
    if let Err(source) = probe {
        return Err(TemplateError::CorruptManifest { source });
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|source| TemplateError::CorruptManifest { source })?;
    manifest.validate()?;
    Ok(manifest)
}

fn open_listed(dir: &Path, file: &str) -> Result<File, TemplateError> {
    let path = dir.join(file);
    File::open(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TemplateError::FileMissing {
                file: file.to_string(),
            }
        } else {
            TemplateError::Io { path, source }
        }
    })
}

fn check_size(file: &File, name: &str, dir: &Path, expected: u64) -> Result<(), TemplateError> {
    let actual = file.metadata().map_err(io_err(&dir.join(name)))?.len();
    if actual != expected {
        return Err(TemplateError::SizeMismatch {
            file: name.to_string(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// Reads a whole-file entry, checking size and SHA-256.
fn read_digested(dir: &Path, entry: &FileDigest) -> Result<Vec<u8>, TemplateError> {
    use std::io::Read;
    if entry.size > MAX_STATE_BYTES {
        return Err(TemplateError::InvalidManifest(format!(
            "{} claims {} bytes",
            entry.file, entry.size
        )));
    }
    let mut file = open_listed(dir, &entry.file)?;
    check_size(&file, &entry.file, dir, entry.size)?;
    let mut data = Vec::with_capacity(entry.size as usize);
    file.read_to_end(&mut data)
        .map_err(io_err(&dir.join(&entry.file)))?;
    if data.len() as u64 != entry.size {
        return Err(TemplateError::SizeMismatch {
            file: entry.file.clone(),
            expected: entry.size,
            actual: data.len() as u64,
        });
    }
    let actual = util::sha256_hex(&data);
    if actual != entry.sha256 {
        return Err(TemplateError::DigestMismatch {
            file: entry.file.clone(),
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(data)
}

/// Reads the state blob, checking its size and SHA-256.
pub fn verify_state(dir: &Path, manifest: &Manifest) -> Result<Vec<u8>, TemplateError> {
    read_digested(dir, &manifest.state)
}

/// Reads the working set (guest physical page addresses), checking its size and SHA-256.
pub fn read_working_set(
    dir: &Path,
    manifest: &Manifest,
) -> Result<Option<Vec<u64>>, TemplateError> {
    let Some(entry) = &manifest.working_set else {
        return Ok(None);
    };
    let data = read_digested(dir, entry)?;
    if data.len() % 8 != 0 {
        return Err(TemplateError::InvalidManifest(format!(
            "{} is not a list of u64",
            entry.file
        )));
    }
    Ok(Some(
        data.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
    ))
}

/// Cheap check for every restore: each region image exists and has exactly the manifest's size.
pub fn verify_images_quick(dir: &Path, manifest: &Manifest) -> Result<(), TemplateError> {
    for region in &manifest.regions {
        let file = open_listed(dir, &region.file)?;
        check_size(&file, &region.file, dir, region.size)?;
    }
    Ok(())
}

/// Computes the region digest and data page count of an image file of `size` bytes, reading only its
/// data segments (holes are zero pages, which the digest skips).
pub fn region_digest(file: &File, size: u64) -> io::Result<(String, u64)> {
    let mut hasher = RegionHasher::new(size);
    let page = IMAGE_PAGE as u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut next_page = 0u64;
    for (start, end) in util::data_segments(file, size)? {
        let mut pos = (start / page * page).max(next_page);
        let end = end.div_ceil(page) * page;
        let end = end.min(size);
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            util::read_exact_at(file, &mut buf[..n], pos)?;
            for (i, chunk) in buf[..n].chunks(IMAGE_PAGE).enumerate() {
                if chunk.len() == IMAGE_PAGE {
                    hasher.page(pos + (i * IMAGE_PAGE) as u64, chunk);
                }
            }
            pos += n as u64;
        }
        next_page = end;
    }
    Ok(hasher.finish())
}

/// Full check for `template verify`: sizes and region digests (re-reading the data), plus the state and
/// working-set files.
pub fn verify_images_full(dir: &Path, manifest: &Manifest) -> Result<(), TemplateError> {
    verify_images_quick(dir, manifest)?;
    for region in &manifest.regions {
        let file = open_listed(dir, &region.file)?;
        let (digest, pages) =
            region_digest(&file, region.size).map_err(io_err(&dir.join(&region.file)))?;
        if digest != region.digest {
            return Err(TemplateError::DigestMismatch {
                file: region.file.clone(),
                expected: region.digest.clone(),
                actual: digest,
            });
        }
        if pages != region.data_pages {
            return Err(TemplateError::DataPagesMismatch {
                file: region.file.clone(),
                expected: region.data_pages,
                actual: pages,
            });
        }
    }
    verify_state(dir, manifest)?;
    read_working_set(dir, manifest)?;
    Ok(())
}

/// SHA-256 of a byte slice as a `FileDigest` entry (used by the writer).
pub(crate) fn file_digest(file: &str, bytes: &[u8]) -> FileDigest {
    FileDigest {
        file: file.to_string(),
        size: bytes.len() as u64,
        sha256: util::hex(&Sha256::digest(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            created_unix_ms: 1,
            trenv_version: "0.1.0".into(),
            vm_config: serde_json::json!({"memory": {"size": 1048576}, "cpus": {"boot_vcpus": 1}}),
            fingerprint: Fingerprint::default(),
            regions: vec![RegionImage {
                guest_addr: 0,
                size: 1 << 20,
                file: "mem-0.img".into(),
                data_pages: 1,
                digest: "0".repeat(64),
            }],
            state: file_digest(STATE_FILE, b"{}"),
            working_set: None,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn content_digest_ignores_time_and_key_order() {
        let a = sample();
        let mut b = sample();
        b.created_unix_ms = 99;
        b.trenv_version = "9.9".into();
        b.vm_config = serde_json::json!({"cpus": {"boot_vcpus": 1}, "memory": {"size": 1048576}});
        assert_eq!(a.content_digest(), b.content_digest());
        b.regions[0].digest = "1".repeat(64);
        assert_ne!(a.content_digest(), b.content_digest());
    }

    #[test]
    fn fingerprint_mismatch_names_fields() {
        let a = Fingerprint {
            cpu_vendor: "GenuineIntel".into(),
            host_page_size: 4096,
            ..Default::default()
        };
        assert!(a.mismatch(&a.clone()).is_none());
        let mut b = a.clone();
        b.cpu_vendor = "AuthenticAMD".into();
        b.kvm_api_version = 12;
        let msg = a.mismatch(&b).unwrap();
        assert!(msg.contains("cpu_vendor (template: GenuineIntel, host: AuthenticAMD)"));
        assert!(msg.contains("kvm_api_version"));
        assert!(!msg.contains("host_page_size"));
    }

    #[test]
    fn validate_rejects_escaping_file_names_and_overlaps() {
        let mut m = sample();
        m.regions[0].file = "../etc/passwd".into();
        assert!(matches!(
            m.validate(),
            Err(TemplateError::InvalidManifest(_))
        ));
        let mut m = sample();
        let mut r = m.regions[0].clone();
        r.guest_addr = 4096;
        r.file = "mem-1.img".into();
        m.regions.push(r);
        assert!(matches!(
            m.validate(),
            Err(TemplateError::InvalidManifest(_))
        ));
        assert!(sample().validate().is_ok());
    }
}
