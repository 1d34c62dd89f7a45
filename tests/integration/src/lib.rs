//! Support for TrEnv's end-to-end tests: spawning `trenv` processes, collecting what their guests print on
//! the serial console, and waiting for lines or exits with deadlines, so that a hung guest fails a test
//! instead of hanging it.
//!
//! The tests themselves live in `tests/` beside this crate and are built as targets of the `vmm` package, so
//! they get the binaries' paths from cargo (`env!("CARGO_BIN_EXE_trenv")`).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Tests that boot guests need /dev/kvm; on a machine without it they must fail, loudly, not pass.
pub fn require_kvm() {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = kvm {
        panic!("this test boots a VM and needs read/write access to /dev/kvm (run as root on a KVM host): {e}");
    }
}

/// Path of the bundled test guest's ELF image.
pub fn test_guest_path() -> &'static str {
    test_guest::IMAGE_PATH
}

/// The command line prefix that points the test guest at the VMM's MMIO alias of ttyS0.
pub const GUEST_CONSOLE: &str = "earlycon=uart8250,mmio,0xfe001000";

#[derive(Default)]
struct Captured {
    stdout: String,
    stderr: String,
    closed: usize,
}

/// A running `trenv` process whose stdout (the serial console with `--serial tty`) and stderr are captured.
pub struct VmmProcess {
    child: Child,
    captured: Arc<(Mutex<Captured>, Condvar)>,
    pub started: Instant,
}

fn pump(
    reader: impl Read + Send + 'static,
    captured: Arc<(Mutex<Captured>, Condvar)>,
    is_stdout: bool,
) {
    thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let (lock, cvar) = &*captured;
                    let mut c = lock.lock().unwrap();
                    if is_stdout {
                        c.stdout.push_str(&text);
                    } else {
                        c.stderr.push_str(&text);
                    }
                    cvar.notify_all();
                }
            }
        }
        let (lock, cvar) = &*captured;
        lock.lock().unwrap().closed += 1;
        cvar.notify_all();
    });
}

impl VmmProcess {
    pub fn spawn(binary: &str, args: &[&str]) -> VmmProcess {
        Self::spawn_command(Command::new(binary).args(args))
    }

    pub fn spawn_command(command: &mut Command) -> VmmProcess {
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command:?}: {e}"));
        let captured = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        pump(child.stdout.take().unwrap(), captured.clone(), true);
        pump(child.stderr.take().unwrap(), captured.clone(), false);
        VmmProcess {
            child,
            captured,
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.captured.0.lock().unwrap().stdout.clone()
    }

    pub fn stderr(&self) -> String {
        self.captured.0.lock().unwrap().stderr.clone()
    }

    /// Waits until a stdout line satisfies `pred`; returns it, or None at the deadline or when stdout closes.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.captured;
        let mut c = lock.lock().unwrap();
        loop {
            if let Some(line) = c.stdout.lines().find(|l| pred(l)) {
                return Some(line.to_string());
            }
            let now = Instant::now();
            if now >= deadline || c.closed >= 2 {
                return None;
            }
            c = cvar.wait_timeout(c, deadline - now).unwrap().0;
        }
    }

    /// Waits for the process to exit; kills it at the deadline and returns None.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.drain();
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for both output pipes to close so that the captured text is complete.
    fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (lock, cvar) = &*self.captured;
        let mut c = lock.lock().unwrap();
        while c.closed < 2 && Instant::now() < deadline {
            c = cvar.wait_timeout(c, Duration::from_millis(50)).unwrap().0;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.drain();
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a VMM to completion within `timeout`, panicking with its output if it does not finish.
pub fn run_to_exit(binary: &str, args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let mut vmm = VmmProcess::spawn(binary, args);
    match vmm.wait_exit(timeout) {
        Some(status) => (status, vmm.stdout(), vmm.stderr()),
        None => panic!(
            "{binary} {args:?} did not exit within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            vmm.stdout(),
            vmm.stderr()
        ),
    }
}

/// A template of the test guest's `serve` workload, made through the API of a `trenv` at `binary`.
pub struct ServeTemplate {
    pub dir: std::path::PathBuf,
    /// The heap checksum and base address the guest printed when it built its heap.
    pub checksum: String,
    pub base: u64,
    pub seed: u64,
}

/// The value of `key=` on a line of `key=value` words.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Boots `serve heap=16 seed=SEED` with `memory`, waits for its heap, pauses and snapshots it into
/// `dir/name`, and stops that VMM.
pub fn make_serve_template(
    binary: &str,
    dir: &std::path::Path,
    name: &str,
    seed: u64,
    memory: &str,
) -> ServeTemplate {
    let socket = dir.join(format!("{name}.sock"));
    let cmdline = format!("{GUEST_CONSOLE} serve heap=16 seed={seed} dirty=1");
    let memory = format!("size={memory}");
    let mut vmm = VmmProcess::spawn(
        binary,
        &[
            "--api-socket",
            socket.to_str().unwrap(),
            "--kernel",
            test_guest_path(),
            "--cmdline",
            &cmdline,
            "--memory",
            &memory,
            "--serial",
            "tty",
        ],
    );
    let heap_line = vmm
        .wait_for_line(Duration::from_secs(30), |l| l.starts_with("serve: heap"))
        .unwrap_or_else(|| panic!("no heap line: {}\n{}", vmm.stdout(), vmm.stderr()));
    let put = |endpoint: &str, body: Option<&str>| -> (u16, String) {
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("API socket");
        let body = body.unwrap_or("");
        let request = format!(
            "PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
        let mut reply = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut reply);
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, reply)
    };
    let template = dir.join(name);
    assert_eq!(put("vm.pause", None).0, 204);
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, template.display());
    let (status, reply) = put("vm.snapshot", Some(&body));
    assert_eq!(status, 204, "{reply}");
    let _ = put("vmm.shutdown", None);
    vmm.wait_exit(Duration::from_secs(30))
        .expect("template VMM did not exit");
    ServeTemplate {
        dir: template,
        checksum: field(&heap_line, "checksum").to_string(),
        base: u64::from_str_radix(field(&heap_line, "base").trim_start_matches("0x"), 16).unwrap(),
        seed,
    }
}
