//! Memory templates end to end: snapshot a paused test guest (`serve` workload) into a template, restore it
//! in new VMM processes in every memory mode, and check what the restored guests report: the heap they
//! built before the snapshot is intact, each instance is a distinct clone (new generation ID), instances
//! never see each other's writes, the template's files never change, and broken templates are refused
//! with a clear error before anything is created.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use api::client::ApiClient;
use integration::{field, make_serve_template, require_kvm, ServeTemplate, VmmProcess};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const SEED: u64 = 9;
const TIMEOUT: Duration = Duration::from_secs(30);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trenv-template-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One template shared by the tests of this file (they only read it). (A snapshot of a running VM being
/// refused is covered by api_bad_input.rs.)
fn template() -> &'static ServeTemplate {
    static TEMPLATE: OnceLock<ServeTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        require_kvm();
        make_serve_template(TRENV, &scratch("shared"), "template", SEED, "128M")
    })
}

fn restore_args(dir: &Path, mode: &str) -> Vec<String> {
    vec![
        "--restore".into(),
        format!(
            "source_url=file://{},memory_restore_mode={mode},resume=on",
            dir.display()
        ),
        "--serial".into(),
        "tty".into(),
    ]
}

fn spawn_restore(dir: &Path, mode: &str) -> VmmProcess {
    let args = restore_args(dir, mode);
    VmmProcess::spawn_command(Command::new(TRENV).args(&args))
}

/// Waits for the restored guest's report line.
fn restored_line(vmm: &VmmProcess) -> String {
    vmm.wait_for_line(TIMEOUT, |l| l.starts_with("serve: restored"))
        .unwrap_or_else(|| panic!("no restored line:\n{}\n{}", vmm.stdout(), vmm.stderr()))
}

fn file_digests(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        out.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            format!("{:x}", md5_like(&bytes)),
        ));
    }
    out.sort();
    out
}

/// A cheap 64-bit FNV-1a: enough to notice any change to a file in a test.
fn md5_like(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x1000_0000_01b3)
    })
}

fn check_restored(line: &str, template: &ServeTemplate) -> String {
    assert_eq!(field(line, "heap"), "ok", "{line}");
    assert_eq!(field(line, "checksum"), template.checksum, "{line}");
    // The first heap word as the template holds it: the seeded pattern, never another instance's write.
    let expected_first = test_guest::pattern::word(SEED, template.base);
    assert_eq!(
        field(line, "first_before"),
        format!("{expected_first:#018x}"),
        "{line}"
    );
    assert_eq!(field(line, "instance"), "1", "{line}");
    // The ACPI VMGenID buffer Linux would read carries the same new ID.
    assert_eq!(field(line, "vmgenid"), field(line, "generation"), "{line}");
    field(line, "generation").to_string()
}

#[test]
fn restore_continues_the_guest_exactly() {
    let template = template();
    let mut vmm = spawn_restore(&template.dir, "cow");
    let line = restored_line(&vmm);
    let generation = check_restored(&line, template);
    assert_ne!(
        generation,
        format!("{:#034x}", 0),
        "a restore must get a generation ID"
    );
    vmm.kill();
}

#[test]
fn every_restore_mode_gives_the_same_guest_view() {
    let template = template();
    let mut generations = Vec::new();
    for mode in ["cow", "copy", "ondemand"] {
        let mut vmm = spawn_restore(&template.dir, mode);
        let line = restored_line(&vmm);
        generations.push(check_restored(&line, template));
        vmm.kill();
    }
    generations.sort();
    generations.dedup();
    assert_eq!(generations.len(), 3, "each restore is a new clone");
}

#[test]
fn eight_concurrent_instances_are_isolated_and_the_template_is_unchanged() {
    let template = template();
    let before = file_digests(&template.dir);
    let mut instances: Vec<VmmProcess> = (0..8)
        .map(|_| spawn_restore(&template.dir, "cow"))
        .collect();
    let lines: Vec<String> = instances.iter().map(restored_line).collect();
    let mut generations: Vec<String> = lines.iter().map(|l| check_restored(l, template)).collect();
    // Every instance wrote its own generation ID into the heap's first word and reads back its own.
    for line in &lines {
        let generation =
            u128::from_str_radix(field(line, "generation").trim_start_matches("0x"), 16).unwrap();
        assert_eq!(
            field(line, "first_after"),
            format!("{:#018x}", generation as u64),
            "{line}"
        );
    }
    generations.sort();
    generations.dedup();
    assert_eq!(
        generations.len(),
        8,
        "generation IDs must differ between instances"
    );
    for vmm in &mut instances {
        vmm.kill();
    }
    assert_eq!(
        file_digests(&template.dir),
        before,
        "a restore changed the template's files"
    );
}

#[test]
fn restore_through_the_api_stays_paused_until_resumed() {
    let template = template();
    let dir = scratch("api");
    let socket = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(
        TRENV,
        &["--api-socket", socket.to_str().unwrap(), "--serial", "tty"],
    );
    let client = ApiClient::new(&socket);
    client.wait_until_ready(TIMEOUT).unwrap();
    let body = serde_json::json!({
        "source_url": format!("file://{}", template.dir.display()),
        "memory_restore_mode": "OnDemand",
    });
    let (status, text) = client
        .request("PUT", "vm.restore", Some(&body.to_string()), &[])
        .unwrap();
    assert_eq!(status, 204, "{text}");
    let (_, info) = client.request("GET", "vm.info", None, &[]).unwrap();
    assert!(info.contains("\"state\":\"Paused\""), "{info}");
    assert!(vmm
        .wait_for_line(Duration::from_millis(300), |l| l
            .starts_with("serve: restored"))
        .is_none());
    let (status, text) = client.request("PUT", "vm.resume", None, &[]).unwrap();
    assert_eq!(status, 204, "{text}");
    check_restored(&restored_line(&vmm), template);
    let (status, _) = client
        .request("PUT", "vm.restore", Some(&body.to_string()), &[])
        .unwrap();
    assert_eq!(
        status, 500,
        "a second restore into a VMM with a VM must fail"
    );
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
    vmm.wait_exit(TIMEOUT).expect("VMM did not exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_template_from_before_device_state_restores_with_fresh_devices() {
    let dir = copy_template("state-v1");
    rewrite_state(&dir, 1, |s| {
        let state = s.as_object_mut().unwrap();
        state.remove("pci");
        state.insert("version".into(), 1.into());
    });
    let mut vmm = spawn_restore(&dir, "cow");
    check_restored(&restored_line(&vmm), template());
    vmm.kill();
    // A layout newer than this trenv knows is refused.
    let dir = copy_template("state-v3");
    rewrite_state(&dir, 3, |_| {});
    assert_restore_refused(&dir, "state layout version");
}

/// Copies the shared template so a test can damage its copy.
fn copy_template(name: &str) -> PathBuf {
    let dir = scratch(name).join("template");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&template().dir).unwrap() {
        let path = entry.unwrap().path();
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(&path)
            .arg(dir.join(path.file_name().unwrap()))
            .status()
            .unwrap();
        assert!(status.success());
    }
    dir
}

fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    // Keep the manifest's own checksum right, so that only the edited meaning is wrong.
    let digest = Command::new("sha256sum").arg(&path).output().unwrap();
    let hex = String::from_utf8(digest.stdout).unwrap();
    let hex = hex.split_whitespace().next().unwrap();
    std::fs::write(dir.join("manifest.json.sha256"), format!("{hex}\n")).unwrap();
}

/// Edits the template's state.json and re-digests it, so that only the edited meaning is wrong.
fn rewrite_state(dir: &Path, state_version: u64, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut state);
    let bytes = serde_json::to_vec(&state).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let digest = Command::new("sha256sum").arg(&path).output().unwrap();
    let hex = String::from_utf8(digest.stdout).unwrap();
    let hex = hex.split_whitespace().next().unwrap().to_string();
    rewrite_manifest(dir, |m| {
        m["state"]["sha256"] = serde_json::json!(hex);
        m["state"]["size"] = serde_json::json!(bytes.len());
        m["extra"]["state_version"] = serde_json::json!(state_version);
    });
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let offset = offset.min(bytes.len() - 1);
    bytes[offset] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

fn assert_restore_refused(dir: &Path, expected: &str) {
    let before = file_digests(dir);
    let output = Command::new(TRENV)
        .args(restore_args(dir, "cow"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "restore of a broken template succeeded"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line:\n{stderr}");
    assert!(
        lines[0].contains(expected),
        "error does not mention '{expected}': {}",
        lines[0]
    );
    assert!(
        output.stdout.is_empty(),
        "the guest ran: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(
        file_digests(dir),
        before,
        "a refused restore changed the template"
    );
}

#[test]
fn broken_templates_are_refused_clearly() {
    let dir = copy_template("corrupt-manifest");
    flip_byte(&dir.join("manifest.json"), 40);
    assert_restore_refused(&dir, "manifest");

    let dir = copy_template("state-byte");
    flip_byte(&dir.join("state.json"), 100);
    assert_restore_refused(&dir, "state");

    let dir = copy_template("truncated-image");
    let image = dir.join("mem-0.img");
    let len = std::fs::metadata(&image).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_restore_refused(&dir, "mem-0.img");

    let dir = copy_template("format-version");
    rewrite_manifest(&dir, |m| m["format_version"] = serde_json::json!(99));
    assert_restore_refused(&dir, "v99");

    let dir = copy_template("fingerprint");
    rewrite_manifest(&dir, |m| {
        m["fingerprint"]["cpu_signature"] = serde_json::json!("255/255/15")
    });
    assert_restore_refused(&dir, "incompatible host");

    let dir = copy_template("missing-state");
    std::fs::remove_file(dir.join("state.json")).unwrap();
    assert_restore_refused(&dir, "state.json");

    // Device state is checked as hostile input: each of these is refused with the reason, never a panic.
    type Edit = fn(&mut serde_json::Value);
    let device_cases: [(&str, Edit, &str); 6] = [
        (
            "queue-size",
            |d| d["state"]["queues"][0]["size"] = 3.into(),
            "queue 0",
        ),
        (
            "msix-vector",
            |d| d["state"]["config_msix_vector"] = 100.into(),
            "MSI-X vector 100",
        ),
        // A BAR elsewhere in the PCI window is honoured (the device goes where the template had it); one
        // in guest RAM is not.
        (
            "bar-in-ram",
            |d| d["state"]["config_space"][4] = 0x0010_0000u32.into(),
            "BAR",
        ),
        (
            "features",
            |d| d["state"]["driver_features"] = (1u64 << 40).into(),
            "never offered",
        ),
        (
            "ring-outside-ram",
            |d| {
                d["state"]["queues"][0]["ready"] = true.into();
                d["state"]["queues"][0]["used_ring"] = (1u64 << 40).into();
            },
            "outside guest memory",
        ),
        (
            "device-type",
            |d| d["state"]["device_type"] = 2.into(),
            "device type",
        ),
    ];
    for (name, edit, expected) in device_cases {
        let dir = copy_template(&format!("device-{name}"));
        rewrite_state(&dir, 2, |s| edit(&mut s["pci"][0]));
        assert_restore_refused(&dir, expected);
    }
    let dir = copy_template("device-missing");
    rewrite_state(&dir, 2, |s| s["pci"] = serde_json::json!([]));
    assert_restore_refused(&dir, "do not match");

    let missing = scratch("missing-dir").join("nothing-here");
    let output = Command::new(TRENV)
        .args(restore_args(&missing, "cow"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("manifest"));
}
