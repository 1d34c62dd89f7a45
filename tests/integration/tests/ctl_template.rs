//! `trenvctl template ...` and `trenvctl start --template` end to end: make a template of a test guest
//! running the `serve` workload, list/inspect/verify it, restore two instances from it and check on their
//! consoles that each is a distinct clone with an intact heap, see `template rm` refused while they run
//! and accepted after; identical VM state is stored once; a flipped image byte fails `verify`. Each test
//! uses its own run, state and store directories.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration::{require_kvm, test_guest_path, GUEST_CONSOLE};
use serde_json::Value;

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const CTL: &str = env!("CARGO_BIN_EXE_trenvctl");
const WAIT: Duration = Duration::from_secs(30);

struct Env {
    root: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        // Short paths: the sockets under the run dir must fit in sun_path.
        let root = std::env::temp_dir().join(format!("tctlt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Env { root }
    }

    fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    fn command_with_store(&self, store: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(CTL);
        c.arg("--run-dir")
            .arg(self.root.join("run"))
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .arg("--store")
            .arg(store)
            .arg("--trenv")
            .arg(TRENV)
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command_with_store(&self.store(), args)
            .output()
            .expect("run trenvctl")
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

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "trenvctl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(&full)).expect("--json output is JSON")
    }

    fn domstate(&self, name: &str) -> String {
        self.ok(&["domstate", name]).trim().to_string()
    }

    /// Starts a transient VM running `serve heap=8 seed=3` with its serial output in a file (the heap line
    /// comes before any console could attach), waits for the heap line and returns the heap's base.
    fn boot_serve(&self, name: &str) -> u64 {
        let serial = self.root.join(format!("{name}.serial"));
        let config = serde_json::json!({
            "payload": {
                "kernel": test_guest_path(),
                "cmdline": format!("{GUEST_CONSOLE} serve heap=8 seed=3"),
            },
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 256u64 << 20},
            "serial": {"mode": "File", "file": serial},
        });
        let file = self.root.join(format!("{name}.json"));
        std::fs::write(&file, config.to_string()).unwrap();
        self.ok(&["create", file.to_str().unwrap(), "--name", name]);
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.starts_with("serve: heap")) {
                assert!(line.contains("mib=8 seed=3"), "{line}");
                return hex_field(line, "base=").expect("heap base");
            }
            assert!(
                Instant::now() < deadline,
                "no 'serve: heap' line from {name}: {text:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn objects(&self) -> usize {
        std::fs::read_dir(self.store().join("objects"))
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count()
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
        // Published templates are read-only files; the directories are ours to delete.
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The hex number after `key` in `line` (`key=0x1234 ...`).
fn hex_field(line: &str, key: &str) -> Option<u64> {
    let rest = line.split(key).nth(1)?;
    let digits = rest.split_whitespace().next()?.trim_start_matches("0x");
    u64::from_str_radix(digits.get(digits.len().saturating_sub(16)..)?, 16).ok()
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

/// `trenvctl console NAME` running in the background, its output collected.
struct Console {
    child: Child,
    seen: Arc<Mutex<String>>,
}

impl Console {
    fn attach(env: &Env, name: &str) -> Console {
        let mut child = env
            .command_with_store(&env.store(), &["console", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let console = Console { child, seen };
        console.wait_for(|l| l.starts_with("Connected to domain"));
        // The VMM accepts the connection on its own thread; output before that is dropped.
        std::thread::sleep(Duration::from_millis(200));
        console
    }

    fn wait_for(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            // Only complete lines: the console relays output as the guest writes it, byte by byte.
            let seen = self.seen.lock().unwrap().clone();
            let complete = &seen[..seen.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(line) = complete.lines().find(|l| pred(l)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "console never showed the line: {:?}",
                self.seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Restores `name` from `template` paused, attaches its console, resumes it and returns its
/// `serve: restored` line.
fn restore_instance(env: &Env, args: &[&str], name: &str) -> String {
    let out = env.ok(args);
    assert!(out.contains("restored from template"), "{out}");
    assert_eq!(env.domstate(name), "paused");
    let console = Console::attach(env, name);
    env.ok(&["resume", name]);
    let line = console.wait_for(|l| l.starts_with("serve: restored"));
    assert_eq!(env.domstate(name), "running");
    line
}

#[test]
fn template_create_restore_and_remove() {
    require_kvm();
    let env = Env::new("life");
    env.boot_serve("vm1");

    let out = env.ok(&["template", "create", "t1", "--from-vm", "vm1"]);
    assert!(out.contains("Template 't1' created from 'vm1'"), "{out}");
    assert!(out.contains("left paused"), "{out}");
    assert_eq!(env.domstate("vm1"), "paused");
    assert!(
        std::fs::read_dir(env.store().join("staging"))
            .unwrap()
            .next()
            .is_none(),
        "staging debris left"
    );

    let list = env.json(&["template", "list"]);
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "t1")
        .expect("t1 listed");
    let digest = entry["digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64);
    assert_eq!(entry["memory_bytes"], 256u64 << 20);
    assert_eq!(entry["in_use"], false);
    let table = env.ok(&["template", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("t1") && l.contains(&digest[..12])),
        "{table}"
    );

    let info = env.json(&["template", "inspect", "t1"]);
    assert_eq!(info["digest"], digest.as_str());
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["memory_bytes"], 256u64 << 20);
    // The 8 MiB heap is data; the untouched rest of RAM is holes.
    let data = info["data_bytes"].as_u64().unwrap();
    assert!((8 << 20..64 << 20).contains(&data), "data_bytes {data}");
    assert!(!info["regions"].as_array().unwrap().is_empty());
    assert!(info["config"]["payload"]["cmdline"]
        .as_str()
        .unwrap()
        .contains("serve heap=8"));
    let text = env.ok(&["template", "inspect", "t1"]);
    assert!(
        text.contains("Fingerprint:") && text.contains("mem-0.img"),
        "{text}"
    );

    let out = env.ok(&["template", "verify", "t1"]);
    assert!(out.contains("intact"), "{out}");

    // Two clones: one started as `start VM --template`, one as `start --template T --name VM`.
    let first = restore_instance(
        &env,
        &["start", "inst1", "--template", "t1", "--paused"],
        "inst1",
    );
    let second = restore_instance(
        &env,
        &["start", "--template", "t1", "--name", "inst2", "--paused"],
        "inst2",
    );
    for line in [&first, &second] {
        assert_eq!(field(line, "heap="), Some("ok"), "{line}");
        assert_eq!(field(line, "instance="), Some("1"), "{line}");
    }
    let generation = |l: &str| field(l, "generation=").unwrap().to_string();
    assert_ne!(
        generation(&first),
        generation(&second),
        "two clones share a generation ID"
    );
    // Neither clone sees the other's write to the heap's first word: both read the template's value.
    assert_eq!(
        field(&first, "first_before="),
        field(&second, "first_before=")
    );

    let dominfo = env.json(&["dominfo", "inst1"]);
    assert_eq!(dominfo["template"]["name"], "t1");
    assert_eq!(dominfo["template"]["digest"], digest.as_str());
    assert_eq!(dominfo["template"]["mode"], "cow");
    assert_eq!(dominfo["persistent"], false);
    let listed = env.ok(&["list"]);
    assert!(
        listed.contains("inst1") && listed.contains("inst2"),
        "{listed}"
    );

    let err = env.fails(&["template", "rm", "t1"]);
    assert!(
        err.contains("in use") && err.contains("inst1") && err.contains("inst2"),
        "{err}"
    );
    let list = env.json(&["template", "list"]);
    assert_eq!(list[0]["in_use"], true);
    env.ok(&["template", "verify", "t1"]);

    env.ok(&["destroy", "inst1"]);
    env.ok(&["destroy", "inst2"]);
    let out = env.ok(&["template", "rm", "t1"]);
    assert!(out.contains("removed"), "{out}");
    assert!(env
        .json(&["template", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(env.objects(), 0);
    let err = env.fails(&["start", "inst3", "--template", "t1"]);
    assert!(err.contains("no template named"), "{err}");

    // The source VM was left paused and still runs when resumed.
    env.ok(&["resume", "vm1"]);
    assert_eq!(env.domstate("vm1"), "running");
    env.ok(&["destroy", "vm1"]);
}

#[test]
fn identical_templates_are_stored_once() {
    require_kvm();
    let env = Env::new("dedup");
    env.boot_serve("vm1");
    let a = env.json(&["template", "create", "a", "--from-vm", "vm1"]);
    assert_eq!(a["vm_state"], "paused");
    // The VM is still paused: nothing changed, so the second template is the same content.
    let b = env.json(&["template", "create", "b", "--from-vm", "vm1", "--resume"]);
    assert_eq!(b["vm_state"], "running");
    assert_eq!(env.domstate("vm1"), "running");
    assert_eq!(
        a["digest"], b["digest"],
        "two snapshots of one paused VM differ"
    );
    assert_eq!(b["deduplicated"], true);
    assert_eq!(env.objects(), 1);
    let names: Vec<String> = env
        .json(&["template", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
    // Removing one name keeps the object for the other.
    env.ok(&["template", "rm", "a"]);
    assert_eq!(env.objects(), 1);
    env.ok(&["template", "verify", "b"]);
}

#[test]
fn verify_detects_a_flipped_image_byte() {
    require_kvm();
    let env = Env::new("flip");
    let heap_base = env.boot_serve("vm1");
    let created = env.json(&["template", "create", "t", "--from-vm", "vm1", "--resume"]);
    let digest = created["digest"].as_str().unwrap().to_string();

    // Corrupt a copy of the store, never the original.
    let scratch = env.root.join("scratch");
    let status = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(env.store())
        .arg(&scratch)
        .status()
        .unwrap();
    assert!(status.success());
    let image = scratch.join("objects").join(&digest).join("mem-0.img");
    {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        // A byte of the heap, which region 0 (guest address 0) holds at its guest address.
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, heap_base + 100).unwrap();
        file.write_all_at(&[byte[0] ^ 0x01], heap_base + 100)
            .unwrap();
    }

    let out = env
        .command_with_store(&scratch, &["template", "verify", "t"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "verify passed a corrupted image");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("template 't'") && err.contains("mem-0.img") && err.contains("corrupted"),
        "{err}"
    );
    // The original is untouched and still verifies.
    env.ok(&["template", "verify", "t"]);
    env.ok(&["destroy", "vm1"]);
}
