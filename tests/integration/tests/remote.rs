//! Drives a `trenv --api-socket` VMM through its whole lifecycle with the `trenv-remote` binary, the way an
//! operator uses `ch-remote`: create from a JSON file, info, boot, pause, resume, shutdown, shutdown-vmm.
//! The guest runs the test guest's `idle` workload, which prints a tick per second on the serial port, so
//! the test can tell a running guest from a paused one by its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use integration::{require_kvm, test_guest_path, VmmProcess, GUEST_CONSOLE};
use serde_json::Value;

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const REMOTE: &str = env!("CARGO_BIN_EXE_trenv-remote");

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trenv-remote-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn remote(socket: &Path, args: &[&str]) -> Output {
    Command::new(REMOTE)
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run trenv-remote")
}

/// Runs a command that must succeed and returns its stdout.
fn ok(socket: &Path, args: &[&str]) -> String {
    let out = remote(socket, args);
    assert!(
        out.status.success(),
        "trenv-remote {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn state(socket: &Path) -> String {
    let info: Value = serde_json::from_str(&ok(socket, &["info"])).expect("info is JSON");
    info["state"]
        .as_str()
        .expect("info has a state")
        .to_string()
}

fn wait_ready(socket: &Path, vmm: &VmmProcess) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !remote(socket, &["ping"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the VMM never answered ping\n{}",
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ticks(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("idle: tick")).count()
}

#[test]
fn full_lifecycle_through_trenv_remote() {
    require_kvm();
    let dir = temp_dir("lifecycle");
    let socket = dir.join("api.sock");
    let socket_arg = socket.to_str().unwrap();
    let mut vmm = VmmProcess::spawn(TRENV, &["--api-socket", socket_arg]);
    wait_ready(&socket, &vmm);

    let ping: Value = serde_json::from_str(&ok(&socket, &["ping"])).unwrap();
    assert!(ping["version"].is_string(), "{ping}");

    // Before create: a clear error on stderr and a non-zero exit, and the VMM keeps serving.
    let out = remote(&socket, &["boot"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("trenv-remote: error: vm.boot failed (HTTP "),
        "{err}"
    );
    // Bad device syntax is refused before anything is sent.
    let out = remote(&socket, &["add-disk", "path=/x,bogus=1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown parameter 'bogus'"),
        "{:?}",
        out
    );

    let config = serde_json::json!({
        "payload": {"kernel": test_guest_path(), "cmdline": format!("{GUEST_CONSOLE} idle")},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256u64 << 20},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"}
    });
    let config_file = dir.join("vm.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    ok(&socket, &["create", config_file.to_str().unwrap()]);
    assert_eq!(state(&socket), "Created");

    ok(&socket, &["boot"]);
    assert_eq!(state(&socket), "Running");
    assert!(
        vmm.wait_for_line(Duration::from_secs(30), |l| l.starts_with("idle: tick"))
            .is_some(),
        "the guest never ticked\n--- serial ---\n{}\n--- stderr ---\n{}",
        vmm.stdout(),
        vmm.stderr()
    );

    ok(&socket, &["pause"]);
    assert_eq!(state(&socket), "Paused");
    let paused_ticks = ticks(&vmm.stdout());
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        ticks(&vmm.stdout()),
        paused_ticks,
        "a paused guest kept printing"
    );

    ok(&socket, &["resume"]);
    assert_eq!(state(&socket), "Running");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(&vmm.stdout()) <= paused_ticks {
        assert!(Instant::now() < deadline, "no tick after resume");
        std::thread::sleep(Duration::from_millis(50));
    }

    let counters = ok(&socket, &["counters"]);
    assert!(
        counters.trim().is_empty() || serde_json::from_str::<Value>(&counters).is_ok(),
        "{counters}"
    );

    ok(&socket, &["shutdown"]);
    ok(&socket, &["shutdown-vmm"]);
    let status = vmm
        .wait_exit(Duration::from_secs(3))
        .expect("the VMM did not exit within 3 s of shutdown-vmm");
    assert!(status.success(), "{status}\n{}", vmm.stderr());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreachable_socket_is_a_clear_error() {
    let dir = temp_dir("nosock");
    let out = remote(&dir.join("none.sock"), &["info"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("trenv-remote: error: GET vm.info via "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
