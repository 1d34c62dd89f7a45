//! One sandbox: a `trenv` process restored from a function's template, in a directory of its own (its API
//! socket, the vsock socket its template names relatively, and its console and log output).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::ApiClient;

use super::config::SANDBOX_VSOCK;

/// The longest answer line a guest may send.
const MAX_ANSWER: usize = 4096;

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
    #[error("repurposing failed: {0}")]
    Repurpose(String),
    #[error("the guest did not answer: {0}")]
    Guest(String),
}

pub struct Sandbox {
    pub id: u64,
    pub function: String,
    dir: PathBuf,
    child: Child,
    api: ApiClient,
}

impl Sandbox {
    /// Starts `trenv` restoring `template` (resumed), and waits for its API.
    pub fn restore(
        trenv: &Path,
        dir: PathBuf,
        id: u64,
        function: &str,
        template: &Path,
        timeout: Duration,
    ) -> Result<Sandbox, SandboxError> {
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
            "source_url=file://{},memory_restore_mode=cow,resume=on",
            template.display()
        );
        // The template's own vsock (relative `vsock.sock`) and serial settings apply: the sandbox runs in
        // its directory, and keeping the template's devices as they are lets repurposing work in place.
        let child = Command::new(trenv)
            .current_dir(&dir)
            .arg("--api-socket")
            .arg(&api_socket)
            .arg("--restore")
            .arg(&restore)
            .stdin(Stdio::null())
            .stdout(file("console.log")?)
            .stderr(file("vmm.log")?)
            .spawn()
            .map_err(|source| SandboxError::Spawn {
                binary: trenv.to_path_buf(),
                source,
            })?;
        let mut sandbox = Sandbox {
            id,
            function: function.to_string(),
            dir,
            child,
            api: ApiClient::new(api_socket).with_timeout(timeout),
        };
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
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Switches the running VM to another function's template (`vm.repurpose`). Returns whether it was
    /// done in place.
    pub fn repurpose(&mut self, function: &str, template: &Path) -> Result<bool, SandboxError> {
        let body = serde_json::json!({
            "template": format!("file://{}", template.display()),
            "resume": true,
        });
        let reply = self
            .api
            .call("PUT", "vm.repurpose", Some(&body.to_string()), &[])
            .map_err(|e| SandboxError::Repurpose(e.to_string()))?
            .map_err(|(status, e)| SandboxError::Repurpose(format!("{status}: {e}")))?;
        self.function = function.to_string();
        let value: serde_json::Value = serde_json::from_str(&reply).unwrap_or_default();
        Ok(value["in_place"].as_bool().unwrap_or(false))
    }

    /// Sends one request line to the guest's `port` through the hybrid vsock socket and returns its answer
    /// line. A guest whose device is not up yet (just restored) is retried until the deadline.
    pub fn invoke(
        &self,
        port: u32,
        payload: &str,
        timeout: Duration,
    ) -> Result<String, SandboxError> {
        let deadline = Instant::now() + timeout;
        let socket = self.dir.join(SANDBOX_VSOCK);
        loop {
            match exchange(&socket, port, payload, deadline) {
                Ok(answer) => return Ok(answer),
                Err(Attempt::Retry(e)) if Instant::now() < deadline => {
                    log::debug!("sandbox {}: {e}; retrying", self.id);
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(Attempt::Retry(e)) | Err(Attempt::Fatal(e)) => {
                    return Err(SandboxError::Guest(e))
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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
