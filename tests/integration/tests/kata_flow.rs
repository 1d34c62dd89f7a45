//! Kata Containers' pod-start sequence against `trenv`, over raw HTTP/1.1 on the API socket exactly as its
//! clh driver sends it: spawn with only `--api-socket`, poll vmm.ping every 10 ms, vm.create, vm.info says
//! Created, vm.boot, vm.info says Running, and vmm.shutdown ends the process within 3 s. One keep-alive
//! connection carries every request, as Go's net/http client does.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use integration::{require_kvm, test_guest_path, VmmProcess, GUEST_CONSOLE};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");

/// A keep-alive HTTP/1.1 connection to the API socket.
struct Http {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Http {
    fn connect(socket: &Path) -> std::io::Result<Http> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Http {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    fn request(&mut self, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
        let mut request = format!(
            "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: Go-http-client/1.1\r\n"
        );
        match body {
            Some(body) => request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            None if method == "PUT" => request.push_str("Content-Length: 0\r\n\r\n"),
            None => request.push_str("\r\n"),
        }
        self.writer.write_all(request.as_bytes()).unwrap();

        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{method} {endpoint}: bad status line {status_line:?}"));
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }
}

fn state_of(info: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(info).unwrap();
    v["state"].as_str().unwrap().to_string()
}

#[test]
fn kata_pod_start_sequence() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("trenv-kata-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("clh-api.sock");
    let mut vmm = VmmProcess::spawn(TRENV, &["--api-socket", socket.to_str().unwrap()]);

    // 1. Poll vmm.ping every 10 ms for up to 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut http = loop {
        if let Ok(mut http) = Http::connect(&socket) {
            let (status, body) = http.request("GET", "vmm.ping", None);
            assert_eq!(status, 200, "{body}");
            let ping: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(ping["pid"].as_u64(), Some(vmm.pid() as u64));
            break http;
        }
        assert!(Instant::now() < deadline, "the API socket never answered");
        std::thread::sleep(Duration::from_millis(10));
    };

    // 2. vm.create with what the test guest needs (Kata would also send pmem, vsock, fs, rng).
    let config = serde_json::json!({
        "payload": {
            "kernel": test_guest_path(),
            "cmdline": format!("{GUEST_CONSOLE} idle"),
        },
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 268435456u64, "shared": false},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
        "platform": {"num_pci_segments": 1},
    });
    let (status, body) = http.request("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "vm.create: {body}");

    // 3. vm.info says Created; boot; vm.info says Running.
    let (status, body) = http.request("GET", "vm.info", None);
    assert_eq!(status, 200);
    assert_eq!(state_of(&body), "Created");
    let (status, body) = http.request("PUT", "vm.boot", None);
    assert_eq!(status, 204, "vm.boot: {body}");
    let (status, body) = http.request("GET", "vm.info", None);
    assert_eq!(status, 200);
    assert_eq!(state_of(&body), "Running");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["config"]["memory"]["size"].as_u64(), Some(268435456));
    assert!(
        vmm.wait_for_line(Duration::from_secs(10), |l| l.starts_with("idle: running"))
            .is_some(),
        "the guest did not start: {}",
        vmm.stdout()
    );

    // 4. Stop: vmm.shutdown, and the process must be gone within 3 s.
    let asked = Instant::now();
    let (status, body) = http.request("PUT", "vmm.shutdown", None);
    assert_eq!(status, 204, "vmm.shutdown: {body}");
    let exit = vmm
        .wait_exit(Duration::from_secs(3))
        .expect("trenv did not exit within 3 s of vmm.shutdown");
    assert!(exit.success(), "{}", vmm.stderr());
    assert!(asked.elapsed() < Duration::from_secs(3));
    let _ = std::fs::remove_dir_all(&dir);
}
