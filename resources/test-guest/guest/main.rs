//! TrEnv test guest: a freestanding x86_64 program the VMM boots through the Linux 64-bit boot protocol.
//! A few dozen instructions of CPL0 setup (boot.rs), then everything at CPL3 where this host runs guests
//! natively. PROTOCOL.md describes the contract with the VMM.
//!
//! Built by ../build.rs with rustc directly (not a cargo target). The modules marked "shared" are pure
//! logic that ../src/lib.rs also compiles host-side for unit tests.

#![no_std]
#![no_main]

// Shared with the host-side crate; some items are only used there.
#[allow(dead_code)]
mod acpi;
#[allow(dead_code)]
mod cmdline;
#[allow(dead_code)]
mod e820;
#[allow(dead_code)]
mod pattern;
#[allow(dead_code)]
mod pci;
#[allow(dead_code)]
mod protocol;

mod boot;
mod bootinfo;
mod global;
mod mem;
mod power;
mod serial;
mod signal;
mod virtio;
mod workloads;

use bootinfo::BootInfo;
use protocol::*;
use serial::{println, Uart};

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// [start, end) of the loaded image including .bss and stacks (page aligned end).
pub fn image_range() -> (u64, u64) {
    (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    )
}

/// Entered at CPL3 from boot.rs with the boot_params address.
#[no_mangle]
extern "C" fn guest_main(boot_params: u64) -> ! {
    let signal_version = signal::init();
    signal::send(SIGNAL_BOOT_COMPLETE, 0);
    match run(boot_params, signal_version) {
        Ok(result) => signal::send(SIGNAL_WORKLOAD_DONE, result),
        Err(code) => signal::send(SIGNAL_FAILURE, code),
    }
    power::power_off();
}

/// Sets up the console and runs the workload: Ok(WORKLOAD_DONE argument) or Err(FAIL_*).
fn run(boot_params: u64, signal_version: Option<u32>) -> Result<u64, u64> {
    let Some(info) = BootInfo::new(boot_params) else {
        println!("TrEnv test guest: error: boot_params address {boot_params:#x} is not in the first 4 GiB");
        return Err(FAIL_BOOT_PARAMS);
    };
    power::RSDP_HINT.set(info.rsdp_hint());
    let raw = info.cmdline();
    // A non-UTF-8 byte ends the usable command line (reported below).
    let (cmdline, bad_utf8) = match core::str::from_utf8(raw) {
        Ok(s) => (s, false),
        Err(e) => (
            core::str::from_utf8(&raw[..e.valid_up_to()]).unwrap_or(""),
            true,
        ),
    };

    power::RESET_INSTEAD.set(cmdline::kernel_param(cmdline, "trenv.exit") == Some("reset"));
    let earlycon = cmdline::kernel_param(cmdline, "earlycon");
    let wanted = match earlycon.and_then(cmdline::parse_earlycon) {
        Some(cmdline::Earlycon::Mmio { addr, stride }) => Uart::Mmio { base: addr, stride },
        Some(cmdline::Earlycon::Io { port }) => Uart::Port(port),
        None => Uart::Port(SERIAL_PORT),
    };
    let uart = serial::init(wanted);
    if uart == Uart::None && wanted != Uart::Port(SERIAL_PORT) {
        // The requested console did not answer: COM1 is better than silence.
        serial::init(Uart::Port(SERIAL_PORT));
    }

    let workload = cmdline::workload(cmdline);
    let name = workload.as_ref().map_or("boot", |w| w.name);
    println!(
        "TrEnv test guest: workload {name}, console {}, signal device {}",
        ConsoleName(serial::uart()),
        SignalName(signal_version)
    );
    if let Some(value) = earlycon.filter(|v| cmdline::parse_earlycon(v).is_none()) {
        println!("warning: earlycon={value} not understood, using COM1");
    }
    if bad_utf8 {
        println!(
            "warning: the command line is not UTF-8 after byte {}",
            cmdline.len()
        );
    }

    let Some(selected) = workloads::find(name) else {
        println!(
            "error: unknown workload '{name}' (known:{})",
            KnownWorkloads
        );
        return Err(FAIL_UNKNOWN_WORKLOAD);
    };
    let params = workload
        .map(|w| w.params)
        .unwrap_or_else(|| cmdline::tokens(""));
    if let Err(e) = cmdline::check_params(params.clone(), selected.params) {
        println!("error: workload {name}: {e}");
        return Err(FAIL_BAD_PARAMETER);
    }
    let map = e820::parse(info.zero_page).map_err(|e| {
        println!("error: {e}");
        FAIL_BOOT_PARAMS
    })?;
    let ctx = workloads::Context {
        info,
        cmdline,
        e820: &map,
    };

    signal::send(SIGNAL_READY, selected.id);
    signal::send(SIGNAL_WORKLOAD_START, selected.id);
    (selected.run)(&ctx, params)
}

struct ConsoleName(Uart);

impl core::fmt::Display for ConsoleName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Uart::Mmio { base, .. } => write!(f, "mmio {base:#x}"),
            Uart::Port(port) => write!(f, "port {port:#x}"),
            Uart::None => f.write_str("none"),
        }
    }
}

struct SignalName(Option<u32>);

impl core::fmt::Display for SignalName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "v{v}"),
            None => f.write_str("absent"),
        }
    }
}

struct KnownWorkloads;

impl core::fmt::Display for KnownWorkloads {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for w in workloads::WORKLOADS {
            write!(f, " {}", w.name)?;
        }
        Ok(())
    }
}

/// Reports a CPU exception. Entered by `iretq` from the CPL0 stub (boot.rs) on a fresh stack.
#[no_mangle]
extern "C" fn fault_entry() -> ! {
    let f = boot::last_fault();
    println!(
        "FAULT: exception {} ({}) error={:#x} rip={:#x} cs={:#x} rsp={:#x} cr2={:#x}",
        f.vector,
        exception_name(f.vector),
        f.error,
        f.rip,
        f.cs,
        f.rsp,
        f.cr2
    );
    signal::send(SIGNAL_FAILURE, FAIL_EXCEPTION_BASE + f.vector);
    power::power_off();
}

fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE",
        "#DB",
        "NMI",
        "#BP (unknown int3 service)",
        "#OF",
        "#BR",
        "#UD",
        "#NM",
        "#DF",
        "CSO",
        "#TS",
        "#NP",
        "#SS",
        "#GP",
        "#PF",
        "reserved",
        "#MF",
        "#AC",
        "#MC",
        "#XM",
        "#VE",
        "#CP",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "#HV",
        "#VC",
        "#SX",
        "reserved",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("?")
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC: {info}");
    signal::send(SIGNAL_FAILURE, FAIL_PANIC);
    power::power_off();
}

/// The precompiled libcore (built for unwinding) references the personality routine from its unwind
/// tables; nothing unwinds here (panic=abort), so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
