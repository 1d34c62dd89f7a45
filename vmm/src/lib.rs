//! The TrEnv VMM: one process per VM. This crate owns the VM lifecycle (create, configure for boot, run,
//! stop), vCPU threads and their exit dispatch, guest memory and its KVM memslots, the x86_64 boot path
//! (kernel loading, boot_params, page tables, CPUID, MSRs, ACPI tables), the VM configuration model with its
//! Cloud Hypervisor-compatible CLI syntax, and the binaries (`trenv`, `trenv-bench`). Snapshot and restore
//! orchestration for templates arrives here too.

pub mod arch;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod device_manager;
pub mod event_monitor;
pub mod hotplug;
pub mod logger;
pub mod memory;
pub mod pci_devices;
pub mod pool;
pub mod remote;
pub mod runner;
pub mod seccomp;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod vm;
pub mod vmm;

/// An error and its sources, outermost first, without repeating a source that its parent already quotes.
pub fn error_chain_list(error: &dyn std::error::Error) -> Vec<String> {
    let mut chain = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !chain.last().is_some_and(|outer| outer.ends_with(&text)) {
            chain.push(text);
        }
        source = e.source();
    }
    chain
}

/// Formats an error with its whole source chain on one line, outermost first.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    error_chain_list(error).join(": ")
}

/// The command-line parameter that points the test guest at the MMIO alias of ttyS0 (Linux's earlycon
/// syntax, which Linux itself accepts too).
pub const TEST_GUEST_CONSOLE: &str = "earlycon=uart8250,mmio,0xfe001000";

/// Writes the bundled test guest's image to a sealed memfd and returns a path to it that stays valid for the
/// life of the process, so the demo and benchmarks need no file next to the binary.
pub fn test_guest_image() -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: memfd_create with a static C string; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"trenv-test-guest".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(test_guest::IMAGE)?;
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    // Keep the descriptor open for the life of the process.
    std::mem::forget(file);
    Ok(path)
}
