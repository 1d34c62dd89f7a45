//! The `trenv` policy's pool: started as a process of its own (this binary in pool mode, running
//! `vmm::pool` as `trenv-pool` does), stopped with SIGTERM, and checked for sandboxes that outlive it.

use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::function::Function;
use super::memory::{is_vmm, processes};
use super::{Params, POOL_INVOKE_TIMEOUT_MS, PORT, TIMEOUT};
use crate::common::Scratch;

/// First argument that turns this binary into the pool process.
pub const POOL_MODE: &str = "__pool";
/// The name under which this binary acts as `trenv` (the pool starts sandboxes by that name).
pub const TRENV_NAME: &str = "trenv";

pub struct PoolProcess {
    child: Child,
    pub socket: PathBuf,
}

impl PoolProcess {
    /// Sandbox VMMs the pool runs now.
    fn sandboxes(&self) -> Vec<u32> {
        let pool = self.child.id();
        processes()
            .into_iter()
            .filter(|(_, ppid, z, args)| *ppid == pool && !z && is_vmm(args))
            .map(|p| p.0)
            .collect()
    }

    /// SIGTERM, as an operator stops it; returns how many of its sandbox VMMs outlived it.
    pub fn stop(mut self) -> usize {
        let sandboxes = self.sandboxes();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Sandboxes still running now outlived their pool: count them, and do not leave them running.
        processes()
            .iter()
            .filter(|(pid, _, z, args)| sandboxes.contains(pid) && !z && is_vmm(args))
            .inspect(|(pid, _, _, _)| {
                // SAFETY: a VMM process this benchmark's pool started.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            })
            .count()
    }
}

pub fn start_pool(
    scratch: &Scratch,
    functions: &[Function],
    p: &Params,
) -> Result<PoolProcess, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // The pool starts sandboxes by running `trenv`: a link to this binary, which acts as the VMM under
    // that name (main.rs), so nothing but this binary needs building.
    let trenv = scratch.path(TRENV_NAME);
    if !trenv.exists() {
        std::os::unix::fs::symlink(&exe, &trenv).map_err(|e| e.to_string())?;
    }
    let mut config = json!({
        "functions": functions.iter().map(|f| (f.name.clone(), json!({
            "template": format!("file://{}", f.template.display()),
            "port": PORT,
        }))).collect::<serde_json::Map<_, _>>(),
        "max_sandboxes": p.pool_max_sandboxes,
        "keep_alive_ms": p.pool_keep_alive_ms,
        "invoke_timeout_ms": POOL_INVOKE_TIMEOUT_MS,
    });
    // Parked sandboxes the pool makes at start (`prewarm`); sent only when asked for, since a pool
    // without that setting refuses unknown keys.
    if p.pool_prewarm > 0 {
        config["prewarm"] = json!(p.pool_prewarm);
    }
    let config_path = scratch.path("pool.json");
    std::fs::write(&config_path, config.to_string()).map_err(|e| e.to_string())?;
    let socket = scratch.path("pool.sock");
    let log = std::fs::File::create(scratch.path("pool.log")).map_err(|e| e.to_string())?;
    let child = std::process::Command::new(exe)
        .arg(POOL_MODE)
        .args([&config_path, &socket, &trenv, &scratch.path("pool-work")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start the pool: {e}"))?;
    let mut pool = PoolProcess { child, socket };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(Some(status)) = pool.child.try_wait() {
            let log = std::fs::read_to_string(scratch.path("pool.log")).unwrap_or_default();
            return Err(format!("the pool exited ({status}): {}", log.trim()));
        }
        if UnixStream::connect(&pool.socket).is_ok() {
            return Ok(pool);
        }
        if Instant::now() > deadline {
            pool.stop();
            return Err("the pool did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// The pool process (`trenv-bench __pool CONFIG SOCKET TRENV WORK_DIR`): what `trenv-pool` does.

static POOL_STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_pool_signal(_: libc::c_int) {
    POOL_STOP.store(true, Ordering::Relaxed);
}

pub fn pool_main(args: &[OsString]) -> ExitCode {
    use vmm::pool::{http, Pool, PoolConfig};
    let [config, socket, trenv, work_dir] = args else {
        eprintln!("usage: trenv-bench {POOL_MODE} CONFIG SOCKET TRENV WORK_DIR");
        return ExitCode::FAILURE;
    };
    let _ = vmm::logger::init(0, None);
    let result = (|| -> Result<(), String> {
        let config = PoolConfig::from_file(Path::new(config)).map_err(|e| e.to_string())?;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                libc::SIGTERM,
                on_pool_signal as *const () as libc::sighandler_t,
            );
            libc::signal(
                libc::SIGINT,
                on_pool_signal as *const () as libc::sighandler_t,
            );
        }
        let drain = Duration::from_millis(config.invoke_timeout_ms.saturating_mul(3));
        let pool = Pool::new(config, PathBuf::from(trenv), PathBuf::from(work_dir))
            .map_err(|e| format!("cannot start the pool: {e}"))?;
        let pool = Arc::new(pool);
        // Listening last, as trenv-pool does: a connectable socket means the pool is up.
        let _ = std::fs::remove_file(socket);
        let listener = std::os::unix::net::UnixListener::bind(socket)
            .map_err(|e| format!("cannot listen: {e}"))?;
        http::serve(pool.clone(), listener, &POOL_STOP, drain);
        drop(pool);
        let _ = std::fs::remove_file(socket);
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trenv-bench pool: {e}");
            ExitCode::FAILURE
        }
    }
}
