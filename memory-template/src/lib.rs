//! Memory templates for TrEnv: a paused VM's RAM and state written once as an immutable directory, from
//! which any number of VMs are restored by mapping the RAM images copy-on-write (or copying them, or
//! paging them in on demand through userfaultfd).
//!
//! # On-disk format (version 1)
//!
//! A template is a directory. Nothing in it is written after the directory is renamed into place.
//!
//! ```text
//! <template>/
//!   manifest.json          the Manifest (JSON, see `format::Manifest`)
//!   manifest.json.sha256   lowercase hex SHA-256 of manifest.json's exact bytes, then "\n"
//!   state.json             the VMM's serialized vCPU/device state (opaque bytes to this crate)
//!   mem-<i>.img            one image per guest RAM region i (manifest order)
//!   working-set.bin        optional: prefetch list for on-demand restore
//! ```
//!
//! * **Region images** are linear: byte `o` of `mem-<i>.img` is guest physical address
//!   `regions[i].guest_addr + o`, and the file is exactly `regions[i].size` bytes long, so it can be mapped
//!   1:1 over the region's host range. Pages that were all-zero (or never touched) are holes in a sparse
//!   file, so they occupy no disk and read as zero.
//! * **Region digest** (`RegionImage::digest`): lowercase hex SHA-256 over
//!   `"trenv-region-v1\0" || le64(size) || for each non-zero 4096-byte page in ascending order:
//!   le64(byte offset) || the 4096 page bytes`. It is a function of the logical contents only (a zero
//!   page hashes the same whether it is a hole or allocated), and costs time proportional to the data,
//!   not to the region size. `data_pages` counts the non-zero pages.
//! * **State / working set** (`FileDigest`): plain SHA-256 of the file's bytes plus its exact size.
//! * **Working set** file: little-endian u64 guest physical addresses of 4 KiB pages, ascending, no
//!   duplicates; the pages an on-demand restore should fetch first.
//! * **Manifest checksum**: `manifest.json.sha256` guards the manifest itself; every other file is
//!   guarded by a digest inside the manifest. `format_version` is checked before anything else so that
//!   a newer template is refused with a clear message rather than as "corrupt".
//! * **Content digest** (`Manifest::content_digest`): SHA-256 of a canonical JSON (sorted keys) of the
//!   fields that define what a restore produces: format version, VM config, fingerprint, region layout
//!   and digests, state digest, working-set digest and `extra`. Creation time and writer version are
//!   excluded, so the same VM state snapshotted twice gets the same address in the `store`.
//!
//! # Store layout
//!
//! ```text
//! <root>/objects/<content digest>/   immutable template directories (as above)
//! <root>/names/<name>                "<content digest>\n", replaced atomically (temp file + rename)
//! ```
//!
//! Instances hold a shared `flock` on `objects/<d>/manifest.json` while they map the template.
//!
//! # Restoring
//!
//! `image::cow_guest_region` / `copy_guest_region` / `anonymous_guest_region` build
//! `vm_memory::GuestRegionMmap`s that own their mappings; `image::map_cow` / `map_copy` with a fixed
//! address swap the RAM behind an existing region in place (same host range, so KVM memslots stay). For
//! `ondemand`, build anonymous regions and start a `uffd::OnDemandServer` over them, kept alive for as long
//! as the VM runs (or until its background fill completes).

pub mod detach;
pub mod format;
pub mod image;
pub mod sharing;
pub mod store;
pub mod uffd;
pub mod writer;

mod util;

pub use format::{
    read_manifest, read_working_set, verify_images_full, verify_images_quick, verify_state,
    FileDigest, Fingerprint, Manifest, ManifestDraft, RegionImage, TemplateError, FORMAT_VERSION,
};
pub use image::{
    anonymous_guest_region, copy_guest_region, cow_guest_region, map_anonymous, map_copy, map_cow,
    ImageError, RestoreMode,
};
pub use sharing::{mapping_memory, process_memory, MemoryUsage, SharingError};
pub use store::{PublishedTemplate, StoreError, TemplateLease, TemplateStore, TemplateSummary};
pub use uffd::{OnDemandOptions, OnDemandServer, OnDemandSource, OnDemandStats, UffdError};
pub use writer::{TemplateWriter, WriterError};

#[cfg(test)]
mod test_util;
