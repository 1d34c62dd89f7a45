//! One sandbox: a `trenv` process restored from a function's template, in a directory of its own (its API
//! socket, its vsock socket, its console and log output, and a `pid` file for cleaning up after a pool
//! that was killed).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::ApiClient;

use super::config::SANDBOX_VSOCK;
use super::spawner;

/// The longest answer line a guest may send.
const MAX_ANSWER: usize = 4096;
/// How long a VMM whose connection closed may take to be seen exiting.
const EXIT_GRACE: Duration = Duration::from_millis(300);
/// The name of the file in a sandbox directory that holds its VMM's pid.
pub const PID_FILE: &str = "pid";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot create the sandbox directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("the sandbox's VMM did not come up: {0}")]
    NotReady(String),
    #[error("the template cannot be used: {0}")]
    Template(String),
    #[error("repurposing failed: {0}")]
    Repurpose(String),
    #[error("parking failed: {0}")]
    Park(String),
    #[error("the guest did not answer: {0}")]
    Guest(String),
    #[error("the sandbox's VMM exited mid-invocation ({status}){console}")]
    Exited { status: String, console: String },
}

/// How to start a sandbox.
pub struct Launch<'a> {
    pub trenv: &'a Path,
    pub dir: PathBuf,
    pub id: u64,
    pub template: &'a Path,
    /// Run the guest at once (else it stays paused, e.g. to be parked).
    pub resume: bool,
    pub timeout: Duration,
}

pub struct Sandbox {
    pub id: u64,
    dir: PathBuf,
    child: Child,
    api: ApiClient,
}

impl Sandbox {
    /// Starts `trenv` restoring the template, with the template's vsock device on this sandbox's own
    /// socket, and waits for its API.
    pub fn restore(launch: Launch<'_>) -> Result<Sandbox, SandboxError> {
        let Launch {
            trenv,
            dir,
            id,
            template,
            resume,
            timeout,
        } = launch;
        let cid = super::config::template_vsock_cid(template).map_err(SandboxError::Template)?;
        std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Dir {
            path: dir.clone(),
            source,
        })?;
        let file = |name: &str| {
            std::fs::File::create(dir.join(name)).map_err(|source| SandboxError::Dir {
                path: dir.clone(),
                source,
            })
        };
        let api_socket = dir.join("api.sock");
        let restore = format!(
            "source_url=file://{},memory_restore_mode=cow,resume={}",
            template.display(),
            if resume { "on" } else { "off" }
        );
        let mut command = Command::new(trenv);
        command
            .current_dir(&dir)
            .arg("--api-socket")
            .arg(&api_socket)
            .arg("--restore")
            .arg(&restore)
            // Relative to the sandbox directory (no comma or length trouble with long paths); the
            // template's serial settings stay, so repurposing keeps the devices as they are.
            .arg("--vsock")
            .arg(format!("cid={cid},socket={SANDBOX_VSOCK}"))
            .stdin(Stdio::null())
            .stdout(file("console.log")?)
            .stderr(file("vmm.log")?);
        let child = spawner::spawn(command).map_err(|source| SandboxError::Spawn {
            binary: trenv.to_path_buf(),
            source,
        })?;
        let mut sandbox = Sandbox {
            id,
            dir,
            child,
            api: ApiClient::new(api_socket).with_timeout(timeout),
        };
        // Best effort: only a later pool's cleanup of this directory reads it.
        let _ = std::fs::write(sandbox.dir.join(PID_FILE), sandbox.child.id().to_string());
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = sandbox.child.try_wait() {
                let log = std::fs::read_to_string(sandbox.dir.join("vmm.log")).unwrap_or_default();
                return Err(SandboxError::NotReady(format!(
                    "exited ({status}): {}",
                    log.trim()
                )));
            }
            let probe = ApiClient::new(sandbox.api.socket()).with_timeout(timeout);
            if let Ok((200, _)) = probe.request("GET", "vmm.ping", None, &[]) {
                return Ok(sandbox);
            }
            if Instant::now() >= deadline {
                return Err(SandboxError::NotReady("no API within the timeout".into()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Switches the VM to another function's template (`vm.repurpose`). Returns whether it was done in
    /// place.
    pub fn repurpose(&mut self, template: &Path) -> Result<bool, SandboxError> {
        let body = serde_json::json!({
            "template": format!("file://{}", template.display()),
            "resume": true,
        });
        let reply = self
            .api
            .call("PUT", "vm.repurpose", Some(&body.to_string()), &[])
            .map_err(|e| SandboxError::Repurpose(e.to_string()))?
            .map_err(|(status, e)| SandboxError::Repurpose(format!("{status}: {e}")))?;
        let value: serde_json::Value = serde_json::from_str(&reply).unwrap_or_default();
        Ok(value["in_place"].as_bool().unwrap_or(false))
    }

    /// Pauses the VM and drops its guest memory (`vm.park`): it costs the VMM's own memory until its next
    /// repurpose.
    pub fn park(&mut self) -> Result<(), SandboxError> {
        self.api
            .call("PUT", "vm.park", None, &[])
            .map_err(|e| SandboxError::Park(e.to_string()))?
            .map_err(|(status, e)| SandboxError::Park(format!("{status}: {e}")))?;
        Ok(())
    }

    /// Sends one request line to the guest's `port` through the hybrid vsock socket and returns its answer
    /// line. A guest whose device is not up yet (just restored) is retried until the deadline; a VMM that
    /// exits (a crashed guest powers off) ends the wait at once.
    pub fn invoke(
        &mut self,
        port: u32,
        payload: &str,
        timeout: Duration,
    ) -> Result<String, SandboxError> {
        let deadline = Instant::now() + timeout;
        let socket = self.dir.join(SANDBOX_VSOCK);
        loop {
            let failure = match exchange(&socket, port, payload, deadline) {
                Ok(answer) => return Ok(answer),
                Err(Attempt::Retry(e)) if Instant::now() < deadline => {
                    if let Some(exited) = self.exited(Duration::ZERO) {
                        return Err(exited);
                    }
                    log::debug!("sandbox {}: {e}; retrying", self.id);
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(Attempt::Retry(e)) | Err(Attempt::Fatal(e)) => e,
            };
            // A connection that broke is most often a VMM that is going away: say that, not "closed".
            return Err(self
                .exited(EXIT_GRACE)
                .unwrap_or(SandboxError::Guest(failure)));
        }
    }

    /// If the VMM has exited (waiting up to `grace` for it), why, with the end of its console output.
    fn exited(&mut self, grace: Duration) -> Option<SandboxError> {
        let deadline = Instant::now() + grace;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return None,
            }
        };
        let console = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&console);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Some(SandboxError::Exited {
            status: status.to_string(),
            console: if last.is_empty() {
                String::new()
            } else {
                format!("; its console ends with: {}", last.trim())
            },
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the VMM process has exited (and is reaped).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

enum Attempt {
    /// Nothing reached the guest (no connection yet): safe to try again.
    Retry(String),
    Fatal(String),
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then_some(left)
}

/// Reads up to and including `\n`, byte by byte (nothing after the line may be consumed), within `limit`.
fn read_line(stream: &mut UnixStream, limit: usize, deadline: Instant) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let left = remaining(deadline).ok_or("timed out")?;
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut byte) {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= limit => return Err("line too long".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    String::from_utf8(line).map_err(|_| "not UTF-8".to_string())
}

fn exchange(socket: &Path, port: u32, payload: &str, deadline: Instant) -> Result<String, Attempt> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| Attempt::Retry(format!("vsock socket: {e}")))?;
    let left = remaining(deadline).ok_or(Attempt::Fatal("timed out".into()))?;
    let _ = stream.set_write_timeout(Some(left));
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| Attempt::Retry(format!("CONNECT: {e}")))?;
    let ok = read_line(&mut stream, 64, deadline).map_err(|e| {
        if e == "timed out" {
            Attempt::Fatal(format!("no answer to CONNECT {port}"))
        } else {
            Attempt::Retry(format!("CONNECT {port}: {e}"))
        }
    })?;
    if !ok.starts_with("OK ") {
        return Err(Attempt::Retry(format!("CONNECT {port}: {ok:?}")));
    }
    stream
        .write_all(format!("{payload}\n").as_bytes())
        .map_err(|e| Attempt::Fatal(format!("sending the payload: {e}")))?;
    let answer = read_line(&mut stream, MAX_ANSWER, deadline).map_err(Attempt::Fatal)?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(answer)
}

impl Drop for Sandbox {
    /// The VMM process is killed and reaped, and its directory removed: nothing outlives the sandbox.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes sandbox directories a previous pool left in `work_dir` (it was killed), killing any VMM still
/// running in one (its pid file names it, and its working directory must be that directory, so a reused
/// pid is never hit). Returns how many directories were removed.
pub fn remove_stale(work_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let path = entry.path();
        if !name.to_string_lossy().starts_with("sandbox-") || !path.is_dir() {
            continue;
        }
        let pid = std::fs::read_to_string(path.join(PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|&p| p > 0);
        if let Some(pid) = pid {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
            if cwd.is_some() && cwd == std::fs::canonicalize(&path).ok() {
                log::warn!("killing VMM {pid} left running in {}", path.display());
                // SAFETY: kill has no memory-safety preconditions; the pid was checked just above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_stale_sandbox_directories() {
        let dir = std::env::temp_dir().join(format!("trenv-pool-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["sandbox-1", "sandbox-7", "other"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // A pid file naming a live process that does not run there (this test) must not get it killed.
        std::fs::write(
            dir.join("sandbox-1").join(PID_FILE),
            std::process::id().to_string(),
        )
        .unwrap();
        std::fs::write(dir.join("sandbox-9"), "a file, not a sandbox").unwrap();
        assert_eq!(remove_stale(&dir), 2);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["other", "sandbox-9"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
