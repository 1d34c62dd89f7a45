//! virtio-vsock in hybrid mode end to end: host clients reach the test guest's echo server through the
//! VMM's Unix socket (`CONNECT <port>\n` -> `OK <port>\n`), and the guest reaches a host server listening
//! on `<socket>_<port>`. Peers that never answer (a stuck guest, a host client that never finishes its
//! CONNECT line) are timed out by the VMM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::{require_kvm, run_to_exit, test_guest_path, VmmProcess, GUEST_CONSOLE};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const TIMEOUT: Duration = Duration::from_secs(60);
const CID: u32 = 3;
/// How long the VMM gives the guest to answer a host CONNECT, and a host client to send its CONNECT line
/// (devices::virtio::vsock::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT}).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("trenv-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("vsock.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vsock_arg(socket: &Path) -> String {
    format!("cid={CID},socket={}", socket.display())
}

/// Boots the guest's echo server and waits until it listens.
fn echo_guest(socket: &Path, port: u32, count: u32) -> VmmProcess {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} vsock port={port} mode=echo count={count}");
    let vsock = vsock_arg(socket);
    let vmm = VmmProcess::spawn(
        TRENV,
        &[
            "--kernel",
            test_guest_path(),
            "--cmdline",
            &cmdline,
            "--memory",
            "size=128M",
            "--serial",
            "tty",
            "--vsock",
            &vsock,
        ],
    );
    let line = vmm.wait_for_line(TIMEOUT, |l| l.starts_with("vsock: listening"));
    assert_eq!(
        line.as_deref(),
        Some(format!("vsock: listening port={port} cid={CID}").as_str()),
        "{}\n{}",
        vmm.stdout(),
        vmm.stderr()
    );
    vmm
}

/// Connects through the hybrid socket; returns the stream and the host port from `OK <port>`.
fn host_connect(socket: &Path, port: u32) -> (UnixStream, u32) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    // Byte by byte: nothing after the line may be consumed here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed before OK");
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("bad answer {line:?}"));
    (stream, host_port)
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// Writes `bytes` from a second thread while reading the echo, so neither side's buffers must hold it all.
fn echo_round_trip(stream: UnixStream, bytes: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let to_send = bytes.to_vec();
    let sender = std::thread::spawn(move || writer.write_all(&to_send).unwrap());
    let mut got = vec![0u8; bytes.len()];
    let mut reader = stream;
    reader.read_exact(&mut got).unwrap();
    sender.join().unwrap();
    got
}

#[test]
fn host_connections_reach_the_guest_echo_server() {
    let scratch = Scratch::new("echo");
    let socket = scratch.socket();
    let mut vmm = echo_guest(&socket, 1234, 4);

    let (stream, first_port) = host_connect(&socket, 1234);
    let small = data(100, 1);
    assert_eq!(echo_round_trip(stream, &small), small);

    // Two at once, interleaved.
    let (a, port_a) = host_connect(&socket, 1234);
    let (b, port_b) = host_connect(&socket, 1234);
    assert!(first_port != port_a && port_a != port_b);
    let (da, db) = (data(200 << 10, 2), data(150 << 10, 3));
    let tb = {
        let db = db.clone();
        std::thread::spawn(move || echo_round_trip(b, &db))
    };
    assert_eq!(echo_round_trip(a, &da), da);
    assert_eq!(tb.join().unwrap(), db);

    // One transfer well past every buffer on the way (guest credit 256 KiB, host 256 KiB).
    let (stream, _) = host_connect(&socket, 1234);
    let big = data(3 << 20, 4);
    assert_eq!(echo_round_trip(stream, &big), big);

    let status = vmm
        .wait_exit(TIMEOUT)
        .expect("the guest stops after 4 connections");
    let out = vmm.stdout();
    assert!(status.success(), "{out}\n{}", vmm.stderr());
    assert_eq!(out.matches("vsock: closed").count(), 4, "{out}");
    assert!(
        out.contains(&format!("bytes={}", 3 << 20)),
        "the guest saw the whole transfer: {out}"
    );
    assert!(out.lines().any(|l| l == "vsock: ok"), "{out}");
    assert!(!socket.exists(), "the VMM removes its socket");
}

#[test]
fn a_client_vanishing_mid_stream_does_not_hurt_the_vm() {
    let scratch = Scratch::new("vanish");
    let socket = scratch.socket();
    let mut vmm = echo_guest(&socket, 77, 3);

    // Sends half a megabyte, reads a little of the echo, disappears with the rest unread.
    let (mut stream, _) = host_connect(&socket, 77);
    stream.write_all(&data(512 << 10, 5)).unwrap_or(());
    let mut some = [0u8; 1000];
    stream.read_exact(&mut some).unwrap();
    drop(stream);

    // A client that connects and closes before the guest even answers.
    let mut quick = UnixStream::connect(&socket).unwrap();
    quick.write_all(b"CONNECT 77\n").unwrap();
    drop(quick);

    // The next client is served normally.
    let (stream, _) = host_connect(&socket, 77);
    let payload = data(300 << 10, 6);
    assert_eq!(echo_round_trip(stream, &payload), payload);

    let status = vmm.wait_exit(TIMEOUT).expect("the guest finishes");
    let out = vmm.stdout();
    assert!(status.success(), "{out}\n{}", vmm.stderr());
    assert!(out.lines().any(|l| l == "vsock: ok"), "{out}");
}

#[test]
fn connect_to_a_port_nobody_serves_is_refused_by_the_guest() {
    let scratch = Scratch::new("refused");
    let socket = scratch.socket();
    let mut vmm = echo_guest(&socket, 10, 1);
    // Wrong port: the guest answers RST, the client sees EOF instead of OK, promptly (the guest's answer,
    // not the VMM's timeout).
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let start = Instant::now();
    stream.write_all(b"CONNECT 11\n").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).unwrap(), 0);
    let waited = start.elapsed();
    assert!(
        waited < CONNECT_TIMEOUT * 3 / 4,
        "closed after {waited:?}: not by the guest's RST"
    );
    // The right one still works.
    let (stream, _) = host_connect(&socket, 10);
    assert_eq!(echo_round_trip(stream, b"still here"), b"still here");
    assert!(vmm.wait_exit(TIMEOUT).is_some_and(|s| s.success()));
}

/// Reads one line (without consuming more), or None at EOF.
fn read_line(stream: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).unwrap() == 0 {
            return None;
        }
        if byte[0] == b'\n' {
            return Some(String::from_utf8(line).unwrap());
        }
        line.push(byte[0]);
    }
}

/// The function runtime (`function ... cold=1`): a request line `sleep=MS` keeps the guest from serving
/// the device for MS ms, which is how a stuck guest is made here.
#[test]
fn clients_left_hanging_by_a_stuck_guest_or_their_own_line_are_closed() {
    require_kvm();
    let scratch = Scratch::new("stuck");
    let socket = scratch.socket();
    let cmdline = format!("{GUEST_CONSOLE} function seed=7 heap=4 port=5000 cold=1");
    let vsock = vsock_arg(&socket);
    let vmm = VmmProcess::spawn(
        TRENV,
        &[
            "--kernel",
            test_guest_path(),
            "--cmdline",
            &cmdline,
            "--memory",
            "size=128M",
            "--serial",
            "tty",
            "--vsock",
            &vsock,
        ],
    );
    let listening = vmm.wait_for_line(TIMEOUT, |l| l.starts_with("function: listening"));
    assert!(listening.is_some(), "{}\n{}", vmm.stdout(), vmm.stderr());

    // A client that never finishes its CONNECT line; its clock starts now.
    let mut partial = UnixStream::connect(&socket).unwrap();
    partial.set_read_timeout(Some(TIMEOUT)).unwrap();
    let partial_start = Instant::now();
    partial.write_all(b"CONNECT 50").unwrap();

    // The guest answers this one, then stops serving the device for 6 s.
    let sleep = Duration::from_secs(6);
    let (mut busy, _) = host_connect(&socket, 5000);
    busy.write_all(format!("sleep={}\n", sleep.as_millis()).as_bytes())
        .unwrap();
    let asleep = Instant::now();
    // Let the guest take that line before the next REQUEST is queued behind it.
    std::thread::sleep(Duration::from_millis(300));

    // Nobody answers this REQUEST: the VMM closes the client after its timeout, long before the guest
    // wakes up.
    let mut stuck = UnixStream::connect(&socket).unwrap();
    stuck.set_read_timeout(Some(TIMEOUT)).unwrap();
    let start = Instant::now();
    stuck.write_all(b"CONNECT 5000\n").unwrap();
    assert_eq!(read_line(&mut stuck), None, "no OK from a stuck guest");
    let waited = start.elapsed();
    assert!(
        waited >= CONNECT_TIMEOUT - Duration::from_millis(50) && start + waited < asleep + sleep,
        "closed after {waited:?}"
    );

    // The half-sent line is dropped after its own timeout.
    let mut buf = [0u8; 8];
    assert_eq!(partial.read(&mut buf).unwrap(), 0);
    let waited = partial_start.elapsed();
    assert!(
        waited >= HANDSHAKE_TIMEOUT - Duration::from_millis(50) && waited < TIMEOUT,
        "partial line closed after {waited:?}"
    );

    // The guest wakes, answers its request and, its late answer to the dropped REQUEST refused by an
    // RST, serves new clients as before.
    assert_eq!(
        read_line(&mut busy).as_deref(),
        Some(format!("7 ok sleep={} dirty=0", sleep.as_millis()).as_str())
    );
    let (mut fresh, _) = host_connect(&socket, 5000);
    fresh.write_all(b"12\n").unwrap();
    let answer = read_line(&mut fresh).expect("an answer");
    assert!(answer.starts_with("7 0x"), "{answer}");
    drop(vmm);
}

/// A host echo server on `<socket>_<port>`, serving connections until the listener is dropped.
fn host_echo_server(socket: &Path, port: u32) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(format!("_{port}"));
    let path = PathBuf::from(path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut writer = conn.try_clone().unwrap();
                let mut reader = BufReader::new(conn);
                loop {
                    let buf = match reader.fill_buf() {
                        Ok([]) | Err(_) => return,
                        Ok(b) => b.to_vec(),
                    };
                    reader.consume(buf.len());
                    if writer.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
    });
    path
}

#[test]
fn guest_connections_reach_the_host_socket_port_path() {
    require_kvm();
    let scratch = Scratch::new("guest");
    let socket = scratch.socket();
    host_echo_server(&socket, 5000);
    let vsock = vsock_arg(&socket);
    let run = |workload: &str| {
        let cmdline = format!("{GUEST_CONSOLE} {workload}");
        let (status, out, err) = run_to_exit(
            TRENV,
            &[
                "--kernel",
                test_guest_path(),
                "--cmdline",
                &cmdline,
                "--memory",
                "size=128M",
                "--serial",
                "tty",
                "--vsock",
                &vsock,
            ],
            TIMEOUT,
        );
        assert!(status.success(), "{out}\n{err}");
        out
    };
    let out = run("vsock port=5000 mode=connect bytes=1500000 count=3");
    assert!(out.lines().any(|l| l == "vsock: ok"), "{out}");
    // Nothing listens on _5001: the device answers RST.
    let out = run("vsock port=5001 mode=connect");
    assert!(
        out.contains("vsock: error: connection to port 5001 refused"),
        "{out}"
    );
}

#[test]
fn bad_vsock_options_are_clear_errors() {
    let scratch = Scratch::new("opts");
    for (arg, needle) in [
        (
            format!("cid=2,socket={}", scratch.socket().display()),
            "CID",
        ),
        ("cid=3".to_string(), "socket"),
        (
            format!("cid=3,socket={}/no/such/dir/v.sock", scratch.0.display()),
            "no/such/dir",
        ),
    ] {
        let output = std::process::Command::new(TRENV)
            .args(["--kernel", test_guest_path(), "--vsock", &arg])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{arg}");
        assert!(
            stderr.to_lowercase().contains(&needle.to_lowercase()),
            "{arg}: {stderr}"
        );
    }
}
