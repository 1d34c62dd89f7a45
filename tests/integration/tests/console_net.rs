//! virtio-console and virtio-net used by the test guest: console bytes checked in the host file and
//! through the console socket (both directions), Ethernet frames exchanged with a host process on the
//! guest's tap (a raw AF_PACKET socket bound to it).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration::{require_kvm, run_to_exit, test_guest_path, VmmProcess, GUEST_CONSOLE};
use test_guest::virtio::net;

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const TIMEOUT: Duration = Duration::from_secs(60);

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("trenv-cn-{name}-{}", std::process::id()));
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

fn guest_args<'a>(cmdline: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--kernel",
        test_guest_path(),
        "--cmdline",
        cmdline,
        "--memory",
        "size=128M",
        "--serial",
        "tty",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn console_output_reaches_the_host_file_exactly() {
    require_kvm();
    let scratch = Scratch::new("file");
    let out = scratch.0.join("console.out");
    let cmdline = format!("{GUEST_CONSOLE} console text=\"hello virtio console\"");
    let console = format!("file={}", out.display());
    let (status, stdout, stderr) = run_to_exit(
        TRENV,
        &guest_args(&cmdline, &["--console", &console]),
        TIMEOUT,
    );
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.lines().any(|l| l == "console: ok"), "{stdout}");
    assert_eq!(std::fs::read(&out).unwrap(), b"hello virtio console\n");
}

#[test]
fn console_socket_carries_input_and_output() {
    require_kvm();
    let scratch = Scratch::new("sock");
    let sock = scratch.0.join("console.sock");
    let cmdline = format!("{GUEST_CONSOLE} console text=hi echo=5");
    let console = format!("socket={}", sock.display());
    let mut vmm = VmmProcess::spawn(TRENV, &guest_args(&cmdline, &["--console", &console]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("no console socket: {e}\n{}", vmm.stderr()),
        }
    };
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    client.write_all(b"abcde").unwrap();
    let mut got = [0u8; 8];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi\nabcde");
    let status = vmm.wait_exit(TIMEOUT).expect("trenv did not exit");
    assert!(status.success(), "{}\n{}", vmm.stdout(), vmm.stderr());
    assert!(
        vmm.stdout()
            .lines()
            .any(|l| l == "console: received 5 bytes"),
        "{}",
        vmm.stdout()
    );
}

#[test]
fn console_off_is_absent_and_bad_modes_are_refused() {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} console");
    let (status, stdout, _) = run_to_exit(TRENV, &guest_args(&cmdline, &[]), TIMEOUT);
    assert!(!status.success() || !stdout.contains("console: ok"));
    assert!(
        stdout.contains("console: error: no virtio-console device"),
        "{stdout}"
    );
    let output = std::process::Command::new(TRENV)
        .args(guest_args(
            &cmdline,
            &["--console", "file=/nonexistent/dir/out"],
        ))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/dir/out"), "{stderr}");
}

/// A raw packet socket bound to interface `ifname` for EtherType 0x88b5.
fn packet_socket(ifname: &str) -> std::io::Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: plain libc calls on values owned here; results checked.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let proto = net::ETHERTYPE.to_be();
        let raw = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        );
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        if libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        Ok(fd)
    }
}

const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// Answers every ping on `ifname` with a pong to its sender until `stop`; returns (sender, seq) of pings.
/// (sender MAC, sequence number) of each ping the host saw.
type Seen = Arc<Mutex<Vec<([u8; 6], u64)>>>;

fn responder(ifname: String, stop: Arc<AtomicBool>, seen: Seen) {
    // The VMM creates the tap: wait for it.
    let fd = loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match packet_socket(&ifname) {
            Ok(fd) => break fd,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let Some(frame) = net::parse_frame(&buf[..n as usize]) else {
            continue;
        };
        let Some(seq) = net::parse_tagged(frame.payload, net::PING) else {
            // Our own pongs show up here too (outgoing frames).
            continue;
        };
        seen.lock().unwrap().push((frame.src, seq));
        let mut payload = [0u8; 40];
        let plen = net::tagged(&mut payload, net::PONG, seq);
        let mut reply = [0u8; 128];
        let len = net::build_frame(
            &mut reply,
            frame.src,
            HOST_MAC,
            net::ETHERTYPE,
            &payload[..plen],
        )
        .unwrap();
        // SAFETY: `reply[..len]` is initialised.
        unsafe { libc::send(fd.as_raw_fd(), reply.as_ptr().cast(), len, 0) };
    }
}

fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn net_frames_cross_the_tap_both_ways() {
    require_kvm();
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (and root)"
    );
    let tap = format!("trnt{}", std::process::id() % 1_000_000);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let thread = {
        let (tap, stop, seen) = (tap.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || responder(tap, stop, seen))
    };
    let cmdline = format!("{GUEST_CONSOLE} net pings=3");
    let net_arg = format!("tap={tap},mac=52:54:00:12:34:56");
    let mut vmm = VmmProcess::spawn(TRENV, &guest_args(&cmdline, &["--net", &net_arg]));
    let status = vmm.wait_exit(TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    thread.join().unwrap();
    let (stdout, stderr) = (vmm.stdout(), vmm.stderr());
    if interface_exists(&tap) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &tap])
            .status();
        panic!("tap {tap} outlived the VMM");
    }
    assert!(status.is_some_and(|s| s.success()), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "net: mac=52:54:00:12:34:56"),
        "{stdout}"
    );
    for seq in 0..3 {
        let line = format!("net: pong seq={seq} from 02:00:00:00:00:01 bytes=72");
        assert!(stdout.lines().any(|l| l == line), "{line}\n{stdout}");
    }
    assert!(stdout.lines().any(|l| l == "net: ok"), "{stdout}");
    // The host saw the guest's own frames, from its configured MAC.
    let seen = seen.lock().unwrap();
    for seq in 0..3 {
        assert!(seen.contains(&(GUEST_MAC, seq)), "{seen:?}");
    }
}

#[test]
fn bad_net_options_are_clear_errors() {
    require_kvm();
    let cmdline = format!("{GUEST_CONSOLE} net");
    for (arg, needle) in [
        ("tap=has/slash", "has/slash"),
        ("tap=x,mac=nonsense", "nonsense"),
        ("tap=x,colour=blue", "colour"),
    ] {
        let output = std::process::Command::new(TRENV)
            .args(guest_args(&cmdline, &["--net", arg]))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{arg}");
        assert!(stderr.contains(needle), "{arg}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}
