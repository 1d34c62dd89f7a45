//! The warm pool end to end (`trenv-pool`): invocations restore a sandbox from a function's template,
//! reuse it, repurpose it for another function (the answer carries the new function's seed and heap), a
//! guest that does not answer gets its sandbox destroyed, idle sandboxes expire, and stopping the pool
//! leaves no VMM process behind.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::{field, require_kvm, test_guest_path, VmmProcess, GUEST_CONSOLE};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const POOL: &str = env!("CARGO_BIN_EXE_trenv-pool");
const TIMEOUT: Duration = Duration::from_secs(30);
const PORT: u32 = 5000;
const HEAP_MIB: u64 = 4;

struct Template {
    dir: PathBuf,
    seed: u64,
    base: u64,
}

/// The guest's page choice (guest/workloads/function.rs `page_of`), for recomputing answers.
fn page_of(n: u64, i: u64, pages: u64) -> u64 {
    let mut z = n.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % pages
}

/// What `function seed=S` must answer to `n`: its seed and the sum of 4 pristine heap pages.
fn expected(t: &Template, n: u64) -> String {
    let readable = HEAP_MIB * (1 << 20) / 4096 - 16;
    let mut sum = 0u64;
    for i in 0..4 {
        let page = t.base + page_of(n, i, readable) * 4096;
        for w in 0..512 {
            sum = sum.wrapping_add(test_guest::pattern::word(t.seed, page + w * 8));
        }
    }
    format!("{} {sum:#018x}", t.seed)
}

fn put(socket: &Path, endpoint: &str, body: &str) -> u16 {
    let mut stream = UnixStream::connect(socket).expect("API socket");
    let request = format!(
        "PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Boots `cmdline` with a vsock device on the relative socket the pool expects, waits for `ready_prefix`,
/// and snapshots it into `dir/name`. Returns the waited-for line.
fn make_template(dir: &Path, name: &str, workload: &str, ready_prefix: &str) -> (PathBuf, String) {
    let staging = dir.join(format!("staging-{name}"));
    std::fs::create_dir_all(&staging).unwrap();
    let api = staging.join("api.sock");
    let cmdline = format!("{GUEST_CONSOLE} {workload}");
    let mut vmm = VmmProcess::spawn_command(
        Command::new(TRENV)
            .current_dir(&staging)
            .arg("--api-socket")
            .arg(&api)
            .args(["--kernel", test_guest_path(), "--cmdline", &cmdline])
            .args(["--memory", "size=128M", "--serial", "tty"])
            .args(["--vsock", &format!("cid=3,socket={}", "vsock.sock")]),
    );
    let line = vmm
        .wait_for_line(TIMEOUT, |l| l.starts_with(ready_prefix))
        .unwrap_or_else(|| panic!("no {ready_prefix}: {}\n{}", vmm.stdout(), vmm.stderr()));
    let template = dir.join(name);
    assert_eq!(put(&api, "vm.pause", ""), 204);
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, template.display());
    assert_eq!(put(&api, "vm.snapshot", &body), 204, "{}", vmm.stderr());
    let _ = put(&api, "vmm.shutdown", "");
    vmm.wait_exit(TIMEOUT).expect("template VMM did not exit");
    (template, line)
}

fn function_template(dir: &Path, name: &str, seed: u64) -> Template {
    let workload = format!("function seed={seed} heap={HEAP_MIB} port={PORT}");
    let (dir, line) = make_template(dir, name, &workload, "function: heap");
    let base = field(&line, "base").trim_start_matches("0x");
    Template {
        dir,
        seed,
        base: u64::from_str_radix(base, 16).unwrap(),
    }
}

struct Reply {
    status: u16,
    path: String,
    sandbox: String,
    in_place: String,
    body: String,
}

fn http(socket: &Path, method: &str, target: &str, body: &str) -> Reply {
    let mut stream = UnixStream::connect(socket).expect("pool socket");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .unwrap_or("")
            .to_string()
    };
    Reply {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        path: header("X-Trenv-Path"),
        sandbox: header("X-Trenv-Sandbox"),
        in_place: header("X-Trenv-In-Place"),
        body: body.to_string(),
    }
}

fn invoke(socket: &Path, function: &str, n: u64) -> Reply {
    http(
        socket,
        "POST",
        &format!("/invoke/{function}"),
        &format!("{n}\n"),
    )
}

fn sandbox_pids(socket: &Path) -> Vec<u32> {
    let status: serde_json::Value =
        serde_json::from_str(&http(socket, "GET", "/status", "").body).unwrap();
    status["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// A live (not zombie) trenv process with this pid.
fn trenv_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    !stat.is_empty()
        && !state.starts_with('Z')
        && String::from_utf8_lossy(&cmdline).contains("trenv")
}

struct PoolProcess {
    vmm: VmmProcess,
    socket: PathBuf,
}

fn start_pool(dir: &Path, name: &str, config: serde_json::Value) -> PoolProcess {
    let config_path = dir.join(format!("{name}.json"));
    std::fs::write(&config_path, config.to_string()).unwrap();
    let socket = dir.join(format!("{name}.sock"));
    let work = dir.join(format!("{name}-work"));
    let vmm = VmmProcess::spawn(
        POOL,
        &[
            "--config",
            config_path.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--trenv",
            TRENV,
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    vmm.wait_for_line(TIMEOUT, |l| l.contains("serving on"))
        .unwrap_or_else(|| panic!("pool did not start: {}", vmm.stderr()));
    PoolProcess { vmm, socket }
}

impl PoolProcess {
    /// SIGTERM, then the pool must exit and every sandbox it ran must be gone.
    fn stop(mut self, pids: &[u32]) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.vmm.pid() as i32, libc::SIGTERM) };
        let status = self.vmm.wait_exit(TIMEOUT).expect("pool did not exit");
        assert!(status.success(), "{status:?}: {}", self.vmm.stderr());
        for &pid in pids {
            assert!(!trenv_alive(pid), "sandbox VMM {pid} outlived the pool");
        }
    }
}

#[test]
fn pool_restores_reuses_repurposes_and_cleans_up() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("trenv-pool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let a = function_template(&dir, "a", 11);
    let b = function_template(&dir, "b", 22);
    // A guest that never serves vsock: invocations of it must time out.
    let (hang, _) = make_template(&dir, "hang", "idle", "idle: running");
    let url = |p: &Path| format!("file://{}", p.display());
    let config = serde_json::json!({
        "functions": {
            "a": {"template": url(&a.dir), "port": PORT},
            "b": {"template": url(&b.dir), "port": PORT},
            "hang": {"template": url(&hang), "port": PORT},
        },
        "max_sandboxes": 1,
        "keep_alive_ms": 60000,
        "invoke_timeout_ms": 3000,
    });
    let pool = start_pool(&dir, "main", config);
    let socket = pool.socket.clone();
    let mut pids = Vec::new();

    let check = |r: &Reply, t: &Template, n: u64, path: &str| {
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body.trim_end(), expected(t, n));
        assert_eq!(r.path, path, "{}", r.body);
    };
    let first = invoke(&socket, "a", 7);
    check(&first, &a, 7, "restore");
    pids.extend(sandbox_pids(&socket));
    let t0 = Instant::now();
    let again = invoke(&socket, "a", 8);
    check(&again, &a, 8, "reuse");
    eprintln!("warm invocation: {:?}", t0.elapsed());
    assert_eq!(again.sandbox, first.sandbox);
    // max_sandboxes = 1: function b takes a's sandbox, and answers with b's seed and heap.
    let t0 = Instant::now();
    let other = invoke(&socket, "b", 7);
    check(&other, &b, 7, "repurpose");
    eprintln!("repurposed invocation: {:?}", t0.elapsed());
    assert_eq!(other.sandbox, first.sandbox);
    assert_eq!(
        other.in_place, "true",
        "same layout and devices: repurposed in place"
    );
    check(&invoke(&socket, "b", 1234), &b, 1234, "reuse");
    let back = invoke(&socket, "a", 99);
    check(&back, &a, 99, "repurpose");
    assert_eq!(back.sandbox, first.sandbox);
    assert_eq!(back.in_place, "true");

    // Bad requests leave the sandbox alone.
    assert_eq!(invoke(&socket, "nope", 1).status, 404);
    assert_eq!(http(&socket, "POST", "/invoke/a", "1\n2\n").status, 400);
    assert_eq!(http(&socket, "GET", "/invoke/a", "").status, 405);
    let garbage = http(&socket, "POST", "/invoke/a", "x\n");
    assert_eq!(garbage.status, 200);
    assert_eq!(garbage.body.trim_end(), "11 error");

    // A guest that does not answer: 502 after the timeout, and its sandbox is destroyed.
    let hung = invoke(&socket, "hang", 1);
    assert_eq!(hung.status, 502, "{}", hung.body);
    assert!(sandbox_pids(&socket).is_empty());
    let deadline = Instant::now() + TIMEOUT;
    while pids.iter().any(|&p| trenv_alive(p)) {
        assert!(Instant::now() < deadline, "the hung sandbox was not killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fresh = invoke(&socket, "a", 5);
    check(&fresh, &a, 5, "restore");
    assert_ne!(fresh.sandbox, first.sandbox);
    pids.extend(sandbox_pids(&socket));
    pool.stop(&pids);

    // Idle sandboxes past keep-alive are destroyed.
    let config = serde_json::json!({
        "functions": {"a": {"template": url(&a.dir)}},
        "keep_alive_ms": 200,
    });
    let pool = start_pool(&dir, "short", config);
    check(&invoke(&pool.socket, "a", 3), &a, 3, "restore");
    let pids = sandbox_pids(&pool.socket);
    assert_eq!(pids.len(), 1);
    let deadline = Instant::now() + TIMEOUT;
    while !sandbox_pids(&pool.socket).is_empty() || trenv_alive(pids[0]) {
        assert!(Instant::now() < deadline, "the idle sandbox did not expire");
        std::thread::sleep(Duration::from_millis(50));
    }
    check(&invoke(&pool.socket, "a", 4), &a, 4, "restore");
    let pids = sandbox_pids(&pool.socket);
    pool.stop(&pids);
    let _ = std::fs::remove_dir_all(&dir);
}
