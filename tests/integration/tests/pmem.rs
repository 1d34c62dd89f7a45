//! virtio-pmem end to end: the test guest reads a host file through its pmem mapping (and through
//! virtio-blk for comparison), writes it with and without `discard_writes`, and the VMM refuses bad files
//! and survives (fails cleanly on) a file truncated under a running guest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::{require_kvm, run_to_exit, test_guest_path, VmmProcess, GUEST_CONSOLE};
use test_guest::virtio::blk::checksum;

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const TIMEOUT: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("trenv-pmem-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An image of seeded, non-repeating bytes.
fn image(path: &Path, bytes: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..bytes / 8)
        .flat_map(|i| test_guest::pattern::word(31, i as u64 * 8).to_le_bytes())
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

fn args<'a>(cmdline: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--kernel",
        test_guest_path(),
        "--cmdline",
        cmdline,
        "--memory",
        "size=128M",
        "--serial",
        "tty",
    ];
    a.extend_from_slice(extra);
    a
}

fn run_guest(workload: &str, extra: &[&str]) -> String {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} {workload}");
    let (status, stdout, stderr) = run_to_exit(TRENV, &args(&cmdline, extra), TIMEOUT);
    assert!(status.success(), "{stdout}\n{stderr}");
    stdout
}

/// The value of `key=` on the first stdout line starting with `prefix`.
fn field<'a>(out: &'a str, prefix: &str, key: &str) -> &'a str {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        })
        .unwrap_or_else(|| panic!("no {key}= on a `{prefix}` line:\n{out}"))
}

fn hex(sum: u64) -> String {
    format!("{sum:#018x}")
}

#[test]
fn pmem_and_blk_read_the_host_file() {
    let scratch = Scratch::new("read");
    let img = scratch.path("img");
    let data = image(&img, 4 * MIB);
    let pmem = format!("file={},discard_writes=on", img.display());
    let disk = format!("path={},readonly=on", img.display());
    let out = run_guest("pmem", &["--pmem", &pmem]);
    assert_eq!(field(&out, "pmem: start", "size"), (4 * MIB).to_string());
    // The range lies in the 64-bit pmem window, 1 GiB aligned.
    let start = u64::from_str_radix(
        field(&out, "pmem: start", "start").trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert!(start >= 64 << 30 && start.is_multiple_of(1 << 30), "{out}");
    assert_eq!(field(&out, "pmem: read", "checksum"), hex(checksum(&data)));
    // A prefix, and the same bytes through virtio-blk into guest RAM.
    let out = run_guest("pmem bytes=65536", &["--pmem", &pmem]);
    assert_eq!(
        field(&out, "pmem: read", "checksum"),
        hex(checksum(&data[..65536]))
    );
    let out = run_guest("blkread", &["--pmem", &pmem, "--disk", &disk]);
    assert_eq!(
        field(&out, "blkread: read", "checksum"),
        hex(checksum(&data))
    );
    // An explicit size maps a prefix of a longer file.
    let out = run_guest(
        "pmem",
        &[
            "--pmem",
            &format!("file={},size=2M,discard_writes=on", img.display()),
        ],
    );
    assert_eq!(field(&out, "pmem: start", "size"), (2 * MIB).to_string());
    assert_eq!(
        field(&out, "pmem: read", "checksum"),
        hex(checksum(&data[..2 * MIB]))
    );
}

#[test]
fn discarded_writes_never_reach_the_file_or_another_vm() {
    require_kvm();
    let scratch = Scratch::new("discard");
    let img = scratch.path("img");
    let data = image(&img, 2 * MIB);
    let socket = scratch.path("api.sock");
    let pmem = format!("file={},discard_writes=on,id=rootfs", img.display());
    // VM 1 overwrites 64 KiB, flushes, and stays up while VM 2 reads the same file.
    let cmdline = format!("{GUEST_CONSOLE} pmem write=on flush=on bytes=65536 seed=3 hold=30");
    let mut extra = vec!["--pmem", pmem.as_str(), "--api-socket"];
    let socket_arg = socket.display().to_string();
    extra.push(&socket_arg);
    let mut writer = VmmProcess::spawn(TRENV, &args(&cmdline, &extra));
    writer
        .wait_for_line(TIMEOUT, |l| l.starts_with("pmem: holding"))
        .unwrap_or_else(|| panic!("{}\n{}", writer.stdout(), writer.stderr()));
    assert!(writer.stdout().contains("pmem: write ok"));
    assert!(writer.stdout().contains("pmem: flush ok"));

    let out = run_guest("pmem", &["--pmem", &pmem]);
    assert_eq!(
        field(&out, "pmem: read", "checksum"),
        hex(checksum(&data)),
        "VM 2 sees the file, not VM 1's writes"
    );
    assert_eq!(std::fs::read(&img).unwrap(), data, "the file is unchanged");

    // VM 1's counters: its writes are copies private to it; the rest it read is page cache.
    let (status, body) = api::client::ApiClient::new(&socket)
        .request("GET", "vm.counters", None, &[])
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let counters: serde_json::Value = serde_json::from_str(&body).unwrap();
    let c = &counters["pmem rootfs"];
    assert_eq!(c["size_bytes"], 2 * MIB as u64, "{counters}");
    assert_eq!(c["discard_writes"], 1);
    assert_eq!(c["flushes"], 1);
    let copied = c["copied_bytes"].as_u64().unwrap();
    assert!((65536..=2 * MIB as u64).contains(&copied), "{counters}");
    assert!(
        c["resident_bytes"].as_u64().unwrap() >= copied,
        "{counters}"
    );
    writer.kill();
    assert_eq!(std::fs::read(&img).unwrap(), data);
}

#[test]
fn kept_writes_persist_after_flush() {
    let scratch = Scratch::new("keep");
    let img = scratch.path("img");
    let data = image(&img, 2 * MIB);
    let pmem = format!("file={},discard_writes=off", img.display());
    let out = run_guest(
        "pmem write=on flush=on bytes=65536 seed=9",
        &["--pmem", &pmem],
    );
    assert!(out.contains("pmem: flush ok"), "{out}");
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        test_guest::pattern::first_mismatch(9, 0, &after[..65536]),
        None,
        "the guest's pattern is in the file"
    );
    assert_eq!(after[65536..], data[65536..], "nothing else changed");
    // A later VM reads what the first one wrote.
    let out = run_guest("pmem bytes=65536", &["--pmem", &pmem]);
    assert_eq!(
        field(&out, "pmem: read", "checksum"),
        hex(checksum(&after[..65536]))
    );
}

fn refused(pmem: &str, expect: &str) {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} pmem");
    let (status, stdout, stderr) = run_to_exit(TRENV, &args(&cmdline, &["--pmem", pmem]), TIMEOUT);
    assert!(!status.success(), "{pmem} was accepted:\n{stdout}");
    assert!(
        stderr.contains(expect),
        "{pmem}: expected '{expect}' in:\n{stderr}"
    );
    assert!(!stdout.contains("pmem: read"), "{stdout}");
}

#[test]
fn bad_files_and_sizes_are_refused_clearly() {
    let scratch = Scratch::new("bad");
    let img = scratch.path("img");
    image(&img, 2 * MIB);
    let odd = scratch.path("odd");
    image(&odd, 2 * MIB + 4096);
    let f = |extra: &str| format!("file={}{extra}", img.display());
    refused(
        &format!("file={}", scratch.path("missing").display()),
        "cannot open pmem file",
    );
    refused(&f(",size=4M"), "shorter than the requested size 4194304");
    refused(&f(",size=1M"), "not a multiple of 2 MiB");
    refused(
        &format!("file={},discard_writes=on", odd.display()),
        "not a multiple of 2 MiB",
    );
    refused(
        &format!("file={}", scratch.0.display()),
        "cannot open pmem file",
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let locked = scratch.path("locked");
        image(&locked, 2 * MIB);
        std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .unwrap();
        refused(
            &format!("file={},discard_writes=on", locked.display()),
            "Permission denied",
        );
    }
}

#[test]
fn a_file_truncated_under_the_guest_fails_the_vm_cleanly() {
    require_kvm();
    let scratch = Scratch::new("truncate");
    let img = scratch.path("img");
    image(&img, 4 * MIB);
    let pmem = format!("file={},discard_writes=on", img.display());
    // passes=0: the guest reads the range until stopped.
    let cmdline = format!("{GUEST_CONSOLE} pmem passes=0");
    let mut vmm = VmmProcess::spawn(TRENV, &args(&cmdline, &["--pmem", &pmem]));
    vmm.wait_for_line(TIMEOUT, |l| l.starts_with("pmem: read"))
        .unwrap_or_else(|| panic!("{}\n{}", vmm.stdout(), vmm.stderr()));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let status = vmm.wait_exit(TIMEOUT).expect("the VMM must stop, not hang");
    let stderr = vmm.stderr();
    assert!(!status.success(), "{stderr}");
    // Killed by a signal would have no code: the VMM exits on its own, saying why.
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("shrank from 4194304 to 4096 bytes while mapped"),
        "{stderr}"
    );
}

#[test]
fn a_template_maps_pmem_again_instead_of_copying_it() {
    require_kvm();
    let scratch = Scratch::new("template");
    let img = scratch.path("img");
    image(&img, 4 * MIB);
    let pmem = format!("file={},discard_writes=on,id=img", img.display());
    let socket = scratch.path("a.sock").display().to_string();
    let cmdline = format!("{GUEST_CONSOLE} idle");
    let mut vmm = VmmProcess::spawn(
        TRENV,
        &args(&cmdline, &["--pmem", &pmem, "--api-socket", &socket]),
    );
    vmm.wait_for_line(TIMEOUT, |l| l.starts_with("idle: running"))
        .unwrap_or_else(|| panic!("{}\n{}", vmm.stdout(), vmm.stderr()));
    let api = |socket: &str, method: &str, endpoint: &str, body: Option<&str>| {
        let (status, text) = api::client::ApiClient::new(Path::new(socket))
            .request(method, endpoint, body, &[])
            .unwrap();
        assert!(status < 300, "{endpoint}: {status} {text}");
        text
    };
    let template = scratch.path("tpl");
    api(&socket, "PUT", "vm.pause", None);
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, template.display());
    api(&socket, "PUT", "vm.snapshot", Some(&body));
    api(&socket, "PUT", "vmm.shutdown", None);
    vmm.wait_exit(TIMEOUT);
    // Only guest RAM is in the template: 128 MiB of it, nothing of the 4 MiB image.
    let images: Vec<_> = std::fs::read_dir(&template)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(std::fs::metadata(&images[0]).unwrap().len(), 128 << 20);

    let socket = scratch.path("b.sock").display().to_string();
    let restore = format!("source_url=file://{},resume=on", template.display());
    let mut restored = VmmProcess::spawn(
        TRENV,
        &[
            "--restore",
            &restore,
            "--serial",
            "null",
            "--api-socket",
            &socket,
        ],
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !Path::new(&socket).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            restored.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let counters: serde_json::Value =
        serde_json::from_str(&api(&socket, "GET", "vm.counters", None)).unwrap();
    let c = &counters["pmem img"];
    assert_eq!(c["size_bytes"], 4 * MIB as u64, "{counters}");
    assert_eq!(c["guest_addr"], 64u64 << 30, "{counters}");
    restored.kill();
}
