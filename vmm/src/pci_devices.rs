//! The PCI side of a VM: the root bus with its config access paths (ECAM on the MMIO bus, 0xCF8 on the
//! port bus), the GSI routing table, and the virtio-pci devices built from the configuration, with their
//! notification ioeventfds and MSI-X irqfds registered with KVM.
//!
//! Devices take slots 1, 2, ... in the order disks, then rng; BARs come from the 32-bit window
//! `layout::PCI_MMIO32_*`. MSI-X vectors get GSIs from 24 up; the IOAPIC can share the same routing table
//! through [`PciDevices::router`] (see `devices::pci::IoapicRouteSender`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::pci::{
    BarAllocator, InterruptRouter, PciBarBusDevice, PciBdf, PciConfigIo, PciConfigMmio, PciDevice,
    PciRoot, RouterError,
};
use devices::virtio::block::{Block, BlockConfig, BlockError, DEFAULT_QUEUE_SIZE};
use devices::virtio::rng::{Rng, RngError};
use devices::virtio::transport::VirtioPciError;
use devices::virtio::{GuestMemory, VirtioDevice, VirtioPciDevice, VIRTIO_PCI_BAR_SIZE};
use devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

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
    #[error("cannot register the notification ioeventfd of {id} at {addr:#x}")]
    Ioeventfd {
        id: String,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register the MSI-X irqfd of {id} for GSI {gsi}")]
    Irqfd {
        id: String,
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("PCI device state is not part of snapshots yet")]
    SnapshotUnsupported,
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

pub struct PciDevices {
    vm: Arc<VmFd>,
    router: Arc<InterruptRouter>,
    root: Arc<Mutex<PciRoot>>,
    bars: BarAllocator,
    entries: Vec<Entry>,
    vsock_reset: Option<devices::virtio::vsock::ResetHandle>,
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
        let mut pci = Self {
            vm: vm.clone(),
            router,
            root,
            bars: BarAllocator::new(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE)?,
            entries: Vec::new(),
            vsock_reset: None,
        };
        for (n, disk) in disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{n}"));
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
            pci.add_virtio(id, Box::new(block), mem, mmio)?;
        }
        if let Some(rng) = rng {
            let device = Rng::new(&rng.src)?;
            pci.add_virtio(RNG_ID.to_string(), Box::new(device), mem, mmio)?;
        }
        Ok(pci)
    }

    /// Adds a virtio device in the lowest free slot and returns its address.
    pub fn add_virtio(
        &mut self,
        id: String,
        device: Box<dyn VirtioDevice>,
        mem: &GuestMemory,
        mmio: &mut Bus,
    ) -> Result<PciBdf, PciError> {
        if self.entries.iter().any(|e| e.id == id) {
            return Err(PciError::DuplicateId(id));
        }
        let slot = self.root_lock().free_slot()?;
        let bar = self.bars.allocate(VIRTIO_PCI_BAR_SIZE)?;
        let result = self.place(id, device, mem, mmio, slot, bar);
        if result.is_err() {
            let _ = self.bars.free(bar, VIRTIO_PCI_BAR_SIZE);
        }
        result
    }

    fn place(
        &mut self,
        id: String,
        device: Box<dyn VirtioDevice>,
        mem: &GuestMemory,
        mmio: &mut Bus,
        slot: u8,
        bar: u64,
    ) -> Result<PciBdf, PciError> {
        let virtio =
            VirtioPciDevice::new(id.clone(), device, mem.clone(), bar, self.router.clone())
                .map_err(|source| PciError::VirtioPci {
                    id: id.clone(),
                    source,
                })?;
        // Register with KVM before the guest can see the device. Unregistering an ioeventfd is slow
        // (~7 ms here), so they stay for the device's life.
        for (addr, event) in virtio.ioeventfds() {
            self.vm
                .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|source| PciError::Ioeventfd {
                    id: id.clone(),
                    addr,
                    source,
                })?;
        }
        let irqfds = virtio.irqfds().map_err(|source| PciError::Irqfd {
            id: id.clone(),
            gsi: 0,
            source,
        })?;
        for (gsi, fd) in &irqfds {
            self.vm
                .register_irqfd(fd, *gsi)
                .map_err(|e| PciError::Irqfd {
                    id: id.clone(),
                    gsi: *gsi,
                    source: e.into(),
                })?;
        }
        let bars = virtio.bars();
        let device = Arc::new(Mutex::new(virtio));
        for b in bars {
            mmio.insert(
                Arc::new(Mutex::new(PciBarBusDevice::new(device.clone(), b.index))),
                b.addr,
                b.size,
            )?;
        }
        let bdf = self.root_lock().add_device(slot, device.clone())?;
        log::info!("pci: {id} at {bdf}, BAR0 {bar:#x}");
        self.entries.push(Entry { id, bdf, device });
        Ok(bdf)
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
        mmio: &mut Bus,
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
            // SAFETY: the handle returned to the caller owns the mapping for the VM's life.
            unsafe {
                crate::memory::register_extra_slot(
                    &self.vm,
                    first_slot + i as u32,
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
            self.add_virtio(id.clone(), Box::new(device), mem, mmio)?;
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
    pub fn add_vsock(
        &mut self,
        spec: &VsockSpec,
        mem: &GuestMemory,
        mmio: &mut Bus,
    ) -> Result<PciBdf, PciError> {
        let device = devices::virtio::vsock::Vsock::new(&spec.config)?;
        let reset = device.reset_handle();
        let bdf = self.add_virtio(spec.id.clone(), Box::new(device), mem, mmio)?;
        self.vsock_reset = Some(reset);
        Ok(bdf)
    }

    /// Resets the vsock transport (after a restore: the host sockets did not survive it).
    pub fn vsock_reset_handle(&self) -> Option<&devices::virtio::vsock::ResetHandle> {
        self.vsock_reset.as_ref()
    }

    fn root_lock(&self) -> std::sync::MutexGuard<'_, PciRoot> {
        self.root.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Snapshot support arrives with device state (issue 5, part 4).
    pub fn state(&self) -> Result<(), PciError> {
        Err(PciError::SnapshotUnsupported)
    }

    pub fn set_state(&mut self) -> Result<(), PciError> {
        Err(PciError::SnapshotUnsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};
    use vm_memory::GuestAddress;

    fn vm_fd() -> Option<Arc<VmFd>> {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let vm = kvm.create_vm().ok()?;
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = 24;
        vm.enable_cap(&cap).ok()?;
        Some(Arc::new(vm))
    }

    fn read32(bus: &Bus, addr: u64) -> u32 {
        let mut d = [0u8; 4];
        bus.read(addr, &mut d).unwrap();
        u32::from_le_bytes(d)
    }

    #[test]
    fn builds_devices_on_the_buses() {
        let Some(vm) = vm_fd() else {
            eprintln!("no usable /dev/kvm: skipped");
            return;
        };
        let dir = std::env::temp_dir().join(format!("trenv-pci-devices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
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
        assert!(pci.state().is_err());

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
        let vm2 = vm_fd().unwrap();
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
}
