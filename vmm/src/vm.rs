//! A VM's lifecycle: create its resources (KVM VM, guest memory, interrupt controllers, devices, vCPUs),
//! configure them for booting a kernel, run the vCPU threads, and wait for the guest to power off or reset.
//!
//! Creating resources is kept apart from configuring them for boot so that restoring from a template can
//! reuse the creation path and load saved state instead.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::exit::ExitReason;
use kvm_bindings::{kvm_enable_cap, CpuId, KVM_CAP_SPLIT_IRQCHIP, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::{self, layout};
use crate::config::VmConfig;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::memory::{self, MemoryError};
use crate::vcpu::{self, RunRequest, Vcpu, VcpuControl, VcpuShared};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm is not a KVM device (KVM_GET_API_VERSION failed)")]
    NotKvm,
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a capability trenv needs: {0}")]
    MissingCapability(&'static str),
    #[error("cannot enable the split irqchip")]
    SplitIrqchip(#[source] kvm_ioctls::Error),
    #[error("cannot set the TSS address")]
    TssAddress(#[source] kvm_ioctls::Error),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("devices")]
    Devices(#[from] DeviceError),
    #[error("cannot create vCPU {id}")]
    CreateVcpu {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot read KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open initramfs {path}")]
    OpenInitramfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the kernel")]
    Boot(#[from] arch::boot::BootError),
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] arch::acpi::AcpiError),
    #[error("cannot set up vCPU {id}: {message}")]
    VcpuSetup { id: u8, message: String },
    #[error("cannot start vCPU threads")]
    SpawnVcpu(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    #[error("the VM has no kernel to boot")]
    NoKernel,
    /// A vCPU thread hit an error it could not recover from; the VM cannot run on.
    #[error("{0}")]
    VcpuFailed(String),
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("the VM is parked (its memory was dropped): repurpose it to a template first")]
    Parked,
    #[error("{0}")]
    GuestMemory(String),
    #[error("snapshot/restore")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("waiting for the guest failed")]
    Wait(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, VmError>;

/// Opens /dev/kvm and checks what trenv cannot run without.
pub fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(VmError::NotKvm);
    }
    if version != 12 {
        return Err(VmError::KvmApiVersion(version));
    }
    for (cap, name) in [
        (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (kvm_ioctls::Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
        (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) kvm: Kvm,
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) devices: DeviceManager,
    pub(crate) base_cpuid: CpuId,
    pub(crate) vcpus: Vec<Arc<Mutex<Vcpu>>>,
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) shared: VcpuShared,
    /// KVM's clock when the VM was paused, restored on resume.
    pub(crate) paused_clock: Option<kvm_bindings::kvm_clock_data>,
    /// Parked: paused with its guest memory dropped; only a repurpose may bring a guest back.
    pub(crate) parked: bool,
    /// The serialized state captured by the first snapshot of the current pause.
    pub(crate) paused_state: Option<Vec<u8>>,
    /// What a restored VM's memory depends on (template lease, on-demand pager); empty for a booted VM.
    pub(crate) backing: crate::snapshot::TemplateBacking,
    /// When creation began: the origin of the VMM-side boot timings.
    pub created_at: Instant,
}

impl Vm {
    /// Creates every resource of the VM; nothing runs yet and guest memory is still empty.
    pub fn create(kvm: Kvm, config: &VmConfig) -> Result<Vm> {
        let memory = memory::create_guest_memory(&config.memory)?;
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        Self::create_with_memory(kvm, config, memory, base_cpuid, &Default::default())
    }

    /// Creates every resource of the VM around `memory` (fresh anonymous RAM for a boot, or a template's
    /// images for a restore).
    /// `base_cpuid` is KVM's supported CPUID (fetched once per VM: the ioctl costs ~0.3 ms here).
    /// `placements` puts PCI devices where a template had them (empty for a boot).
    pub fn create_with_memory(
        kvm: Kvm,
        config: &VmConfig,
        memory: GuestMemoryMmap,
        base_cpuid: CpuId,
        placements: &std::collections::BTreeMap<String, crate::pci_devices::Placement>,
    ) -> Result<Vm> {
        let created_at = Instant::now();
        let vm_fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);

        // Memory first: a memslot registered before the irqchip exists avoids an expensive SRCU
        // synchronisation in KVM (~7 ms on these hosts, see HOST-FACTS).
        memory::register_with_kvm(&vm_fd, &memory)?;

        // LAPIC in KVM, IOAPIC in the VMM, no PIC or PIT: far cheaper to create than the full in-kernel
        // irqchip, and what a modern Linux guest needs.
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = layout::IOAPIC_PINS as u64;
        vm_fd.enable_cap(&cap).map_err(VmError::SplitIrqchip)?;
        // Intel VMX needs three pages for the real-mode TSS; place them just below the IOAPIC hole.
        vm_fd
            .set_tss_address(0xfffb_d000)
            .map_err(VmError::TssAddress)?;

        let devices = DeviceManager::with_placements(vm_fd.clone(), config, &memory, placements)?;

        let mut vcpus = Vec::new();
        for id in 0..config.cpus.boot_vcpus {
            let fd = vm_fd
                .create_vcpu(id as u64)
                .map_err(|source| VmError::CreateVcpu { id, source })?;
            vcpus.push(Arc::new(Mutex::new(Vcpu { id, fd })));
        }

        let shared = VcpuShared {
            pio_bus: devices.pio_bus.clone(),
            mmio_bus: devices.mmio_bus.clone(),
            ioapic: devices.ioapic.clone(),
            exit: devices.exit.clone(),
            control: Arc::new(VcpuControl::default()),
            failure: Arc::new(Mutex::new(None)),
        };
        Ok(Vm {
            config: config.clone(),
            kvm,
            vm_fd,
            memory,
            devices,
            base_cpuid,
            vcpus,
            threads: Vec::new(),
            shared,
            paused_clock: None,
            paused_state: None,
            parked: false,
            backing: Default::default(),
            created_at,
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// Loads the kernel (and initramfs), writes the boot structures and ACPI tables, and sets every vCPU's
    /// initial state for a cold boot.
    pub fn configure_for_boot(&mut self) -> Result<()> {
        let payload = &self.config.payload;
        let kernel_path = payload.kernel.as_ref().ok_or(VmError::NoKernel)?;
        let mut kernel_file = File::open(kernel_path).map_err(|source| VmError::OpenKernel {
            path: kernel_path.display().to_string(),
            source,
        })?;
        let kernel = arch::boot::load_kernel(&self.memory, &mut kernel_file)?;
        let initramfs = match &payload.initramfs {
            Some(path) => {
                let mut file = File::open(path).map_err(|source| VmError::OpenInitramfs {
                    path: path.display().to_string(),
                    source,
                })?;
                Some(arch::boot::load_initramfs(
                    &self.memory,
                    &mut file,
                    &kernel,
                )?)
            }
            None => None,
        };
        let rsdp = arch::acpi::create_acpi_tables(
            &self.memory,
            &arch::acpi::AcpiConfig {
                vcpu_count: self.config.cpus.boot_vcpus,
                max_vcpus: self.config.cpus.max_vcpus,
            },
        )?;
        // A cold boot's generation ID: random for Linux's RNG seeding, while the test guest's register
        // stays 0 until the first restore (it tells cold boots from clones).
        {
            use vm_memory::Bytes;
            let id = crate::snapshot::new_generation_id();
            self.memory
                .write_slice(
                    &id.to_le_bytes(),
                    vm_memory::GuestAddress(layout::VMGENID_START),
                )
                .map_err(|e| {
                    VmError::GuestMemory(format!("cannot write the VMGenID buffer: {e}"))
                })?;
        }
        let cmdline = payload.cmdline.clone().unwrap_or_default();
        arch::boot::configure_boot(
            &self.memory,
            &kernel,
            &arch::boot::BootConfig {
                cmdline: &cmdline,
                initramfs,
                rsdp,
                mem_size: self.config.memory.size,
            },
        )?;
        log::info!(
            "kernel loaded: entry {:#x} ({:?}), rsdp {:#x}",
            kernel.entry.0,
            kernel.protocol,
            rsdp.0
        );

        let topology = self.topology();
        let count = self.config.cpus.boot_vcpus;
        for vcpu in &self.vcpus {
            let vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            let id = vcpu.id;
            let setup_err = |message: String| VmError::VcpuSetup { id, message };
            let cpuid = arch::cpuid::vcpu_cpuid(&self.base_cpuid, id, count, &topology)
                .map_err(|e| setup_err(e.to_string()))?;
            vcpu.fd
                .set_cpuid2(&cpuid)
                .map_err(|e| setup_err(format!("KVM_SET_CPUID2: {e}")))?;
            arch::msr::setup_msrs(&self.kvm, &vcpu.fd).map_err(|e| setup_err(e.to_string()))?;
            arch::interrupts::set_lint(&vcpu.fd).map_err(|e| setup_err(e.to_string()))?;
            if id == 0 {
                // APs wait for INIT/SIPI from the guest; KVM starts them in that state.
                arch::regs::setup_boot_vcpu(&vcpu.fd, &self.memory, &kernel)
                    .map_err(|e| setup_err(e.to_string()))?;
            }
        }
        Ok(())
    }

    fn topology(&self) -> arch::cpuid::CpuTopology {
        match self.config.cpus.topology {
            Some(t) => arch::cpuid::CpuTopology {
                threads_per_core: t.threads_per_core,
                cores_per_die: t.cores_per_die,
                dies_per_package: t.dies_per_package,
                packages: t.packages,
            },
            None => arch::cpuid::CpuTopology {
                threads_per_core: 1,
                cores_per_die: self.config.cpus.max_vcpus,
                dies_per_package: 1,
                packages: 1,
            },
        }
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<()> {
        vcpu::install_kick_handler().map_err(VmError::KickHandler)?;
        self.shared.control.set_request(RunRequest::Run);
        if !self.threads.is_empty() {
            return Ok(());
        }
        for vcpu in &self.vcpus {
            let handle =
                Vcpu::spawn(vcpu.clone(), self.shared.clone()).map_err(VmError::SpawnVcpu)?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// The guest's exit reason once it has powered off or reset, or None while it runs. A vCPU failure is
    /// an error.
    pub fn poll_exit(&self) -> Result<Option<ExitReason>> {
        if let Some(failure) = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(VmError::VcpuFailed(failure));
        }
        Ok(self.devices.exit.reason())
    }

    /// The eventfd that becomes readable when `poll_exit` has something to say.
    pub fn exit_eventfd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.devices.exit.eventfd()
    }

    /// Blocks until the guest powers off or resets (or a vCPU fails).
    pub fn wait(&self) -> Result<ExitReason> {
        loop {
            if let Some(reason) = self.poll_exit()? {
                return Ok(reason);
            }
            let mut pollfd = libc::pollfd {
                fd: self.exit_eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one descriptor we own, described by a pollfd on our stack.
            if unsafe { libc::poll(&mut pollfd, 1, -1) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(VmError::Wait(e));
                }
            }
            // The eventfd is non-blocking; draining it may race with another reader, which is fine.
            let _ = self.exit_eventfd().read();
        }
    }

    /// Parks every vCPU thread outside KVM_RUN; KVM's clock is frozen so that guest time does not jump
    /// across the pause.
    pub fn pause(&mut self) -> Result<()> {
        self.shared.control.set_request(RunRequest::Pause);
        self.devices.idle_waker.wake();
        const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
        if !self
            .shared
            .control
            .wait_parked(&self.threads, Instant::now() + PAUSE_TIMEOUT)
        {
            self.shared.control.set_request(RunRequest::Run);
            return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
        }
        match self.vm_fd.get_clock() {
            Ok(clock) => self.paused_clock = Some(clock),
            Err(e) => log::warn!("cannot read the KVM clock at pause: {e}"),
        }
        Ok(())
    }

    /// True when no vCPU runs guest code: paused, or restored and not started yet.
    pub fn is_paused(&self) -> bool {
        self.threads.is_empty() || self.shared.control.request() == RunRequest::Pause
    }

    /// Lets paused vCPU threads run again (or starts them, for a VM restored paused).
    pub fn resume(&mut self) -> Result<()> {
        if self.resume_deferred()? {
            self.release_vcpus();
        }
        Ok(())
    }

    /// Everything [`Self::resume`] does except letting parked vCPU threads run; true when the caller must
    /// still call [`Self::release_vcpus`] (a VM whose vCPU threads were not started yet starts them here).
    /// The API answers a resuming request between the two, so that the reply does not compete for a CPU
    /// with the guest it just set running.
    pub fn resume_deferred(&mut self) -> Result<bool> {
        if self.parked {
            return Err(VmError::Parked);
        }
        self.paused_state = None;
        // Devices a snapshot paused serve again (a no-op for running ones).
        self.devices.pci.resume_devices();
        if let Some(clock) = self.paused_clock.take() {
            self.set_clock(clock);
        }
        if self.threads.is_empty() {
            self.start()?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Lets parked vCPU threads run guest code again (the last step of a resume).
    pub fn release_vcpus(&self) {
        self.shared.control.set_request(RunRequest::Run);
    }

    /// [`Vm::release_vcpus`] for later, from any thread: it does nothing if the VM was paused, stopped
    /// or resumed since this was taken.
    pub fn vcpu_release(&self) -> impl FnOnce() + Send + 'static {
        let control = self.shared.control.clone();
        let changes = control.changes();
        move || control.run_unless_changed(changes)
    }

    pub(crate) fn set_clock(&self, mut clock: kvm_bindings::kvm_clock_data) {
        // Only the time value is loaded; the flags describe the reading, not a request.
        clock.flags = 0;
        if let Err(e) = self.vm_fd.set_clock(&clock) {
            log::warn!("cannot load the KVM clock: {e}");
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop_vcpus(&mut self) {
        self.shared.control.set_request(RunRequest::Stop);
        self.devices.idle_waker.wake();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                vcpu::kick(t);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("a vCPU thread did not stop within 2 s");
            }
        }
    }

    /// The guest-signal events seen so far.
    pub fn guest_events(&self) -> Vec<devices::guest_signal::GuestEvent> {
        self.devices
            .guest_events
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
