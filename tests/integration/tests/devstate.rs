//! virtio device state in snapshots, end to end: the test guest's `devstate` workload brings up virtio-blk,
//! -rng and -vsock, and a snapshot is taken through the API while a host vsock connection is open. The
//! original VM resumes and keeps using its devices (the very same connection included); a copy restored
//! from the snapshot in a new VMM keeps using the same queues without initialising any device again: its
//! block writes land in its disk file, rng answers, and after the vsock TRANSPORT_RESET event it serves
//! new connections.
//!
//! Each VMM runs in its own directory with relative disk and vsock paths, so the restored copy gets its own
//! disk (a copy of the original's, taken while it was paused for the snapshot) and its own socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api::client::ApiClient;
use integration::{require_kvm, test_guest_path, VmmProcess, GUEST_CONSOLE};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const TIMEOUT: Duration = Duration::from_secs(60);
const PORT: u32 = 5000;
const SEED: u64 = 7;
const SECTORS: u64 = 16;
const SECTOR: usize = 512;
const DISK_BYTES: usize = 1 << 20;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("trenv-devstate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn sub(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_in(dir: &Path, args: &[&str]) -> VmmProcess {
    VmmProcess::spawn_command(Command::new(TRENV).current_dir(dir).args(args))
}

fn wait_line(vmm: &VmmProcess, prefix: &str) -> String {
    vmm.wait_for_line(TIMEOUT, |l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "no '{prefix}' line:\n--- stdout ---\n{}\n--- stderr ---\n{}",
                vmm.stdout(),
                vmm.stderr()
            )
        })
}

/// Connects through the hybrid vsock socket to the guest's port.
fn host_connect(socket: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("vsock socket {}: {e}", socket.display()));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(format!("CONNECT {PORT}\n").as_bytes())
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed before OK");
        line.push(byte[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    stream
}

fn round_trip(stream: &mut UnixStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
}

/// Ends a connection the way the guest's echo server expects: our side shuts down, theirs follows.
fn close(mut stream: UnixStream) {
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "unexpected bytes {rest:?}");
}

fn put(client: &ApiClient, endpoint: &str, body: Option<&str>) {
    let (status, text) = client.request("PUT", endpoint, body, &[]).unwrap();
    assert_eq!(status, 204, "{endpoint}: {text}");
}

fn sectors(disk: &[u8], first: u64) -> &[u8] {
    let start = first as usize * SECTOR;
    &disk[start..start + SECTORS as usize * SECTOR]
}

/// Boots `devstate` in `dir` (its disk and vsock socket there) with an API socket, up to its ready line.
fn boot_devstate(dir: &Path, extra: &[&str]) -> (VmmProcess, ApiClient) {
    std::fs::write(dir.join("disk.img"), vec![0u8; DISK_BYTES]).unwrap();
    let api = dir.join("api.sock");
    let cmdline = format!("{GUEST_CONSOLE} devstate port={PORT} seed={SEED} sectors={SECTORS}");
    let mut args = vec![
        "--api-socket",
        api.to_str().unwrap(),
        "--kernel",
        test_guest_path(),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=128M",
        "--serial",
        "tty",
        "--disk",
        "path=disk.img",
        "--vsock",
        "cid=3,socket=vsock.sock",
    ];
    args.extend_from_slice(extra);
    let vmm = spawn_in(dir, &args);
    wait_line(&vmm, "devstate: ready");
    let client = ApiClient::new(&api);
    client.wait_until_ready(TIMEOUT).unwrap();
    (vmm, client)
}

#[test]
fn devices_keep_their_state_across_snapshot_resume_and_restore() {
    require_kvm();
    let scratch = Scratch::new("e2e");
    let (a, b) = (scratch.sub("a"), scratch.sub("b"));
    let (mut original, client) = boot_devstate(&a, &["--event-monitor", "path=events.json"]);
    // The guest also signals it (DEVSTATE_READY, right after the line).
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !std::fs::read_to_string(a.join("events.json"))
        .unwrap_or_default()
        .contains("custom_0x120")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no DEVSTATE_READY event"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut conn = host_connect(&a.join("vsock.sock"));
    round_trip(&mut conn, b"before the snapshot\n");

    put(&client, "vm.pause", None);
    let template = scratch.0.join("template");
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, template.display());
    put(&client, "vm.snapshot", Some(&body));
    // The disk as of the snapshot goes with it.
    std::fs::copy(a.join("disk.img"), b.join("disk.img")).unwrap();
    let state = std::fs::read_to_string(template.join("state.json")).unwrap();
    assert!(state.contains("\"pci\""), "device state in the template");
    put(&client, "vm.resume", None);

    // The original carries on, on the very connection it had.
    round_trip(&mut conn, b"after the resume\n");
    close(conn);
    let check = wait_line(&original, "devstate: check n=1 ");
    assert!(check.contains("blk=ok"), "{check}");

    // A copy restored in a new VMM, in its own directory.
    let restore = format!(
        "source_url=file://{},memory_restore_mode=cow,resume=on",
        template.display()
    );
    let mut restored = spawn_in(&b, &["--restore", &restore, "--serial", "tty"]);
    wait_line(&restored, "devstate: restored ok");
    let out = restored.stdout();
    let after_restore = &out[out.find("devstate: restored generation").unwrap()..];
    assert!(
        after_restore.contains(&format!(
            "devstate: blk wrote sectors={SECTORS}..{} seed={} (same queue)",
            2 * SECTORS,
            SEED + 1
        )),
        "{out}"
    );
    let rng = after_restore
        .lines()
        .find(|l| l.starts_with("devstate: rng ") && l.ends_with("(same queue)"))
        .unwrap_or_else(|| panic!("no rng line after the restore: {out}"));
    assert_eq!(rng.split_whitespace().nth(2).unwrap().len(), 64, "{rng}");
    // (It may come before the guest notices it was restored: the device sends it at once.)
    assert!(
        out.contains("vsock: transport reset"),
        "the restored guest saw TRANSPORT_RESET: {out}"
    );
    assert!(!out.contains("error"), "{out}");

    // Its writes landed in its own disk file, with the right bytes; the original's disk never saw them.
    let disk = std::fs::read(b.join("disk.img")).unwrap();
    assert_eq!(
        test_guest::pattern::first_mismatch(SEED, 0, sectors(&disk, 0)),
        None
    );
    let offset = SECTORS * SECTOR as u64;
    assert_eq!(
        test_guest::pattern::first_mismatch(SEED + 1, offset, sectors(&disk, SECTORS)),
        None,
        "the restored guest's write"
    );
    let original_disk = std::fs::read(a.join("disk.img")).unwrap();
    assert_eq!(
        test_guest::pattern::first_mismatch(SEED, 0, sectors(&original_disk, 0)),
        None
    );
    assert!(sectors(&original_disk, SECTORS).iter().all(|&b| b == 0));

    // vsock works again after the reset, through the copy's own socket.
    let mut conn = host_connect(&b.join("vsock.sock"));
    round_trip(&mut conn, b"hello restored copy\n");
    close(conn);
    let check = wait_line(&restored, "devstate: check n=1 ");
    assert!(check.contains("blk=ok"), "{check}");

    // And the original is still well: a new connection, a second device check.
    let mut conn = host_connect(&a.join("vsock.sock"));
    round_trip(&mut conn, b"still the original\n");
    close(conn);
    wait_line(&original, "devstate: check n=2 ");
    assert!(
        !original.stdout().contains("restored"),
        "{}",
        original.stdout()
    );
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
    original.wait_exit(TIMEOUT).expect("the original VMM exits");
    restored.kill();
}

/// An in-place repurpose to a template with device state loads it into the VM's own devices (reset, state,
/// activation), whose backends stay open: the guest carries on with the template's queues, and the vsock
/// connections of the previous tenant are dropped with a TRANSPORT_RESET.
#[test]
fn repurpose_in_place_loads_the_templates_device_state() {
    require_kvm();
    let scratch = Scratch::new("repurpose");
    let dir = scratch.sub("vm");
    let (mut vmm, client) = boot_devstate(&dir, &[]);
    put(&client, "vm.pause", None);
    let template = scratch.0.join("template");
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, template.display());
    put(&client, "vm.snapshot", Some(&body));
    put(&client, "vm.resume", None);

    // A tenant connection, open while the VM is repurposed.
    let mut old = host_connect(&dir.join("vsock.sock"));
    round_trip(&mut old, b"previous tenant\n");
    let body = serde_json::json!({
        "template": format!("file://{}", template.display()),
        "resume": true,
    });
    let (status, reply) = client
        .request("PUT", "vm.repurpose", Some(&body.to_string()), &[])
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("\"in_place\":true"), "{reply}");
    wait_line(&vmm, "devstate: restored ok");
    let mut rest = Vec::new();
    let _ = old.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the old connection is gone");
    let out = vmm.stdout();
    assert!(out.contains("vsock: transport reset"), "{out}");
    assert!(!out.contains("error"), "{out}");

    // The guest wrote through the template's queue into the VM's own disk.
    let disk = std::fs::read(dir.join("disk.img")).unwrap();
    assert_eq!(
        test_guest::pattern::first_mismatch(
            SEED + 1,
            SECTORS * SECTOR as u64,
            sectors(&disk, SECTORS)
        ),
        None
    );
    let mut conn = host_connect(&dir.join("vsock.sock"));
    round_trip(&mut conn, b"next tenant\n");
    close(conn);
    let check = wait_line(&vmm, "devstate: check n=1 ");
    assert!(check.contains("blk=ok"), "{check}");
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
    vmm.wait_exit(TIMEOUT).expect("the VMM exits");
}
