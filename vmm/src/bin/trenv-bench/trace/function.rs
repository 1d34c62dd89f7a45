//! The functions: templates of the test guest's `function` workload, the answers they must give, and the
//! two ways an invocation reaches one (hybrid vsock to its guest, HTTP to the pool).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use devices::guest_signal::event_name;
use serde_json::json;

use super::{Params, PORT, TIMEOUT};
use crate::common::{vmm_command, wait_event, Scratch};

/// Pages of the heap's end that `function` writes and never reads (guest/workloads/function.rs).
const SCRATCH_PAGES: u64 = 16;
/// Heap pages one request reads.
const READ_PAGES: u64 = 4;

pub struct Function {
    pub name: String,
    pub template: PathBuf,
    pub seed: u64,
    /// Guest-physical address of the heap (the SERVE_HEAP argument).
    pub base: u64,
}

/// The i-th heap page request `n` reads (guest/workloads/function.rs `page_of`), to check answers.
fn page_of(n: u64, i: u64, pages: u64) -> u64 {
    let mut z = n.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % pages
}

impl Function {
    /// What the function answers to `n`: its seed and the sum of the heap pages `n` picks.
    fn expected(&self, heap_mib: u64, n: u64) -> String {
        let readable = heap_mib * (1 << 20) / 4096 - SCRATCH_PAGES;
        let mut sum = 0u64;
        for i in 0..READ_PAGES {
            let page = self.base + page_of(n, i, readable) * 4096;
            for w in 0..512 {
                sum = sum.wrapping_add(test_guest::pattern::word(self.seed, page + w * 8));
            }
        }
        format!("{} {sum:#018x}", self.seed)
    }
}

pub fn function_cmdline(seed: u64, p: &Params, cold: bool) -> String {
    let cold = if cold { " cold=1" } else { "" };
    format!(
        "{} function seed={seed} heap={} port={PORT}{cold}",
        vmm::TEST_GUEST_CONSOLE,
        p.heap_mib
    )
}

fn api(socket: &Path, endpoint: &str, body: Option<&str>) -> Result<(), String> {
    let (status, text) = api::client::ApiClient::new(socket)
        .request("PUT", endpoint, body, &[])
        .map_err(|e| format!("{endpoint}: {e}"))?;
    if status >= 300 {
        return Err(format!("{endpoint}: HTTP {status}: {text}"));
    }
    Ok(())
}

/// Boots `function seed=S` with a vsock device on the relative socket every sandbox resolves in its own
/// directory, waits for its heap (the device is live and listening by then) and snapshots it.
pub fn make_function(
    scratch: &Scratch,
    guest: &Path,
    i: usize,
    p: &Params,
) -> Result<Function, String> {
    let name = format!("f{i:02}");
    let seed = 100 + i as u64;
    let staging = scratch.path(&format!("staging-{name}"));
    std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
    let socket = staging.join("api.sock");
    let events = staging.join("events.jsonl");
    let mut child = vmm_command()
        .current_dir(&staging)
        .arg("--api-socket")
        .arg(&socket)
        .arg("--kernel")
        .arg(guest)
        .args(["--cmdline", &function_cmdline(seed, p, false)])
        .args([
            "--memory",
            &format!("size={}M", p.mem_mib),
            "--serial",
            "null",
        ])
        .args(["--vsock", "cid=3,socket=vsock.sock"])
        .arg("--event-monitor")
        .arg(format!("path={}", events.display()))
        .spawn()
        .map_err(|e| format!("cannot start the VMM: {e}"))?;
    let made = (|| {
        // SERVE_HEAP comes once the heap is built and the guest listens on its vsock port: the template
        // carries the live device, and only the host socket moves per sandbox.
        let heap = event_name(test_guest::SIGNAL_SERVE_HEAP);
        let heap = wait_event(&events, "guest", &heap, &mut child, TIMEOUT)?;
        let base = heap.properties["arg"]
            .as_str()
            .and_then(|a| a.parse::<u64>().ok())
            .ok_or("no heap base in the SERVE_HEAP event")?;
        let template = scratch.path(&format!("templates/{name}"));
        api(&socket, "vm.pause", None)?;
        let body = json!({"destination_url": format!("file://{}", template.display())});
        api(&socket, "vm.snapshot", Some(&body.to_string()))?;
        let _ = api(&socket, "vmm.shutdown", None);
        Ok(Function {
            name: name.clone(),
            template,
            seed,
            base,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&staging);
    made.map_err(|e: String| format!("template {name}: {e}"))
}

// ---------------------------------------------------------------------------------------------------------
// Talking to a guest over hybrid vsock, and to the pool over HTTP.

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    Ok(left)
}

/// One line (without the newline), at most `limit` bytes, read a byte at a time: the guest sends nothing
/// after it that could be lost.
fn read_line(stream: &mut UnixStream, limit: usize, deadline: Instant) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut byte) {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= limit => return Err("line too long".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    String::from_utf8(line).map_err(|_| "not UTF-8".into())
}

/// Sends `n` to the guest's function port through the VMM's hybrid vsock socket and returns the answer.
/// Until the guest listens (no socket yet, or CONNECT refused or reset) it tries again; nothing reaches the
/// function before the CONNECT is accepted, so retrying is safe.
pub fn vsock_invoke(
    socket: &Path,
    n: u64,
    child: &mut Child,
    deadline: Instant,
) -> Result<String, String> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the VMM exited ({status})"));
        }
        let attempt = (|| -> Result<Option<String>, String> {
            let Ok(mut s) = UnixStream::connect(socket) else {
                return Ok(None);
            };
            let _ = s.set_write_timeout(Some(remaining(deadline)?));
            if s.write_all(format!("CONNECT {PORT}\n").as_bytes()).is_err() {
                return Ok(None);
            }
            match read_line(&mut s, 64, deadline) {
                Ok(ok) if ok.starts_with("OK ") => {}
                Err(e) if e == "timed out" => return Err("no answer to CONNECT".into()),
                _ => return Ok(None),
            }
            s.write_all(format!("{n}\n").as_bytes())
                .map_err(|e| format!("sending the request: {e}"))?;
            let answer = read_line(&mut s, 256, deadline)?;
            let _ = s.shutdown(std::net::Shutdown::Both);
            Ok(Some(answer))
        })()?;
        if let Some(answer) = attempt {
            return Ok(answer);
        }
        remaining(deadline).map_err(|_| "the guest never listened".to_string())?;
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `POST /invoke/{function}` to the pool; returns the answer line and the pool's path (reuse, ...).
pub fn pool_invoke(socket: &Path, function: &str, n: u64) -> Result<(String, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("pool socket: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let body = format!("{n}\n");
    let request = format!(
        "POST /invoke/{function} HTTP/1.1\r\nHost: pool\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes())
        .map_err(|e| format!("sending to the pool: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("reading the pool's answer: {e}"))?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Err(format!("pool: HTTP {status}: {}", body.trim_end()));
    }
    let path = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Trenv-Path: "))
        .unwrap_or("?")
        .to_string();
    Ok((body.trim_end().to_string(), path))
}

/// Checks an answer against the function's seed and heap.
pub fn check(f: &Function, heap_mib: u64, n: u64, answer: &str) -> Result<(), String> {
    let want = f.expected(heap_mib, n);
    if answer != want {
        return Err(format!(
            "{}: answered {answer:?}, expected {want:?}",
            f.name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_predicted_from_seed_and_heap() {
        let f = Function {
            name: "f".into(),
            template: PathBuf::new(),
            seed: 5,
            base: 0x80_0000,
        };
        let a = f.expected(4, 1);
        assert!(a.starts_with("5 0x") && a.len() == "5 0x".len() + 16, "{a}");
        assert_ne!(a, f.expected(4, 2));
        assert_eq!(a, f.expected(4, 1));
    }
}
