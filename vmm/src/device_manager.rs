//! Creates the platform devices of a VM and places them on the port-I/O and MMIO buses at the addresses of
//! `arch::layout`: the emulated IOAPIC (split irqchip), the 16550 UART (ttyS0, on port 0x3f8 and its MMIO
//! alias), the i8042 (reset), the ACPI sleep registers (power-off) and the guest-signal device.

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
use crate::pci_devices::{DiskSpec, PciDevices, RngSpec};
use devices::console_socket::ConsoleSocket;
use vm_memory::GuestMemoryMmap;

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
        let serial_config = &config.serial;
        let exit = ExitNotifier::new().map_err(DeviceError::ExitEvent)?;
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
        let rng = Some(RngSpec::from(&config.rng));
        let mut pci = PciDevices::with_router(
            router,
            &vm,
            memory,
            (&mut pio, &mut mmio),
            &disks,
            rng.as_ref(),
        )?;
        if let Some(vsock) = &config.vsock {
            let spec = crate::pci_devices::VsockSpec::try_from(vsock)?;
            pci.add_vsock(&spec, memory, &mut mmio)?;
        }
        // After RAM's memslots, in the window above RAM; the handles keep the files mapped.
        let pmem_specs = config
            .pmem
            .iter()
            .flatten()
            .enumerate()
            .map(|(n, p)| crate::pci_devices::pmem_spec(n, p))
            .collect::<Result<Vec<_>, _>>()?;
        let pmem = pci.add_pmem(
            &pmem_specs,
            layout::pmem_window_start(config.memory.size),
            crate::memory::first_free_slot(memory),
            memory,
            &mut mmio,
        )?;

        // The virtio console and the NICs take the next slots.
        let serial_reads_stdin = serial_config.mode == ConsoleMode::Tty;
        if let Some(console) =
            crate::pci_devices::console_device(&config.console, serial_reads_stdin)?
        {
            let id = crate::pci_devices::CONSOLE_ID.to_string();
            pci.add_virtio(id, Box::new(console), memory, &mut mmio)?;
        }
        for (n, net) in config.net.iter().flatten().enumerate() {
            let (id, device) = crate::pci_devices::net_device(n, net, Vec::new())?;
            pci.add_virtio(id, Box::new(device), memory, &mut mmio)?;
        }

        let idle_waker = IdleWaker::default();
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
        })
    }
}
