//! `trenvctl` end to end: define, list, start, domstate, suspend/resume, dominfo, console, shutdown and
//! undefine a test-guest VM; destroy a transient one; notice a VMM that died behind trenvctl's back. Each
//! test uses its own run and state directories.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration::{require_kvm, test_guest_path, GUEST_CONSOLE};
use serde_json::Value;

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const CTL: &str = env!("CARGO_BIN_EXE_trenvctl");

struct Env {
    root: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        // Short paths: the sockets under the run dir must fit in sun_path.
        let root = std::env::temp_dir().join(format!("tctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Env { root }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(CTL);
        c.arg("--run-dir")
            .arg(self.root.join("run"))
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .arg("--trenv")
            .arg(TRENV)
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run trenvctl")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "trenvctl {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(&full)).expect("--json output is JSON")
    }

    fn domstate(&self, name: &str) -> String {
        self.ok(&["domstate", name]).trim().to_string()
    }

    fn write_config(&self, file: &str) -> PathBuf {
        let config = serde_json::json!({
            "payload": {"kernel": test_guest_path(), "cmdline": format!("{GUEST_CONSOLE} idle")},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 256u64 << 20}
        });
        let path = self.root.join(file);
        std::fs::write(&path, config.to_string()).unwrap();
        path
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join("run").join(name)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Never leave a spinning guest behind, whatever failed.
        for entry in std::fs::read_dir(self.root.join("run"))
            .into_iter()
            .flatten()
        {
            let name = entry.unwrap().file_name();
            let _ = self.run(&["destroy", name.to_str().unwrap()]);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Alive and not a zombie.
fn process_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

fn entry<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|v| v["name"] == name)
}

/// Attaches `trenvctl console`, waits for a guest tick on its stdout, then detaches with Ctrl+].
fn console_shows_guest_output(env: &Env, name: &str) {
    let mut child = env
        .command(&["console", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.lock().unwrap().contains("idle: tick") {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no guest output on the console: {:?}", seen.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.stdin.as_mut().unwrap().write_all(&[0x1d]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "console exited with {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("Ctrl+] did not detach the console");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn defined_vm_lifecycle() {
    require_kvm();
    let env = Env::new("life");
    let file = env.write_config("guest1.json");
    let out = env.ok(&["define", file.to_str().unwrap()]);
    assert!(out.contains("'guest1' defined"), "{out}");

    let all = env.json(&["list", "--all"]);
    assert_eq!(entry(&all, "guest1").unwrap()["state"], "shut off");
    assert!(entry(&env.json(&["list"]), "guest1").is_none());
    assert_eq!(env.domstate("guest1"), "shut off");

    env.ok(&["start", "guest1"]);
    assert_eq!(env.domstate("guest1"), "running");
    // Starting it twice is refused.
    let again = env.run(&["start", "guest1"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    let table = env.ok(&["list"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("guest1") && l.contains("running")),
        "{table}"
    );

    console_shows_guest_output(&env, "guest1");

    env.ok(&["suspend", "guest1"]);
    assert_eq!(env.domstate("guest1"), "paused");
    env.ok(&["resume", "guest1"]);
    assert_eq!(env.domstate("guest1"), "running");

    let info = env.json(&["dominfo", "guest1"]);
    assert_eq!(info["state"], "running");
    assert_eq!(info["persistent"], true);
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["memory"], 256u64 << 20);
    let pid = info["pid"].as_u64().expect("a running VM has a pid");
    assert!(process_alive(pid));
    assert!(Path::new(info["api_socket"].as_str().unwrap()).exists());
    assert!(info["uptime_s"].is_u64());
    let text = env.ok(&["dominfo", "guest1"]);
    assert!(
        text.contains("State:") && text.contains("running"),
        "{text}"
    );

    env.ok(&["shutdown", "guest1"]);
    assert!(!process_alive(pid), "the VMM outlived shutdown");
    assert!(!env.vm_dir("guest1").exists(), "run dir left behind");
    assert_eq!(env.domstate("guest1"), "shut off");

    env.ok(&["undefine", "guest1"]);
    let gone = env.run(&["domstate", "guest1"]);
    assert!(!gone.status.success());
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(
        err.starts_with("trenvctl: error: ") && err.contains("guest1"),
        "{err}"
    );
}

#[test]
fn destroy_and_stale_run_dirs() {
    require_kvm();
    let env = Env::new("destroy");
    let file = env.write_config("t.json");

    // A transient VM: destroy leaves no process and no run dir.
    env.ok(&["create", file.to_str().unwrap(), "--name", "tmp1"]);
    let pid = env.json(&["dominfo", "tmp1"])["pid"].as_u64().unwrap();
    assert!(process_alive(pid));
    env.ok(&["destroy", "tmp1"]);
    assert!(!process_alive(pid), "destroy left the VMM running");
    assert!(!env.vm_dir("tmp1").exists());
    assert!(entry(&env.json(&["list", "--all"]), "tmp1").is_none());

    // A defined VM whose VMM dies behind our back reads as shut off and its run dir is cleaned.
    env.ok(&["define", file.to_str().unwrap(), "--name", "crashy"]);
    env.ok(&["start", "crashy"]);
    let pid = env.json(&["dominfo", "crashy"])["pid"].as_u64().unwrap();
    // SAFETY: kill of the VMM process this test started through trenvctl.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "SIGKILL did not take");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(env.domstate("crashy"), "shut off");
    assert!(!env.vm_dir("crashy").exists(), "stale run dir not cleaned");
    let not_running = env.run(&["suspend", "crashy"]);
    assert!(!not_running.status.success());
    assert!(String::from_utf8_lossy(&not_running.stderr).contains("is not running"));

    // Names that could escape the directories are refused.
    let bad = env.run(&["define", file.to_str().unwrap(), "--name", "../x"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid VM name"));
}
