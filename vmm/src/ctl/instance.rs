//! Running VMs: each is a detached `trenv` process serving its API on `<run-dir>/<name>/api.sock`. This
//! module starts one (spawn, wait for `vmm.ping`, `vm.create`, `vm.boot`; or, from a template, spawn with
//! `--restore` and wait for `vmm.ping`), finds out whether one is alive (pid file plus /proc, guarding
//! against pid reuse), talks to it, stops it and cleans up after it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::paths::{Dirs, VmPaths};
use super::store::write_atomic;
use super::CtlError;

/// How long a new VMM gets to answer `vmm.ping` (Kata allows 10 s too).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `shutdown` waits for the VMM process to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A run dir without a pid file younger than this is a `start` in progress, not debris.
const STARTING_GRACE: Duration = Duration::from_secs(30);

/// What `start` records in the run dir for later commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    pub persistent: bool,
    /// Unix time in seconds.
    pub started_at: u64,
    pub pid: u32,
    /// The config as sent to `vm.create` (for a restored VM: the template's, with the serial console
    /// moved to this VM's socket).
    pub config: Value,
    /// The template a restored VM came from; None for a booted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRecord>,
}

/// Which template a restored VM maps, as recorded in its run dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// The name it was started by (or the digest, when started by digest).
    pub name: String,
    pub digest: String,
    /// The store object directory the VMM restored from.
    pub dir: PathBuf,
    /// cow, copy or ondemand.
    pub mode: String,
}

/// A start that restores from a template instead of booting.
pub struct RestoreRequest {
    pub template: TemplateRecord,
    /// Run the guest at once; otherwise it stays paused until `vm.resume`.
    pub resume: bool,
}

/// What the run dir says about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// No run dir.
    Absent,
    /// A run dir whose process is gone; it has been removed.
    Stale,
    /// A `start` that has not written its pid file yet.
    Starting,
    Alive(u32),
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// True when `pid` is a live (not zombie) process whose command line names `api_socket`, so a recycled
/// pid never passes for our VMM.
/// Whether `pid` is still running at all (not gone, not a zombie).
fn process_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ')'.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    match state {
        // A dead main thread shows as a zombie while other threads are still exiting, and until the last
        // of them is gone the process keeps its descriptors (a template's lease among them).
        Some("Z") | Some("X") | Some("x") => other_threads_alive(pid),
        None => false,
        Some(_) => true,
    }
}

/// Whether threads besides the (dead) main one are still in the thread group of `pid`.
fn other_threads_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        })
        .is_some_and(|threads| threads > 1)
}

pub fn is_our_vmm(pid: u32, api_socket: &Path) -> bool {
    if !process_running(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let socket = api_socket.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == socket)
}

fn read_pid(paths: &VmPaths) -> Option<u32> {
    std::fs::read_to_string(&paths.pid)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Removes a VM's run dir (sockets, log, pid file).
pub fn clean(paths: &VmPaths) -> Result<(), CtlError> {
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CtlError::Io {
            what: format!("cannot remove {}", paths.dir.display()),
            source: e,
        }),
    }
}

/// Finds out whether `name` runs; a run dir whose process is gone is cleaned on the way.
pub fn probe(dirs: &Dirs, name: &str) -> Result<Liveness, CtlError> {
    let paths = dirs.vm(name);
    let Ok(meta) = std::fs::metadata(&paths.dir) else {
        return Ok(Liveness::Absent);
    };
    match read_pid(&paths) {
        Some(pid) if is_our_vmm(pid, &paths.api_socket) => Ok(Liveness::Alive(pid)),
        Some(_) => {
            clean(&paths)?;
            Ok(Liveness::Stale)
        }
        None => {
            let young = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age < STARTING_GRACE);
            if young {
                Ok(Liveness::Starting)
            } else {
                clean(&paths)?;
                Ok(Liveness::Stale)
            }
        }
    }
}

/// Names with a run dir, sorted.
pub fn running_names(dirs: &Dirs) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(&dirs.run) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| super::paths::validate_name(n).is_ok())
        .collect();
    names.sort();
    names
}

pub fn read_meta(paths: &VmPaths) -> Option<Meta> {
    serde_json::from_str(&std::fs::read_to_string(&paths.meta).ok()?).ok()
}

/// The last few lines of the VMM's log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// One API call to the VM `name`; a non-2xx answer becomes `CtlError::Api` with the server's message.
pub fn call(
    name: &str,
    paths: &VmPaths,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> Result<String, CtlError> {
    // A wedged VMM must not hang trenvctl; boot of the test guest or a small Linux takes far less.
    let client = api::client::ApiClient::new(&paths.api_socket).with_timeout(CALL_TIMEOUT);
    let (status, text) =
        client
            .request(method, endpoint, body, &[])
            .map_err(|e| CtlError::Client {
                name: name.to_string(),
                endpoint: endpoint.to_string(),
                message: crate::error_chain(&e),
            })?;
    if (200..300).contains(&status) {
        Ok(text)
    } else {
        Err(CtlError::Api {
            name: name.to_string(),
            endpoint: endpoint.to_string(),
            status,
            message: crate::remote::error_body_text(&text),
        })
    }
}

/// `vm.info`, parsed.
pub fn info(name: &str, paths: &VmPaths) -> Result<Value, CtlError> {
    let text = call(name, paths, "GET", "vm.info", None)?;
    serde_json::from_str(&text).map_err(|e| CtlError::Client {
        name: name.to_string(),
        endpoint: "vm.info".into(),
        message: format!("answer is not JSON: {e}"),
    })
}

/// virsh-style state words for the API's VM states.
pub fn state_word(api_state: &str) -> &'static str {
    match api_state {
        "Running" => "running",
        "Paused" => "paused",
        "Created" => "created",
        "Shutdown" => "shut off",
        _ => "unknown",
    }
}

/// Forces the serial port onto the console socket unless the config sends it to a file.
pub fn console_config(config: &Value, console_socket: &Path) -> Value {
    let mut config = config.clone();
    let to_file = config
        .get("serial")
        .and_then(|s| s.get("mode"))
        .and_then(Value::as_str)
        == Some("File");
    if !to_file {
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "serial".into(),
                json!({"mode": "Socket", "socket": console_socket}),
            );
        }
    }
    config
}

/// Parameters of one `start`.
pub struct StartRequest<'a> {
    pub name: &'a str,
    /// The VM config to create (for a restore: the template's, recorded only).
    pub config: &'a Value,
    pub persistent: bool,
    pub trenv: &'a Path,
    /// Restore from a template instead of `vm.create` + `vm.boot`.
    pub restore: Option<&'a RestoreRequest>,
}

/// The arguments that make `trenv` restore `req` with its serial console on `console_socket`. The
/// VMM splits `--restore` and `--serial` at commas and trims items, so paths that would not survive that
/// are refused here rather than misread there.
pub fn restore_args(
    req: &RestoreRequest,
    console_socket: &Path,
) -> Result<Vec<OsString>, CtlError> {
    let dir = req.template.dir.to_str().filter(|d| option_safe(d));
    let socket = console_socket.to_str().filter(|s| option_safe(s));
    let (Some(dir), Some(socket)) = (dir, socket) else {
        let bad = if dir.is_none() {
            &req.template.dir
        } else {
            console_socket
        };
        return Err(CtlError::UnusablePath(bad.to_path_buf()));
    };
    let mut spec = format!(
        "source_url=file://{dir},memory_restore_mode={}",
        req.template.mode
    );
    if req.resume {
        spec.push_str(",resume=on");
    }
    Ok(vec![
        "--restore".into(),
        spec.into(),
        "--serial".into(),
        format!("socket={socket}").into(),
    ])
}

/// An absolute UTF-8 path the VMM's `key=value,...` option syntax carries unchanged.
fn option_safe(path: &str) -> bool {
    path.starts_with('/') && !path.contains(',') && path.trim() == path
}

/// The config recorded for a VM restored with its serial console on `console_socket`.
pub fn restored_config(template_config: &Value, console_socket: &Path) -> Value {
    let mut config = template_config.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "serial".into(),
            json!({"mode": "Socket", "socket": console_socket}),
        );
    }
    config
}

/// Spawns a detached VMM for `req.name`, creates and boots the VM; on any failure kills the VMM and
/// removes the run dir. Returns the VMM's pid.
pub fn start(dirs: &Dirs, req: &StartRequest<'_>) -> Result<u32, CtlError> {
    let paths = dirs.vm(req.name);
    paths.check_socket_lengths()?;
    match probe(dirs, req.name)? {
        Liveness::Alive(_) | Liveness::Starting => {
            return Err(CtlError::AlreadyRunning(req.name.to_string()))
        }
        Liveness::Absent | Liveness::Stale => {}
    }
    std::fs::create_dir_all(&dirs.run).map_err(|e| CtlError::Io {
        what: format!("cannot create {}", dirs.run.display()),
        source: e,
    })?;
    // create_dir (not _all) is the lock: two concurrent starts of one name cannot both get here.
    if let Err(e) = std::fs::create_dir(&paths.dir) {
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            CtlError::AlreadyRunning(req.name.to_string())
        } else {
            CtlError::Io {
                what: format!("cannot create {}", paths.dir.display()),
                source: e,
            }
        });
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o700));
    }
    let result = spawn_and_boot(&paths, req);
    if result.is_err() {
        if let Some(pid) = read_pid(&paths) {
            kill_and_wait(pid, &paths.api_socket);
        }
        let _ = clean(&paths);
    }
    result
}

fn spawn_and_boot(paths: &VmPaths, req: &StartRequest<'_>) -> Result<u32, CtlError> {
    let io_err = |what: String| move |e: std::io::Error| CtlError::Io { what, source: e };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(io_err(format!("cannot open {}", paths.log.display())))?;
    let log2 = log
        .try_clone()
        .map_err(io_err("cannot duplicate the log descriptor".into()))?;
    let mut command = Command::new(req.trenv);
    if let Some(restore) = req.restore {
        command.args(restore_args(restore, &paths.console_socket)?);
    }
    command
        .arg("--api-socket")
        .arg(&paths.api_socket)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: setsid is async-signal-safe; it detaches the VMM from our session and terminal so that it
    // outlives trenvctl and a closing terminal does not hang it up.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| CtlError::Spawn {
        binary: req.trenv.to_path_buf(),
        source: e,
    })?;
    let pid = child.id();
    write_atomic(&paths.pid, format!("{pid}\n").as_bytes())
        .map_err(io_err(format!("cannot write {}", paths.pid.display())))?;

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(CtlError::VmmExited {
                name: req.name.to_string(),
                status: status.to_string(),
                log: log_tail(&paths.log),
            });
        }
        if paths.api_socket.exists() && call(req.name, paths, "GET", "vmm.ping", None).is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CtlError::Timeout {
                name: req.name.to_string(),
                what: format!(
                    "the VMM to answer on {} within {} s (log: {})",
                    paths.api_socket.display(),
                    READY_TIMEOUT.as_secs(),
                    log_tail(&paths.log)
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let config = match req.restore {
        Some(_) => restored_config(req.config, &paths.console_socket),
        None => console_config(req.config, &paths.console_socket),
    };
    let meta = Meta {
        name: req.name.to_string(),
        persistent: req.persistent,
        started_at: now_unix(),
        pid,
        config: config.clone(),
        template: req.restore.map(|r| r.template.clone()),
    };
    write_atomic(
        &paths.meta,
        serde_json::to_string_pretty(&meta)
            .unwrap_or_default()
            .as_bytes(),
    )
    .map_err(io_err(format!("cannot write {}", paths.meta.display())))?;
    // A restoring VMM answers its first ping only once the restore is done (or exits if it failed), so
    // there is nothing left to ask it for.
    if req.restore.is_none() {
        call(
            req.name,
            paths,
            "PUT",
            "vm.create",
            Some(&config.to_string()),
        )?;
        call(req.name, paths, "PUT", "vm.boot", None)?;
    }
    // The child is not waited for: it is detached and outlives us (init reaps it).
    drop(child);
    Ok(pid)
}

/// Waits until `pid` is no longer our VMM; true if it went within `timeout`.
pub fn wait_gone(pid: u32, api_socket: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    if !is_our_vmm(pid, api_socket) {
        return true;
    }
    // Once it is known to be ours, wait on the process itself: an exiting process loses its command line
    // (its memory is torn down) before it stops running.
    wait_stopped(pid, deadline.saturating_duration_since(Instant::now()))
}

/// Waits until `pid` no longer runs (gone or a zombie).
fn wait_stopped(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_running(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// SIGKILLs our VMM (after checking it is ours) and waits for it to go.
pub fn kill_and_wait(pid: u32, api_socket: &Path) -> bool {
    if !is_our_vmm(pid, api_socket) {
        return true;
    }
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with a pid we just verified is our VMM.
    unsafe { libc::kill(raw, libc::SIGKILL) };
    wait_stopped(pid, Duration::from_secs(5))
}

/// Graceful stop: `vm.shutdown` (tolerated to fail when the VM is not running), then `vmm.shutdown`, then
/// wait for the process to exit and clean the run dir.
pub fn shutdown(dirs: &Dirs, name: &str, pid: u32) -> Result<(), CtlError> {
    let paths = dirs.vm(name);
    if let Err(e) = call(name, &paths, "PUT", "vm.shutdown", None) {
        log::debug!("{e}");
    }
    // The VMM may close the connection while exiting; the wait below is what decides success.
    let _ = call(name, &paths, "PUT", "vmm.shutdown", None);
    if !wait_gone(pid, &paths.api_socket, EXIT_TIMEOUT) {
        return Err(CtlError::Timeout {
            name: name.to_string(),
            what: format!(
                "the VMM (pid {pid}) to exit within {} s; use 'trenvctl destroy {name}'",
                EXIT_TIMEOUT.as_secs()
            ),
        });
    }
    clean(&paths)
}

/// Hard stop: kill the process, clean the run dir.
pub fn destroy(dirs: &Dirs, name: &str, pid: u32) -> Result<(), CtlError> {
    let paths = dirs.vm(name);
    if !kill_and_wait(pid, &paths.api_socket) {
        return Err(CtlError::Timeout {
            name: name.to_string(),
            what: format!("the VMM (pid {pid}) to die after SIGKILL"),
        });
    }
    clean(&paths)
}

/// Seconds since `meta.started_at`.
pub fn uptime_s(meta: &Meta) -> u64 {
    now_unix().saturating_sub(meta.started_at)
}

/// The socket path of `name`'s console, for error messages and `dominfo`.
pub fn console_path(dirs: &Dirs, name: &str) -> PathBuf {
    dirs.vm(name).console_socket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_forced_to_the_console_socket_unless_a_file() {
        let sock = Path::new("/run/trenv/vm/console.sock");
        let c = console_config(
            &json!({"serial": {"mode": "Tty"}, "memory": {"size": 1}}),
            sock,
        );
        assert_eq!(
            c["serial"],
            json!({"mode": "Socket", "socket": "/run/trenv/vm/console.sock"})
        );
        assert_eq!(c["memory"]["size"], 1);
        let c = console_config(&json!({}), sock);
        assert_eq!(c["serial"]["mode"], "Socket");
        let file = json!({"serial": {"mode": "File", "file": "/tmp/s.log"}});
        assert_eq!(console_config(&file, sock), file);
    }

    fn restore_request(dir: &str, resume: bool) -> RestoreRequest {
        RestoreRequest {
            template: TemplateRecord {
                name: "t1".into(),
                digest: "ab".repeat(32),
                dir: dir.into(),
                mode: "cow".into(),
            },
            resume,
        }
    }

    #[test]
    fn restore_arguments() {
        let sock = Path::new("/run/trenv/i1/console.sock");
        let args = restore_args(&restore_request("/store/objects/abc", true), sock).unwrap();
        assert_eq!(
            args,
            [
                "--restore",
                "source_url=file:///store/objects/abc,memory_restore_mode=cow,resume=on",
                "--serial",
                "socket=/run/trenv/i1/console.sock"
            ]
        );
        let paused = restore_args(&restore_request("/s", false), sock).unwrap();
        assert_eq!(paused[1], "source_url=file:///s,memory_restore_mode=cow");
        for bad in ["/a,b", "relative/dir", "/trailing "] {
            assert!(matches!(
                restore_args(&restore_request(bad, true), sock),
                Err(CtlError::UnusablePath(_))
            ));
        }
        assert!(restore_args(&restore_request("/s", true), Path::new("/r,x/c.sock")).is_err());
    }

    #[test]
    fn restored_config_always_uses_the_console_socket() {
        let sock = Path::new("/r/i1/console.sock");
        let template = json!({"serial": {"mode": "File", "file": "/tmp/origin.log"}, "cpus": {"boot_vcpus": 2}});
        let c = restored_config(&template, sock);
        assert_eq!(
            c["serial"],
            json!({"mode": "Socket", "socket": "/r/i1/console.sock"})
        );
        assert_eq!(c["cpus"]["boot_vcpus"], 2);
        // Records written before templates existed still parse.
        let old = r#"{"name":"a","persistent":false,"started_at":1,"pid":2,"config":{}}"#;
        assert!(serde_json::from_str::<Meta>(old)
            .unwrap()
            .template
            .is_none());
    }

    #[test]
    fn liveness_checks_the_command_line() {
        // This test process is alive but is not a VMM serving that socket.
        assert!(!is_our_vmm(
            std::process::id(),
            Path::new("/no/such/api.sock")
        ));
        assert!(!is_our_vmm(u32::MAX, Path::new("/x")));
    }

    #[test]
    fn stale_run_dirs_are_cleaned() {
        let root = std::env::temp_dir().join(format!("trenvctl-instance-{}", std::process::id()));
        let dirs = Dirs::resolve(Some(root.join("run")), Some(root.join("state")));
        assert_eq!(probe(&dirs, "vm").unwrap(), Liveness::Absent);
        let paths = dirs.vm("vm");
        std::fs::create_dir_all(&paths.dir).unwrap();
        assert_eq!(probe(&dirs, "vm").unwrap(), Liveness::Starting);
        // A pid that is certainly not a VMM serving this socket: our own.
        std::fs::write(&paths.pid, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(running_names(&dirs), vec!["vm".to_string()]);
        assert_eq!(probe(&dirs, "vm").unwrap(), Liveness::Stale);
        assert!(!paths.dir.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn states_and_log_tail() {
        assert_eq!(state_word("Running"), "running");
        assert_eq!(state_word("Shutdown"), "shut off");
        assert_eq!(state_word("Bogus"), "unknown");
        let f = std::env::temp_dir().join(format!("trenvctl-log-{}", std::process::id()));
        std::fs::write(&f, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(log_tail(&f), "b | c | d");
        std::fs::remove_file(&f).unwrap();
    }
}
