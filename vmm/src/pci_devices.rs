//! The PCI side of a VM: the root bus with its config access paths (ECAM on the MMIO bus, 0xCF8 on the
//! port bus), the GSI routing table, and the virtio-pci devices built from the configuration, with their
//! notification ioeventfds and MSI-X irqfds registered with KVM.
//!
//! Devices take slots 1, 2, ... in the order disks, then rng; BARs come from the 32-bit window
//! `layout::PCI_MMIO32_*`, which is one range of the MMIO bus ([`PciBarWindow`]) so that BARs can come and go
//! while vCPUs run. MSI-X vectors get GSIs from 24 up; the IOAPIC can share the same routing table
//! through [`PciDevices::router`] (see `devices::pci::IoapicRouteSender`).
//!
//! Hotplug: after boot, devices are added in the lowest free slot and announced to the guest through the
//! hotplug controller ([`PciHotplug`], see [`PciDevices::enable_hotplug`]); a removal is a request to the
//! guest, and only once the guest ejected the slot does [`PciDevices::release_ejected`] unregister the
//! device's ioeventfds and irqfds and free its BAR and slot.
//!
//! BAR moves: the guest may reprogram a BAR (Linux does for hot-added devices when it prefers another
//! place in the window). The vCPU thread whose config write programs the move carries it out inside the
//! PCI root (`devices::pci::root`): the window and its allocator first, then the device, whose
//! notification ioeventfds move with it (KVM_IOEVENTFD on that vCPU thread). It takes the root's lock,
//! then the window's and the device's one after the other, never this struct: the VMM thread that holds
//! `PciDevices` for a hotplug only ever takes those locks briefly and one at a time, so the two never
//! wait on each other. A refused move (outside the window, onto another BAR) leaves the BAR where it was.
//! The saved device state records each BAR where it decodes; a restore creates devices there
//! ([`placements`]), and loading state into existing devices moves their BARs there first
//! ([`PciDevices::set_state`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::pci::configuration::saved_bar_address;
use devices::pci::hotplug::HotplugNotifier;
use devices::pci::{
    InterruptRouter, PciBarWindow, PciBdf, PciConfigIo, PciConfigMmio, PciHotplug, PciRoot,
    RouterError, SharedPciDevice,
};
use devices::virtio::block::{Block, BlockConfig, BlockError, DEFAULT_QUEUE_SIZE};
use devices::virtio::rng::{Rng, RngError};
use devices::virtio::transport::{IoEventRegistrar, VirtioPciError};
use devices::virtio::{GuestMemory, VirtioDevice, VirtioPciDevice, VIRTIO_PCI_BAR_SIZE};
use devices::{Bus, BusError};
use kvm_ioctls::VmFd;

use crate::arch::layout;

/// Configuration mechanism #1 ports (0xCF8 address, 0xCFC-0xCFF data).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_IO_SIZE: u64 = 8;

/// A disk as the PCI layer needs it (the API's `DiskConfig` maps onto this).
#[derive(Clone, Debug, Default)]
pub struct DiskSpec {
    /// Defaults to `_disk<N>` (N counts disks from 0), as Cloud Hypervisor names them.
    pub id: Option<String>,
    pub path: PathBuf,
    pub readonly: bool,
    pub serial: Option<String>,
    /// 0 means the default.
    pub queue_size: u16,
}

/// The entropy device's source (the API's `RngConfig.src`).
#[derive(Clone, Debug)]
pub struct RngSpec {
    pub src: PathBuf,
}

pub const RNG_ID: &str = "_rng";

/// The vsock device (the API's `VsockConfig`); `id` defaults to `_vsock`, as Cloud Hypervisor names it.
#[derive(Clone, Debug)]
pub struct VsockSpec {
    pub id: String,
    pub config: devices::virtio::vsock::VsockConfig,
}

impl TryFrom<&api::models::VsockConfig> for VsockSpec {
    type Error = PciError;

    fn try_from(v: &api::models::VsockConfig) -> Result<Self, PciError> {
        if v.iommu {
            return Err(PciError::Unsupported("vsock behind a virtual IOMMU"));
        }
        if v.pci_segment != 0 {
            return Err(PciError::Unsupported("PCI segments other than 0"));
        }
        Ok(VsockSpec {
            id: v.id.clone().unwrap_or_else(|| "_vsock".to_string()),
            config: devices::virtio::vsock::VsockConfig {
                cid: v.cid,
                socket: v.socket.clone(),
            },
        })
    }
}

impl TryFrom<&api::models::DiskConfig> for DiskSpec {
    type Error = PciError;

    /// Only raw files are supported: vhost-user disks and multiple queues are refused.
    fn try_from(d: &api::models::DiskConfig) -> Result<Self, PciError> {
        let path = match (&d.path, d.vhost_user) {
            (Some(path), false) => path.clone(),
            _ => {
                return Err(PciError::Unsupported(
                    "a disk needs a path (vhost-user is not supported)",
                ))
            }
        };
        if d.num_queues > 1 {
            return Err(PciError::Unsupported("disks have one queue"));
        }
        Ok(DiskSpec {
            id: d.id.clone(),
            path,
            readonly: d.readonly,
            serial: d.serial.clone(),
            queue_size: d.queue_size,
        })
    }
}

/// The API's pmem config as the device needs it; `id` defaults to `_pmem<N>` (N counts pmem devices from
/// 0), as Cloud Hypervisor names them.
pub fn pmem_spec(
    n: usize,
    p: &api::models::PmemConfig,
) -> Result<virtio_pmem_share::PmemSpec, PciError> {
    if p.iommu {
        return Err(PciError::Unsupported("pmem behind a virtual IOMMU"));
    }
    if p.pci_segment != 0 {
        return Err(PciError::Unsupported("PCI segments other than 0"));
    }
    Ok(virtio_pmem_share::PmemSpec {
        id: p.id.clone().unwrap_or_else(|| format!("_pmem{n}")),
        file: p.file.clone(),
        size: p.size,
        discard_writes: p.discard_writes,
    })
}

impl From<&api::models::RngConfig> for RngSpec {
    fn from(r: &api::models::RngConfig) -> Self {
        RngSpec { src: r.src.clone() }
    }
}

pub const CONSOLE_ID: &str = "_console";

/// The virtio console for `config`, with its output sink and input source wired up; None when it is off.
/// Input from the terminal is only read when the serial console does not already read it.
pub fn console_device(
    config: &api::models::ConsoleConfig,
    serial_reads_stdin: bool,
) -> Result<Option<devices::virtio::console::Console>, PciError> {
    use api::models::ConsoleMode;
    use devices::console_socket::ConsoleSocket;
    use devices::virtio::console::Console;
    let io_err = |what: &str, source| PciError::Console {
        what: what.to_string(),
        source,
    };
    let mut socket_to_attach = None;
    let output: Box<dyn std::io::Write + Send> = match config.mode {
        ConsoleMode::Off => return Ok(None),
        ConsoleMode::Null => Box::new(std::io::sink()),
        ConsoleMode::Tty => Box::new(std::io::stdout()),
        ConsoleMode::File => {
            let path = config
                .file
                .as_ref()
                .ok_or(PciError::Unsupported("console mode File needs a file"))?;
            let file = std::fs::File::create(path)
                .map_err(|e| io_err(&format!("cannot create {}", path.display()), e))?;
            Box::new(file)
        }
        ConsoleMode::Socket => {
            let path = config
                .socket
                .as_ref()
                .ok_or(PciError::Unsupported("console mode Socket needs a socket"))?;
            let sock = ConsoleSocket::bind(path)
                .map_err(|e| io_err(&format!("cannot listen on {}", path.display()), e))?;
            let writer = sock.writer();
            socket_to_attach = Some(sock);
            Box::new(writer)
        }
        ConsoleMode::Pty => return Err(PciError::Unsupported("console mode Pty")),
    };
    let console = Console::new(output).map_err(|e| match e {
        devices::virtio::console::ConsoleError::Event(io) => {
            io_err("cannot create the console", io)
        }
    })?;
    if let Some(sock) = socket_to_attach {
        sock.attach("console-socket", console.input())
            .map_err(|e| io_err("cannot serve the console socket", e))?;
    }
    if config.mode == ConsoleMode::Tty && !serial_reads_stdin {
        crate::terminal::route_stdin_to(console.input());
    }
    Ok(Some(console))
}

/// Cloud Hypervisor's address for a tap it creates itself (no `tap=` given).
const DEFAULT_TAP_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 249, 1);
const DEFAULT_TAP_MASK: std::net::Ipv4Addr = std::net::Ipv4Addr::new(255, 255, 255, 0);

/// A virtio-net device for NIC `n` of the configuration: on tap `fds[0]` if given (vm.add-net), else on
/// tap `tap` (created if missing, brought up, with `ip`/`mask` set if given), else on a new `vmtapN`.
/// `id` defaults to `_net<n>`.
pub fn net_device(
    n: usize,
    cfg: &api::models::NetConfig,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<(String, devices::virtio::net::Net), PciError> {
    use devices::virtio::net::{generated_mac, Net, NetParams, Tap};
    let id = cfg.id.clone().unwrap_or_else(|| format!("_net{n}"));
    if cfg.vhost_user {
        return Err(PciError::Unsupported("vhost-user net"));
    }
    if cfg.num_queues != 2 || fds.len() > 1 {
        return Err(PciError::Unsupported("net has one queue pair"));
    }
    if cfg.iommu || cfg.pci_segment != 0 {
        return Err(PciError::Unsupported(
            "net behind a virtual IOMMU or on a PCI segment other than 0",
        ));
    }
    if cfg.fds.as_ref().is_some_and(|f| !f.is_empty()) && fds.is_empty() {
        return Err(PciError::Unsupported(
            "net fds= given without the descriptors (pass them with vm.add-net)",
        ));
    }
    let ipv4 = |a: Option<std::net::IpAddr>| match a {
        None => Ok(None),
        Some(std::net::IpAddr::V4(v4)) => Ok(Some(v4)),
        Some(_) => Err(PciError::Unsupported("IPv6 tap addresses")),
    };
    let net_err = |source| PciError::Net {
        id: id.clone(),
        source,
    };
    let tap = match (fds.into_iter().next(), &cfg.tap) {
        (Some(fd), _) => Tap::from_fd(fd).map_err(|e| net_err(e.into()))?,
        (None, name) => {
            let (name, ip, mask) = match name {
                Some(name) => (name.as_str(), ipv4(cfg.ip)?, ipv4(cfg.mask)?),
                None => (
                    "vmtap%d",
                    Some(ipv4(cfg.ip)?.unwrap_or(DEFAULT_TAP_IP)),
                    Some(ipv4(cfg.mask)?.unwrap_or(DEFAULT_TAP_MASK)),
                ),
            };
            let tap = Tap::open(name).map_err(|e| net_err(e.into()))?;
            tap.configure_host(ip, mask)
                .map_err(|e| net_err(e.into()))?;
            tap
        }
    };
    let params = NetParams {
        mac: cfg
            .mac
            .map(|m| m.0)
            .unwrap_or_else(|| generated_mac(n as u32)),
        mtu: cfg.mtu,
        queue_size: cfg.queue_size,
    };
    let device = Net::new(tap, &params).map_err(net_err)?;
    log::info!("net {id}: tap {}", device.tap_name());
    Ok((id, device))
}

/// Deletes KVM memslot `slot` (a pmem range whose mapping is about to go).
pub fn remove_memslot(vm: &VmFd, slot: u32) {
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot,
        memory_size: 0,
        ..Default::default()
    };
    // SAFETY: a zero-sized region deletes the slot; no host memory is handed to KVM.
    if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
        log::warn!("cannot delete KVM memslot {slot}: {e}");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("PCI")]
    Pci(#[from] devices::pci::PciError),
    #[error("cannot place a PCI device on the bus")]
    Bus(#[from] BusError),
    #[error("GSI routing")]
    Router(#[from] RouterError),
    #[error("virtio-pci device {id}")]
    VirtioPci {
        id: String,
        #[source]
        source: VirtioPciError,
    },
    #[error("disk {id}")]
    Block {
        id: String,
        #[source]
        source: BlockError,
    },
    #[error("rng")]
    Rng(#[from] RngError),
    #[error("vsock")]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    #[error("pmem {id}")]
    Pmem {
        id: String,
        #[source]
        source: virtio_pmem_share::PmemError,
    },
    #[error("pmem {id}: cannot map its range into the guest")]
    PmemSlot {
        id: String,
        #[source]
        source: crate::memory::MemoryError,
    },
    #[error("the pmem ranges do not fit in the guest-physical address space")]
    PmemWindow,
    #[error("unsupported device configuration: {0}")]
    Unsupported(&'static str),
    #[error("device id {0} is used twice")]
    DuplicateId(String),
    #[error("cannot register the notification ioeventfds of {id}")]
    Ioeventfd {
        id: String,
        #[source]
        source: devices::pci::PciError,
    },
    #[error("device {id}: cannot move its BAR to {addr:#x}")]
    BarMove {
        id: String,
        addr: u64,
        #[source]
        source: devices::pci::PciError,
    },
    #[error("cannot register the MSI-X irqfd of {id} for GSI {gsi}")]
    Irqfd {
        id: String,
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("device {id}: saved state")]
    DeviceState {
        id: String,
        #[source]
        source: devices::virtio::SnapshotError,
    },
    #[error("the saved devices do not match this VM's: {0}")]
    DeviceSet(String),
    #[error("no PCI device has id {0}")]
    UnknownDevice(String),
    #[error("cannot create the PCI hotplug controller")]
    Hotplug(#[source] std::io::Error),
    #[error("PCI hotplug is not enabled on this VM")]
    HotplugDisabled,
    #[error("virtio console: {what}")]
    Console {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("net {id}")]
    Net {
        id: String,
        #[source]
        source: devices::virtio::net::NetError,
    },
}

struct Entry {
    id: String,
    bdf: PciBdf,
    device: Arc<Mutex<VirtioPciDevice>>,
}

/// Where a device must go: the slot and BAR it had when a template was taken, so that the restored guest
/// finds every device where its drivers left it (see [`placements`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub slot: u8,
    pub bar: u64,
}

/// The placements recorded in a template's device states (slot from the saved address, BAR 0 from the
/// saved configuration space). States that name no usable slot or BAR are left out: the restore then
/// fails on the device-set check with the device named.
pub fn placements(saved: &[PciDeviceState]) -> std::collections::BTreeMap<String, Placement> {
    saved
        .iter()
        .filter_map(|s| {
            let slot = s
                .bdf
                .strip_prefix("0000:00:")?
                .strip_suffix(".0")
                .and_then(|d| u8::from_str_radix(d, 16).ok())?;
            let bar = saved_bar_address(&s.state.config_space, 0)?;
            Some((s.id.clone(), Placement { slot, bar }))
        })
        .collect()
}

/// How much of a device's registration happened (KVM ioeventfds and irqfds, in the device's order, then
/// its BARs in the window and its slot).
#[derive(Default)]
struct Registered {
    ioeventfds: bool,
    irqfds: usize,
    visible: bool,
}

pub struct PciDevices {
    vm: Arc<VmFd>,
    router: Arc<InterruptRouter>,
    root: Arc<Mutex<PciRoot>>,
    /// Where BARs decode, with the allocator of its ranges (shared with the root, which moves BARs).
    window: Arc<Mutex<PciBarWindow>>,
    entries: Vec<Entry>,
    /// The vsock device's id and its transport reset.
    vsock_reset: Option<(String, devices::virtio::vsock::ResetHandle)>,
    hotplug: Option<Arc<Mutex<PciHotplug>>>,
    /// Slots and BARs held for devices not created yet (see [`Self::reserve`]).
    reserved: std::collections::BTreeMap<String, Placement>,
    /// Given to every virtio device, present and future (see [`Self::set_interrupt_observer`]).
    interrupt_observer: Option<devices::virtio::transport::InterruptObserver>,
}

impl PciDevices {
    /// Builds the PCI segment and its devices and puts them on the buses (before they are shared with the
    /// vCPUs). The routing table is new and owned here; use [`Self::with_router`] to share one with the
    /// IOAPIC.
    pub fn new(
        vm: &Arc<VmFd>,
        mem: &GuestMemory,
        pio: &mut Bus,
        mmio: &mut Bus,
        disks: &[DiskSpec],
        rng: Option<&RngSpec>,
    ) -> Result<Self, PciError> {
        let router = Arc::new(InterruptRouter::new(Box::new(vm.clone())));
        Self::with_router(router, vm, mem, (pio, mmio), disks, rng)
    }

    /// Has `observer` called whenever any virtio device, present or added later, raises an interrupt.
    pub fn set_interrupt_observer(
        &mut self,
        observer: devices::virtio::transport::InterruptObserver,
    ) {
        for e in &self.entries {
            lock_device(&e.device).set_interrupt_observer(observer.clone());
        }
        self.interrupt_observer = Some(observer);
    }

    pub fn with_router(
        router: Arc<InterruptRouter>,
        vm: &Arc<VmFd>,
        mem: &GuestMemory,
        (pio, mmio): (&mut Bus, &mut Bus),
        disks: &[DiskSpec],
        rng: Option<&RngSpec>,
    ) -> Result<Self, PciError> {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
        )?;
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_SIZE,
        )?;
        let window = Arc::new(Mutex::new(PciBarWindow::new(
            layout::PCI_MMIO32_START,
            layout::PCI_MMIO32_SIZE,
        )?));
        root.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_bar_window(window.clone());
        mmio.insert(
            window.clone(),
            layout::PCI_MMIO32_START,
            layout::PCI_MMIO32_SIZE,
        )?;
        let mut pci = Self {
            vm: vm.clone(),
            router,
            root,
            window,
            entries: Vec::new(),
            vsock_reset: None,
            hotplug: None,
            reserved: Default::default(),
            interrupt_observer: None,
        };
        for (n, disk) in disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{n}"));
            pci.add_disk(id, disk, mem)?;
        }
        if let Some(rng) = rng {
            let device = Rng::new(&rng.src)?;
            pci.add_virtio(RNG_ID.to_string(), Box::new(device), mem)?;
        }
        Ok(pci)
    }

    /// Adds virtio-blk device `id` for `disk` in the lowest free slot.
    pub fn add_disk(
        &mut self,
        id: String,
        disk: &DiskSpec,
        mem: &GuestMemory,
    ) -> Result<PciBdf, PciError> {
        let cfg = BlockConfig {
            path: disk.path.clone(),
            readonly: disk.readonly,
            serial: disk.serial.clone(),
            queue_size: if disk.queue_size == 0 {
                DEFAULT_QUEUE_SIZE
            } else {
                disk.queue_size
            },
        };
        let block = Block::new(id.clone(), &cfg).map_err(|source| PciError::Block {
            id: id.clone(),
            source,
        })?;
        self.add_virtio(id, Box::new(block), mem)
    }

    /// Holds each device's slot and BAR for it until it is added (a restore places the devices where the
    /// template had them, whatever order they are created in); other devices keep off them. Refuses
    /// placements that collide with each other or with a device already there, changing nothing then.
    pub fn reserve(
        &mut self,
        placements: &std::collections::BTreeMap<String, Placement>,
    ) -> Result<(), PciError> {
        let mut held: Vec<(&String, Placement)> = Vec::new();
        let mut result = Ok(());
        for (id, p) in placements {
            let slot_free = (1..devices::pci::root::NUM_SLOTS).contains(&p.slot)
                && !self.root_lock().has_device(p.slot)
                && !self.entries.iter().any(|e| e.bdf.device == p.slot)
                && !self.reserved.values().any(|q| q.slot == p.slot)
                && !held.iter().any(|(_, q)| q.slot == p.slot);
            let id_free =
                !self.entries.iter().any(|e| e.id == *id) && !self.reserved.contains_key(id);
            if !slot_free || !id_free {
                result = Err(PciError::Pci(devices::pci::PciError::SlotTaken(p.slot)));
                break;
            }
            if let Err(e) = self.window_lock().allocate_at(p.bar, VIRTIO_PCI_BAR_SIZE) {
                result = Err(e.into());
                break;
            }
            held.push((id, *p));
        }
        if result.is_err() {
            let mut window = self.window_lock();
            for (_, p) in held {
                let _ = window.free(p.bar, VIRTIO_PCI_BAR_SIZE);
            }
            return result;
        }
        self.reserved
            .extend(held.into_iter().map(|(id, p)| (id.clone(), p)));
        Ok(())
    }

    /// Frees what [`Self::reserve`] held for devices that were never added; returns their ids.
    pub fn drop_reservations(&mut self) -> Vec<String> {
        let reserved = std::mem::take(&mut self.reserved);
        let mut window = self.window_lock();
        for p in reserved.values() {
            let _ = window.free(p.bar, VIRTIO_PCI_BAR_SIZE);
        }
        drop(window);
        reserved.into_keys().collect()
    }

    /// Puts the hotplug controller on the MMIO bus at `layout::PCI_HOTPLUG_START`; `notify` raises the
    /// guest's hotplug interrupt. Returns the eventfd that says the guest ejected a device.
    pub fn enable_hotplug(
        &mut self,
        mmio: &mut Bus,
        notify: HotplugNotifier,
    ) -> Result<vmm_sys_util::eventfd::EventFd, PciError> {
        let controller = PciHotplug::new(self.root.clone(), self.window.clone(), notify)
            .map_err(PciError::Hotplug)?;
        let ejected = controller.ejected_eventfd().map_err(PciError::Hotplug)?;
        let controller = Arc::new(Mutex::new(controller));
        mmio.insert(
            controller.clone(),
            layout::PCI_HOTPLUG_START,
            layout::PCI_HOTPLUG_SIZE,
        )?;
        self.hotplug = Some(controller);
        Ok(ejected)
    }

    fn hotplug_lock(&self) -> Result<std::sync::MutexGuard<'_, PciHotplug>, PciError> {
        let controller = self.hotplug.as_ref().ok_or(PciError::HotplugDisabled)?;
        Ok(controller.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Tells the guest that the device `id` (added after boot) is there.
    pub fn announce(&self, id: &str) -> Result<(), PciError> {
        let slot = self.slot_of(id)?;
        self.hotplug_lock()?.device_added(slot);
        Ok(())
    }

    /// Asks the guest to eject device `id`; the device stays until the guest does.
    pub fn request_eject(&self, id: &str) -> Result<(), PciError> {
        let slot = self.slot_of(id)?;
        self.hotplug_lock()?.request_eject(slot);
        Ok(())
    }

    fn slot_of(&self, id: &str) -> Result<u8, PciError> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.bdf.device)
            .ok_or_else(|| PciError::UnknownDevice(id.to_string()))
    }

    /// Releases every device the guest ejected since the last call (KVM ioeventfds and irqfds, BAR, slot;
    /// the device itself stops when dropped) and returns their ids.
    pub fn release_ejected(&mut self) -> Vec<String> {
        let ejected = match self.hotplug_lock() {
            Ok(mut controller) => controller.take_ejected(),
            Err(_) => return Vec::new(),
        };
        let slots: Vec<u8> = (0..32u8).filter(|s| ejected & (1 << s) != 0).collect();
        slots
            .into_iter()
            .filter_map(|slot| {
                let index = self.entries.iter().position(|e| e.bdf.device == slot)?;
                let entry = self.entries.remove(index);
                self.release(&entry);
                Some(entry.id)
            })
            .collect()
    }

    /// Undoes [`Self::place`] for a device the guest ejected: nothing may reach it afterwards. The device
    /// stops (resets) when the last reference, the entry's, is dropped.
    fn release(&mut self, entry: &Entry) {
        let all = Registered {
            ioeventfds: true,
            irqfds: usize::MAX,
            visible: true,
        };
        self.unregister(entry, &all);
        let bar = entry
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_addr();
        if let Err(e) = self.window_lock().free(bar, VIRTIO_PCI_BAR_SIZE) {
            log::warn!("pci: {}: cannot free BAR {bar:#x}: {e}", entry.id);
        }
        if self
            .vsock_reset
            .as_ref()
            .is_some_and(|(id, _)| *id == entry.id)
        {
            self.vsock_reset = None;
        }
        log::info!("pci: {} at {} released", entry.id, entry.bdf);
    }

    /// The lowest slot neither on the bus, nor held by a device the guest ejected and that is not released
    /// yet, nor reserved.
    fn free_slot(&self) -> Result<u8, PciError> {
        let root = self.root_lock();
        (1..devices::pci::root::NUM_SLOTS)
            .find(|&s| {
                !root.has_device(s)
                    && !self.entries.iter().any(|e| e.bdf.device == s)
                    && !self.reserved.values().any(|p| p.slot == s)
            })
            .ok_or(PciError::Pci(devices::pci::PciError::NoFreeSlot))
    }

    /// Adds a virtio device in the lowest free slot and returns its address.
    pub fn add_virtio(
        &mut self,
        id: String,
        device: Box<dyn VirtioDevice>,
        mem: &GuestMemory,
    ) -> Result<PciBdf, PciError> {
        if self.entries.iter().any(|e| e.id == id) {
            return Err(PciError::DuplicateId(id));
        }
        let (slot, bar) = match self.reserved.remove(&id) {
            Some(p) => (p.slot, p.bar),
            None => {
                let slot = self.free_slot()?;
                (slot, self.window_lock().allocate(VIRTIO_PCI_BAR_SIZE)?)
            }
        };
        let result = self.place(id, device, mem, slot, bar);
        if result.is_err() {
            let _ = self.window_lock().free(bar, VIRTIO_PCI_BAR_SIZE);
        }
        result
    }

    fn place(
        &mut self,
        id: String,
        device: Box<dyn VirtioDevice>,
        mem: &GuestMemory,
        slot: u8,
        bar: u64,
    ) -> Result<PciBdf, PciError> {
        let virtio =
            VirtioPciDevice::new(id.clone(), device, mem.clone(), bar, self.router.clone())
                .map_err(|source| PciError::VirtioPci {
                    id: id.clone(),
                    source,
                })?;
        if let Some(observer) = &self.interrupt_observer {
            virtio.set_interrupt_observer(observer.clone());
        }
        let entry = Entry {
            id,
            bdf: PciBdf::new(0, slot, 0),
            device: Arc::new(Mutex::new(virtio)),
        };
        let mut done = Registered::default();
        if let Err(e) = self.register(&entry, &mut done) {
            // A device added after boot must leave nothing behind when it fails.
            self.unregister(&entry, &done);
            return Err(e);
        }
        log::info!("pci: {} at {}, BAR0 {bar:#x}", entry.id, entry.bdf);
        let bdf = entry.bdf;
        self.entries.push(entry);
        Ok(bdf)
    }

    /// Registers the device's notifications and interrupts with KVM, then makes it visible: BARs in the
    /// window, function in its slot (the guest may find it from then on). `done` records how far it got.
    fn register(&mut self, entry: &Entry, done: &mut Registered) -> Result<(), PciError> {
        let id = &entry.id;
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        // They follow BAR 0 from now on, wherever the guest moves it.
        let registrar: Arc<dyn IoEventRegistrar> = self.vm.clone();
        device
            .register_ioeventfds(registrar)
            .map_err(|source| PciError::Ioeventfd {
                id: id.clone(),
                source,
            })?;
        done.ioeventfds = true;
        let irqfds = device.irqfds().map_err(|source| PciError::Irqfd {
            id: id.clone(),
            gsi: 0,
            source,
        })?;
        drop(device);
        for (gsi, fd) in &irqfds {
            self.vm
                .register_irqfd(fd, *gsi)
                .map_err(|e| PciError::Irqfd {
                    id: id.clone(),
                    gsi: *gsi,
                    source: e.into(),
                })?;
            done.irqfds += 1;
        }
        let shared: SharedPciDevice = entry.device.clone();
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert_device(&shared)?;
        done.visible = true;
        self.root_lock().add_device(entry.bdf.device, shared)?;
        Ok(())
    }

    /// Undoes what [`Self::register`] did (all of it for a device that was placed).
    fn unregister(&mut self, entry: &Entry, done: &Registered) {
        if done.visible {
            // Normally the controller did this when the guest ejected; then these are no-ops.
            let shared: SharedPciDevice = entry.device.clone();
            let mut root = self.root_lock();
            if root
                .device_at(entry.bdf.device)
                .is_some_and(|d| Arc::ptr_eq(&d, &shared))
            {
                root.remove_device(entry.bdf.device);
            }
            drop(root);
            self.window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove_device(&shared);
        }
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        // A stale ioeventfd would swallow the notifications of the next device at this BAR (and KVM
        // refuses a second one at the same address): unregister before the BAR is reused.
        if done.ioeventfds {
            device.unregister_ioeventfds();
        }
        if done.irqfds > 0 {
            match device.irqfds() {
                Ok(irqfds) => {
                    for (gsi, fd) in irqfds.into_iter().take(done.irqfds) {
                        if let Err(e) = self.vm.unregister_irqfd(&fd, gsi) {
                            log::warn!(
                                "pci: {}: cannot unregister the irqfd of GSI {gsi}: {e}",
                                entry.id
                            );
                        }
                    }
                }
                Err(e) => log::warn!("pci: {}: cannot list its irqfds: {e}", entry.id),
            }
        }
    }

    /// Maps each pmem file, makes its range KVM memslot `first_slot + i` in the pmem window from
    /// `window_start` (see `virtio_pmem_share::place`), and adds a virtio-pmem device describing it. The
    /// returned handles own the mappings: keep them for as long as the VM exists.
    pub fn add_pmem(
        &mut self,
        specs: &[virtio_pmem_share::PmemSpec],
        window_start: u64,
        first_slot: u32,
        mem: &GuestMemory,
    ) -> Result<Vec<virtio_pmem_share::PmemHandle>, PciError> {
        use virtio_pmem_share::{Pmem, PmemBacking, PmemHandle};
        let mut backings = Vec::with_capacity(specs.len());
        for spec in specs {
            if self.entries.iter().any(|e| e.id == spec.id) {
                return Err(PciError::DuplicateId(spec.id.clone()));
            }
            let backing = PmemBacking::open(spec).map_err(|source| PciError::Pmem {
                id: spec.id.clone(),
                source,
            })?;
            backings.push(Arc::new(backing));
        }
        let sizes: Vec<u64> = backings.iter().map(|b| b.size()).collect();
        let starts = virtio_pmem_share::place(window_start, &sizes).ok_or(PciError::PmemWindow)?;
        let mut handles = Vec::with_capacity(specs.len());
        for (i, (backing, guest_addr)) in backings.into_iter().zip(starts).enumerate() {
            let id = backing.id().to_string();
            let memslot = first_slot + i as u32;
            // SAFETY: the handle returned to the caller owns the mapping for the VM's life.
            unsafe {
                crate::memory::register_extra_slot(
                    &self.vm,
                    memslot,
                    guest_addr,
                    backing.host_addr(),
                    backing.size(),
                )
            }
            .map_err(|source| PciError::PmemSlot {
                id: id.clone(),
                source,
            })?;
            let device = Pmem::new(backing.clone(), guest_addr);
            let counters = device.counters();
            if let Err(e) = self.add_virtio(id.clone(), Box::new(device), mem) {
                // The mapping goes with `backing`: KVM must not keep a slot on it.
                remove_memslot(&self.vm, memslot);
                return Err(e);
            }
            log::info!(
                "pmem {id}: guest range {guest_addr:#x}+{:#x}",
                backing.size()
            );
            handles.push(PmemHandle {
                id,
                guest_addr,
                backing,
                counters,
            });
        }
        Ok(handles)
    }

    /// Adds the virtio-vsock device (hybrid: host side on Unix sockets); it starts listening now.
    pub fn add_vsock(&mut self, spec: &VsockSpec, mem: &GuestMemory) -> Result<PciBdf, PciError> {
        if self.vsock_reset.is_some() {
            return Err(PciError::Unsupported("a second vsock device"));
        }
        let device = devices::virtio::vsock::Vsock::new(&spec.config)?;
        let reset = device.reset_handle();
        let bdf = self.add_virtio(spec.id.clone(), Box::new(device), mem)?;
        self.vsock_reset = Some((spec.id.clone(), reset));
        Ok(bdf)
    }

    /// Resets the vsock transport (after a restore: the host sockets did not survive it).
    pub fn vsock_reset_handle(&self) -> Option<&devices::virtio::vsock::ResetHandle> {
        self.vsock_reset.as_ref().map(|(_, reset)| reset)
    }

    fn root_lock(&self) -> std::sync::MutexGuard<'_, PciRoot> {
        self.root.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn window_lock(&self) -> std::sync::MutexGuard<'_, PciBarWindow> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The PCI address of device `id`.
    pub fn bdf(&self, id: &str) -> Option<PciBdf> {
        self.entries.iter().find(|e| e.id == id).map(|e| e.bdf)
    }

    pub(crate) fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The PCI address of device `id`, as `0000:00:05.0`.
    pub fn bdf_of(&self, id: &str) -> Option<String> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.bdf.to_string())
    }

    /// (id, bdf) of every device, in slot order of creation.
    pub fn devices(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|e| (e.id.clone(), e.bdf.to_string()))
            .collect()
    }

    /// The virtio-pci device `id`, for inspection.
    pub fn device(&self, id: &str) -> Option<Arc<Mutex<VirtioPciDevice>>> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.device.clone())
    }

    /// The routing table MSI-X vectors live in; hand it to the IOAPIC (`IoapicRouteSender`) so both share
    /// one `KVM_SET_GSI_ROUTING` owner.
    pub fn router(&self) -> &Arc<InterruptRouter> {
        &self.router
    }

    /// Stops every device's data path, keeping its state (idempotent): until [`Self::resume_devices`] no
    /// device writes guest memory or moves its queues. A snapshot does this before reading anything.
    pub fn pause_devices(&self) -> Result<(), PciError> {
        for e in &self.entries {
            lock_device(&e.device)
                .pause()
                .map_err(|source| PciError::DeviceState {
                    id: e.id.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Lets every device serve again after [`Self::pause_devices`] (a device that cannot is marked
    /// DEVICE_NEEDS_RESET for its driver).
    pub fn resume_devices(&self) {
        for e in &self.entries {
            lock_device(&e.device).resume();
        }
    }

    /// Every device's state, in slot order of creation; the devices must be paused.
    pub fn state(&self) -> Result<Vec<PciDeviceState>, PciError> {
        self.entries
            .iter()
            .map(|e| {
                let state =
                    lock_device(&e.device)
                        .state()
                        .map_err(|source| PciError::DeviceState {
                            id: e.id.clone(),
                            source,
                        })?;
                Ok(PciDeviceState {
                    id: e.id.clone(),
                    bdf: e.bdf.to_string(),
                    state,
                })
            })
            .collect()
    }

    /// Loads saved device states (untrusted: from a template) into this VM's devices, which must be the
    /// same devices at the same PCI addresses. Every state is checked before any device changes. Devices
    /// that were live are activated on their saved queues; the vsock device, whose host connections did
    /// not survive, then tells its driver with a TRANSPORT_RESET event.
    pub fn set_state(&mut self, saved: &[PciDeviceState]) -> Result<(), PciError> {
        let pairs = self.match_state(saved)?;
        // BARs first: a device's state is loaded where the template's guest had its BAR (the guest may
        // have moved it there, or this VM's guest may have moved it away).
        let targets: Vec<(&Entry, u64)> = pairs
            .iter()
            .filter_map(|(e, s)| Some((*e, saved_bar_address(&s.state.config_space, 0)?)))
            .collect();
        self.place_bars(&targets)?;
        for (e, s) in pairs {
            let live = s.state.status & devices::virtio::STATUS_DRIVER_OK != 0
                && s.state.status & devices::virtio::STATUS_DEVICE_NEEDS_RESET == 0;
            if let Some((_, reset)) = self.vsock_reset.as_ref().filter(|(id, _)| *id == e.id) {
                if live {
                    // Asked before the activation, so that the device starts with the reset: no host
                    // client gets accepted (and then dropped) on the old connections' behalf.
                    reset.reset_connections();
                }
            }
            lock_device(&e.device)
                .set_state(&s.state)
                .map_err(|source| PciError::DeviceState {
                    id: e.id.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Moves each device's BAR 0 to its target (checked by [`Self::check_bars`]). Targets may be each
    /// other's current places, in a chain or a cycle: devices move once their target is free, and a
    /// cycle is broken by parking one device in a free range.
    fn place_bars(&self, targets: &[(&Entry, u64)]) -> Result<(), PciError> {
        let mut pending: Vec<(&Entry, u64)> = targets
            .iter()
            .filter(|(e, bar)| lock_device(&e.device).bar_addr() != *bar)
            .copied()
            .collect();
        // Each round moves a device or parks one; a device that cannot move for another reason (KVM
        // refusing its ioeventfds) ends this after a bounded number of rounds.
        let mut rounds = 2 * pending.len() + 2;
        while !pending.is_empty() {
            let mut last_error = None;
            let before = pending.len();
            let mut still = Vec::new();
            for (e, bar) in pending {
                if let Err(err) = self.move_device_bar(e, bar) {
                    last_error = Some(err);
                    still.push((e, bar));
                }
            }
            pending = still;
            rounds = rounds.saturating_sub(1);
            if let Some(err) = last_error.filter(|_| rounds == 0) {
                return Err(err);
            }
            if !pending.is_empty() && pending.len() == before {
                let (e, _) = pending[0];
                let spare = {
                    let mut window = self.window_lock();
                    let spare = window.allocate(VIRTIO_PCI_BAR_SIZE)?;
                    window.free(spare, VIRTIO_PCI_BAR_SIZE)?;
                    spare
                };
                self.move_device_bar(e, spare)?;
            }
        }
        Ok(())
    }

    fn move_device_bar(&self, e: &Entry, addr: u64) -> Result<(), PciError> {
        let shared: SharedPciDevice = e.device.clone();
        devices::pci::root::move_bar(&self.window, &shared, 0, addr)
            .map(|old| log::debug!("pci: {} BAR0 {old:#x} -> {addr:#x}", e.id))
            .map_err(|source| PciError::BarMove {
                id: e.id.clone(),
                addr,
                source,
            })
    }

    /// Whether [`Self::set_state`] would accept `saved`; changes nothing.
    pub fn check_state(&self, saved: &[PciDeviceState]) -> Result<(), PciError> {
        self.match_state(saved).map(|_| ())
    }

    /// Pairs every device with its saved state, each checked, their BARs too.
    fn match_state<'a>(
        &'a self,
        saved: &'a [PciDeviceState],
    ) -> Result<Vec<(&'a Entry, &'a PciDeviceState)>, PciError> {
        let mismatch = |why: String| Err(PciError::DeviceSet(why));
        if saved.len() != self.entries.len() {
            return mismatch(format!(
                "{} saved, {} here",
                saved.len(),
                self.entries.len()
            ));
        }
        let mut pairs = Vec::with_capacity(saved.len());
        for e in &self.entries {
            let mut found = saved.iter().filter(|s| s.id == e.id);
            let (Some(s), None) = (found.next(), found.next()) else {
                return mismatch(format!("device {} is not saved exactly once", e.id));
            };
            if s.bdf != e.bdf.to_string() {
                return mismatch(format!(
                    "device {} was at {}, it is at {} here",
                    e.id, s.bdf, e.bdf
                ));
            }
            lock_device(&e.device)
                .check_state(&s.state)
                .map_err(|source| PciError::DeviceState {
                    id: e.id.clone(),
                    source,
                })?;
            pairs.push((e, s));
        }
        self.check_bars(&pairs)?;
        Ok(pairs)
    }

    /// The saved BARs (untrusted) can all be placed at once: each naturally aligned inside the window,
    /// none on another's or on a range held for a device not created yet.
    fn check_bars(&self, pairs: &[(&Entry, &PciDeviceState)]) -> Result<(), PciError> {
        let window = layout::PCI_MMIO32_START..layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE;
        let mut taken: Vec<u64> = self.reserved.values().map(|p| p.bar).collect();
        for (e, s) in pairs {
            let Some(bar) = saved_bar_address(&s.state.config_space, 0) else {
                return Err(PciError::DeviceSet(format!(
                    "device {} saved no BAR 0",
                    e.id
                )));
            };
            let inside = bar.is_multiple_of(VIRTIO_PCI_BAR_SIZE)
                && window.contains(&bar)
                && window.contains(&(bar + VIRTIO_PCI_BAR_SIZE - 1));
            // Same size and naturally aligned: two BARs overlap exactly when they are equal.
            if !inside || taken.contains(&bar) {
                return Err(PciError::DeviceSet(format!(
                    "device {} saved BAR 0 at {bar:#x}, which is not a free, aligned place in the PCI window",
                    e.id
                )));
            }
            taken.push(bar);
        }
        Ok(())
    }
}

/// A virtio-pci function's saved state with the id and PCI address it had (part of a template's state).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciDeviceState {
    pub id: String,
    pub bdf: String,
    pub state: devices::virtio::transport::VirtioPciState,
}

fn lock_device(device: &Mutex<VirtioPciDevice>) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};
    use vm_memory::GuestAddress;

    /// A VM with a split irqchip. These tests need /dev/kvm: without it they fail, never skip.
    fn vm_fd() -> Arc<VmFd> {
        let kvm = kvm_ioctls::Kvm::new().unwrap_or_else(|e| {
            panic!(
                "these tests need read/write access to /dev/kvm (run as root on a KVM host): {e}"
            )
        });
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = 24;
        vm.enable_cap(&cap).expect("KVM_CAP_SPLIT_IRQCHIP");
        Arc::new(vm)
    }

    /// A scratch directory holding a 1 MiB disk image `disk.img`; returns both.
    fn scratch_disk(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("trenv-pci-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        (dir, disk)
    }

    fn read32(bus: &Bus, addr: u64) -> u32 {
        let mut d = [0u8; 4];
        bus.read(addr, &mut d).unwrap();
        u32::from_le_bytes(d)
    }

    #[test]
    fn builds_devices_on_the_buses() {
        let vm = vm_fd();
        let (dir, disk) = scratch_disk("devices");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let disks = [
            DiskSpec {
                path: disk.clone(),
                ..Default::default()
            },
            DiskSpec {
                id: Some("data".into()),
                path: disk.clone(),
                readonly: true,
                ..Default::default()
            },
        ];
        let rng = RngSpec {
            src: "/dev/urandom".into(),
        };
        let pci = PciDevices::new(&vm, &mem, &mut pio, &mut mmio, &disks, Some(&rng)).unwrap();
        assert_eq!(pci.bdf_of("_disk0").as_deref(), Some("0000:00:01.0"));
        assert_eq!(pci.bdf_of("data").as_deref(), Some("0000:00:02.0"));
        assert_eq!(pci.bdf_of(RNG_ID).as_deref(), Some("0000:00:03.0"));
        assert_eq!(pci.bdf_of("nope"), None);
        // Device state: the same set loads back; another set is refused.
        let saved = pci.state().unwrap();
        assert_eq!(
            saved.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["_disk0", "data", RNG_ID]
        );
        assert!(saved.iter().all(|d| d.state.status == 0));
        let mut pci = pci;
        pci.set_state(&saved).unwrap();
        assert!(matches!(
            pci.set_state(&saved[..2]),
            Err(PciError::DeviceSet(_))
        ));
        let mut moved = saved.clone();
        moved[0].bdf = "0000:00:07.0".into();
        assert!(matches!(pci.set_state(&moved), Err(PciError::DeviceSet(_))));
        let mut bad = saved.clone();
        bad[2].state.queues[0].size = 3;
        assert!(matches!(
            pci.set_state(&bad),
            Err(PciError::DeviceState { .. })
        ));

        // ECAM: host bridge, then virtio-blk, virtio-blk, virtio-rng.
        let ecam = layout::PCI_ECAM_START;
        assert_eq!(read32(&mmio, ecam), 0x0008_1b36);
        assert_eq!(read32(&mmio, ecam + (1 << 15)), 0x1042_1af4);
        assert_eq!(read32(&mmio, ecam + (3 << 15)), 0x1044_1af4);
        assert_eq!(read32(&mmio, ecam + (4 << 15)), u32::MAX);
        // The same through 0xCF8/0xCFC.
        pio.write(
            PCI_CONFIG_IO_PORT,
            &(0x8000_0000u32 | 2 << 11).to_le_bytes(),
        )
        .unwrap();
        assert_eq!(read32(&pio, PCI_CONFIG_IO_PORT + 4), 0x1042_1af4);
        // BARs in the 32-bit window, each on the MMIO bus: num_queues of the first disk.
        let bar0 = u64::from(read32(&mmio, ecam + (1 << 15) + 0x10));
        assert!((layout::PCI_MMIO32_START..layout::PCI_ECAM_START).contains(&bar0));
        let mut nq = [0u8; 2];
        mmio.read(bar0 + 0x12, &mut nq).unwrap();
        assert_eq!(u16::from_le_bytes(nq), 1);
        let bar2 = u64::from(read32(&mmio, ecam + (3 << 15) + 0x10));
        assert_ne!(bar0, bar2);

        // API models convert; vhost-user and multi-queue disks are refused.
        let mut api_disk = api::models::DiskConfig {
            path: Some(disk.clone()),
            readonly: true,
            id: Some("x".into()),
            ..Default::default()
        };
        let spec = DiskSpec::try_from(&api_disk).unwrap();
        assert!(spec.readonly && spec.id.as_deref() == Some("x"));
        api_disk.num_queues = 2;
        assert!(DiskSpec::try_from(&api_disk).is_err());
        api_disk.path = None;
        assert!(DiskSpec::try_from(&api_disk).is_err());

        // Duplicate ids are refused (a fresh VM: the first one has ioeventfds at these addresses).
        let vm2 = vm_fd();
        let again = PciDevices::new(
            &vm2,
            &mem,
            &mut Bus::new(),
            &mut Bus::new(),
            &[disks[1].clone(), disks[1].clone()],
            None,
        );
        assert!(matches!(again, Err(PciError::DuplicateId(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hot_added_devices_are_announced_ejected_and_released() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let vm = vm_fd();
        let (dir, disk) = scratch_disk("hotplug");
        let spec = DiskSpec {
            path: disk.clone(),
            ..Default::default()
        };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let mut pci = PciDevices::new(
            &vm,
            &mem,
            &mut pio,
            &mut mmio,
            std::slice::from_ref(&spec),
            None,
        )
        .unwrap();
        let notified = Arc::new(AtomicUsize::new(0));
        let count = notified.clone();
        let ejected = pci
            .enable_hotplug(
                &mut mmio,
                Box::new(move || {
                    count.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        let hp = layout::PCI_HOTPLUG_START;
        let ecam = layout::PCI_ECAM_START;
        assert_eq!(read32(&mmio, hp), u32::from_le_bytes(*b"TRHP"));

        // Added after boot: slot 2, BAR after the first disk's, announced.
        let bdf = pci.add_disk("hot".into(), &spec, &mem).unwrap();
        assert_eq!(bdf.to_string(), "0000:00:02.0");
        pci.announce("hot").unwrap();
        assert_eq!(notified.load(Ordering::SeqCst), 1);
        assert_eq!(read32(&mmio, hp + 0x08), 1 << 2);
        assert_eq!(read32(&mmio, hp + 0x14), 0b111);
        assert_eq!(read32(&mmio, ecam + (2 << 15)), 0x1042_1af4);
        let bar = u64::from(read32(&mmio, ecam + (2 << 15) + 0x10));
        let mut nq = [0u8; 2];
        mmio.read(bar + 0x12, &mut nq).unwrap();
        assert_eq!(u16::from_le_bytes(nq), 1, "the BAR decodes");
        let routes_before = pci.router().routes().len();

        // Eject: requested, then done by the guest's write; the device leaves the bus at once and is
        // released by the VMM.
        assert!(matches!(
            pci.request_eject("nope"),
            Err(PciError::UnknownDevice(_))
        ));
        pci.request_eject("hot").unwrap();
        assert_eq!(notified.load(Ordering::SeqCst), 2);
        assert_eq!(read32(&mmio, hp + 0x0c), 1 << 2);
        assert!(pci.release_ejected().is_empty(), "not ejected yet");
        mmio.write(hp + 0x10, &(1u32 << 2).to_le_bytes()).unwrap();
        assert_eq!(read32(&mmio, ecam + (2 << 15)), u32::MAX);
        assert_eq!(read32(&mmio, bar), u32::MAX, "the BAR no longer decodes");
        assert_eq!(ejected.read().unwrap(), 1);
        assert_eq!(pci.release_ejected(), ["hot"]);
        assert_eq!(pci.bdf_of("hot"), None);
        assert_eq!(pci.devices().len(), 1);
        assert!(pci.router().routes().len() <= routes_before);

        // Slot, BAR and notify address are free again: the same place takes a new device (KVM would
        // refuse a second ioeventfd at an address still registered).
        let again = pci.add_disk("again".into(), &spec, &mem).unwrap();
        assert_eq!(again, bdf);
        assert_eq!(u64::from(read32(&mmio, ecam + (2 << 15) + 0x10)), bar);
        // A failed add leaves nothing behind either.
        assert!(matches!(
            pci.add_disk("again".into(), &spec, &mem),
            Err(PciError::DuplicateId(_))
        ));
        let bad = DiskSpec {
            path: dir.join("missing.img"),
            ..Default::default()
        };
        assert!(matches!(
            pci.add_disk("bad".into(), &bad, &mem),
            Err(PciError::Block { .. })
        ));
        let third = pci.add_disk("third".into(), &spec, &mem).unwrap();
        assert_eq!(third.to_string(), "0000:00:03.0");
        let _ = std::fs::remove_dir_all(&dir);
    }
    #[test]
    fn reserved_placements_hold_slots_and_bars_whatever_the_creation_order() {
        use std::collections::BTreeMap;
        let vm = vm_fd();
        let (dir, disk) = scratch_disk("place");
        let spec = DiskSpec {
            path: disk.clone(),
            ..Default::default()
        };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let mut pci = PciDevices::new(&vm, &mem, &mut pio, &mut mmio, &[], None).unwrap();
        let window = layout::PCI_MMIO32_START;
        let at = |slot, bar| Placement { slot, bar };
        let plan = BTreeMap::from([
            ("a".to_string(), at(1, window + 0x8000)),
            ("b".to_string(), at(4, window + 0x10000)),
            ("never".to_string(), at(6, window + 0x20000)),
        ]);
        pci.reserve(&plan).unwrap();
        // Colliding placements are refused as a whole.
        let clash = BTreeMap::from([
            ("c".to_string(), at(5, window + 0x18000)),
            ("d".to_string(), at(4, window + 0x28000)),
        ]);
        assert!(pci.reserve(&clash).is_err());
        let bar_clash = BTreeMap::from([("e".to_string(), at(7, window + 0x10000))]);
        assert!(pci.reserve(&bar_clash).is_err());

        // An unplaced device keeps off the reserved slots and BARs; placed ones land where planned.
        pci.add_disk("x".into(), &spec, &mem).unwrap();
        pci.add_disk("b".into(), &spec, &mem).unwrap();
        pci.add_disk("a".into(), &spec, &mem).unwrap();
        let bar_of = |pci: &PciDevices, id: &str| {
            pci.device(id)
                .unwrap()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .bar_addr()
        };
        assert_eq!(pci.bdf_of("x").as_deref(), Some("0000:00:02.0"));
        assert_eq!(bar_of(&pci, "x"), window);
        assert_eq!(pci.bdf_of("b").as_deref(), Some("0000:00:04.0"));
        assert_eq!(bar_of(&pci, "b"), window + 0x10000);
        assert_eq!(pci.bdf_of("a").as_deref(), Some("0000:00:01.0"));
        assert_eq!(bar_of(&pci, "a"), window + 0x8000);
        // The refused placements held nothing: slot 5 and the BAR at +0x18000 go to the next devices.
        pci.add_disk("y".into(), &spec, &mem).unwrap();
        assert_eq!(pci.bdf_of("y").as_deref(), Some("0000:00:03.0"));
        assert_eq!(bar_of(&pci, "y"), window + 0x18000);
        assert_eq!(pci.drop_reservations(), ["never"]);
        pci.add_disk("z".into(), &spec, &mem).unwrap();
        assert_eq!(pci.bdf_of("z").as_deref(), Some("0000:00:05.0"));

        // A template's device states give the same placements back.
        pci.pause_devices().unwrap();
        let saved = pci.state().unwrap();
        let derived = placements(&saved);
        assert_eq!(derived["a"], at(1, window + 0x8000));
        assert_eq!(derived["b"], at(4, window + 0x10000));
        assert_eq!(derived["z"], at(5, bar_of(&pci, "z")));
        assert_eq!(derived.len(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }
    /// Whether KVM holds an ioeventfd at `addr` (it refuses a second one at the same address).
    fn ioeventfd_at(vm: &VmFd, addr: u64) -> bool {
        use kvm_ioctls::{IoEventAddress, NoDatamatch};
        let probe = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let at = IoEventAddress::Mmio(addr);
        match vm.register_ioevent(&probe, &at, NoDatamatch) {
            Ok(()) => {
                vm.unregister_ioevent(&probe, &at, NoDatamatch).unwrap();
                false
            }
            Err(e) => {
                assert_eq!(e.errno(), libc::EEXIST, "{e}");
                true
            }
        }
    }

    #[test]
    fn guest_bar_moves_carry_ioeventfds_and_survive_state_loads() {
        let vm = vm_fd();
        let (dir, disk) = scratch_disk("barmove");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let spec = DiskSpec {
            path: disk.clone(),
            ..Default::default()
        };
        let rng = RngSpec {
            src: "/dev/urandom".into(),
        };
        let mut pci = PciDevices::new(
            &vm,
            &mem,
            &mut pio,
            &mut mmio,
            std::slice::from_ref(&spec),
            Some(&rng),
        )
        .unwrap();
        let ecam = layout::PCI_ECAM_START;
        let cfg = |slot: u64, reg: u64| ecam + (slot << 15) + reg;
        let write32 = |bus: &Bus, addr: u64, v: u32| bus.write(addr, &v.to_le_bytes()).unwrap();
        let disk_bar = u64::from(read32(&mmio, cfg(1, 0x10)));
        let rng_bar = u64::from(read32(&mmio, cfg(2, 0x10)));
        let notify = |bar: u64| bar + 0x3000;
        assert!(ioeventfd_at(&vm, notify(rng_bar)));
        let new = layout::PCI_MMIO32_START + 0x10_0000;

        // The guest's way: decoding off, new address, decoding on (as a vCPU's ECAM writes).
        write32(&mmio, cfg(2, 0x04), 0);
        write32(&mmio, cfg(2, 0x10), new as u32);
        assert_eq!(read32(&mmio, rng_bar), 0, "still decodes at the old place");
        write32(&mmio, cfg(2, 0x04), 0x6);
        let rng = pci.device(RNG_ID).unwrap();
        assert_eq!(rng.lock().unwrap().bar_addr(), new);
        assert_eq!(read32(&mmio, cfg(2, 0x10)), new as u32);
        let mut nq = [0u8; 2];
        mmio.read(new + 0x12, &mut nq).unwrap();
        assert_eq!(
            u16::from_le_bytes(nq),
            1,
            "common config at the new address"
        );
        assert_eq!(read32(&mmio, rng_bar), u32::MAX, "nothing at the old one");
        assert!(ioeventfd_at(&vm, notify(new)));
        assert!(!ioeventfd_at(&vm, notify(rng_bar)));

        // Refused: onto the disk's BAR, outside the window. The BAR stays, and says so.
        for bad in [disk_bar, layout::PCI_ECAM_START, 0] {
            write32(&mmio, cfg(2, 0x10), bad as u32);
            assert_eq!(read32(&mmio, cfg(2, 0x10)), new as u32, "{bad:#x}");
            assert_eq!(rng.lock().unwrap().bar_addr(), new);
            assert!(ioeventfd_at(&vm, notify(new)));
        }
        let mut nq = [0u8; 2];
        mmio.read(disk_bar + 0x12, &mut nq).unwrap();
        assert_eq!(u16::from_le_bytes(nq), 1, "the disk is untouched");
        // The old range is free again: a hot-added device may take it.
        pci.add_disk("hot".into(), &spec, &mem).unwrap();
        let hot_bar = pci.device("hot").unwrap().lock().unwrap().bar_addr();
        assert_eq!(hot_bar, rng_bar);

        // Saved where the guest put it; a restore would place it there.
        pci.pause_devices().unwrap();
        let saved = pci.state().unwrap();
        assert_eq!(placements(&saved)[RNG_ID].bar, new);
        pci.resume_devices();
        // Loading a state moves BARs back where it says, even when the devices swapped places.
        write32(&mmio, cfg(2, 0x10), (new + 0x8000) as u32);
        write32(&mmio, cfg(1, 0x04), 0x6);
        write32(&mmio, cfg(1, 0x10), new as u32);
        write32(&mmio, cfg(2, 0x10), disk_bar as u32);
        let disk_dev = pci.device("_disk0").unwrap();
        assert_eq!(disk_dev.lock().unwrap().bar_addr(), new);
        assert_eq!(rng.lock().unwrap().bar_addr(), disk_bar);
        pci.check_state(&saved).unwrap();
        pci.set_state(&saved).unwrap();
        assert_eq!(disk_dev.lock().unwrap().bar_addr(), disk_bar);
        assert_eq!(rng.lock().unwrap().bar_addr(), new);
        assert_eq!(read32(&mmio, cfg(1, 0x10)), disk_bar as u32);
        for (bar, present) in [(disk_bar, true), (new, true), (new + 0x8000, false)] {
            assert_eq!(ioeventfd_at(&vm, notify(bar)), present, "{bar:#x}");
        }
        // A state whose BARs collide or leave the window is refused before anything moves.
        let mut clash = saved.clone();
        clash[1].state.config_space[4] = disk_bar as u32;
        assert!(matches!(
            pci.check_state(&clash),
            Err(PciError::DeviceSet(_))
        ));
        let mut outside = saved.clone();
        outside[1].state.config_space[4] = layout::PCI_ECAM_START as u32;
        assert!(matches!(
            pci.set_state(&outside),
            Err(PciError::DeviceSet(_))
        ));
        assert_eq!(rng.lock().unwrap().bar_addr(), new);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
