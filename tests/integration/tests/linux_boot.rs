//! Linux boots under `trenv`: a real kernel is the judge of the boot protocol.
//!
//! `linux_early_boot_sees_our_boot_protocol` boots Debian's cloud kernel (fetched and unpacked by
//! `resources/linux/fetch-kernel.sh`) as an uncompressed ELF and reads the kernel's own early log on the
//! serial console: the command line it received, the e820 map it was handed, the ACPI tables it found and the
//! number of CPUs it will bring up. On kvm_pvm hosts CPL0 code is emulated, so the VM is stopped as soon as
//! those lines are out; nothing later in the boot is waited for.
//!
//! `linux_full_boot_to_init_and_poweroff` runs only with `TRENV_LINUX_FULL_BOOT=1` (a host with hardware
//! virtualisation, where a full boot takes seconds): it boots the bzImage with a busybox initramfs whose init
//! prints a marker and powers the VM off, and expects `trenv` to exit 0. Without the variable it says it is
//! skipped and passes.
//!
//! Both need network access the first time (apt-get download, ~27 MB); later runs use the cache.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::{require_kvm, VmmProcess};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");

/// The whole early-boot check, download excluded, must fit in this.
const EARLY_BOOT_BUDGET: Duration = Duration::from_secs(180);
const FULL_BOOT_BUDGET: Duration = Duration::from_secs(120);

const MEMORY: &str = "size=256M";
const CPUS: u32 = 2;

/// The e820 map the VMM gives a 256 MiB guest (vmm/src/arch/x86_64/layout.rs): low RAM up to the EBDA, the
/// EBDA/BIOS area holding the ACPI tables reserved, then RAM from 1 MiB to the end of memory.
const EXPECTED_E820: &[(u64, u64, &str)] = &[
    (0x0, 0x9_fbff, "usable"),
    (0x9_fc00, 0xf_ffff, "reserved"),
    (0x10_0000, 0xfff_ffff, "usable"),
];
/// The PCI ECAM window (layout::PCI_ECAM_START/SIZE), which the VMM may list as reserved once it has PCI.
const ECAM_E820: (u64, u64, &str) = (0xe000_0000, 0xefff_ffff, "reserved");

/// layout::RSDP_START, as the kernel prints it.
const RSDP_LINE_PREFIX: &str = "ACPI: RSDP 0x00000000000E0000";

/// The MADT's IOAPIC at layout::IOAPIC_START with layout::IOAPIC_PINS pins, as the kernel prints it.
const IOAPIC_LINE_PREFIX: &str = "IOAPIC[0]: apic_id ";
const IOAPIC_LINE_SUFFIX: &str = "address 0xfec00000, GSI 0-23";

/// What `fetch-kernel.sh` reports.
struct Kernel {
    vmlinux: PathBuf,
    vmlinuz: PathBuf,
    busybox: Option<PathBuf>,
}

fn fetch_kernel(with_busybox: bool) -> Kernel {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux/fetch-kernel.sh");
    let mut command = Command::new("bash");
    command.arg(&script);
    if with_busybox {
        command.arg("--with-busybox");
    }
    let started = Instant::now();
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}): the kernel is fetched with apt-get on first use and needs network access\n\
         --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        script.display(),
        output.status
    );
    let path_of = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(PathBuf::from)
    };
    let missing = |key: &str| -> PathBuf {
        panic!(
            "{} printed no {key}= line:\n{stdout}\n{stderr}",
            script.display()
        )
    };
    let kernel = Kernel {
        vmlinux: path_of("vmlinux").unwrap_or_else(|| missing("vmlinux")),
        vmlinuz: path_of("vmlinuz").unwrap_or_else(|| missing("vmlinuz")),
        busybox: path_of("busybox"),
    };
    eprintln!(
        "kernel: {} (fetch-kernel.sh took {:.1?})",
        kernel.vmlinux.display(),
        started.elapsed()
    );
    kernel
}

/// A token no earlier run or other kernel could have printed, so a match proves this boot read our cmdline.
fn random_token() -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    format!("{:016x}", hasher.finish())
}

/// A kernel log line without its `[    0.000000] ` timestamp and the serial driver's `\r`.
fn log_text(line: &str) -> &str {
    let line = line.trim_end_matches(['\r', '\n']);
    match line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
    {
        Some((stamp, text)) if stamp.trim().parse::<f64>().is_ok() => text,
        _ => line,
    }
}

fn log_lines(log: &str) -> Vec<&str> {
    log.lines().map(log_text).collect()
}

/// The last lines of the console and all of stderr, for failure messages.
fn describe(vmm: &VmmProcess) -> String {
    let stdout = vmm.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    let tail = &lines[lines.len().saturating_sub(80)..];
    format!(
        "after {:.1?}\n--- console (last {} lines) ---\n{}\n--- trenv stderr ---\n{}",
        vmm.started.elapsed(),
        tail.len(),
        tail.join("\n"),
        vmm.stderr()
    )
}

/// Parses `BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable`.
fn parse_e820(text: &str) -> Option<(u64, u64, String)> {
    let rest = text.strip_prefix("BIOS-e820: [mem ")?;
    let (range, kind) = rest.split_once("] ")?;
    let (start, end) = range.split_once('-')?;
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    Some((hex(start)?, hex(end)?, kind.trim().to_string()))
}

/// Checks everything the early log must show; returns what is wrong, or an empty list.
fn early_boot_problems(log: &str, cmdline: &str) -> Vec<String> {
    let lines = log_lines(log);
    let mut problems = Vec::new();

    // (a) The command line, byte for byte.
    let expected = format!("Command line: {cmdline}");
    if !lines.iter().any(|l| *l == expected) {
        let seen: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("Command line:"))
            .collect();
        problems.push(format!("no `{expected}` line (saw {seen:?})"));
    }

    // (b) The e820 map. A line may repeat if a boot console and the real console both print it.
    let mut e820: Vec<(u64, u64, String)> = Vec::new();
    for entry in lines.iter().filter_map(|l| parse_e820(l)) {
        if !e820.contains(&entry) {
            e820.push(entry);
        }
    }
    let mut expected_e820: Vec<(u64, u64, String)> = EXPECTED_E820
        .iter()
        .map(|&(s, e, k)| (s, e, k.to_string()))
        .collect();
    let ecam = (ECAM_E820.0, ECAM_E820.1, ECAM_E820.2.to_string());
    if e820.contains(&ecam) {
        expected_e820.push(ecam);
    }
    if e820 != expected_e820 {
        problems.push(format!(
            "e820 map as the kernel read it: {}\n  expected: {}",
            fmt_e820(&e820),
            fmt_e820(&expected_e820)
        ));
    }

    // (c) The ACPI tables, found from an RSDP where the layout puts it.
    for signature in ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        let prefix = format!("ACPI: {signature} 0x");
        if !lines.iter().any(|l| l.starts_with(&prefix)) {
            problems.push(format!("no `{prefix}...` line"));
        }
    }
    if !lines.iter().any(|l| l.starts_with(RSDP_LINE_PREFIX)) {
        problems.push(format!("no `{RSDP_LINE_PREFIX}` line"));
    }
    // Tables Linux dislikes show up as ACPICA errors or warnings, or as firmware-bug lines naming ACPI;
    // AML that fails when Linux runs it (a method of the DSDT, _OSC) as an ACPICA status code (AE_...).
    for l in lines.iter().filter(|l| {
        l.starts_with("ACPI BIOS Error")
            || l.starts_with("ACPI Error")
            || l.starts_with("ACPI BIOS Warning")
            || l.starts_with("ACPI Warning")
            || (l.contains("[Firmware Bug]") && l.contains("ACPI"))
            || (l.contains("AE_") && l.to_ascii_lowercase().contains("acpi"))
    }) {
        problems.push(format!("ACPI complaint: `{l}`"));
    }

    // (d) The interrupt controllers and CPU count, learnt from our MADT.
    if !lines
        .iter()
        .any(|l| l.starts_with(IOAPIC_LINE_PREFIX) && l.ends_with(IOAPIC_LINE_SUFFIX))
    {
        problems.push(format!(
            "no `{IOAPIC_LINE_PREFIX}...{IOAPIC_LINE_SUFFIX}` line (IOAPIC from the MADT)"
        ));
    }
    if !lines
        .iter()
        .any(|l| l.starts_with("ACPI: Using ACPI (MADT) for SMP configuration information"))
    {
        problems.push("the kernel did not take its SMP configuration from the MADT".to_string());
    }
    let allowing = format!("smpboot: Allowing {CPUS} CPUs, 0 hotplug CPUs");
    if !lines.iter().any(|l| *l == allowing) {
        let seen: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("smpboot: Allowing"))
            .collect();
        problems.push(format!("no `{allowing}` line (saw {seen:?})"));
    }
    problems
}

fn fmt_e820(map: &[(u64, u64, String)]) -> String {
    map.iter()
        .map(|(s, e, k)| format!("[{s:#x}-{e:#x}] {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn linux_early_boot_sees_our_boot_protocol() {
    require_kvm();
    let kernel = fetch_kernel(false);
    let token = random_token();
    // earlyprintk makes the kernel print from setup_arch on, replaying the lines logged before it; the real
    // console comes far too late to wait for here. panic=-1 turns a panic into a reset, i.e. a VMM exit, so a
    // broken boot fails fast instead of at the deadline; reboot=k resets through the i8042, the one reset
    // path the VMM emulates.
    let cmdline = format!(
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 trenv.check={token}"
    );
    let vmlinux = kernel.vmlinux.to_str().expect("cache path is UTF-8");
    let cpus = format!("boot={CPUS}");
    let args = [
        "--kernel",
        vmlinux,
        "--memory",
        MEMORY,
        "--cpus",
        &cpus,
        "--serial",
        "tty",
        "--cmdline",
        &cmdline,
    ];
    eprintln!("running {TRENV} {args:?}");
    let mut vmm = VmmProcess::spawn(TRENV, &args);

    // The kernel prints these in this order (setup_arch: command line, e820, ACPI tables, MADT, CPU count);
    // waiting for each in turn reports how far it got when one never comes.
    let milestones = [
        "Command line:",
        "BIOS-e820:",
        "ACPI: RSDP",
        "smpboot: Allowing",
    ];
    let deadline = vmm.started + EARLY_BOOT_BUDGET;
    for milestone in milestones {
        let left = deadline.saturating_duration_since(Instant::now());
        if vmm
            .wait_for_line(left, |l| log_text(l).starts_with(milestone))
            .is_none()
        {
            // Stdout may have closed because trenv is exiting; give it a moment to be reaped.
            let how = match vmm.wait_exit(Duration::from_millis(500)) {
                Some(status) => format!("trenv exited ({status})"),
                None => format!("not within {EARLY_BOOT_BUDGET:?}"),
            };
            panic!(
                "the kernel printed no `{milestone}` line: {how} {}",
                describe(&vmm)
            );
        }
        eprintln!(
            "{:>6.1?}: kernel printed `{milestone}`",
            vmm.started.elapsed()
        );
    }
    vmm.kill();

    let log = vmm.stdout();
    let problems = early_boot_problems(&log, &cmdline);
    assert!(
        problems.is_empty(),
        "the kernel's early log disagrees with the boot protocol:\n- {}\n{}",
        problems.join("\n- "),
        describe(&vmm)
    );
    eprintln!(
        "early boot checked in {:.1?}; matched lines:",
        vmm.started.elapsed()
    );
    for l in log_lines(&log).iter().filter(|l| {
        l.starts_with("Command line:")
            || l.starts_with("BIOS-e820:")
            || l.starts_with("ACPI: ")
            || l.starts_with("IOAPIC[0]:")
            || l.starts_with("smpboot: Allowing")
    }) {
        eprintln!("  {l}");
    }
}

/// Appends one `newc` (SVR4 with no CRC) cpio entry, the format the kernel unpacks an initramfs from.
fn cpio_entry(
    archive: &mut Vec<u8>,
    ino: u32,
    name: &str,
    mode: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    let name_size = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        u32::try_from(data.len()).expect("initramfs file under 4 GiB"),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name_size).expect("short name"),
        0, // check
    ];
    archive.extend_from_slice(b"070701");
    for field in fields {
        archive.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    archive.extend_from_slice(name.as_bytes());
    archive.push(0);
    // The name (after the 110-byte header) and the data are each padded to 4 bytes.
    archive.resize(archive.len().next_multiple_of(4), 0);
    archive.extend_from_slice(data);
    archive.resize(archive.len().next_multiple_of(4), 0);
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// An initramfs holding busybox and an init that prints `marker` and powers off.
fn busybox_initramfs(busybox: &Path, marker: &str) -> Vec<u8> {
    let busybox = std::fs::read(busybox).expect("read busybox");
    // poweroff -f skips init's shutdown sequence and goes straight to reboot(POWER_OFF), which the kernel
    // carries out through the ACPI sleep registers of our FADT.
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox echo {marker}\n\
         /bin/busybox poweroff -f\n\
         /bin/busybox sleep 5\n\
         /bin/busybox echo poweroff did not stop the VM\n"
    );
    let mut archive = Vec::new();
    cpio_entry(&mut archive, 1, "bin", S_IFDIR | 0o755, (0, 0), &[]);
    cpio_entry(
        &mut archive,
        2,
        "bin/busybox",
        S_IFREG | 0o755,
        (0, 0),
        &busybox,
    );
    cpio_entry(&mut archive, 3, "dev", S_IFDIR | 0o755, (0, 0), &[]);
    // init's stdin/stdout/stderr: the kernel opens /dev/console before starting it and has no devtmpfs
    // mounted in an initramfs.
    cpio_entry(&mut archive, 4, "dev/console", S_IFCHR | 0o600, (5, 1), &[]);
    cpio_entry(&mut archive, 5, "proc", S_IFDIR | 0o755, (0, 0), &[]);
    cpio_entry(
        &mut archive,
        6,
        "init",
        S_IFREG | 0o755,
        (0, 0),
        init.as_bytes(),
    );
    cpio_entry(&mut archive, 0, "TRAILER!!!", 0, (0, 0), &[]);
    archive
}

#[test]
fn linux_full_boot_to_init_and_poweroff() {
    if std::env::var("TRENV_LINUX_FULL_BOOT").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set TRENV_LINUX_FULL_BOOT=1 on a host with hardware virtualisation to boot Linux to \
             init (under kvm_pvm the kernel is emulated and never gets there)"
        );
        return;
    }
    require_kvm();
    let kernel = fetch_kernel(true);
    let busybox = kernel
        .busybox
        .as_deref()
        .expect("fetch-kernel.sh --with-busybox printed no busybox= line");
    let token = random_token();
    let marker = format!("TRENV-INIT-REACHED-{token}");
    let initramfs = std::env::temp_dir().join(format!("trenv-linux-boot-{token}.cpio"));
    std::fs::write(&initramfs, busybox_initramfs(busybox, &marker)).expect("write initramfs");

    let cmdline = format!("console=ttyS0 reboot=k panic=-1 rdinit=/init trenv.check={token}");
    let cpus = format!("boot={CPUS}");
    let args = [
        "--kernel",
        kernel.vmlinuz.to_str().expect("cache path is UTF-8"),
        "--initramfs",
        initramfs.to_str().expect("temp path is UTF-8"),
        "--memory",
        MEMORY,
        "--cpus",
        &cpus,
        "--serial",
        "tty",
        "--cmdline",
        &cmdline,
    ];
    eprintln!("running {TRENV} {args:?}");
    let mut vmm = VmmProcess::spawn(TRENV, &args);
    let status = vmm.wait_exit(FULL_BOOT_BUDGET);
    let _ = std::fs::remove_file(&initramfs);
    let Some(status) = status else {
        panic!(
            "trenv did not exit within {FULL_BOOT_BUDGET:?} {}",
            describe(&vmm)
        );
    };
    let log = vmm.stdout();
    assert!(
        log_lines(&log).contains(&marker.as_str()),
        "init never printed {marker} {}",
        describe(&vmm)
    );
    assert!(
        status.success(),
        "trenv exited with {status} after the guest powered off {}",
        describe(&vmm)
    );
    let problems = early_boot_problems(&log, &cmdline);
    assert!(
        problems.is_empty(),
        "the kernel's boot log disagrees with the boot protocol:\n- {}\n{}",
        problems.join("\n- "),
        describe(&vmm)
    );
    eprintln!(
        "full boot to init and poweroff in {:.1?}",
        vmm.started.elapsed()
    );
}

#[test]
fn early_boot_check_parses_a_kernel_log() {
    let cmdline = "console=ttyS0 trenv.check=abc";
    let log = "\
[    0.000000] Linux version 6.1.0-48-cloud-amd64\r
[    0.000000] Command line: console=ttyS0 trenv.check=abc\r
[    0.000000] BIOS-provided physical RAM map:\r
[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable\r
[    0.000000] BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved\r
[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable\r
[    0.000000] BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved\r
[    0.000000] ACPI: RSDP 0x00000000000E0000 000024 (v02 TRENV )\r
[    0.000000] ACPI: XSDT 0x00000000000E0024 00003C (v01 TRENV  TRENVXSD 00000001 TRNV 00000001)\r
[    0.000000] ACPI: FACP 0x00000000000E0060 000114 (v06 TRENV  TRENVFAC 00000001 TRNV 00000001)\r
[    0.000000] ACPI: DSDT 0x00000000000E0174 000040 (v06 TRENV  TRENVDSD 00000001 TRNV 00000001)\r
[    0.000000] ACPI: APIC 0x00000000000E01B4 000050 (v05 TRENV  TRENVMAD 00000001 TRNV 00000001)\r
[    0.000000] ACPI: MCFG 0x00000000000E0204 00003C (v01 TRENV  TRENVMCF 00000001 TRNV 00000001)\r
[    0.000000] IOAPIC[0]: apic_id 0, version 32, address 0xfec00000, GSI 0-23\r
[    0.000000] ACPI: Using ACPI (MADT) for SMP configuration information\r
[    0.000000] smpboot: Allowing 2 CPUs, 0 hotplug CPUs\r
";
    assert_eq!(early_boot_problems(log, cmdline), Vec::<String>::new());

    let wrong_cmdline = early_boot_problems(log, "console=ttyS0 trenv.check=abd");
    assert_eq!(wrong_cmdline.len(), 1, "{wrong_cmdline:?}");

    let short_ram = log.replace("0x000000000fffffff] usable", "0x0000000007ffffff] usable");
    let problems = early_boot_problems(&short_ram, cmdline);
    assert!(
        problems.len() == 1 && problems[0].contains("e820"),
        "{problems:?}"
    );

    let one_cpu = log.replace("Allowing 2 CPUs", "Allowing 1 CPUs");
    assert_eq!(early_boot_problems(&one_cpu, cmdline).len(), 1);

    let no_madt = log.replace("ACPI: APIC", "ACPI: XXXX");
    assert_eq!(early_boot_problems(&no_madt, cmdline).len(), 1);

    let few_pins = log.replace("GSI 0-23", "GSI 0-15");
    assert_eq!(early_boot_problems(&few_pins, cmdline).len(), 1);

    let complaint = format!(
        "{log}[    0.1] ACPI BIOS Warning (bug): Invalid length for FADT/Pm1aControlBlock\r\n"
    );
    assert_eq!(early_boot_problems(&complaint, cmdline).len(), 1);
    let aml_failure = format!(
        "{log}[    0.2] acpi PNP0A08:00: _OSC: platform retains control of PCIe features (AE_NOT_FOUND)\r\n"
    );
    assert_eq!(early_boot_problems(&aml_failure, cmdline).len(), 1);
    let aml_error = format!(
        "{log}[    0.2] ACPI Error: Aborting method \\_SB.PCI0.PSCN due to previous error (AE_NOT_FOUND) (20220331/psparse-529)\r\n"
    );
    assert_eq!(early_boot_problems(&aml_error, cmdline).len(), 1);

    // The TSC firmware-bug line this host's AMD CPUs cause is not about the boot protocol.
    let tsc = log.replace(
        "[    0.000000] BIOS-provided",
        "[    0.000000] [Firmware Bug]: TSC doesn't count with P0 frequency!\r\n[    0.000000] BIOS-provided",
    );
    assert_eq!(early_boot_problems(&tsc, cmdline), Vec::<String>::new());
}

#[test]
fn initramfs_is_newc_cpio() {
    let mut archive = Vec::new();
    cpio_entry(&mut archive, 7, "init", S_IFREG | 0o755, (0, 0), b"abcde");
    assert_eq!(&archive[..6], b"070701");
    assert_eq!(&archive[6..14], b"00000007");
    assert_eq!(&archive[14..22], b"000081ed");
    assert_eq!(&archive[54..62], b"00000005"); // filesize
    assert_eq!(&archive[94..102], b"00000005"); // namesize incl. NUL
    assert_eq!(&archive[110..115], b"init\0");
    // 110 + 5 = 115, padded to 116; data 5 bytes padded to 8.
    assert_eq!(&archive[116..121], b"abcde");
    assert_eq!(archive.len(), 124);
}
