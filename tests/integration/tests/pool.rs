//! The warm pool end to end (`trenv-pool`): invocations restore a sandbox from a function's template,
//! reuse it, repurpose it for another function (the answer carries the new function's seed and heap);
//! parallel invocations are all answered; callers wait for a busy pool or one at its memory cap and then
//! get 503; a guest that does not answer, or crashes, gets its sandbox destroyed (502); idle sandboxes
//! expire, or are evicted when the pool grows past its memory cap; parked sandboxes are kept ready and
//! serve new functions in place; sandboxes die with a pool killed by SIGKILL and a restarted pool cleans
//! up; and `trenv --restore` moves a template's vsock device to the socket it is given.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use integration::{field, require_kvm, run_to_exit, test_guest_path, VmmProcess, GUEST_CONSOLE};

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const POOL: &str = env!("CARGO_BIN_EXE_trenv-pool");
const TIMEOUT: Duration = Duration::from_secs(30);
const PORT: u32 = 5000;
const HEAP_MIB: u64 = 4;
const CID: u64 = 3;

struct Template {
    dir: PathBuf,
    seed: u64,
    base: u64,
}

/// The templates every test uses, made once per test run.
struct Templates {
    dir: PathBuf,
    a: Template,
    b: Template,
    /// Made with an absolute vsock socket path: sandboxes can only use it with their own socket.
    c: Template,
    /// A guest that never serves vsock.
    hang: PathBuf,
}

static TEMPLATES: OnceLock<Templates> = OnceLock::new();
static TEMPLATE_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_templates() {
    if let Some(dir) = TEMPLATE_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn templates() -> &'static Templates {
    TEMPLATES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("trenv-pool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _ = TEMPLATE_DIR.set(dir.clone());
        // SAFETY: registers a plain function that only removes files, run when the test binary exits.
        unsafe { libc::atexit(remove_templates) };
        let absolute = dir.join("staging-c").join("vsock.sock");
        Templates {
            a: function_template(&dir, "a", 11, "vsock.sock"),
            b: function_template(&dir, "b", 22, "vsock.sock"),
            c: function_template(&dir, "c", 33, absolute.to_str().unwrap()),
            hang: make_template(&dir, "hang", "idle", "idle: running", "vsock.sock").0,
            dir,
        }
    })
}

/// A directory of the test's own under the templates' one.
fn test_dir(name: &str) -> PathBuf {
    let dir = templates().dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn url(p: &Path) -> String {
    format!("file://{}", p.display())
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

/// Boots `workload` with a vsock device on `vsock_socket`, waits for `ready_prefix`, and snapshots it
/// into `dir/name`. Returns the waited-for line.
fn make_template(
    dir: &Path,
    name: &str,
    workload: &str,
    ready_prefix: &str,
    vsock_socket: &str,
) -> (PathBuf, String) {
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
            .args(["--vsock", &format!("cid={CID},socket={vsock_socket}")]),
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

fn function_template(dir: &Path, name: &str, seed: u64, vsock_socket: &str) -> Template {
    let workload = format!("function seed={seed} heap={HEAP_MIB} port={PORT}");
    let (dir, line) = make_template(dir, name, &workload, "function: heap", vsock_socket);
    let base = field(&line, "base").trim_start_matches("0x");
    Template {
        dir,
        seed,
        base: u64::from_str_radix(base, 16).unwrap(),
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    path: String,
    sandbox: String,
    in_place: String,
    body: String,
}

/// One HTTP request to the pool; a connection that breaks gives status 0.
fn http(socket: &Path, method: &str, target: &str, body: &str) -> Reply {
    let mut stream = UnixStream::connect(socket).expect("pool socket");
    stream.set_read_timeout(Some(TIMEOUT * 2)).unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
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
    send(socket, function, &n.to_string())
}

fn send(socket: &Path, function: &str, line: &str) -> Reply {
    http(
        socket,
        "POST",
        &format!("/invoke/{function}"),
        &format!("{line}\n"),
    )
}

fn check(r: &Reply, t: &Template, n: u64, path: &str) {
    check_answer(r, t, n);
    assert_eq!(r.path, path, "{}", r.body);
}

fn check_answer(r: &Reply, t: &Template, n: u64) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body.trim_end(), expected(t, n));
}

fn status(socket: &Path) -> serde_json::Value {
    serde_json::from_str(&http(socket, "GET", "/status", "").body).unwrap()
}

fn sandboxes(socket: &Path) -> Vec<serde_json::Value> {
    status(socket)["sandboxes"].as_array().unwrap().clone()
}

fn sandbox_pids(socket: &Path) -> Vec<u32> {
    sandboxes(socket)
        .iter()
        .filter_map(|s| s["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// Polls the pool's status until `pred` holds; panics after `timeout`.
fn wait_status(
    socket: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(socket);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn in_state<'a>(s: &'a serde_json::Value, state: &str) -> Vec<&'a serde_json::Value> {
    s["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["state"] == state)
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

fn wait_gone(pids: &[u32], timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| trenv_alive(p)) {
        assert!(Instant::now() < deadline, "{what}: {pids:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct PoolProcess {
    vmm: VmmProcess,
    socket: PathBuf,
    work: PathBuf,
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
    PoolProcess { vmm, socket, work }
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
    let t = templates();
    let dir = test_dir("basic");
    let (a, b) = (&t.a, &t.b);
    let config = serde_json::json!({
        "functions": {
            "a": {"template": url(&a.dir), "port": PORT},
            "b": {"template": url(&b.dir), "port": PORT},
            "hang": {"template": url(&t.hang), "port": PORT},
        },
        "max_sandboxes": 1,
        "keep_alive_ms": 60000,
        "invoke_timeout_ms": 3000,
    });
    let pool = start_pool(&dir, "main", config);
    let socket = pool.socket.clone();
    let mut pids = Vec::new();

    let first = invoke(&socket, "a", 7);
    check(&first, a, 7, "restore");
    pids.extend(sandbox_pids(&socket));
    let t0 = Instant::now();
    let again = invoke(&socket, "a", 8);
    check(&again, a, 8, "reuse");
    eprintln!("warm invocation: {:?}", t0.elapsed());
    assert_eq!(again.sandbox, first.sandbox);
    // max_sandboxes = 1: function b takes a's sandbox, and answers with b's seed and heap.
    let t0 = Instant::now();
    let other = invoke(&socket, "b", 7);
    check(&other, b, 7, "repurpose");
    eprintln!("repurposed invocation: {:?}", t0.elapsed());
    assert_eq!(other.sandbox, first.sandbox);
    assert_eq!(
        other.in_place, "true",
        "same layout and devices: repurposed in place"
    );
    check(&invoke(&socket, "b", 1234), b, 1234, "reuse");
    let back = invoke(&socket, "a", 99);
    check(&back, a, 99, "repurpose");
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
    wait_gone(&pids, TIMEOUT, "the hung sandbox was not killed");
    let fresh = invoke(&socket, "a", 5);
    check(&fresh, a, 5, "restore");
    assert_ne!(fresh.sandbox, first.sandbox);
    pids.extend(sandbox_pids(&socket));
    pool.stop(&pids);

    // Idle sandboxes past keep-alive are destroyed.
    let config = serde_json::json!({
        "functions": {"a": {"template": url(&a.dir)}},
        "keep_alive_ms": 200,
    });
    let pool = start_pool(&dir, "short", config);
    check(&invoke(&pool.socket, "a", 3), a, 3, "restore");
    let pids = sandbox_pids(&pool.socket);
    assert_eq!(pids.len(), 1);
    wait_status(
        &pool.socket,
        TIMEOUT,
        "the idle sandbox did not expire",
        |s| s["sandboxes"].as_array().unwrap().is_empty(),
    );
    wait_gone(&pids, TIMEOUT, "the expired sandbox was not killed");
    check(&invoke(&pool.socket, "a", 4), a, 4, "restore");
    let pids = sandbox_pids(&pool.socket);
    pool.stop(&pids);
}

#[test]
fn parallel_invocations_of_several_functions_are_all_answered() {
    require_kvm();
    let t = templates();
    let dir = test_dir("parallel");
    let config = serde_json::json!({
        "functions": {
            "a": {"template": url(&t.a.dir)},
            "b": {"template": url(&t.b.dir)},
            "c": {"template": url(&t.c.dir)},
        },
        "max_sandboxes": 2,
        "invoke_timeout_ms": 20000,
    });
    let pool = start_pool(&dir, "parallel", config);
    let socket = &pool.socket.clone();
    let functions = [("a", &t.a), ("b", &t.b), ("c", &t.c)];
    let replies: Vec<(Reply, &Template, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..15u64)
            .map(|i| {
                let (name, template) = functions[i as usize % 3];
                let n = 1000 + i;
                scope.spawn(move || (invoke(socket, name, n), template, n))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut paths = std::collections::BTreeMap::new();
    for (reply, template, n) in &replies {
        assert_eq!(reply.status, 200, "{n}: {}", reply.body);
        assert_eq!(reply.body.trim_end(), expected(template, *n), "{n}");
        *paths.entry(reply.path.clone()).or_insert(0) += 1;
    }
    eprintln!("paths taken by 15 parallel invocations: {paths:?}");
    let s = status(socket);
    assert!(s["sandboxes"].as_array().unwrap().len() <= 2, "{s}");
    pool.stop(&sandbox_pids(socket));
}

#[test]
fn callers_wait_for_a_busy_pool_then_get_503() {
    require_kvm();
    let t = templates();
    let dir = test_dir("busy");
    let config = serde_json::json!({
        "functions": {
            "a": {"template": url(&t.a.dir)},
            "slow": {"template": url(&t.a.dir), "invoke_timeout_ms": 30000},
        },
        "max_sandboxes": 1,
        "invoke_timeout_ms": 2000,
    });
    let pool = start_pool(&dir, "busy", config);
    let socket = &pool.socket.clone();
    check(&invoke(socket, "a", 1), &t.a, 1, "restore");
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| send(socket, "slow", "sleep=3000"));
        wait_status(socket, TIMEOUT, "slow never ran", |s| {
            in_state(s, "busy").iter().any(|x| x["function"] == "slow")
        });
        // The only sandbox is busy for 3 s: a caller waits its 2 s and gets 503.
        let t0 = Instant::now();
        let refused = invoke(socket, "a", 2);
        let waited = t0.elapsed();
        assert_eq!(refused.status, 503, "{}", refused.body);
        assert!(refused.body.contains("busy"), "{}", refused.body);
        assert!(waited >= Duration::from_millis(1900), "{waited:?}");
        // The next caller waits too, and gets the sandbox when slow is done.
        let t0 = Instant::now();
        let served = invoke(socket, "a", 3);
        eprintln!("waited for the busy sandbox: {:?}", t0.elapsed());
        check(&served, &t.a, 3, "repurpose");
        let slow = slow.join().unwrap();
        assert_eq!(slow.status, 200, "{}", slow.body);
        assert_eq!(slow.body.trim_end(), "11 ok sleep=3000 dirty=0");
        assert_eq!(slow.sandbox, served.sandbox);
    });
    pool.stop(&sandbox_pids(socket));
}

#[test]
fn memory_cap_makes_callers_wait_and_evicts_idle_sandboxes() {
    require_kvm();
    let t = templates();
    let dir = test_dir("memory");
    const CAP_MIB: u64 = 48;
    let config = serde_json::json!({
        "functions": {
            "a": {"template": url(&t.a.dir)},
            "grow": {"template": url(&t.a.dir), "invoke_timeout_ms": 30000},
        },
        "max_sandboxes": 4,
        "max_host_mib": CAP_MIB,
        "invoke_timeout_ms": 2000,
    });
    let pool = start_pool(&dir, "memory", config);
    let socket = &pool.socket.clone();
    check(&invoke(socket, "a", 1), &t.a, 1, "restore");
    let s = wait_status(socket, TIMEOUT, "no PSS measured", |s| {
        s["sandboxes"][0]["pss_kib"].as_u64().is_some()
    });
    eprintln!("one warm sandbox: {} KiB PSS", s["host_kib"]);
    let pids = sandbox_pids(socket);
    std::thread::scope(|scope| {
        // The sandbox grows past the cap (64 MiB of guest writes) and stays busy for 4 s.
        let grow = scope.spawn(|| send(socket, "grow", "dirty=64 sleep=4000"));
        let s = wait_status(socket, TIMEOUT, "the sandbox did not grow", |s| {
            s["host_kib"].as_u64().unwrap() > (CAP_MIB + 16) << 10
        });
        eprintln!("grown: {} KiB PSS", s["host_kib"]);
        // Fewer than max_sandboxes, but no memory for another: the caller waits and gets 503.
        let t0 = Instant::now();
        let refused = invoke(socket, "a", 2);
        let waited = t0.elapsed();
        assert_eq!(refused.status, 503, "{}", refused.body);
        assert!(refused.body.contains("max_host_mib=48"), "{}", refused.body);
        assert!(waited >= Duration::from_millis(1900), "{waited:?}");
        let grow = grow.join().unwrap();
        assert_eq!(grow.status, 200, "{}", grow.body);
        assert_eq!(grow.body.trim_end(), "11 ok sleep=4000 dirty=64");
    });
    // Idle now, and alone over the cap: evicted.
    wait_status(socket, TIMEOUT, "the grown sandbox was not evicted", |s| {
        s["sandboxes"].as_array().unwrap().is_empty()
    });
    wait_gone(&pids, TIMEOUT, "the evicted sandbox was not killed");
    check(&invoke(socket, "a", 3), &t.a, 3, "restore");
    pool.stop(&sandbox_pids(socket));
}

#[test]
fn a_crashing_guest_fails_its_invocation_at_once() {
    require_kvm();
    let t = templates();
    let dir = test_dir("crash");
    let config = serde_json::json!({
        "functions": {"a": {"template": url(&t.a.dir)}},
        "max_sandboxes": 2,
        "invoke_timeout_ms": 30000,
    });
    let pool = start_pool(&dir, "crash", config);
    let socket = &pool.socket.clone();
    let first = invoke(socket, "a", 1);
    check(&first, &t.a, 1, "restore");
    let pids = sandbox_pids(socket);
    let t0 = Instant::now();
    let crashed = send(socket, "a", "crash");
    let took = t0.elapsed();
    eprintln!("crash reported after {took:?}: {}", crashed.body.trim_end());
    assert_eq!(crashed.status, 502, "{}", crashed.body);
    assert!(crashed.body.contains("exited"), "{}", crashed.body);
    assert!(crashed.body.contains("FAULT"), "{}", crashed.body);
    assert!(took < Duration::from_secs(5), "{took:?}: not at once");
    assert!(sandboxes(socket).is_empty());
    wait_gone(&pids, Duration::from_secs(2), "the crashed VMM");
    let next = invoke(socket, "a", 2);
    check(&next, &t.a, 2, "restore");
    assert_ne!(next.sandbox, first.sandbox);
    pool.stop(&sandbox_pids(socket));
}

#[test]
fn sandboxes_die_with_a_killed_pool_and_a_restart_cleans_up() {
    require_kvm();
    let t = templates();
    let dir = test_dir("kill");
    let config = serde_json::json!({
        "functions": {
            "a": {"template": url(&t.a.dir)},
            "slow": {"template": url(&t.a.dir), "invoke_timeout_ms": 30000},
        },
        "max_sandboxes": 4,
        "prewarm": 1,
        "invoke_timeout_ms": 20000,
    });
    let mut pool = start_pool(&dir, "kill", config.clone());
    let socket = pool.socket.clone();
    check_answer(&invoke(&socket, "a", 1), &t.a, 1);
    // slow takes a parked sandbox (not a's idle one) once there is one again.
    wait_status(&socket, TIMEOUT, "no parked sandbox", |s| {
        !in_state(s, "parked").is_empty()
    });
    let busy = std::thread::spawn({
        let socket = socket.clone();
        move || send(&socket, "slow", "sleep=20000").status
    });
    // An idle, a busy and a parked sandbox.
    let s = wait_status(&socket, TIMEOUT, "sandboxes did not come up", |s| {
        ["idle", "busy", "parked"]
            .iter()
            .all(|state| !in_state(s, state).is_empty())
    });
    let pids = sandbox_pids(&socket);
    assert!(pids.len() >= 3, "{s}");
    pool.vmm.kill();
    let t0 = Instant::now();
    wait_gone(
        &pids,
        Duration::from_secs(2),
        "sandboxes outlived a SIGKILLed pool",
    );
    eprintln!("sandboxes gone {:?} after the pool's SIGKILL", t0.elapsed());
    // The caller whose sandbox died gets no answer.
    assert_ne!(busy.join().unwrap(), 200);
    let stale: Vec<_> = std::fs::read_dir(&pool.work)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("sandbox-"))
        .collect();
    assert!(!stale.is_empty(), "a killed pool leaves its directories");

    // A new pool on the same socket and work directory serves, and keeps none of the old directories
    // (sandbox ids start again at 1: the pid files tell the runs apart).
    let pool = start_pool(&dir, "kill", config);
    check_answer(&invoke(&socket, "a", 2), &t.a, 2);
    for entry in std::fs::read_dir(&pool.work).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("sandbox-")
        {
            continue;
        }
        let pid: u32 = std::fs::read_to_string(path.join("pid"))
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        assert!(!pids.contains(&pid), "{} is stale", path.display());
    }
    pool.stop(&sandbox_pids(&socket));
}

#[test]
fn prewarmed_parked_sandboxes_serve_new_functions_in_place() {
    require_kvm();
    let t = templates();
    let dir = test_dir("prewarm");
    let config = serde_json::json!({
        "functions": {
            "a": {"template": url(&t.a.dir)},
            "b": {"template": url(&t.b.dir)},
            "c": {"template": url(&t.c.dir)},
        },
        "max_sandboxes": 4,
        "prewarm": 1,
    });
    let pool = start_pool(&dir, "prewarm", config);
    let socket = &pool.socket.clone();
    let parked = |s: &serde_json::Value| -> Option<(String, u64)> {
        let p = in_state(s, "parked");
        let p = p.first()?;
        Some((p["id"].to_string(), p["pss_kib"].as_u64()?))
    };
    let s = wait_status(socket, TIMEOUT, "no parked sandbox", |s| {
        parked(s).is_some()
    });
    let (first, pss_kib) = parked(&s).unwrap();
    eprintln!("a parked sandbox costs {pss_kib} KiB PSS");
    assert!(pss_kib < 64 << 10, "{s}");
    assert!(s["sandboxes"][0]["function"].is_null(), "{s}");

    // A function with no sandbox: the parked one is repurposed in place, no restore.
    let t0 = Instant::now();
    let r = invoke(socket, "a", 5);
    eprintln!(
        "invocation served from a parked sandbox: {:?}",
        t0.elapsed()
    );
    check(&r, &t.a, 5, "repurpose");
    assert_eq!(r.in_place, "true");
    assert_eq!(r.sandbox, first);

    // Refilled in the background; the next new function takes the new parked sandbox, not a's.
    let s = wait_status(
        socket,
        TIMEOUT,
        "the parked sandbox was not replaced",
        |s| parked(s).is_some_and(|(id, _)| id != first),
    );
    let (second, _) = parked(&s).unwrap();
    let r = invoke(socket, "b", 6);
    check(&r, &t.b, 6, "repurpose");
    assert_eq!(r.sandbox, second);
    let r = invoke(socket, "a", 7);
    check(&r, &t.a, 7, "reuse");
    assert_eq!(r.sandbox, first);
    let s = wait_status(socket, TIMEOUT, "no third, parked sandbox", |s| {
        parked(s).is_some()
    });
    assert_eq!(s["sandboxes"].as_array().unwrap().len(), 3, "{s}");
    // c's template names another vsock socket: the sandbox keeps its own, so it is still in place.
    let (third, _) = parked(&s).unwrap();
    let r = invoke(socket, "c", 8);
    check(&r, &t.c, 8, "repurpose");
    assert_eq!((r.sandbox, r.in_place.as_str()), (third, "true"));
    pool.stop(&sandbox_pids(socket));
}

fn vsock_request(socket: &Path, line: &str) -> String {
    vsock_try(socket, line).unwrap_or_else(|e| panic!("{e}"))
}

/// Connects to a hybrid vsock socket and sends one request line to the guest's port, retrying while the
/// guest brings its device up; returns the answer line.
fn vsock_try(socket: &Path, line: &str) -> Result<String, String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = UnixStream::connect(socket)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(format!("CONNECT {PORT}\n").as_bytes())?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut ok = String::new();
            reader.read_line(&mut ok)?;
            if !ok.starts_with("OK ") {
                return Err(std::io::Error::other(ok));
            }
            stream.write_all(format!("{line}\n").as_bytes())?;
            let mut answer = String::new();
            reader.read_line(&mut answer)?;
            Ok(answer.trim_end().to_string())
        })();
        match attempt {
            Ok(answer) if !answer.is_empty() => return Ok(answer),
            other if Instant::now() >= deadline => return Err(format!("no answer: {other:?}")),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn restore_moves_the_vsock_device_to_the_given_socket() {
    require_kvm();
    let t = templates();
    let dir = test_dir("override");
    let restore = |template: &Template, cwd: &Path, vsock: Option<String>| {
        let mut command = Command::new(TRENV);
        command
            .current_dir(cwd)
            .arg("--api-socket")
            .arg(cwd.join("api.sock"))
            .arg("--restore")
            .arg(format!("source_url={},resume=on", url(&template.dir)));
        if let Some(vsock) = vsock {
            command.args(["--vsock", &vsock]);
        }
        VmmProcess::spawn_command(&mut command)
    };

    // Template c names an absolute socket; this instance gets its own.
    let mine = dir.join("mine.sock");
    let mut vmm = restore(
        &t.c,
        &dir,
        Some(format!("cid={CID},socket={}", mine.display())),
    );
    assert_eq!(vsock_request(&mine, "7"), expected(&t.c, 7));
    vmm.kill();

    // The template's relative path still resolves in the working directory when nothing is given.
    let cwd = dir.join("relative");
    std::fs::create_dir_all(&cwd).unwrap();
    let mut vmm = restore(&t.a, &cwd, None);
    assert_eq!(
        vsock_request(&cwd.join("vsock.sock"), "8"),
        expected(&t.a, 8)
    );
    vmm.kill();

    // The device is the template's: another CID or id is refused, as are devices the template fixes.
    let source = format!("source_url={}", url(&t.a.dir));
    let other = dir.join("other.sock");
    for (vsock, why) in [
        (format!("cid=4,socket={}", other.display()), "cid=4"),
        (format!("cid={CID},socket={},id=x", other.display()), "id"),
    ] {
        let (status, _, stderr) =
            run_to_exit(TRENV, &["--restore", &source, "--vsock", &vsock], TIMEOUT);
        assert!(!status.success());
        assert!(
            stderr.contains("override") && stderr.contains(why),
            "{stderr}"
        );
        assert!(!other.exists());
    }
    let (status, _, stderr) = run_to_exit(
        TRENV,
        &["--restore", &source, "--disk", "path=/dev/null"],
        TIMEOUT,
    );
    assert!(!status.success() && stderr.contains("--disk"), "{stderr}");
}

/// The `function` template carries a live vsock device: a restored sandbox serves on the template's
/// queues without bringing the device up again, and so does a snapshot of a serving sandbox, restored
/// (each restore's TRANSPORT_RESET only makes the guest forget its connections).
#[test]
fn a_serving_function_restored_from_its_snapshot_serves_again() {
    require_kvm();
    let t = templates();
    let dir = test_dir("reserve");
    let api = dir.join("api.sock");
    let one = dir.join("one.sock");
    let mut vmm = VmmProcess::spawn_command(
        Command::new(TRENV)
            .current_dir(&dir)
            .arg("--api-socket")
            .arg(&api)
            .arg("--restore")
            .arg(format!("source_url={},resume=on", url(&t.a.dir)))
            .args(["--vsock", &format!("cid={CID},socket={}", one.display())]),
    );
    assert_eq!(vsock_request(&one, "7"), expected(&t.a, 7));
    // Once idle the guest reports the reset; it never initialised the device again.
    vmm.wait_for_line(TIMEOUT, |l| l.starts_with("function: reset port="))
        .unwrap_or_else(|| panic!("{}\n{}", vmm.stdout(), vmm.stderr()));
    assert!(
        !vmm.stdout().contains("function: listening"),
        "{}",
        vmm.stdout()
    );
    // Let the guest settle into its quiet loop before the snapshot.
    std::thread::sleep(Duration::from_millis(200));
    let served = dir.join("served");
    assert_eq!(put(&api, "vm.pause", ""), 204);
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, served.display());
    assert_eq!(put(&api, "vm.snapshot", &body), 204, "{}", vmm.stderr());
    let _ = put(&api, "vmm.shutdown", "");
    vmm.wait_exit(TIMEOUT).expect("the VMM did not exit");

    let two = dir.join("two.sock");
    let api2 = dir.join("api2.sock");
    let mut clone = VmmProcess::spawn_command(
        Command::new(TRENV)
            .current_dir(&dir)
            .arg("--api-socket")
            .arg(&api2)
            .arg("--restore")
            .arg(format!("source_url={},resume=on", url(&served)))
            .args(["--vsock", &format!("cid={CID},socket={}", two.display())]),
    );
    let answer = vsock_try(&two, "8")
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", clone.stdout(), clone.stderr()));
    assert_eq!(answer, expected(&t.a, 8));
    // The clone carried on from inside its serving loop, on the same queues.
    clone
        .wait_for_line(TIMEOUT, |l| l.starts_with("function: reset port="))
        .unwrap_or_else(|| panic!("{}\n{}", clone.stdout(), clone.stderr()));
    assert_eq!(vsock_request(&two, "9"), expected(&t.a, 9));
    assert!(
        !clone.stdout().contains("function: listening"),
        "{}",
        clone.stdout()
    );
    clone.kill();
}
