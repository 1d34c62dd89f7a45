//! Runs one VM from its configuration until the guest powers off or resets: the path behind `trenv --kernel`
//! and the demo.

use std::time::Duration;

use devices::exit::ExitReason;
use devices::guest_signal::{event, GuestEvent};

use crate::config::{ConsoleMode, VmConfig};
use crate::event_monitor;
use crate::terminal::RawTerminal;
use crate::vm::{self, Vm, VmError};

/// How a VM run ended and what it measured.
#[derive(Debug)]
pub struct RunReport {
    pub exit: ExitReason,
    /// Monotonic timestamps (ns) of the guest's milestones.
    pub events: Vec<GuestEvent>,
    /// From the caller's start mark to the guest's first BOOT_COMPLETE signal.
    pub boot_complete: Option<Duration>,
    /// From the caller's start mark to the exit.
    pub total: Duration,
}

/// Creates, boots and runs a VM; `start_ns` is the monotonic time the caller counts boot time from
/// (the process start for `trenv`).
pub fn run_vm(config: &VmConfig, start_ns: u64) -> Result<RunReport, VmError> {
    config.validate()?;
    // A run that fails must not leave behind an output file it created.
    let serial_file = (config.serial.mode == ConsoleMode::File)
        .then(|| config.serial.file.clone())
        .flatten()
        .filter(|path| !path.exists());
    let result = boot_and_wait(config, start_ns);
    if result.is_err() {
        if let Some(path) = serial_file {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

fn boot_and_wait(config: &VmConfig, start_ns: u64) -> Result<RunReport, VmError> {
    let kvm = vm::open_kvm()?;
    let mut vm = Vm::create(kvm, config)?;
    vm.configure_for_boot()?;
    let tty = config.serial.mode == ConsoleMode::Tty;
    let _raw_terminal = if tty { RawTerminal::enable() } else { None };
    event_monitor::emit("vm", "booting", &[]);
    vm.start()?;
    let exit = vm.wait();
    let end_ns = event_monitor::monotonic_ns();
    vm.stop_vcpus();
    let exit = exit?;
    let (rss_kib, hwm_kib) = process_memory_kib();
    event_monitor::emit(
        "vm",
        match exit {
            ExitReason::PowerOff => "shutdown",
            ExitReason::Reset => "reset",
        },
        &[
            ("vmm_rss_kib", rss_kib.to_string()),
            ("vmm_hwm_kib", hwm_kib.to_string()),
        ],
    );
    let events = vm.guest_events();
    let boot_complete = events
        .iter()
        .find(|e| e.code == event::BOOT_COMPLETE)
        .map(|e| Duration::from_nanos(e.monotonic_ns.saturating_sub(start_ns)));
    Ok(RunReport {
        exit,
        events,
        boot_complete,
        total: Duration::from_nanos(end_ns.saturating_sub(start_ns)),
    })
}

/// This process's resident set now and at its peak (VmRSS, VmHWM), in KiB.
pub fn process_memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
