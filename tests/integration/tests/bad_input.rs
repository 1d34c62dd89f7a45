//! Bad input to `trenv`: every case must end in a non-zero exit with one clear line on stderr, no panic,
//! and no file left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use integration::{require_kvm, test_guest_path, GUEST_CONSOLE};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("trenv-bad-input-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Asserts a failure reported as exactly one line that contains `expected`.
fn assert_one_line_error(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_ne!(output.status.code(), None, "killed by a signal: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(lines[0].starts_with("trenv: error: "), "{stderr}");
    assert!(
        lines[0].contains(expected),
        "error line does not mention '{expected}': {}",
        lines[0]
    );
    assert!(output.stdout.is_empty(), "unexpected stdout");
}

fn trenv_with_kernel(kernel: &Path, extra: &[&str]) -> Output {
    let cmdline = format!("{GUEST_CONSOLE} boot");
    run(Command::new(TRENV)
        .arg("--kernel")
        .arg(kernel)
        .args(["--cmdline", &cmdline, "--memory", "size=64M"])
        .args(extra))
}

#[test]
fn missing_kernel_file() {
    require_kvm();
    let out = trenv_with_kernel(Path::new("/nonexistent/vmlinux"), &[]);
    assert_one_line_error(&out, "cannot open kernel /nonexistent/vmlinux");
}

#[test]
fn no_kernel_at_all() {
    let out = run(Command::new(TRENV).args(["--memory", "size=64M"]));
    assert_one_line_error(&out, "no kernel given");
}

#[test]
fn truncated_kernel_leaves_no_serial_file() {
    require_kvm();
    let scratch = Scratch::new("truncated");
    let image = std::fs::read(test_guest_path()).unwrap();
    let kernel = scratch.file("truncated.elf", &image[..image.len().min(200)]);
    let serial = scratch.0.join("serial.log");
    let out = trenv_with_kernel(
        &kernel,
        &["--serial", &format!("file={}", serial.display())],
    );
    assert_one_line_error(&out, "kernel");
    assert_eq!(
        scratch.entries(),
        vec!["truncated.elf".to_string()],
        "partial files left"
    );
}

#[test]
fn non_kernel_files() {
    require_kvm();
    let scratch = Scratch::new("garbage");
    let cases: [(&str, Vec<u8>); 3] = [
        ("empty", Vec::new()),
        ("text", b"#!/bin/sh\necho not a kernel\n".repeat(100)),
        (
            "random",
            (0..65536u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
    ];
    for (name, contents) in cases {
        let kernel = scratch.file(name, &contents);
        let out = trenv_with_kernel(&kernel, &[]);
        assert_one_line_error(&out, "kernel");
    }
}

#[test]
fn memory_too_small_and_too_large() {
    let kernel = Path::new(test_guest_path());
    let out = run(Command::new(TRENV)
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "size=1M"]));
    assert_one_line_error(&out, "too small");
    let out = run(Command::new(TRENV)
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "size=100000G"]));
    assert_one_line_error(&out, "more than this host");
}

#[test]
fn unknown_and_malformed_flags() {
    let kernel = test_guest_path();
    let cases: [(&[&str], &str); 8] = [
        (&["--bogus"], "--bogus"),
        (&["--cpus", "boot=two"], "--cpus"),
        (&["--cpus", "boot=0"], "boot_vcpus"),
        (&["--cpus", "boot=4,max=2"], "boot_vcpus"),
        (&["--cpus", "cores=2"], "unknown parameter 'cores'"),
        (&["--memory", "size=lots"], "--memory"),
        (&["--serial", "carrier-pigeon"], "--serial"),
        (&["--serial", "file="], "needs a path"),
    ];
    for (extra, expected) in cases {
        let out = run(Command::new(TRENV).args(["--kernel", kernel]).args(extra));
        assert_one_line_error(&out, expected);
    }
}

#[test]
fn kvm_device_absent() {
    require_kvm();
    // A private mount namespace with an empty /dev: the VMM sees no /dev/kvm at all.
    let kernel = test_guest_path();
    let script =
        format!("mount -t tmpfs none /dev && exec {TRENV} --kernel {kernel} --memory size=64M");
    let out = run(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert_one_line_error(&out, "cannot open /dev/kvm");
}

#[test]
fn kvm_device_is_not_kvm() {
    require_kvm();
    let kernel = test_guest_path();
    let script = format!(
        "mount --bind /dev/null /dev/kvm && exec {TRENV} --kernel {kernel} --memory size=64M"
    );
    let out = run(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert_one_line_error(&out, "not a KVM device");
}

#[test]
fn kvm_device_not_accessible() {
    require_kvm();
    // An unprivileged user cannot open the root-only /dev/kvm.
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", TRENV])
        .args(["--kernel", test_guest_path(), "--memory", "size=64M"]));
    assert_one_line_error(&out, "cannot open /dev/kvm");
}
