//! Snapshot and restore of a whole VM through memory templates.
//!
//! A snapshot of a paused VM is a template directory (see the `memory-template` crate): one linear, sparse
//! memory image per guest RAM region, `state.json` with every vCPU's and device's state (this module's
//! `VmState`), and a manifest tying them to the VM config and to a fingerprint of the host CPU and KVM.
//! A restore checks the manifest, the state digest, the images' sizes and the fingerprint before it
//! touches KVM, then builds a VM around the images (mapped copy-on-write, copied, or paged in on demand)
//! and loads the state. Each restore gets a new VM generation ID, so clones can tell they are clones.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::ioapic::IoapicState;
use devices::legacy::serial::SerialDeviceState;
use kvm_bindings::{kvm_clock_data, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use memory_template::format::{self, Fingerprint, ManifestDraft};
use memory_template::image::{self, RestoreMode};
use memory_template::uffd::{OnDemandOptions, OnDemandServer, OnDemandSource};
use memory_template::writer::TemplateWriter;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::arch::x86_64::vcpu_state::{self, VcpuState};
use crate::config::VmConfig;
use crate::vm::{Vm, VmError};

/// Version of `VmState`'s layout inside format-v1 templates. Version 2 added the virtio-pci devices' state;
/// version 1 templates (taken before any guest had started a virtio device) still restore, with fresh
/// devices.
pub const STATE_VERSION: u32 = 2;
/// The oldest `VmState` layout still restored.
pub const MIN_STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused to snapshot it")]
    NotPaused,
    #[error("destination {0} exists and is not an empty directory")]
    DestinationExists(PathBuf),
    #[error("invalid snapshot URL '{0}': expected file:///absolute/path")]
    BadUrl(String),
    #[error("cannot read vCPU {id} state")]
    SaveVcpu {
        id: u8,
        #[source]
        source: vcpu_state::VcpuStateError,
    },
    #[error("cannot load vCPU {id} state")]
    RestoreVcpu {
        id: u8,
        #[source]
        source: vcpu_state::VcpuStateError,
    },
    #[error("cannot read the KVM clock")]
    Clock(#[source] kvm_ioctls::Error),
    #[error("cannot read the CPUID of vCPU {id}")]
    Cpuid {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the template")]
    Write(#[from] memory_template::writer::WriterError),
    #[error("the template is unusable")]
    Template(#[from] format::TemplateError),
    #[error("the template was made on an incompatible host: {0}")]
    Fingerprint(String),
    #[error("the template's state is not valid: {0}")]
    State(String),
    #[error("the template's config is not valid for this trenv")]
    Config(#[source] serde_json::Error),
    #[error("cannot map the template's memory")]
    Image(#[from] image::ImageError),
    #[error("cannot start on-demand paging")]
    OnDemand(#[from] memory_template::uffd::UffdError),
    #[error("cannot build guest memory from the template's regions")]
    Memory(String),
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load device state: {0}")]
    Device(String),
    #[error("virtio-pci device state")]
    PciDevices(#[from] crate::pci_devices::PciError),
    #[error("the template cannot be served in place: {0}")]
    Incompatible(String),
    #[error("the restore-time device override does not match the template: {0}")]
    Override(String),
}

/// Everything besides guest RAM that a restored guest needs.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub vcpus: Vec<VcpuState>,
    pub clock: kvm_clock_data,
    pub ioapic: IoapicState,
    pub serial: Option<SerialDeviceState>,
    /// The virtio-pci devices (version 2 on); absent in older templates, whose devices restore fresh.
    #[serde(default)]
    pub pci: Option<Vec<crate::pci_devices::PciDeviceState>>,
}

/// How a restore maps memory and what it changes from the template's config.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub mode: RestoreMode,
    /// Replaces the template's serial console (instances must not share the template's output file).
    pub serial: Option<crate::config::ConsoleConfig>,
    /// Pre-fault every page (copy and cow modes) before the guest runs.
    pub prefault: bool,
    /// Moves the template's vsock device to another host socket; the device itself (CID, id) must be the
    /// template's: see [`override_vsock`].
    pub vsock: Option<api::models::VsockConfig>,
}

/// Applies a restore-time vsock override to a template's config: only the host-side socket path may
/// change, since the guest already knows its CID and device. `wanted.id`, when given, must name the
/// template's device.
pub fn override_vsock(
    config: &mut VmConfig,
    wanted: &api::models::VsockConfig,
) -> Result<(), SnapshotError> {
    let Some(vsock) = config.vsock.as_mut() else {
        return Err(SnapshotError::Override(
            "the template has no vsock device".into(),
        ));
    };
    if wanted.cid != vsock.cid {
        return Err(SnapshotError::Override(format!(
            "vsock cid={} given, the template's device has cid={}",
            wanted.cid, vsock.cid
        )));
    }
    if wanted.id.is_some() && wanted.id != vsock.id {
        return Err(SnapshotError::Override(format!(
            "vsock id={:?} given, the template's device is {:?}",
            wanted.id.as_deref().unwrap_or(""),
            vsock.id.as_deref().unwrap_or("(unnamed)")
        )));
    }
    if (wanted.iommu, wanted.pci_segment) != (vsock.iommu, vsock.pci_segment) {
        return Err(SnapshotError::Override(
            "vsock iommu and pci_segment cannot change at restore".into(),
        ));
    }
    vsock.socket = wanted.socket.clone();
    Ok(())
}

/// Parses `file:///dir` (Cloud Hypervisor's snapshot/restore URL form) or a plain absolute path.
pub fn url_to_path(url: &str) -> Result<PathBuf, SnapshotError> {
    let path = url.strip_prefix("file://").unwrap_or(url);
    if !path.starts_with('/') || path.contains('\0') {
        return Err(SnapshotError::BadUrl(url.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// The host facts a template depends on: CPU vendor and signature, KVM API version, and KVM's supported
/// CPUID (what guest-visible features a restored guest may rely on).
pub fn host_fingerprint(kvm: &Kvm, supported_cpuid: &CpuId) -> Fingerprint {
    // CPUID leaves 0 and 1 exist on every x86_64 CPU.
    let (leaf0, leaf1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
    let mut vendor = Vec::with_capacity(12);
    for reg in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
        vendor.extend_from_slice(&reg.to_le_bytes());
    }
    let family = ((leaf1.eax >> 8) & 0xf) + ((leaf1.eax >> 20) & 0xff);
    let model = ((leaf1.eax >> 4) & 0xf) | ((leaf1.eax >> 12) & 0xf0);
    let stepping = leaf1.eax & 0xf;
    let mut hasher = Sha256::new();
    for entry in supported_cpuid.as_slice() {
        let (mut eax, mut ebx, mut ecx, mut edx) = (entry.eax, entry.ebx, entry.ecx, entry.edx);
        // KVM fills some fields from the host CPU the ioctl happened to run on (APIC and core ids);
        // they say nothing about what a guest may use, and would make every process see another host.
        match entry.function {
            0x1 => ebx &= 0x00ff_ffff,
            0xb | 0x1f => edx = 0,
            0x8000_001e => (eax, ebx, ecx) = (0, 0, 0),
            _ => {}
        }
        for word in [entry.function, entry.index, entry.flags, eax, ebx, ecx, edx] {
            hasher.update(word.to_le_bytes());
        }
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Fingerprint {
        cpu_vendor: String::from_utf8_lossy(&vendor).into_owned(),
        cpu_signature: format!("{family}/{model}/{stepping}"),
        kvm_api_version: kvm.get_api_version(),
        supported_cpuid_digest: digest,
        // SAFETY: sysconf has no memory-safety preconditions.
        host_page_size: unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64,
    }
}

/// A fresh random VM generation ID (never 0, which means "cold boot").
pub fn new_generation_id() -> u128 {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into our buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr() as *mut libc::c_void, bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Extremely unlikely; fall back to the clock, which is still unique per restore.
        bytes[..8].copy_from_slice(&crate::event_monitor::monotonic_ns().to_le_bytes());
        bytes[8..].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    }
    u128::from_le_bytes(bytes).max(1)
}

/// Where an in-place repurpose spent its time, in microseconds, phase by phase (reported in the
/// `repurposed` event, so operators and the benchmark can see which one dominates).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepurposePhases {
    /// Template checks (cached after the first use) and the lease on its manifest.
    pub check_us: u64,
    /// Stopping the vCPUs.
    pub pause_us: u64,
    /// Mapping the template's images over guest RAM (unmapping the previous tenant's pages).
    pub map_us: u64,
    /// Resetting the devices.
    pub devices_us: u64,
    /// Loading vCPU and irqchip state.
    pub state_us: u64,
}

/// A shared lock on a template's manifest for as long as a VM maps it, so that the store refuses to
/// remove a template that instances still use.
pub struct TemplateLease {
    _file: File,
}

fn lease(dir: &Path) -> Result<TemplateLease, SnapshotError> {
    let path = dir.join("manifest.json");
    let file = File::open(&path).map_err(|source| SnapshotError::Open {
        path: path.clone(),
        source,
    })?;
    // Blocking: the store holds an exclusive lock only for an instant, to test whether a template is in use.
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) } != 0 {
        return Err(SnapshotError::Open {
            path,
            source: std::io::Error::last_os_error(),
        });
    }
    // The template may have been removed while we waited; a lease on an unlinked manifest protects nothing.
    if !path.exists() {
        return Err(SnapshotError::Open {
            path,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Ok(TemplateLease { _file: file })
}

/// Keeps what a restored VM's memory depends on alive: the template lease and the on-demand pager.
#[derive(Default)]
pub struct TemplateBacking {
    pub lease: Option<TemplateLease>,
    pub ondemand: Option<OnDemandServer>,
    pub template_dir: Option<PathBuf>,
    pub mode: Option<RestoreMode>,
}

impl Vm {
    /// Writes a template of this (paused) VM to `destination`, atomically: a temporary directory beside it
    /// is renamed into place only once everything is written. An existing empty directory is replaced.
    pub fn snapshot(&mut self, destination: &Path) -> Result<PathBuf, SnapshotError> {
        if !self.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        if self.parked {
            return Err(SnapshotError::State(
                "a parked VM has no guest state to snapshot".into(),
            ));
        }
        // Quiesce the devices first: from here until the VM resumes, none of them writes guest memory or
        // moves its queues, so the memory image and their state agree.
        self.devices.pci.pause_devices()?;
        // Captured once per pause: state read twice from a paused VM must be identical (KVM's TSC keeps
        // counting), so that snapshotting the same paused VM twice gives the same template digest.
        let state_bytes = match &self.paused_state {
            Some(bytes) => bytes.clone(),
            None => {
                let state = self.capture_state()?;
                let bytes =
                    serde_json::to_vec(&state).map_err(|e| SnapshotError::State(e.to_string()))?;
                self.paused_state = Some(bytes.clone());
                bytes
            }
        };

        let (parent, name) = match (destination.parent(), destination.file_name()) {
            (Some(parent), Some(name)) => (parent, name.to_string_lossy().into_owned()),
            _ => return Err(SnapshotError::DestinationExists(destination.to_path_buf())),
        };
        if destination.exists() {
            // Cloud Hypervisor snapshots into an existing (empty) directory; keep that working.
            std::fs::remove_dir(destination)
                .map_err(|_| SnapshotError::DestinationExists(destination.to_path_buf()))?;
        }
        let mut writer = TemplateWriter::create(parent, &name)?;
        for region in self.memory.iter() {
            // SAFETY: the region is mapped for the VM's lifetime, and nothing writes guest memory while the
            // vCPUs are parked, the virtio devices are paused and the legacy devices only touch memory from
            // vCPU exits.
            unsafe {
                writer.write_region(
                    region.start_addr().0,
                    region.as_ptr(),
                    region.len() as usize,
                )?;
            }
        }
        writer.write_state(&state_bytes)?;
        let working_set = self.touched_pages();
        if !working_set.is_empty() {
            writer.write_working_set(&working_set)?;
        }
        let mut extra = std::collections::BTreeMap::new();
        extra.insert(
            "state_version".to_string(),
            serde_json::json!(STATE_VERSION),
        );
        let path = writer.finish(ManifestDraft {
            trenv_version: env!("CARGO_PKG_VERSION").to_string(),
            vm_config: serde_json::to_value(&self.config)
                .map_err(|e| SnapshotError::State(e.to_string()))?,
            fingerprint: host_fingerprint(&self.kvm, &self.base_cpuid),
            extra,
        })?;
        Ok(path)
    }

    /// Guest pages this VM has touched (present in this process's page tables), ascending guest-physical
    /// addresses: the working set an on-demand restore prefetches. For a VM that was itself restored from a
    /// template, these are exactly the pages it used since; for a cold-booted one, everything it touched.
    fn touched_pages(&self) -> Vec<u64> {
        use std::io::{Read, Seek, SeekFrom};
        const PAGE: u64 = 4096;
        let Ok(mut pagemap) = File::open("/proc/self/pagemap") else {
            return Vec::new();
        };
        let mut pages = Vec::new();
        for region in self.memory.iter() {
            let host = region.as_ptr() as u64;
            let count = region.len() / PAGE;
            let mut entries = vec![0u8; count as usize * 8];
            if pagemap.seek(SeekFrom::Start(host / PAGE * 8)).is_err()
                || pagemap.read_exact(&mut entries).is_err()
            {
                return Vec::new();
            }
            for (i, entry) in entries.chunks_exact(8).enumerate() {
                let bits = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                // Bit 63: present in RAM; bit 62: swapped out. Either way the guest touched it.
                if bits & (3 << 62) != 0 {
                    pages.push(region.start_addr().0 + i as u64 * PAGE);
                }
            }
        }
        pages
    }

    fn capture_state(&self) -> Result<VmState, SnapshotError> {
        let msr_indices = vcpu_state::msrs_to_save(&self.kvm)
            .map_err(|source| SnapshotError::SaveVcpu { id: 0, source })?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            let vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            let cpuid = vcpu
                .fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(|source| SnapshotError::Cpuid {
                    id: vcpu.id,
                    source,
                })?;
            vcpus.push(
                vcpu_state::save(&vcpu.fd, vcpu.id, &cpuid, &msr_indices).map_err(|source| {
                    SnapshotError::SaveVcpu {
                        id: vcpu.id,
                        source,
                    }
                })?,
            );
        }
        let clock = match self.paused_clock {
            Some(clock) => clock,
            None => self.vm_fd.get_clock().map_err(SnapshotError::Clock)?,
        };
        Ok(VmState {
            version: STATE_VERSION,
            vcpus,
            clock,
            ioapic: self
                .devices
                .ioapic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
            serial: self
                .devices
                .serial
                .as_ref()
                .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).state()),
            pci: Some(self.devices.pci.state()?),
        })
    }

    /// Builds a VM from the template at `dir`, paused (call `resume` to run it).
    pub fn restore(kvm: Kvm, dir: &Path, options: &RestoreOptions) -> Result<Vm, VmError> {
        log::debug!("restore: reading {}", dir.display());
        let supported = vcpu_state::supported_cpuid(&kvm).map_err(VmError::SupportedCpuid)?;
        let fingerprint = host_fingerprint(&kvm, &supported);
        let checked = check_template(dir, &fingerprint, options)?;
        log::debug!("restore: template checked");
        let lease = lease(dir)?;
        let (memory, ondemand) = map_template_memory(dir, &checked.manifest, options)?;
        log::debug!("restore: memory mapped ({})", options.mode);
        // Devices go back to the slots and BARs they had (hotplug may have made them differ from the
        // order the configuration lists them in).
        let placements = checked
            .state
            .pci
            .as_deref()
            .map(crate::pci_devices::placements)
            .unwrap_or_default();
        let mut vm = Vm::create_with_memory(kvm, &checked.config, memory, supported, &placements)?;
        log::debug!("restore: VM created");
        vm.load_state(&checked.state)?;
        log::debug!("restore: state loaded");
        vm.backing = TemplateBacking {
            lease: Some(lease),
            ondemand,
            template_dir: Some(dir.to_path_buf()),
            mode: Some(options.mode),
        };
        Ok(vm)
    }

    /// Switches this VM in place to the template at `dir`: the template's images replace guest RAM at the
    /// same host addresses (KVM's memslots stay as they are), vCPU and device state are loaded from the
    /// template, and virtio devices are reset. The VM is left paused. Fails with
    /// `SnapshotError::Incompatible` when the template's layout or device set differs from this VM's, in
    /// which case the caller restores a new VM instead.
    pub fn repurpose(
        &mut self,
        dir: &Path,
        options: &RestoreOptions,
    ) -> Result<RepurposePhases, VmError> {
        let mut phases = RepurposePhases::default();
        let mut mark = std::time::Instant::now();
        let mut lap = move || {
            let now = std::time::Instant::now();
            let us = now.duration_since(mark).as_micros() as u64;
            mark = now;
            us
        };
        if options.mode == RestoreMode::OnDemand {
            return Err(SnapshotError::Incompatible(
                "on-demand paging cannot be set up in place; use cow or copy".into(),
            )
            .into());
        }
        log::debug!("repurpose: checking {}", dir.display());
        let fingerprint = host_fingerprint(&self.kvm, &self.base_cpuid);
        let mut checked = check_template_cached(dir, &fingerprint, options)?;
        log::debug!("repurpose: template checked");
        // Keep this VM's own console: the serial device and its sink stay as they are.
        checked.config.serial = self.config.serial.clone();
        // Likewise its vsock backend, whose socket a restore may have moved: where the template's device
        // is otherwise the same, it is served on this VM's socket (else the device sets differ below).
        if let Some(ours) = &self.config.vsock {
            let _ = override_vsock(&mut checked.config, ours);
        }
        if let Some(reason) = self.incompatibility(&checked) {
            return Err(SnapshotError::Incompatible(reason).into());
        }
        // A template whose device state these devices cannot take is refused before the VM is touched.
        if let Some(pci) = &checked.state.pci {
            self.devices
                .pci
                .check_state(pci)
                .map_err(SnapshotError::from)?;
        }
        let lease = lease(dir)?;
        phases.check_us = lap();
        self.pause()?;
        // No device may write guest memory while it is swapped under them (they are reset below).
        self.devices
            .pci
            .pause_devices()
            .map_err(SnapshotError::from)?;
        phases.pause_us = lap();
        let mut detached = Vec::new();
        for (region, image) in self.memory.iter().zip(&checked.manifest.regions) {
            let path = dir.join(&image.file);
            let file = File::open(&path).map_err(|source| SnapshotError::Open {
                path: path.clone(),
                source,
            })?;
            let len = region.len() as usize;
            let host = region.as_ptr();
            // The old tenant's pages are moved out (page tables at a time) and freed on the reaper
            // thread, instead of being unmapped here page by page; if they cannot be moved, the new
            // mapping replaces them in place.
            // SAFETY: the range is this VM's guest RAM region, which it owns, and every vCPU and device
            // is paused until it is mapped again below.
            let old_pages = unsafe { memory_template::detach::Detached::take(host, len) }
                .map_err(|e| log::debug!("repurpose: old guest RAM unmapped in place: {e}"))
                .ok();
            // SAFETY: as above; the new mapping has the same size, so KVM's memslot keeps pointing at
            // valid memory (its MMU notifiers dropped the old pages' translations when they moved).
            let mapped = unsafe {
                match options.mode {
                    RestoreMode::Copy => image::map_copy(&file, len, Some(host)),
                    _ => image::map_cow(&file, len, Some(host)),
                }
            };
            match mapped {
                Ok(_) => detached.extend(old_pages.map(|old| (host, old))),
                Err(e) => {
                    // Every region gets its old pages back: the VM stays paused and usable as it was.
                    for (host, old) in detached.into_iter().chain(old_pages.map(|old| (host, old)))
                    {
                        // SAFETY: the range they were taken from; whatever was mapped there since (the
                        // new template) is replaced.
                        if let Err(back) = unsafe { old.put_back(host) } {
                            log::error!("repurpose: the old guest RAM cannot be put back: {back}");
                        }
                    }
                    return Err(SnapshotError::from(e).into());
                }
            }
        }
        for (_, old) in detached {
            old.release();
        }
        phases.map_us = lap();
        for pci_device in self.devices.pci.devices() {
            if let Some(device) = self.devices.pci.device(&pci_device.0) {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reset_device();
            }
        }
        if let Ok(mut events) = self.devices.guest_events.lock() {
            events.clear();
        }
        self.paused_state = None;
        self.parked = false;
        phases.devices_us = lap();
        self.load_state(&checked.state)?;
        phases.state_us = lap();
        self.config = checked.config;
        self.backing = TemplateBacking {
            lease: Some(lease),
            ondemand: None,
            template_dir: Some(dir.to_path_buf()),
            mode: Some(options.mode),
        };
        Ok(phases)
    }

    /// Pauses the VM and gives its private guest memory back to the host (the next tenant's template
    /// replaces it anyway): copy-on-write pages fall back to the template's shared pages, anonymous ones to
    /// nothing. The guest must not run again before a repurpose. Returns the bytes dropped.
    pub fn park(&mut self) -> Result<u64, VmError> {
        self.pause()?;
        // No device may write the memory being dropped (a host vsock peer, a frame from the tap); the
        // next repurpose loads the devices' state anew, and `resume` refuses a parked VM.
        self.devices
            .pci
            .pause_devices()
            .map_err(SnapshotError::from)?;
        let before = crate::runner::process_memory_kib().0;
        for region in self.memory.iter() {
            // SAFETY: the range is this VM's guest RAM, every vCPU is parked, and MADV_DONTNEED keeps the
            // mapping valid (reads see the file or zero pages).
            let rc = unsafe {
                libc::madvise(
                    region.as_ptr() as *mut libc::c_void,
                    region.len() as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                return Err(VmError::GuestMemory(format!(
                    "cannot drop guest memory: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        self.parked = true;
        self.paused_state = None;
        let after = crate::runner::process_memory_kib().0;
        Ok(before.saturating_sub(after) * 1024)
    }

    /// Why a template cannot be served in place by this VM, if it cannot.
    fn incompatibility(&self, checked: &CheckedTemplate) -> Option<String> {
        let ours: Vec<(u64, u64)> = self
            .memory
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        let theirs: Vec<(u64, u64)> = checked
            .manifest
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        if ours != theirs {
            return Some(format!(
                "memory layout differs ({ours:x?} here, {theirs:x?} in the template)"
            ));
        }
        if checked.state.vcpus.len() != self.vcpus.len() {
            return Some(format!(
                "{} vCPUs here, {} in the template",
                self.vcpus.len(),
                checked.state.vcpus.len()
            ));
        }
        let devices = |c: &VmConfig| {
            serde_json::json!([
                c.disks,
                c.net,
                c.pmem,
                c.fs,
                c.vsock,
                c.rng,
                c.console,
                c.serial.mode
            ])
        };
        if devices(&self.config) != devices(&checked.config) {
            return Some("the device set differs".into());
        }
        None
    }

    fn load_state(&mut self, state: &VmState) -> Result<(), SnapshotError> {
        for (vcpu, saved) in self.vcpus.iter().zip(&state.vcpus) {
            let vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            vcpu_state::restore(&vcpu.fd, saved).map_err(|source| SnapshotError::RestoreVcpu {
                id: vcpu.id,
                source,
            })?;
        }
        self.devices
            .ioapic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_state(&state.ioapic)
            .map_err(|e| SnapshotError::Device(format!("IOAPIC: {e}")))?;
        if let (Some(serial), Some(saved)) = (&self.devices.serial, &state.serial) {
            serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_state(saved)
                .map_err(|e| SnapshotError::Device(format!("serial: {e}")))?;
        }
        // Devices are loaded (and live ones activated) before any vCPU runs; without saved state (an older
        // template) they stay as created or reset.
        if let Some(pci) = &state.pci {
            self.devices.pci.set_state(pci)?;
        }
        // The clock is loaded when the vCPUs start, so that time spent paused after the restore does not
        // count as guest time. Only guests that enabled kvmclock read it, and loading it can cost
        // milliseconds here, so guests without it skip that.
        self.paused_clock = uses_kvmclock(state).then_some(state.clock);
        self.set_generation_id(new_generation_id())?;
        self.devices.idle_waker.wake();
        Ok(())
    }

    /// Publishes a VM generation ID: in the ACPI VMGenID buffer (Linux's vmgenid driver) and in the
    /// guest-signal device (the test guest).
    pub(crate) fn set_generation_id(&self, id: u128) -> Result<(), SnapshotError> {
        use vm_memory::Bytes;
        self.memory
            .write_slice(
                &id.to_le_bytes(),
                vm_memory::GuestAddress(crate::arch::layout::VMGENID_START),
            )
            .map_err(|e| SnapshotError::Memory(format!("VMGenID buffer: {e}")))?;
        self.devices
            .guest_signal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_generation(id);
        Ok(())
    }
}

/// Whether any vCPU has kvmclock enabled (MSR_KVM_SYSTEM_TIME or its _NEW variant, bit 0).
fn uses_kvmclock(state: &VmState) -> bool {
    const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    state.vcpus.iter().any(|vcpu| {
        vcpu.msrs.iter().chain(&vcpu.extra_msrs).any(|m| {
            matches!(m.index, MSR_KVM_SYSTEM_TIME | MSR_KVM_SYSTEM_TIME_NEW) && m.data & 1 != 0
        })
    })
}

/// A template that passed every check, with its parsed parts.
#[derive(Clone)]
struct CheckedTemplate {
    manifest: format::Manifest,
    state: VmState,
    config: VmConfig,
}

/// Templates a VMM has checked and parsed, by directory: a warm sandbox switches between the same few
/// templates over and over. Sound because published templates are immutable; the manifest's checksum file
/// (whose digest covers the manifest, which covers every other file) must still match on every use, and the
/// images' sizes are re-checked.
fn check_template_cached(
    dir: &Path,
    host: &Fingerprint,
    options: &RestoreOptions,
) -> Result<CheckedTemplate, SnapshotError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    /// Directory -> (its manifest checksum file's bytes, the checked template).
    type Cache = HashMap<PathBuf, (Vec<u8>, Arc<CheckedTemplate>)>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = std::fs::read(dir.join(format::MANIFEST_SUM_FILE)).map_err(|source| {
        SnapshotError::Open {
            path: dir.join(format::MANIFEST_SUM_FILE),
            source,
        }
    })?;
    let hit = cache.lock().ok().and_then(|c| {
        c.get(dir)
            .filter(|(k, _)| *k == key)
            .map(|(_, t)| t.clone())
    });
    let checked = match hit {
        Some(t) => {
            format::verify_images_quick(dir, &t.manifest)?;
            if let Some(diff) = t.manifest.fingerprint.mismatch(host) {
                return Err(SnapshotError::Fingerprint(diff));
            }
            t
        }
        None => {
            let t = Arc::new(check_template(
                dir,
                host,
                &RestoreOptions {
                    serial: None,
                    vsock: None,
                    ..options.clone()
                },
            )?);
            if let Ok(mut c) = cache.lock() {
                if c.len() >= 64 {
                    c.clear();
                }
                c.insert(dir.to_path_buf(), (key, t.clone()));
            }
            t
        }
    };
    let mut checked = (*checked).clone();
    if let Some(serial) = &options.serial {
        checked.config.serial = serial.clone();
    }
    if let Some(vsock) = &options.vsock {
        override_vsock(&mut checked.config, vsock)?;
    }
    Ok(checked)
}

/// Checks a template before anything is created: manifest (format version, checksum), state layout version,
/// host fingerprint, state digest, image sizes; then parses the state and config.
fn check_template(
    dir: &Path,
    host: &Fingerprint,
    options: &RestoreOptions,
) -> Result<CheckedTemplate, SnapshotError> {
    let manifest = format::read_manifest(dir)?;
    let state_version = manifest.extra.get("state_version").and_then(|v| v.as_u64());
    if !state_version
        .is_some_and(|v| (u64::from(MIN_STATE_VERSION)..=u64::from(STATE_VERSION)).contains(&v))
    {
        return Err(SnapshotError::State(format!(
            "state layout version {state_version:?} is not one of the supported {MIN_STATE_VERSION}..={STATE_VERSION}"
        )));
    }
    if let Some(diff) = manifest.fingerprint.mismatch(host) {
        return Err(SnapshotError::Fingerprint(diff));
    }
    let state_bytes = format::verify_state(dir, &manifest)?;
    format::verify_images_quick(dir, &manifest)?;
    let state: VmState =
        serde_json::from_slice(&state_bytes).map_err(|e| SnapshotError::State(e.to_string()))?;
    let mut config: VmConfig =
        serde_json::from_value(manifest.vm_config.clone()).map_err(SnapshotError::Config)?;
    if let Some(serial) = &options.serial {
        config.serial = serial.clone();
    }
    if let Some(vsock) = &options.vsock {
        override_vsock(&mut config, vsock)?;
    }
    if state.vcpus.len() != config.cpus.boot_vcpus as usize {
        return Err(SnapshotError::State(format!(
            "{} vCPU states for {} boot vCPUs",
            state.vcpus.len(),
            config.cpus.boot_vcpus
        )));
    }
    Ok(CheckedTemplate {
        manifest,
        state,
        config,
    })
}

/// Maps every region image of a template for `options.mode`.
fn map_template_memory(
    dir: &Path,
    manifest: &format::Manifest,
    options: &RestoreOptions,
) -> Result<(GuestMemoryMmap, Option<OnDemandServer>), SnapshotError> {
    let mut regions: Vec<GuestRegionMmap> = Vec::with_capacity(manifest.regions.len());
    let mut sources = Vec::new();
    for region in &manifest.regions {
        let path = dir.join(&region.file);
        let file = File::open(&path).map_err(|source| SnapshotError::Open {
            path: path.clone(),
            source,
        })?;
        let len = region.size as usize;
        let mapped = match options.mode {
            RestoreMode::Cow => image::cow_guest_region::<()>(&file, len, region.guest_addr)?,
            RestoreMode::Copy => image::copy_guest_region::<()>(&file, len, region.guest_addr)?,
            RestoreMode::OnDemand => {
                let anon = image::anonymous_guest_region::<()>(len, region.guest_addr)?;
                sources.push(OnDemandSource {
                    file: Arc::new(file),
                    host: anon.as_ptr(),
                    len,
                    file_offset: 0,
                    guest_addr: region.guest_addr,
                });
                anon
            }
        };
        if options.prefault && options.mode != RestoreMode::OnDemand {
            // SAFETY: the range is the mapping just created for this region.
            unsafe {
                libc::madvise(
                    mapped.as_ptr() as *mut libc::c_void,
                    len,
                    libc::MADV_POPULATE_READ,
                )
            };
        }
        regions.push(mapped);
    }
    let memory =
        GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Memory(e.to_string()))?;
    let ondemand = if sources.is_empty() {
        None
    } else {
        let prefetch = format::read_working_set(dir, manifest)?;
        Some(OnDemandServer::start_sources(
            sources,
            OnDemandOptions {
                prefetch,
                ..Default::default()
            },
        )?)
    };
    Ok((memory, ondemand))
}
