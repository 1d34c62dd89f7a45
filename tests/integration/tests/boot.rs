//! Boots the bundled test guest under `trenv` through the Linux 64-bit boot protocol and checks what the
//! guest itself reports: the command line and e820 map it found in boot_params, the CPUs it found in the
//! MADT, a memory workload verified word by word, and a clean power-off (exit status 0).

use std::time::Duration;

use integration::{require_kvm, run_to_exit, test_guest_path, VmmProcess, GUEST_CONSOLE};
use vmm::arch::x86_64::boot::e820_map;

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const TIMEOUT: Duration = Duration::from_secs(60);

fn boot_guest(workload: &str, mem: &str, vcpus: u8) -> String {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} {workload}");
    let memory = format!("size={mem}");
    let cpus = format!("boot={vcpus}");
    let args = [
        "--kernel",
        test_guest_path(),
        "--cmdline",
        &cmdline,
        "--memory",
        &memory,
        "--cpus",
        &cpus,
        "--serial",
        "tty",
    ];
    let (status, stdout, stderr) = run_to_exit(TRENV, &args, TIMEOUT);
    assert!(
        status.success(),
        "trenv exited with {status}\n--- serial ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    assert!(
        stdout.starts_with("TrEnv test guest"),
        "no banner on the serial console:\n{stdout}"
    );
    stdout
}

fn e820_type_name(mem_type: u32) -> &'static str {
    match mem_type {
        1 => "usable",
        2 => "reserved",
        3 => "ACPI data",
        4 => "ACPI NVS",
        _ => "unusable",
    }
}

fn expected_e820_lines(mem_size: u64) -> Vec<String> {
    e820_map(mem_size)
        .iter()
        .map(|e| {
            format!(
                "e820: [mem {:#018x}-{:#018x}] {}",
                e.addr,
                e.addr + e.size - 1,
                e820_type_name(e.mem_type)
            )
        })
        .collect()
}

fn check_boot_output(stdout: &str, mem_size: u64, vcpus: u8, cmdline: &str) {
    assert!(
        stdout.lines().any(|l| l == format!("cmdline: {cmdline}")),
        "guest did not see our command line:\n{stdout}"
    );
    let seen: Vec<&str> = stdout.lines().filter(|l| l.starts_with("e820: ")).collect();
    assert_eq!(
        seen,
        expected_e820_lines(mem_size),
        "e820 map as the guest saw it"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l == format!("acpi: {vcpus} cpus in MADT")),
        "MADT does not list {vcpus} CPUs:\n{stdout}"
    );
    assert!(stdout.lines().any(|l| l == "boot: ok"), "{stdout}");
}

#[test]
fn boot_workload_one_vcpu() {
    let out = boot_guest("boot", "256M", 1);
    check_boot_output(&out, 256 << 20, 1, &format!("{GUEST_CONSOLE} boot"));
}

#[test]
fn boot_workload_two_vcpus_second_parked() {
    let out = boot_guest("boot", "256M", 2);
    check_boot_output(&out, 256 << 20, 2, &format!("{GUEST_CONSOLE} boot"));
}

#[test]
fn boot_workload_above_the_32bit_hole() {
    // 3.5 GiB: RAM continues above 4 GiB, which must show in the e820 map the guest reads.
    let out = boot_guest("boot", "3584M", 1);
    check_boot_output(&out, 3584 << 20, 1, &format!("{GUEST_CONSOLE} boot"));
    assert!(
        out.contains("e820: [mem 0x0000000100000000-0x000000011fffffff] usable"),
        "{out}"
    );
}

fn check_touch(out: &str, mib: u64, seed: u64) {
    let summary = out
        .lines()
        .find(|l| l.starts_with("touch: mib="))
        .unwrap_or_else(|| panic!("no touch summary:\n{out}"));
    assert!(
        summary.starts_with(&format!("touch: mib={mib} seed={seed} pages={}", mib * 256)),
        "{summary}"
    );
    assert!(
        out.lines().any(|l| l == "touch: ok"),
        "guest reported a mismatch:\n{out}"
    );
}

#[test]
fn touch_workload_one_vcpu() {
    let out = boot_guest("touch mib=32 seed=7", "128M", 1);
    check_touch(&out, 32, 7);
}

#[test]
fn touch_workload_two_vcpus() {
    let out = boot_guest("touch mib=16 seed=99", "128M", 2);
    check_touch(&out, 16, 99);
}

#[test]
fn touch_more_than_the_guest_has_fails_cleanly() {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} touch mib=200 seed=1");
    let args = [
        "--kernel",
        test_guest_path(),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=64M",
        "--serial",
        "tty",
    ];
    let (status, stdout, _) = run_to_exit(TRENV, &args, TIMEOUT);
    // The guest reports its own failure and still powers off cleanly.
    assert!(status.success());
    assert!(!stdout.contains("touch: ok"), "{stdout}");
    assert!(stdout.contains("touch:"), "{stdout}");
}

#[test]
fn serial_to_file_and_events_to_monitor() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("trenv-boot-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let serial = dir.join("serial.log");
    let events = dir.join("events.jsonl");
    let cmdline = format!("{GUEST_CONSOLE} boot");
    let serial_arg = format!("file={}", serial.display());
    let events_arg = format!("path={}", events.display());
    let args = [
        "--kernel",
        test_guest_path(),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=64M",
        "--serial",
        &serial_arg,
        "--event-monitor",
        &events_arg,
    ];
    let (status, stdout, stderr) = run_to_exit(TRENV, &args, TIMEOUT);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.is_empty(),
        "serial output leaked to stdout: {stdout}"
    );
    let text = std::fs::read_to_string(&serial).unwrap();
    check_boot_output(&text, 64 << 20, 1, &cmdline);

    let events = std::fs::read_to_string(&events).unwrap();
    let names: Vec<String> = events
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{}/{}",
                v["source"].as_str().unwrap(),
                v["event"].as_str().unwrap()
            )
        })
        .collect();
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n} missing from {names:?}"))
    };
    assert!(pos("vm/booting") < pos("guest/boot_complete"));
    assert!(pos("guest/boot_complete") < pos("guest/workload_done"));
    assert!(pos("guest/workload_done") < pos("vm/shutdown"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serial_null_and_off_still_boot() {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} boot");
    for mode in ["null", "off"] {
        let args = [
            "--kernel",
            test_guest_path(),
            "--cmdline",
            &cmdline,
            "--memory",
            "size=64M",
            "--serial",
            mode,
        ];
        let (status, stdout, stderr) = run_to_exit(TRENV, &args, TIMEOUT);
        assert!(status.success(), "--serial {mode}: {stderr}");
        assert!(stdout.is_empty(), "--serial {mode} printed: {stdout}");
    }
}

#[test]
fn demo_command_runs() {
    require_kvm();
    let mut vmm = VmmProcess::spawn(TRENV, &["demo"]);
    let status = vmm.wait_exit(TIMEOUT).expect("demo did not finish");
    let out = vmm.stdout();
    assert!(status.success(), "{out}\n{}", vmm.stderr());
    assert!(out.contains("boot: ok"), "{out}");
    assert!(out.contains("touch: ok"), "{out}");
    assert!(out.contains("boot-complete signal"), "{out}");
}

#[test]
fn i8042_reset_ends_the_vmm_cleanly() {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} trenv.exit=reset boot");
    let args = [
        "--kernel",
        test_guest_path(),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=64M",
        "--serial",
        "tty",
        "-v",
    ];
    let (status, stdout, stderr) = run_to_exit(TRENV, &args, TIMEOUT);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("boot: ok"), "{stdout}");
    assert!(
        stderr.contains("guest Reset"),
        "the VMM did not see a reset:\n{stderr}"
    );
}

#[test]
fn touch_pattern_matches_the_host_computation() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("trenv-touch-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let events = dir.join("events.jsonl");
    let (mib, seed) = (8u64, 0x5eed_u64);
    let cmdline = format!("{GUEST_CONSOLE} touch mib={mib} seed={seed}");
    let events_arg = format!("path={}", events.display());
    let args = [
        "--kernel",
        test_guest_path(),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=64M",
        "--serial",
        "tty",
        "--event-monitor",
        &events_arg,
    ];
    let (status, stdout, stderr) = run_to_exit(TRENV, &args, TIMEOUT);
    assert!(status.success(), "{stderr}");
    check_touch(&stdout, mib, seed);
    // The guest announces where it wrote with a custom signal; recompute its checksum on the host.
    let region_event = devices::guest_signal::event_name(test_guest::SIGNAL_TOUCH_REGION);
    let events = std::fs::read_to_string(&events).unwrap();
    let base: u64 = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["event"] == region_event.as_str())
        .and_then(|v| v["properties"]["arg"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no {region_event} event in {events}"));
    let expected = test_guest::pattern::checksum(seed, base, mib << 20);
    assert!(
        stdout.contains(&format!("touch: checksum={expected:#018x}"))
            || stdout.contains(&format!("touch: checksum={expected:#x}")),
        "expected checksum {expected:#x} for base {base:#x}:\n{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
