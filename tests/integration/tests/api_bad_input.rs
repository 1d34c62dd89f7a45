//! Hostile and mistaken API clients against a real `trenv` whose guest is running: every bad request gets
//! the right status and a JSON error chain, the VMM keeps serving, and the guest keeps running.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use api::client::ApiClient;
use integration::{require_kvm, test_guest_path, VmmProcess, GUEST_CONSOLE};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");

/// Sends raw bytes on a fresh connection and returns the status code of the reply (0 if none).
fn raw(socket: &std::path::Path, bytes: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // One reply is enough; the server may keep the connection open.
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if reply.len() >= head_end + 4 + length {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn assert_json_error(status: u16, expected: u16, body: &str) {
    assert_eq!(status, expected, "{body}");
    let json_start = body.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0);
    let chain: Vec<String> = serde_json::from_str(&body[json_start..])
        .unwrap_or_else(|e| panic!("error body is not a JSON array of strings ({e}): {body}"));
    assert!(
        !chain.is_empty() && chain.iter().all(|s| !s.is_empty()),
        "{body}"
    );
}

#[test]
fn bad_requests_leave_the_vmm_serving_and_the_guest_running() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("trenv-api-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let vmm = VmmProcess::spawn(
        TRENV,
        &["--api-socket", socket.to_str().unwrap(), "--serial", "tty"],
    );
    let client = ApiClient::new(&socket);
    client.wait_until_ready(Duration::from_secs(10)).unwrap();

    // Wrong state before anything exists.
    for endpoint in [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.delete",
    ] {
        let (status, body) = client.request("PUT", endpoint, None, &[]).unwrap();
        assert_eq!(status, 404, "{endpoint} before create: {body}");
    }
    let (status, _) = client.request("GET", "vm.info", None, &[]).unwrap();
    assert_eq!(status, 404);

    let config = serde_json::json!({
        "payload": {"kernel": test_guest_path(), "cmdline": format!("{GUEST_CONSOLE} idle")},
        "memory": {"size": 134217728u64},
        "serial": {"mode": "Tty"},
    });
    let (status, body) = client
        .request("PUT", "vm.create", Some(&config.to_string()), &[])
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let (status, body) = client
        .request("PUT", "vm.create", Some(&config.to_string()), &[])
        .unwrap();
    assert!(status >= 400, "second create must fail: {body}");
    let (status, body) = client.request("PUT", "vm.boot", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    assert!(vmm
        .wait_for_line(Duration::from_secs(10), |l| l == "idle: tick 1")
        .is_some());

    // A client that connects and says nothing must not hold up others.
    let _staller = UnixStream::connect(&socket).unwrap();
    let mut half = UnixStream::connect(&socket).unwrap();
    half.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        .unwrap();

    let head = |method: &str, path: &str, extra: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
    };
    let cases: Vec<(String, u16)> = vec![
        (head("PUT", "/api/v1/vm.create", "", "{not json"), 400),
        (
            head(
                "PUT",
                "/api/v1/vm.create",
                "",
                r#"{"cpus":{"boot_vcpus":"two"}}"#,
            ),
            400,
        ),
        (
            head("PUT", "/api/v1/vm.resize", "", r#"{"desired_vcpus":-1}"#),
            400,
        ),
        (head("GET", "/api/v1/vm.boot", "", ""), 405),
        (head("DELETE", "/api/v1/vm.info", "", ""), 405),
        (head("GET", "/api/v1/vm.nonsense", "", ""), 404),
        (head("GET", "/api/v2/vm.info", "", ""), 404),
        (
            head("PUT", "/api/v1/vm.pause", "", r#"{"unexpected":"body"}"#),
            400,
        ),
        (head("PUT", "/api/v1/vm.boot", "", ""), 500),
        (head("PUT", "/api/v1/vm.resume", "", ""), 500),
        (
            head(
                "PUT",
                "/api/v1/vm.snapshot",
                "",
                r#"{"destination_url":"file:///tmp/x"}"#,
            ),
            500,
        ),
        (
            head(
                "PUT",
                "/api/v1/vm.add-disk",
                "",
                r#"{"path":"/nonexistent"}"#,
            ),
            // A hot-plugged disk whose file cannot be opened is the caller's mistake.
            400,
        ),
        (
            head(
                "GET",
                "/api/v1/vm.info",
                &format!("X-Big: {}\r\n", "a".repeat(20_000)),
                "",
            ),
            431,
        ),
        (
            format!(
                "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                2 << 20
            ),
            413,
        ),
    ];
    for (request, expected) in &cases {
        let (status, body) = raw(&socket, request.as_bytes());
        assert_json_error(status, *expected, &body);
    }
    let (status, _) = raw(&socket, b"\x00\x01garbage\r\n\r\n");
    assert_eq!(status, 400);

    // Still serving, and the guest still runs.
    let (status, info) = client.request("GET", "vm.info", None, &[]).unwrap();
    assert_eq!(status, 200);
    assert!(info.contains("\"Running\""), "{info}");
    let ticks_before = vmm
        .stdout()
        .lines()
        .filter(|l| l.starts_with("idle: tick"))
        .count();
    assert!(
        vmm.wait_for_line(Duration::from_secs(5), |l| l
            == format!("idle: tick {}", ticks_before + 1))
            .is_some(),
        "the guest stopped ticking:\n{}",
        vmm.stdout()
    );
    let (status, body) = client.request("PUT", "vmm.shutdown", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}
