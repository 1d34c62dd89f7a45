//! The VMM process's control loop: owns at most one VM, applies API requests to it in order, and reacts to
//! the guest powering off or resetting.
//!
//! States follow Cloud Hypervisor's: no VM (404 for VM requests), `Created` (config stored, nothing running),
//! `Running`, `Paused`, `Shutdown` (stopped, config kept so it can boot again). A guest power-off ends the
//! process (exit 0), as Kata expects; a guest reset reboots the VM when an API socket is serving, and ends
//! the process otherwise.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, TryRecvError};

use api::models::{VmConfig, VmInfo, VmState, VmmPingResponse};
use api::router::{ApiRequest, ApiResponse};
use api::server::ApiCall;
use devices::exit::ExitReason;
use vmm_sys_util::eventfd::EventFd;

use crate::event_monitor;
use crate::hotplug::HotplugRequest;
use crate::vm::{self, Vm, VmError};

/// Why the control loop ended.
#[derive(Debug)]
pub enum VmmExit {
    /// The guest powered off, or reset without an API to reboot it.
    Guest(ExitReason),
    /// `vmm.shutdown` was requested.
    Requested,
    /// The VM failed (a vCPU error); the process should exit non-zero.
    Failed(String),
}

pub struct Vmm {
    config: Option<VmConfig>,
    vm: Option<Vm>,
    state: VmState,
    api: Option<(Receiver<ApiCall>, EventFd)>,
    /// The request just handled resumed the VM: its vCPUs are let run once the reply is written to the
    /// client ([`Vm::resume_deferred`], [`api::server::ApiReplier::answer_then`]).
    release_after_reply: bool,
}

/// The error chain of a response as one line (for the CLI, which has no HTTP client to show it to).
pub fn response_text(response: &ApiResponse) -> String {
    match response {
        ApiResponse::Error { chain, .. } => chain.join(": "),
        _ => String::new(),
    }
}

fn not_created() -> ApiResponse {
    ApiResponse::Error {
        status: 404,
        chain: vec!["the VM is not created (PUT vm.create first)".to_string()],
    }
}

fn invalid_state(action: &str, state: VmState) -> ApiResponse {
    ApiResponse::Error {
        status: 500,
        chain: vec![format!("cannot {action} a VM that is {state:?}")],
    }
}

fn vm_error(action: &str, e: &VmError) -> ApiResponse {
    let mut chain = vec![format!("cannot {action} the VM")];
    chain.extend(crate::error_chain_list(e));
    ApiResponse::Error { status: 500, chain }
}

impl Vmm {
    pub fn new(api: Option<(Receiver<ApiCall>, EventFd)>) -> Vmm {
        Vmm {
            config: None,
            vm: None,
            state: VmState::Created,
            api,
            release_after_reply: false,
        }
    }

    pub fn state(&self) -> Option<VmState> {
        self.config.as_ref().map(|_| self.state)
    }

    /// Stores a configuration (vm.create, or the CLI's flags).
    pub fn create(&mut self, config: VmConfig) -> Result<(), ApiResponse> {
        if self.config.is_some() {
            return Err(ApiResponse::Error {
                status: 500,
                chain: vec!["a VM is already created (PUT vm.delete first)".to_string()],
            });
        }
        if let Err(e) = config.validate() {
            return Err(ApiResponse::Error {
                status: 400,
                chain: vec!["invalid VM configuration".to_string(), e.to_string()],
            });
        }
        if let Some(missing) = unsupported_feature(&config) {
            return Err(ApiResponse::not_available(missing));
        }
        self.config = Some(config);
        self.state = VmState::Created;
        event_monitor::emit("vm", "created", &[]);
        Ok(())
    }

    /// Creates and starts the VM from the stored configuration.
    pub fn boot(&mut self) -> Result<(), VmError> {
        let config = self.config.as_ref().expect("boot needs a created VM");
        let kvm = vm::open_kvm()?;
        let mut vm = Vm::create(kvm, config)?;
        vm.configure_for_boot()?;
        event_monitor::emit("vm", "booting", &[]);
        vm.start()?;
        event_monitor::emit("vm", "booted", &[]);
        self.vm = Some(vm);
        self.state = VmState::Running;
        Ok(())
    }

    /// `vm.add-disk`, `-pmem`, `-net`, `-vsock`: before boot the device joins the configuration (204, as
    /// Cloud Hypervisor answers); on a running or paused VM it is hot-plugged (200 with its id and PCI
    /// address).
    fn add_device(&mut self, request: HotplugRequest) -> ApiResponse {
        let what = request.kind();
        match (self.state(), self.vm.as_mut()) {
            (None, _) => not_created(),
            (Some(VmState::Created) | Some(VmState::Shutdown), _) => match request {
                HotplugRequest::Disk(disk) => {
                    self.cold_add(what, |c| c.disks.get_or_insert_with(Vec::new).push(disk))
                }
                HotplugRequest::Pmem(pmem) => {
                    self.cold_add(what, |c| c.pmem.get_or_insert_with(Vec::new).push(pmem))
                }
                HotplugRequest::Net(_, fds) if !fds.is_empty() => {
                    ApiResponse::not_available("passing tap fds with vm.add-net before boot")
                }
                HotplugRequest::Net(net, _) => {
                    self.cold_add(what, |c| c.net.get_or_insert_with(Vec::new).push(net))
                }
                HotplugRequest::Vsock(_)
                    if self.config.as_ref().is_some_and(|c| c.vsock.is_some()) =>
                {
                    ApiResponse::message(400, "the VM already has a vsock device")
                }
                HotplugRequest::Vsock(vsock) => self.cold_add(what, |c| c.vsock = Some(vsock)),
            },
            (Some(VmState::Running) | Some(VmState::Paused), Some(vm)) => {
                match vm.hot_add(request) {
                    Ok(info) => {
                        self.config = Some(vm.config().clone());
                        ApiResponse::json(&info)
                    }
                    Err(e) => {
                        let mut chain = vec![format!("cannot add the {what}")];
                        chain.extend(crate::error_chain_list(&e));
                        ApiResponse::Error {
                            status: e.status(),
                            chain,
                        }
                    }
                }
            }
            (Some(state), _) => invalid_state(&format!("add a {what} to"), state),
        }
    }

    /// Adds a device to a VM that has not booted.
    fn cold_add(&mut self, what: &str, add: impl FnOnce(&mut VmConfig)) -> ApiResponse {
        let Some(config) = self.config.as_ref() else {
            return not_created();
        };
        let mut config = config.clone();
        add(&mut config);
        if let Err(e) = config.validate() {
            return ApiResponse::Error {
                status: 400,
                chain: vec![format!("cannot add the {what}"), e.to_string()],
            };
        }
        if let Some(missing) = unsupported_feature(&config) {
            return ApiResponse::not_available(missing);
        }
        self.config = Some(config);
        ApiResponse::Empty
    }

    /// `vm.remove-device`: before boot the device leaves the configuration; on a running or paused VM the
    /// guest is asked to eject it (204 at once; the device goes when the guest has ejected it).
    fn remove_device(&mut self, id: &str) -> ApiResponse {
        let unknown = || ApiResponse::message(404, format!("no device has id '{id}'"));
        match (self.state(), self.vm.as_mut()) {
            (None, _) => not_created(),
            (Some(VmState::Created) | Some(VmState::Shutdown), _) => {
                let Some(mut config) = self.config.clone() else {
                    return not_created();
                };
                if !crate::hotplug::remove_from_config(&mut config, id) {
                    return unknown();
                }
                self.config = Some(config);
                ApiResponse::Empty
            }
            (Some(VmState::Running) | Some(VmState::Paused), Some(vm)) => {
                match vm.request_removal(id) {
                    Ok(()) => ApiResponse::Empty,
                    Err(e) => {
                        let mut chain = vec![format!("cannot remove device '{id}'")];
                        chain.extend(crate::error_chain_list(&e));
                        ApiResponse::Error {
                            status: e.status(),
                            chain,
                        }
                    }
                }
            }
            (Some(state), _) => invalid_state("remove a device from", state),
        }
    }

    /// Lets go of the devices the guest ejected and drops them from the configuration.
    fn complete_ejections(&mut self) {
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        if !vm.complete_ejections().is_empty() {
            self.config = Some(vm.config().clone());
        }
    }

    /// Builds the VM from a template; it stays paused unless `resume`.
    pub fn restore(
        &mut self,
        dir: &std::path::Path,
        options: &crate::snapshot::RestoreOptions,
        resume: bool,
    ) -> Result<(), VmError> {
        let kvm = vm::open_kvm()?;
        let mut vm = Vm::restore(kvm, dir, options)?;
        self.config = Some(vm.config().clone());
        self.state = VmState::Paused;
        event_monitor::emit("vm", "restored", &[("source", dir.display().to_string())]);
        if resume {
            vm.resume()?;
            self.state = VmState::Running;
            event_monitor::emit("vm", "resumed", &[]);
        }
        self.vm = Some(vm);
        Ok(())
    }

    /// Switches the VM to another template in place, or, when the template's layout or devices differ,
    /// replaces it with a VM restored from the template (and says so).
    fn repurpose(&mut self, req: &api::models::VmRepurposeConfig) -> ApiResponse {
        let dir = match resolve_template(&req.template) {
            Ok(dir) => dir,
            Err(message) => {
                return ApiResponse::Error {
                    status: 400,
                    chain: vec![format!("cannot repurpose to '{}'", req.template), message],
                }
            }
        };
        let options = crate::snapshot::RestoreOptions {
            mode: restore_mode(req.memory_restore_mode),
            serial: None,
            prefault: false,
            vsock: None,
        };
        let Some(vm) = self.vm.as_mut() else {
            return not_created();
        };
        let t0 = event_monitor::monotonic_ns();
        match vm.repurpose(&dir, &options) {
            Ok(phases) => {
                self.config = Some(vm.config().clone());
                self.state = VmState::Paused;
                if req.resume {
                    match vm.resume_deferred() {
                        Ok(release) => self.release_after_reply = release,
                        Err(e) => return vm_error("resume the repurposed", &e),
                    }
                    self.state = VmState::Running;
                }
                let resumed = event_monitor::monotonic_ns();
                let us = (resumed - t0) / 1000;
                let phase_sum = phases.check_us
                    + phases.pause_us
                    + phases.map_us
                    + phases.devices_us
                    + phases.state_us;
                event_monitor::emit(
                    "vm",
                    "repurposed",
                    &[
                        ("template", dir.display().to_string()),
                        ("us", us.to_string()),
                        ("check_us", phases.check_us.to_string()),
                        ("pause_us", phases.pause_us.to_string()),
                        ("map_us", phases.map_us.to_string()),
                        ("devices_us", phases.devices_us.to_string()),
                        ("state_us", phases.state_us.to_string()),
                        ("resume_us", us.saturating_sub(phase_sum).to_string()),
                    ],
                );
                ApiResponse::Json(serde_json::json!({"in_place": true, "duration_us": us}))
            }
            Err(VmError::Snapshot(crate::snapshot::SnapshotError::Incompatible(reason))) => {
                log::info!(
                    "repurpose to {}: {reason}; restoring a new VM instead",
                    dir.display()
                );
                let serial = self.config.as_ref().map(|c| c.serial.clone());
                self.stop_vm();
                self.config = None;
                let options = crate::snapshot::RestoreOptions { serial, ..options };
                match self.restore(&dir, &options, req.resume) {
                    Ok(()) => {
                        ApiResponse::Json(serde_json::json!({"in_place": false, "reason": reason}))
                    }
                    Err(e) => vm_error("restore (after an incompatible repurpose)", &e),
                }
            }
            Err(e) => vm_error("repurpose", &e),
        }
    }

    fn stop_vm(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.stop_vcpus();
        }
        if self.config.is_some() {
            self.state = VmState::Shutdown;
        }
    }

    fn handle(&mut self, request: ApiRequest) -> (ApiResponse, Option<VmmExit>) {
        use ApiRequest as R;
        let response = match request {
            R::VmmPing => ApiResponse::Json(
                serde_json::to_value(VmmPingResponse {
                    build_version: env!("CARGO_PKG_VERSION").to_string(),
                    version: format!(
                        "{} (trenv {})",
                        api::CH_COMPAT_VERSION,
                        env!("CARGO_PKG_VERSION")
                    ),
                    pid: std::process::id() as i64,
                    features: vec!["kvm".to_string(), "trenv".to_string()],
                })
                .unwrap_or_default(),
            ),
            R::VmmShutdown => {
                self.stop_vm();
                return (ApiResponse::Empty, Some(VmmExit::Requested));
            }
            R::VmCreate(config) => match self.create(*config) {
                Ok(()) => ApiResponse::Empty,
                Err(response) => response,
            },
            R::VmBoot => match self.state() {
                None => not_created(),
                Some(VmState::Created) | Some(VmState::Shutdown) => match self.boot() {
                    Ok(()) => ApiResponse::Empty,
                    Err(e) => vm_error("boot", &e),
                },
                Some(state) => invalid_state("boot", state),
            },
            R::VmShutdown => match self.state() {
                None => not_created(),
                Some(VmState::Running) | Some(VmState::Paused) => {
                    self.stop_vm();
                    event_monitor::emit("vm", "shutdown", &[]);
                    ApiResponse::Empty
                }
                Some(state) => invalid_state("shut down", state),
            },
            R::VmReboot => match self.state() {
                None => not_created(),
                Some(VmState::Running) | Some(VmState::Paused) => self.reboot(),
                Some(state) => invalid_state("reboot", state),
            },
            R::VmPause => match (self.state(), self.vm.as_mut()) {
                (None, _) => not_created(),
                (Some(VmState::Running), Some(vm)) => match vm.pause() {
                    Ok(()) => {
                        self.state = VmState::Paused;
                        event_monitor::emit("vm", "paused", &[]);
                        ApiResponse::Empty
                    }
                    Err(e) => vm_error("pause", &e),
                },
                (Some(state), _) => invalid_state("pause", state),
            },
            R::VmResume => match (self.state(), self.vm.as_mut()) {
                (None, _) => not_created(),
                (Some(VmState::Paused), Some(vm)) => match vm.resume_deferred() {
                    Ok(release) => {
                        self.release_after_reply = release;
                        self.state = VmState::Running;
                        event_monitor::emit("vm", "resumed", &[]);
                        ApiResponse::Empty
                    }
                    Err(e) => vm_error("resume", &e),
                },
                (Some(state), _) => invalid_state("resume", state),
            },
            R::VmDelete => {
                if self.config.is_none() {
                    not_created()
                } else {
                    self.stop_vm();
                    self.config = None;
                    event_monitor::emit("vm", "deleted", &[]);
                    ApiResponse::Empty
                }
            }
            R::VmInfo => match &self.config {
                None => not_created(),
                Some(config) => ApiResponse::Json(
                    serde_json::to_value(VmInfo {
                        config: config.clone(),
                        state: self.state,
                        memory_actual_size: Some(config.memory.size),
                        device_tree: Some(self.device_tree()),
                    })
                    .unwrap_or_default(),
                ),
            },
            R::VmCounters => match &self.config {
                None => not_created(),
                Some(_) => ApiResponse::Json(self.counters()),
            },
            R::VmPowerButton => ApiResponse::not_available(
                "vm.power-button (needs the ACPI generic event device, not in this build)",
            ),
            R::VmNmi => ApiResponse::not_available("vm.nmi (NMI injection is not in this build)"),
            R::VmResize(_) | R::VmResizeZone(_) | R::VmResizeDisk(_) => {
                ApiResponse::not_available("resizing (CPU/memory hotplug is not in this build)")
            }
            R::VmAddDisk(disk) => self.add_device(HotplugRequest::Disk(disk)),
            R::VmAddPmem(pmem) => self.add_device(HotplugRequest::Pmem(pmem)),
            R::VmAddNet(net, fds) => self.add_device(HotplugRequest::Net(net, fds)),
            R::VmAddVsock(vsock) => self.add_device(HotplugRequest::Vsock(vsock)),
            R::VmRemoveDevice(req) => self.remove_device(&req.id),
            R::VmAddFs(_) | R::VmAddDevice(_) | R::VmAddUserDevice(_) | R::VmAddVdpa(_) => {
                ApiResponse::not_available(
                    "virtio-fs, VFIO, vfio-user and vDPA devices (only disks, pmem, net and vsock)",
                )
            }
            R::VmSnapshot(snapshot) => match (self.state(), self.vm.as_mut()) {
                (None, _) => not_created(),
                (Some(VmState::Paused), Some(vm)) => {
                    match crate::snapshot::url_to_path(&snapshot.destination_url)
                        .and_then(|path| vm.snapshot(&path))
                    {
                        Ok(path) => {
                            event_monitor::emit(
                                "vm",
                                "snapshotted",
                                &[("path", path.display().to_string())],
                            );
                            ApiResponse::Empty
                        }
                        Err(e) => vm_error("snapshot", &VmError::from(e)),
                    }
                }
                (Some(state), _) => invalid_state("snapshot (pause it first)", state),
            },
            R::VmRestore(restore, _fds) => {
                if self.config.is_some() {
                    ApiResponse::Error {
                        status: 500,
                        chain: vec![
                            "cannot restore: a VM is already created (PUT vm.delete first)".into(),
                        ],
                    }
                } else {
                    let options = crate::snapshot::RestoreOptions {
                        mode: restore_mode(restore.memory_restore_mode),
                        serial: None,
                        prefault: restore.prefault,
                        vsock: None,
                    };
                    match crate::snapshot::url_to_path(&restore.source_url)
                        .map_err(VmError::from)
                        .and_then(|dir| self.restore(&dir, &options, restore.resume))
                    {
                        Ok(()) => ApiResponse::Empty,
                        Err(e) => vm_error("restore", &e),
                    }
                }
            }
            R::VmRepurpose(req) => match self.state() {
                None => not_created(),
                Some(VmState::Running) | Some(VmState::Paused) => self.repurpose(&req),
                Some(state) => invalid_state("repurpose", state),
            },
            R::VmPark => match (self.state(), self.vm.as_mut()) {
                (None, _) => not_created(),
                (Some(VmState::Running) | Some(VmState::Paused), Some(vm)) => match vm.park() {
                    Ok(dropped) => {
                        self.state = VmState::Paused;
                        let (rss_kib, _) = crate::runner::process_memory_kib();
                        event_monitor::emit(
                            "vm",
                            "parked",
                            &[("vmm_rss_kib", rss_kib.to_string())],
                        );
                        ApiResponse::Json(serde_json::json!({
                            "vmm_rss_kib": rss_kib,
                            "dropped_kib": dropped / 1024,
                        }))
                    }
                    Err(e) => vm_error("park", &e),
                },
                (Some(state), _) => invalid_state("park", state),
            },
            R::VmSendMigration(_) | R::VmReceiveMigration(_) => {
                ApiResponse::not_available("live migration")
            }
        };
        (response, None)
    }

    fn reboot(&mut self) -> ApiResponse {
        self.stop_vm();
        match self.boot() {
            Ok(()) => {
                event_monitor::emit("vm", "rebooted", &[]);
                ApiResponse::Empty
            }
            Err(e) => vm_error("reboot", &e),
        }
    }

    /// The PCI devices of the running VM by id, with their addresses (empty before boot).
    fn device_tree(&self) -> std::collections::BTreeMap<String, api::models::DeviceNode> {
        self.vm
            .iter()
            .flat_map(|vm| vm.devices().pci.devices())
            .map(|(id, bdf)| {
                let node = api::models::DeviceNode {
                    id: id.clone(),
                    pci_bdf: Some(bdf),
                    ..Default::default()
                };
                (id, node)
            })
            .collect()
    }

    fn counters(&self) -> serde_json::Value {
        let events = self
            .vm
            .as_ref()
            .map(|vm| vm.guest_events().len())
            .unwrap_or(0);
        let mut counters = serde_json::json!({
            "guest-signal": { "events": events },
        });
        for pmem in self.vm.iter().flat_map(|vm| &vm.devices().pmem) {
            let values: serde_json::Map<String, serde_json::Value> = pmem
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect();
            counters[format!("pmem {}", pmem.id)] = values.into();
        }
        counters
    }

    /// Serves API calls and guest exits until the process should end.
    pub fn run(&mut self) -> VmmExit {
        loop {
            // Devices the guest ejected leave first, so that API calls see the VM as the guest does.
            self.complete_ejections();
            // Then API calls: they are what an operator is waiting on.
            if let Some(exit) = self.serve_api_calls() {
                return exit;
            }
            if let Some(exit) = self.check_guest() {
                return exit;
            }
            self.wait_for_events();
        }
    }

    fn serve_api_calls(&mut self) -> Option<VmmExit> {
        let mut calls = Vec::new();
        if let Some((receiver, wake)) = &self.api {
            let _ = wake.read();
            loop {
                match receiver.try_recv() {
                    Ok(call) => calls.push(call),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        log::error!("the API server thread ended");
                        break;
                    }
                }
            }
        }
        for call in calls {
            let (response, exit) = self.handle(call.request);
            let release = std::mem::take(&mut self.release_after_reply)
                .then(|| self.vm.as_ref().map(Vm::vcpu_release))
                .flatten();
            match release {
                // The guest runs once the reply is on the wire, so it does not compete with the
                // connection thread writing it.
                Some(release) => call.reply.answer_then(response, Box::new(release)),
                None => call.reply.answer(response),
            }
            if exit.is_some() {
                return exit;
            }
        }
        None
    }

    fn check_guest(&mut self) -> Option<VmmExit> {
        let vm = self.vm.as_ref()?;
        match vm.poll_exit() {
            Ok(None) => None,
            Ok(Some(ExitReason::Reset)) if self.api.is_some() => {
                log::info!("guest reset: rebooting the VM");
                if let ApiResponse::Error { chain, .. } = self.reboot() {
                    return Some(VmmExit::Failed(chain.join(": ")));
                }
                None
            }
            Ok(Some(reason)) => {
                let (rss_kib, hwm_kib) = crate::runner::process_memory_kib();
                self.stop_vm();
                event_monitor::emit(
                    "vm",
                    if reason == ExitReason::PowerOff {
                        "shutdown"
                    } else {
                        "reset"
                    },
                    &[
                        ("vmm_rss_kib", rss_kib.to_string()),
                        ("vmm_hwm_kib", hwm_kib.to_string()),
                    ],
                );
                Some(VmmExit::Guest(reason))
            }
            Err(e) => {
                // A pmem file that shrank under the guest makes KVM_RUN fail with a bare EFAULT: name it.
                let mut message = crate::error_chain(&e);
                for pmem in &vm.devices().pmem {
                    if let Err(cause) = pmem.backing.check_file() {
                        log::error!("{cause}");
                        message = format!("{message}: {cause}");
                    }
                }
                self.stop_vm();
                Some(VmmExit::Failed(message))
            }
        }
    }

    fn wait_for_events(&self) {
        let mut fds = Vec::with_capacity(3);
        if let Some((_, wake)) = &self.api {
            fds.push(libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(vm) = &self.vm {
            for fd in [vm.exit_eventfd(), vm.hotplug_eventfd()] {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        // SAFETY: polls descriptors we own through pollfds on our stack. Without any, this just sleeps, which
        // only happens without an API and without a VM, a state `run` never waits in.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if let Some(vm) = &self.vm {
            let _ = vm.exit_eventfd().read();
        }
    }
}

/// A template named by `file:///dir`, an absolute directory, or a name/digest in the template store
/// (`$TRENV_STORE_DIR`, default /var/lib/trenv/templates).
pub fn resolve_template(template: &str) -> Result<std::path::PathBuf, String> {
    if template.starts_with("file://") || template.starts_with('/') {
        return crate::snapshot::url_to_path(template).map_err(|e| e.to_string());
    }
    let store = memory_template::store::TemplateStore::open(
        &memory_template::store::TemplateStore::default_root(),
    )
    .map_err(|e| e.to_string())?;
    store
        .resolve(template)
        .map(|t| t.dir)
        .map_err(|e| e.to_string())
}

/// Cloud Hypervisor's restore modes mapped onto the template crate's.
pub fn restore_mode(mode: api::models::MemoryRestoreMode) -> memory_template::image::RestoreMode {
    use api::models::MemoryRestoreMode as Api;
    use memory_template::image::RestoreMode;
    match mode {
        Api::Copy => RestoreMode::Copy,
        Api::OnDemand => RestoreMode::OnDemand,
        Api::CopyOnWrite => RestoreMode::Cow,
    }
}

/// The first configured feature this build cannot provide, so that vm.create fails clearly instead of
/// booting a VM without what was asked for.
fn unsupported_feature(config: &VmConfig) -> Option<&'static str> {
    let non_empty = |len: Option<usize>| len.is_some_and(|n| n > 0);
    if config
        .disks
        .iter()
        .flatten()
        .any(|d| d.vhost_user || d.num_queues > 1)
    {
        return Some("vhost-user or multi-queue disks");
    }
    if config
        .net
        .iter()
        .flatten()
        .any(|n| n.vhost_user || n.num_queues != 2 || n.iommu || n.pci_segment != 0)
    {
        return Some(
            "vhost-user or multi-queue net, or net behind an IOMMU / on a PCI segment other than 0",
        );
    }
    if config
        .pmem
        .iter()
        .flatten()
        .any(|p| p.iommu || p.pci_segment != 0)
    {
        return Some("pmem behind a virtual IOMMU or on a PCI segment other than 0");
    }
    if non_empty(config.fs.as_ref().map(Vec::len)) {
        return Some("fs (virtio-fs)");
    }
    if config
        .vsock
        .as_ref()
        .is_some_and(|v| v.iommu || v.pci_segment != 0)
    {
        return Some("vsock behind a virtual IOMMU or on a PCI segment other than 0");
    }
    None
}
