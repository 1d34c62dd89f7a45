//! `trenv-pool`: a warm pool of sandboxes (one `trenv` process each) serving function invocations.
//!
//! An invocation of function F takes, in this order: an idle sandbox already running F (reuse); an idle
//! sandbox of another function, switched to F's template in place (`vm.repurpose`); a new sandbox restored
//! from F's template, if fewer than `max_sandboxes` exist; otherwise it waits for a sandbox to come free
//! (up to `invoke_timeout_ms`, then [`InvokeError::Busy`]). The payload goes to the guest over vsock and
//! its answer line comes back. A sandbox whose guest does not answer, or that fails to repurpose, is
//! destroyed. Idle sandboxes past `keep_alive_ms` are destroyed by a reaper thread. Dropping the pool
//! (or [`Pool::shutdown`]) kills every sandbox process.

pub mod config;
pub mod http;
pub mod sandbox;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use config::PoolConfig;
use sandbox::{Sandbox, SandboxError};

/// How an invocation got its sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    Reuse,
    Repurpose,
    Restore,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Reuse => "reuse",
            Path::Repurpose => "repurpose",
            Path::Restore => "restore",
        }
    }
}

#[derive(Debug)]
pub struct Invocation {
    /// The guest's answer line, without the newline.
    pub answer: String,
    pub path: Path,
    pub sandbox: u64,
    /// For [`Path::Repurpose`]: whether the VMM switched templates in place (else it restored anew).
    pub in_place: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("no function named {0:?}")]
    UnknownFunction(String),
    #[error("the payload must be one line of at most 4096 bytes")]
    BadPayload,
    #[error("every sandbox is busy")]
    Busy,
    #[error("the pool is shutting down")]
    ShuttingDown,
    #[error("sandbox {id}: {source}")]
    Sandbox { id: u64, source: SandboxError },
}

pub const MAX_PAYLOAD: usize = 4096;

struct Slot {
    /// None while the sandbox is being restored (the slot counts against the cap meanwhile).
    sandbox: Option<Sandbox>,
    id: u64,
    busy: bool,
    last_used: Instant,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    stopping: bool,
}

struct Inner {
    config: PoolConfig,
    trenv: PathBuf,
    work_dir: PathBuf,
    state: Mutex<State>,
    freed: Condvar,
    next_id: AtomicU64,
    reaper_stop: AtomicBool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Destroys idle sandboxes unused for longer than keep-alive; returns them to be dropped unlocked.
    fn expired(&self, state: &mut State) -> Vec<Sandbox> {
        let keep = Duration::from_millis(self.config.keep_alive_ms);
        let mut gone = Vec::new();
        state.slots.retain_mut(|s| {
            let expired = !s.busy && s.last_used.elapsed() >= keep;
            if expired {
                gone.extend(s.sandbox.take());
            }
            !expired
        });
        gone
    }
}

pub struct Pool {
    inner: Arc<Inner>,
    reaper: Option<std::thread::JoinHandle<()>>,
}

/// A sandbox taken out of the pool for one invocation.
struct Lease {
    sandbox: Sandbox,
    path: Path,
    in_place: bool,
}

impl Pool {
    /// `trenv` is the VMM binary; sandboxes get directories under `work_dir` (created).
    pub fn new(config: PoolConfig, trenv: PathBuf, work_dir: PathBuf) -> std::io::Result<Pool> {
        std::fs::create_dir_all(&work_dir)?;
        let inner = Arc::new(Inner {
            config,
            trenv,
            work_dir,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
            next_id: AtomicU64::new(1),
            reaper_stop: AtomicBool::new(false),
        });
        let reaper_inner = inner.clone();
        let reaper = std::thread::Builder::new()
            .name("pool-reaper".into())
            .spawn(move || reap(&reaper_inner))?;
        Ok(Pool {
            inner,
            reaper: Some(reaper),
        })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Runs one invocation of `function` with `payload` (one line).
    pub fn invoke(&self, function: &str, payload: &str) -> Result<Invocation, InvokeError> {
        let inner = &*self.inner;
        let f = inner
            .config
            .functions
            .get(function)
            .ok_or_else(|| InvokeError::UnknownFunction(function.to_string()))?;
        if payload.len() > MAX_PAYLOAD || payload.contains('\n') {
            return Err(InvokeError::BadPayload);
        }
        let timeout = Duration::from_millis(inner.config.invoke_timeout_ms);
        let Lease {
            sandbox,
            path,
            in_place,
        } = self.acquire(function, timeout)?;
        let id = sandbox.id;
        match sandbox.invoke(f.port, payload, timeout) {
            Ok(answer) => {
                self.release(sandbox);
                Ok(Invocation {
                    answer,
                    path,
                    sandbox: id,
                    in_place,
                })
            }
            Err(source) => {
                log::warn!("sandbox {id} ({function}) failed: {source}; destroying it");
                self.discard(id, sandbox);
                Err(InvokeError::Sandbox { id, source })
            }
        }
    }

    fn acquire(&self, function: &str, timeout: Duration) -> Result<Lease, InvokeError> {
        let inner = &*self.inner;
        let deadline = Instant::now() + timeout;
        let template = inner
            .config
            .template(function)
            .ok_or_else(|| InvokeError::UnknownFunction(function.to_string()))?;
        let mut state = inner.lock();
        loop {
            if state.stopping {
                return Err(InvokeError::ShuttingDown);
            }
            let idle = |s: &Slot| !s.busy && s.sandbox.is_some();
            let same = state.slots.iter().position(|s| {
                idle(s) && s.sandbox.as_ref().is_some_and(|b| b.function == function)
            });
            if let Some(i) = same {
                let slot = &mut state.slots[i];
                slot.busy = true;
                let sandbox = slot.sandbox.take().expect("idle slots hold a sandbox");
                return Ok(Lease {
                    sandbox,
                    path: Path::Reuse,
                    in_place: false,
                });
            }
            if let Some(i) = state.slots.iter().position(idle) {
                let slot = &mut state.slots[i];
                slot.busy = true;
                let mut sandbox = slot.sandbox.take().expect("idle slots hold a sandbox");
                let id = sandbox.id;
                drop(state);
                return match sandbox.repurpose(function, &template) {
                    Ok(in_place) => {
                        log::info!("sandbox {id} repurposed to {function} (in place: {in_place})");
                        Ok(Lease {
                            sandbox,
                            path: Path::Repurpose,
                            in_place,
                        })
                    }
                    Err(source) => {
                        self.discard(id, sandbox);
                        Err(InvokeError::Sandbox { id, source })
                    }
                };
            }
            if state.slots.len() < inner.config.max_sandboxes {
                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                state.slots.push(Slot {
                    sandbox: None,
                    id,
                    busy: true,
                    last_used: Instant::now(),
                });
                drop(state);
                let dir = inner.work_dir.join(format!("sandbox-{id}"));
                let restored =
                    Sandbox::restore(&inner.trenv, dir, id, function, &template, timeout);
                return match restored {
                    Ok(sandbox) => {
                        log::info!(
                            "sandbox {id} restored for {function} (pid {})",
                            sandbox.pid()
                        );
                        Ok(Lease {
                            sandbox,
                            path: Path::Restore,
                            in_place: false,
                        })
                    }
                    Err(source) => {
                        self.remove_slot(id);
                        Err(InvokeError::Sandbox { id, source })
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(InvokeError::Busy);
            }
            state = inner
                .freed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Puts a sandbox back as idle (or destroys it if the pool is stopping).
    fn release(&self, sandbox: Sandbox) {
        let mut state = self.inner.lock();
        if state.stopping {
            drop(state);
            drop(sandbox);
            return;
        }
        if let Some(slot) = state.slots.iter_mut().find(|s| s.id == sandbox.id) {
            slot.sandbox = Some(sandbox);
            slot.busy = false;
            slot.last_used = Instant::now();
        }
        drop(state);
        self.inner.freed.notify_all();
    }

    fn discard(&self, id: u64, sandbox: Sandbox) {
        drop(sandbox);
        self.remove_slot(id);
    }

    fn remove_slot(&self, id: u64) {
        self.inner.lock().slots.retain(|s| s.id != id);
        self.inner.freed.notify_all();
    }

    /// Sandboxes as JSON: `{"sandboxes": [{"id", "function", "busy", "pid"}]}` (busy ones without a
    /// function: they are out on an invocation).
    pub fn status(&self) -> serde_json::Value {
        let state = self.inner.lock();
        let list: Vec<serde_json::Value> = state
            .slots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "busy": s.busy,
                    "function": s.sandbox.as_ref().map(|b| b.function.clone()),
                    "pid": s.sandbox.as_ref().map(|b| b.pid()),
                })
            })
            .collect();
        serde_json::json!({ "sandboxes": list })
    }

    /// Kills every idle sandbox now and makes busy ones die when their invocation ends.
    pub fn shutdown(&self) {
        let gone: Vec<Sandbox> = {
            let mut state = self.inner.lock();
            state.stopping = true;
            state
                .slots
                .iter_mut()
                .filter_map(|s| s.sandbox.take())
                .collect()
        };
        drop(gone);
        self.inner.freed.notify_all();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.reaper_stop.store(true, Ordering::Relaxed);
        if let Some(reaper) = self.reaper.take() {
            let _ = reaper.join();
        }
        self.shutdown();
    }
}

fn reap(inner: &Inner) {
    while !inner.reaper_stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        let gone = inner.expired(&mut inner.lock());
        if !gone.is_empty() {
            log::info!("destroying {} idle sandbox(es) past keep-alive", gone.len());
            drop(gone);
            inner.freed.notify_all();
        }
    }
}
