//! PCI and virtio devices used by the test guest through ECAM and the virtio-pci modern transport, with
//! results checked against the host's own view of the backing files.

use std::path::PathBuf;
use std::time::Duration;

use integration::{require_kvm, run_to_exit, test_guest_path, GUEST_CONSOLE};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const TIMEOUT: Duration = Duration::from_secs(60);

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("trenv-devices-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A disk image of seeded, non-repeating bytes.
fn disk_image(path: &std::path::Path, mib: usize) -> Vec<u8> {
    let bytes: Vec<u8> = (0..mib << 20)
        .map(|i| (test_guest::pattern::word(77, i as u64 / 8) >> ((i % 8) * 8)) as u8)
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn run_guest(workload: &str, extra: &[&str]) -> String {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} {workload}");
    let mut args = vec![
        "--kernel",
        test_guest_path(),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=128M",
        "--serial",
        "tty",
    ];
    args.extend_from_slice(extra);
    let (status, stdout, stderr) = run_to_exit(TRENV, &args, TIMEOUT);
    assert!(status.success(), "{stdout}\n{stderr}");
    stdout
}

fn field<'a>(out: &'a str, prefix: &str, key: &str) -> &'a str {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        })
        .unwrap_or_else(|| panic!("no {key}= on a `{prefix}` line:\n{out}"))
}

#[test]
fn pci_enumeration_finds_the_configured_devices() {
    let scratch = Scratch::new("pci");
    let disk = scratch.0.join("disk.img");
    disk_image(&disk, 1);
    let disk_arg = format!("path={},readonly=on", disk.display());
    let out = run_guest(
        "pci",
        &[
            "--disk",
            &disk_arg,
            "--disk",
            &format!("{disk_arg},id=second"),
        ],
    );
    assert!(
        out.contains("pci: 00:00.0 1b36:0008 class 060000 host-bridge"),
        "{out}"
    );
    assert_eq!(out.matches("virtio-blk").count(), 2, "{out}");
    assert_eq!(out.matches("virtio-rng").count(), 1, "{out}");
    assert!(out.lines().any(|l| l == "pci: ok"), "{out}");
}

#[test]
fn blk_reads_and_writes_match_the_host_file() {
    let scratch = Scratch::new("blk");
    let disk = scratch.0.join("disk.img");
    let original = disk_image(&disk, 4);
    let (sectors, seed) = (128usize, 0x5eedu64);
    let disk_arg = format!("path={},serial=trenv-disk-1", disk.display());
    let out = run_guest(
        &format!("blk sectors={sectors} seed={seed} write=on"),
        &["--disk", &disk_arg],
    );
    assert_eq!(field(&out, "blk: capacity", "capacity"), "8192", "{out}");
    assert!(out.lines().any(|l| l == "blk: id=trenv-disk-1"), "{out}");
    let expected = test_guest::virtio::blk::checksum(&original[..sectors * 512]);
    assert_eq!(
        field(&out, "blk: read", "checksum"),
        format!("{expected:#018x}"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l == "blk: write ok") && out.lines().any(|l| l == "blk: ok"),
        "{out}"
    );

    // The guest's writes reached exactly sectors [N, 2N) of the file, after a flush.
    let after = std::fs::read(&disk).unwrap();
    let written = &after[sectors * 512..2 * sectors * 512];
    assert_eq!(
        test_guest::pattern::first_mismatch(seed, (sectors * 512) as u64, written),
        None
    );
    assert_eq!(&after[..sectors * 512], &original[..sectors * 512]);
    assert_eq!(&after[2 * sectors * 512..], &original[2 * sectors * 512..]);
}

#[test]
fn read_only_disks_refuse_writes_and_stay_unchanged() {
    let scratch = Scratch::new("ro");
    let disk = scratch.0.join("disk.img");
    let original = disk_image(&disk, 1);
    let disk_arg = format!("path={},readonly=on", disk.display());
    let out = run_guest("blk sectors=16 write=on", &["--disk", &disk_arg]);
    assert_eq!(field(&out, "blk: capacity", "ro"), "1", "{out}");
    assert!(!out.lines().any(|l| l == "blk: ok"), "{out}");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        original,
        "a read-only disk was modified"
    );
}

#[test]
fn rng_bytes_come_from_the_host_source() {
    let out = run_guest("rng bytes=64", &["--rng", "src=/dev/urandom"]);
    assert!(out.lines().any(|l| l == "rng: ok"), "{out}");
    // A source of zeros is reported as such by the guest: the bytes really come from the host file.
    let out = run_guest("rng bytes=64", &["--rng", "src=/dev/zero"]);
    assert!(!out.lines().any(|l| l == "rng: ok"), "{out}");
}

#[test]
fn bad_device_options_are_clear_errors() {
    let output = std::process::Command::new(TRENV)
        .args([
            "--kernel",
            test_guest_path(),
            "--disk",
            "path=/nonexistent/disk.img",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("/nonexistent/disk.img"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let output = std::process::Command::new(TRENV)
        .args([
            "--kernel",
            test_guest_path(),
            "--disk",
            "path=/x,colour=blue",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("colour"));
}

#[test]
fn devices_added_before_boot_through_the_api_are_present() {
    require_kvm();
    let scratch = Scratch::new("cold-add");
    let disk = scratch.0.join("disk.img");
    disk_image(&disk, 1);
    let socket = scratch.0.join("api.sock");
    let vmm = integration::VmmProcess::spawn(TRENV, &["--api-socket", socket.to_str().unwrap()]);
    let client = api::client::ApiClient::new(&socket);
    client.wait_until_ready(TIMEOUT).unwrap();
    let config = serde_json::json!({
        "payload": {"kernel": test_guest_path(), "cmdline": format!("{GUEST_CONSOLE} pci")},
        "memory": {"size": 134217728u64},
        "serial": {"mode": "Tty"},
    });
    let (status, body) = client
        .request("PUT", "vm.create", Some(&config.to_string()), &[])
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let add = serde_json::json!({"path": disk, "readonly": true, "id": "data"});
    let (status, body) = client
        .request("PUT", "vm.add-disk", Some(&add.to_string()), &[])
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let (_, info) = client.request("GET", "vm.info", None, &[]).unwrap();
    assert!(info.contains("\"data\""), "{info}");
    let unsupported = serde_json::json!({"path": "/x.img", "num_queues": 4});
    let (status, body) = client
        .request("PUT", "vm.add-disk", Some(&unsupported.to_string()), &[])
        .unwrap();
    assert!(status >= 400, "{body}");
    let (status, body) = client.request("PUT", "vm.boot", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    assert!(
        vmm.wait_for_line(TIMEOUT, |l| l.contains("virtio-blk"))
            .is_some(),
        "the added disk is missing:\n{}",
        vmm.stdout()
    );
}

/// (Once refused; device state is now part of templates: see devstate.rs for restores of such snapshots.)
#[test]
fn snapshot_saves_a_virtio_device_the_guest_started() {
    require_kvm();
    let scratch = Scratch::new("snap-refused");
    let socket = scratch.0.join("api.sock");
    let vsock = scratch.0.join("vsock.sock");
    let cmdline = format!("{GUEST_CONSOLE} vsock port=5000 mode=echo");
    let vsock_arg = format!("cid=3,socket={}", vsock.display());
    let vmm = integration::VmmProcess::spawn(
        TRENV,
        &[
            "--api-socket",
            socket.to_str().unwrap(),
            "--kernel",
            test_guest_path(),
            "--cmdline",
            &cmdline,
            "--memory",
            "size=128M",
            "--serial",
            "tty",
            "--vsock",
            &vsock_arg,
        ],
    );
    assert!(
        vmm.wait_for_line(TIMEOUT, |l| l.starts_with("vsock: listening"))
            .is_some(),
        "{}",
        vmm.stdout()
    );
    let client = api::client::ApiClient::new(&socket);
    let (status, body) = client.request("PUT", "vm.pause", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    let target = scratch.0.join("template");
    let request = serde_json::json!({"destination_url": format!("file://{}", target.display())});
    let (status, body) = client
        .request("PUT", "vm.snapshot", Some(&request.to_string()), &[])
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("state.json")).unwrap()).unwrap();
    let vsock = state["pci"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == "_vsock"))
        .unwrap_or_else(|| panic!("no vsock device state: {}", state["pci"]));
    assert_eq!(vsock["state"]["status"], 0x0f, "saved live: {vsock}");
    assert_eq!(
        vsock["state"]["device"]["queues"].as_array().unwrap().len(),
        3
    );
    let (status, body) = client.request("PUT", "vm.resume", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
}

/// The guest moves virtio-rng's BAR 0 (decoding off, new address, decoding on) and drives the device at
/// the new address; moves onto another device's BAR or out of the window are refused, and a notification
/// at the old address no longer reaches the device (its ioeventfd moved).
#[test]
fn a_guest_moves_a_bar_and_the_device_follows() {
    let scratch = Scratch::new("barmove");
    let disk = scratch.0.join("disk.img");
    disk_image(&disk, 1);
    let disk_arg = format!("path={},readonly=on", disk.display());
    let out = run_guest(
        "barmove to=0xd0000000",
        &["--disk", &disk_arg, "--rng", "src=/dev/urandom"],
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("barmove: refused"))
            .count(),
        2,
        "out of the window and onto the disk's BAR: {out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("barmove: moved ")
            && l.ends_with("to=0xd0000000 rng=ok old-notify=ignored")),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "barmove: ok"), "{out}");
}

/// A moved BAR is saved where the guest put it, and a restored copy decodes (and takes notifications)
/// there: the guest uses the same queue after the restore without initialising anything again.
#[test]
fn a_moved_bar_survives_snapshot_and_restore() {
    require_kvm();
    let scratch = Scratch::new("barmove-snap");
    let socket = scratch.0.join("api.sock");
    let cmdline = format!("{GUEST_CONSOLE} barmove to=0xd0000000 restore=1");
    let vmm = integration::VmmProcess::spawn(
        TRENV,
        &[
            "--api-socket",
            socket.to_str().unwrap(),
            "--kernel",
            test_guest_path(),
            "--cmdline",
            &cmdline,
            "--memory",
            "size=128M",
            "--serial",
            "tty",
            "--rng",
            "src=/dev/urandom",
        ],
    );
    assert!(
        vmm.wait_for_line(TIMEOUT, |l| l == "barmove: ready")
            .is_some(),
        "{}\n{}",
        vmm.stdout(),
        vmm.stderr()
    );
    let client = api::client::ApiClient::new(&socket);
    let put = |endpoint: &str, body: Option<&str>| {
        let (status, text) = client.request("PUT", endpoint, body, &[]).unwrap();
        assert_eq!(status, 204, "{endpoint}: {text}");
    };
    put("vm.pause", None);
    let template = scratch.0.join("template");
    let body = serde_json::json!({"destination_url": format!("file://{}", template.display())});
    put("vm.snapshot", Some(&body.to_string()));
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(template.join("state.json")).unwrap()).unwrap();
    let rng = state["pci"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == "_rng"))
        .unwrap_or_else(|| panic!("no rng state: {}", state["pci"]));
    assert_eq!(
        rng["state"]["config_space"][4], 0xd000_0000u32,
        "the BAR as the guest programmed it"
    );

    let restore = format!(
        "source_url=file://{},memory_restore_mode=cow,resume=on",
        template.display()
    );
    let (status, out, err) =
        run_to_exit(TRENV, &["--restore", &restore, "--serial", "tty"], TIMEOUT);
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("barmove: restored ") && l.ends_with("bar0=0xd0000000 rng=ok")),
        "{out}\n{err}"
    );
    assert!(out.lines().any(|l| l == "barmove: ok"), "{out}");
}
