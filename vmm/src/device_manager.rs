//! Creates the platform devices of a VM and places them on the port-I/O and MMIO buses at the addresses of
//! `arch::layout`: the emulated IOAPIC (split irqchip), the 16550 UART (ttyS0, on port 0x3f8 and its MMIO
//! alias), the i8042 (reset), the ACPI sleep registers (power-off), the guest-signal device and the PCI
//! segment with its hotplug controller, whose events raise the ACPI GED's interrupt (`layout::GED_IRQ`).
//!
//! After boot, [`DeviceManager::hot_add`] adds devices to the running VM and
//! [`DeviceManager::release_ejected`] lets go of those the guest ejected.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::sync::{Arc, Mutex};

use devices::acpi_pm::AcpiPmDevice;
use devices::exit::ExitNotifier;
use devices::guest_idle::{GuestIdleDevice, IdleWaker};
use devices::guest_signal::{event_name, GuestEvent, GuestSignalDevice};
use devices::ioapic::{Ioapic, IrqLine};
use devices::legacy::i8042::I8042Device;
use devices::legacy::serial::SerialDevice;
use devices::pci::msi::{InterruptRouter, IoapicRouteSender};
use devices::{Bus, BusError};
use kvm_ioctls::VmFd;

use crate::arch::layout;
use crate::config::{ConsoleConfig, ConsoleMode, VmConfig};
use crate::event_monitor;
use crate::pci_devices::{DiskSpec, PciDevices, RngSpec, VsockSpec};
use devices::console_socket::ConsoleSocket;
use devices::pci::PciBdf;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    #[error("cannot open serial output file {path}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serial mode File needs a file path")]
    MissingFilePath,
    #[error("serial mode Socket needs a socket path")]
    MissingSocketPath,
    #[error("cannot listen on serial socket {path}")]
    SerialSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "serial mode {0:?} is not supported yet (use off, null, tty, file=PATH or socket=PATH)"
    )]
    UnsupportedSerialMode(ConsoleMode),
    #[error("PCI devices")]
    Pci(#[from] crate::pci_devices::PciError),
    #[error("cannot create the exit event")]
    ExitEvent(#[source] std::io::Error),
}

impl DeviceError {
    /// The PCI layer's error, if that is what failed.
    pub fn pci(&self) -> Option<&crate::pci_devices::PciError> {
        match self {
            DeviceError::Pci(e) => Some(e),
            _ => None,
        }
    }
}

pub struct DeviceManager {
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub ioapic: Arc<Mutex<Ioapic>>,
    /// None when the serial console is `off`.
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    pub exit: ExitNotifier,
    pub guest_signal: Arc<Mutex<GuestSignalDevice>>,
    /// Ends guests' idle waits (on restore, pause and stop).
    pub idle_waker: IdleWaker,
    /// The PCI segment: host bridge and virtio-pci devices.
    pub pci: PciDevices,
    /// Guest milestones in arrival order, for the VMM's own reporting (boot time, ready).
    pub guest_events: Arc<Mutex<Vec<GuestEvent>>>,
    /// virtio-pmem mappings (they must outlive the VM's memslots on them), for accounting and diagnosis.
    pub pmem: Vec<virtio_pmem_share::PmemHandle>,
    /// The KVM memslot of each pmem range, by device id.
    pmem_memslots: std::collections::BTreeMap<String, u32>,
    /// The first memslot after guest RAM's (pmem ranges take memslots from here).
    first_pmem_memslot: u32,
    /// Readable when the guest ejected a device (see [`Self::release_ejected`]).
    hotplug_event: EventFd,
}

/// A device to add to a running VM, its configuration already checked.
pub enum HotplugDevice {
    /// A disk and its id.
    Disk(String, DiskSpec),
    Pmem(virtio_pmem_share::PmemSpec),
    /// NIC number `n` (for its default MAC), its configuration and the tap fds that came with the request.
    Net {
        n: usize,
        config: api::models::NetConfig,
        fds: Vec<std::os::fd::OwnedFd>,
    },
    Vsock(VsockSpec),
}

/// The UART's output sink for `config`, and the console socket to serve once the UART exists.
type SerialOutput = (Box<dyn Write + Send>, Option<ConsoleSocket>);

fn serial_output(config: &ConsoleConfig) -> Result<Option<SerialOutput>, DeviceError> {
    let plain = |out: Box<dyn Write + Send>| Some((out, None));
    Ok(match config.mode {
        ConsoleMode::Off => None,
        ConsoleMode::Null => plain(Box::new(std::io::sink())),
        ConsoleMode::Tty => plain(Box::new(std::io::stdout())),
        ConsoleMode::File => {
            let path = config.file.as_ref().ok_or(DeviceError::MissingFilePath)?;
            let file = File::create(path).map_err(|source| DeviceError::SerialFile {
                path: path.display().to_string(),
                source,
            })?;
            plain(Box::new(LineWriter::new(file)))
        }
        ConsoleMode::Socket => {
            let path = config
                .socket
                .as_ref()
                .ok_or(DeviceError::MissingSocketPath)?;
            let socket = ConsoleSocket::bind(path).map_err(|source| DeviceError::SerialSocket {
                path: path.display().to_string(),
                source,
            })?;
            Some((Box::new(socket.writer()), Some(socket)))
        }
        mode => return Err(DeviceError::UnsupportedSerialMode(mode)),
    })
}

impl DeviceManager {
    pub fn new(
        vm: Arc<VmFd>,
        config: &VmConfig,
        memory: &GuestMemoryMmap,
    ) -> Result<Self, DeviceError> {
        Self::with_placements(vm, config, memory, &Default::default())
    }

    /// As [`Self::new`], with PCI devices at the slots and BARs `placements` names (a restore gives each
    /// device the place it had in the template, which hotplug may have made differ from the order the
    /// configuration lists them in; see `pci_devices::placements`).
    pub fn with_placements(
        vm: Arc<VmFd>,
        config: &VmConfig,
        memory: &GuestMemoryMmap,
        placements: &std::collections::BTreeMap<String, crate::pci_devices::Placement>,
    ) -> Result<Self, DeviceError> {
        let serial_config = &config.serial;
        let exit = ExitNotifier::new().map_err(DeviceError::ExitEvent)?;
        let idle_waker = IdleWaker::default();
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        // One GSI routing table for the IOAPIC's pins and the PCI devices' MSI-X vectors: KVM has one.
        let router = Arc::new(InterruptRouter::new(Box::new(vm.clone())));
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Box::new(IoapicRouteSender {
            vm: vm.clone(),
            router: router.clone(),
        }))));
        mmio.insert(ioapic.clone(), layout::IOAPIC_START, layout::IOAPIC_SIZE)?;

        let serial = match serial_output(serial_config)? {
            Some((out, socket)) => {
                let irq = IrqLine::new(ioapic.clone(), layout::SERIAL_IRQ);
                let serial = Arc::new(Mutex::new(SerialDevice::new(irq, out)));
                if serial_config.mode == ConsoleMode::Tty {
                    crate::terminal::route_stdin_to(serial.clone());
                }
                if let Some(socket) = socket {
                    socket
                        .attach("serial-socket", serial.clone())
                        .map_err(|source| DeviceError::SerialSocket {
                            path: serial_config
                                .socket
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            source,
                        })?;
                }
                pio.insert(
                    serial.clone(),
                    layout::SERIAL_PORT,
                    layout::SERIAL_PORT_SIZE,
                )?;
                mmio.insert(
                    serial.clone(),
                    layout::SERIAL_MMIO_START,
                    layout::SERIAL_MMIO_SIZE,
                )?;
                Some(serial)
            }
            None => None,
        };

        let i8042 = Arc::new(Mutex::new(I8042Device::new(exit.clone())));
        pio.insert(i8042, layout::I8042_PORT, layout::I8042_PORT_SIZE)?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPmDevice::new(exit.clone())));
        pio.insert(
            acpi_pm,
            layout::ACPI_SLEEP_CONTROL_PORT,
            layout::ACPI_PM_PORT_SIZE,
        )?;

        let guest_events = Arc::new(Mutex::new(Vec::new()));
        let recorded = guest_events.clone();
        let signal = GuestSignalDevice::new(Box::new(move |event: GuestEvent| {
            let name = event_name(event.code);
            log::info!("guest-signal: {name} (arg {:#x})", event.arg);
            event_monitor::emit_at(
                event.monotonic_ns,
                "guest",
                &name,
                &[("arg", event.arg.to_string())],
            );
            if let Ok(mut events) = recorded.lock() {
                // Bounded: a guest looping on the signal register must not grow VMM memory without limit.
                if events.len() < 4096 {
                    events.push(event);
                }
            }
        }));
        let guest_signal = Arc::new(Mutex::new(signal));
        mmio.insert(
            guest_signal.clone(),
            layout::GUEST_SIGNAL_START,
            layout::GUEST_SIGNAL_SIZE,
        )?;

        let disks = config
            .disks
            .iter()
            .flatten()
            .map(DiskSpec::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut pci =
            PciDevices::with_router(router, &vm, memory, (&mut pio, &mut mmio), &[], None)?;
        pci.reserve(placements)?;
        // A device completing work for the guest ends the guest's idle wait, as an interrupt ends `hlt`.
        let waker = idle_waker.clone();
        pci.set_interrupt_observer(Arc::new(move || waker.wake()));
        // Disks take slots 1, 2, ..., then the rng (unless placed elsewhere).
        for (n, disk) in disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{n}"));
            pci.add_disk(id, disk, memory)?;
        }
        let rng = devices::virtio::rng::Rng::new(&RngSpec::from(&config.rng).src)
            .map_err(crate::pci_devices::PciError::from)?;
        pci.add_virtio(
            crate::pci_devices::RNG_ID.to_string(),
            Box::new(rng),
            memory,
        )?;
        let ged = IrqLine::new(ioapic.clone(), layout::GED_IRQ);
        let waker = idle_waker.clone();
        let hotplug_event = pci.enable_hotplug(
            &mut mmio,
            Box::new(move || {
                ged.pulse();
                // A guest that polls the controller from an idle wait hears of it at once.
                waker.wake();
            }),
        )?;
        if let Some(vsock) = &config.vsock {
            let spec = VsockSpec::try_from(vsock)?;
            pci.add_vsock(&spec, memory)?;
        }
        // After RAM's memslots, in the window above RAM; the handles keep the files mapped.
        let pmem_specs = config
            .pmem
            .iter()
            .flatten()
            .enumerate()
            .map(|(n, p)| crate::pci_devices::pmem_spec(n, p))
            .collect::<Result<Vec<_>, _>>()?;
        let first_pmem_memslot = crate::memory::first_free_slot(memory);
        let pmem = pci.add_pmem(
            &pmem_specs,
            layout::pmem_window_start(config.memory.size),
            first_pmem_memslot,
            memory,
        )?;
        let pmem_memslots = pmem
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), first_pmem_memslot + i as u32))
            .collect();

        // The virtio console and the NICs take the next slots.
        let serial_reads_stdin = serial_config.mode == ConsoleMode::Tty;
        if let Some(console) =
            crate::pci_devices::console_device(&config.console, serial_reads_stdin)?
        {
            let id = crate::pci_devices::CONSOLE_ID.to_string();
            pci.add_virtio(id, Box::new(console), memory)?;
        }
        for (n, net) in config.net.iter().flatten().enumerate() {
            let (id, device) = crate::pci_devices::net_device(n, net, Vec::new())?;
            pci.add_virtio(id, Box::new(device), memory)?;
        }

        let unplaced = pci.drop_reservations();
        if !unplaced.is_empty() {
            log::warn!("no device has the place reserved for {unplaced:?}");
        }

        mmio.insert(
            Arc::new(Mutex::new(GuestIdleDevice::new(idle_waker.clone()))),
            layout::GUEST_IDLE_START,
            layout::GUEST_IDLE_SIZE,
        )?;

        Ok(DeviceManager {
            pio_bus: Arc::new(pio),
            mmio_bus: Arc::new(mmio),
            ioapic,
            serial,
            exit,
            guest_signal,
            idle_waker,
            pci,
            guest_events,
            pmem,
            pmem_memslots,
            first_pmem_memslot,
            hotplug_event,
        })
    }

    /// Creates `device` in the lowest free PCI slot of the running VM and tells the guest (hotplug
    /// interrupt). `mem_size` is the guest's RAM size (pmem ranges go above it). Nothing is left behind
    /// when it fails.
    pub fn hot_add(
        &mut self,
        device: HotplugDevice,
        memory: &GuestMemoryMmap,
        mem_size: u64,
    ) -> Result<(String, PciBdf), DeviceError> {
        let (id, bdf) = match device {
            HotplugDevice::Disk(id, spec) => {
                let bdf = self.pci.add_disk(id.clone(), &spec, memory)?;
                (id, bdf)
            }
            HotplugDevice::Pmem(spec) => {
                // Above every range in use, so that a restore from the configuration, which places the
                // ranges in order, puts this one where it is now.
                let window_start = self
                    .pmem
                    .iter()
                    .map(|p| p.guest_addr.saturating_add(p.backing.size()))
                    .fold(layout::pmem_window_start(mem_size), u64::max);
                let memslot = (self.first_pmem_memslot..)
                    .find(|s| !self.pmem_memslots.values().any(|used| used == s))
                    .unwrap_or(u32::MAX);
                let mut handles = self.pci.add_pmem(
                    std::slice::from_ref(&spec),
                    window_start,
                    memslot,
                    memory,
                )?;
                let handle = handles
                    .pop()
                    .ok_or(crate::pci_devices::PciError::PmemWindow)?;
                let bdf = self
                    .pci
                    .bdf(&spec.id)
                    .ok_or_else(|| crate::pci_devices::PciError::UnknownDevice(spec.id.clone()))?;
                self.pmem_memslots.insert(spec.id.clone(), memslot);
                self.pmem.push(handle);
                (spec.id, bdf)
            }
            HotplugDevice::Net { n, config, fds } => {
                let (id, net) = crate::pci_devices::net_device(n, &config, fds)?;
                let bdf = self.pci.add_virtio(id.clone(), Box::new(net), memory)?;
                (id, bdf)
            }
            HotplugDevice::Vsock(spec) => {
                let bdf = self.pci.add_vsock(&spec, memory)?;
                (spec.id, bdf)
            }
        };
        self.pci.announce(&id)?;
        event_monitor::emit(
            "device",
            "added",
            &[("id", id.clone()), ("bdf", bdf.to_string())],
        );
        Ok((id, bdf))
    }

    /// Asks the guest to eject device `id` (it stays until the guest does).
    pub fn request_removal(&self, id: &str) -> Result<(), DeviceError> {
        self.pci.request_eject(id)?;
        event_monitor::emit("device", "eject-requested", &[("id", id.to_string())]);
        Ok(())
    }

    /// Releases the devices the guest ejected (and the memory of ejected pmem devices); returns their ids.
    pub fn release_ejected(&mut self) -> Vec<String> {
        let ids = self.pci.release_ejected();
        for id in &ids {
            if let Some(memslot) = self.pmem_memslots.remove(id) {
                // The slot goes before the mapping it points into.
                crate::pci_devices::remove_memslot(self.pci.vm_fd(), memslot);
                self.pmem.retain(|p| p.id != *id);
            }
            event_monitor::emit("device", "removed", &[("id", id.clone())]);
        }
        ids
    }

    /// Readable when the guest ejected a device: call [`Self::release_ejected`] then.
    pub fn hotplug_eventfd(&self) -> &EventFd {
        &self.hotplug_event
    }
}
