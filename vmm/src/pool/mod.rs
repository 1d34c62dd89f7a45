//! `trenv-pool`: a warm pool of sandboxes (one `trenv` process each) serving function invocations.
//!
//! An invocation of function F takes, in this order: an idle sandbox already running F (reuse); an idle
//! sandbox of another function, parked ones first, else the least recently used, switched to F's template
//! in place (`vm.repurpose`); a new sandbox restored from F's template, if the pool stays within
//! `max_sandboxes` and `max_host_mib`; otherwise it waits for a sandbox to come free, up to F's invoke
//! timeout, and then fails with [`InvokeError::Busy`] or [`InvokeError::MemoryCap`] (503). The payload goes
//! to the guest over vsock and its answer line comes back. A sandbox whose guest does not answer in time,
//! crashes (its VMM exits: noticed at once), or fails to repurpose is destroyed (502).
//!
//! A keeper thread destroys idle sandboxes past `keep_alive_ms`, measures every sandbox's PSS and, when
//! they grow past `max_host_mib`, evicts idle ones (parked first, then the least recently used), and keeps
//! `prewarm` parked sandboxes ready. Sandbox processes die with the pool even on SIGKILL (see
//! `spawner`), and a pool starting on a work directory removes what a killed predecessor left there.
//! Dropping the pool (or [`Pool::shutdown`]) kills every sandbox process.

pub mod config;
pub mod http;
pub mod sandbox;
mod spawner;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use config::PoolConfig;
use sandbox::{Launch, Sandbox, SandboxError};

/// How often the keeper looks at the pool.
const TICK: Duration = Duration::from_millis(20);
/// How often it measures the sandboxes' memory.
const MEASURE_EVERY: Duration = Duration::from_millis(200);
/// What a sandbox is assumed to cost before any has been measured.
const DEFAULT_SANDBOX_BYTES: u64 = 8 << 20;
/// How long the keeper waits before trying again after a parked sandbox failed to start.
const PREWARM_BACKOFF: Duration = Duration::from_secs(1);
/// The lock file that makes a work directory one pool's.
const LOCK_FILE: &str = "pool.lock";

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
    /// Whether the VMM switched templates in place: always so for [`Path::Repurpose`] (a template that
    /// does not fit in place is served by a new sandbox, [`Path::Restore`]).
    pub in_place: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("no function named {0:?}")]
    UnknownFunction(String),
    #[error("the payload must be one line of at most 4096 bytes")]
    BadPayload,
    #[error(
        "every sandbox is busy (max_sandboxes={max}) and none came free within {waited_ms} ms"
    )]
    Busy { max: usize, waited_ms: u64 },
    #[error(
        "the host memory cap is reached: {sandboxes} sandbox(es) use {used_mib} MiB of \
         max_host_mib={cap_mib}, none is idle to evict, and none came free within {waited_ms} ms"
    )]
    MemoryCap {
        sandboxes: usize,
        used_mib: u64,
        cap_mib: u64,
        waited_ms: u64,
    },
    #[error("the pool is shutting down")]
    ShuttingDown,
    #[error("sandbox {id}: {source}")]
    Sandbox { id: u64, source: SandboxError },
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot use the work directory {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another trenv-pool uses the work directory {0}")]
    WorkDirBusy(PathBuf),
    #[error("function {function}: {reason}")]
    Template { function: String, reason: String },
    #[error("cannot start the pool's keeper thread: {0}")]
    Thread(std::io::Error),
}

pub const MAX_PAYLOAD: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Its VMM is being started (the slot counts against the caps meanwhile).
    Starting,
    Idle,
    /// Out on an invocation, or being repurposed or parked.
    Busy,
}

struct Slot {
    id: u64,
    phase: Phase,
    /// Some exactly when idle.
    sandbox: Option<Sandbox>,
    /// The function it runs; None for a parked sandbox (or one being started to be parked).
    function: Option<String>,
    pid: Option<u32>,
    last_used: Instant,
    /// Proportional set size, bytes, as last measured.
    pss: Option<u64>,
}

impl Slot {
    fn idle(&self) -> bool {
        self.phase == Phase::Idle && self.sandbox.is_some()
    }

    fn parked(&self) -> bool {
        self.function.is_none()
    }
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    stopping: bool,
}

/// The host memory picture the caps are checked against.
struct Memory {
    used: u64,
    /// What one more sandbox is expected to cost.
    estimate: u64,
}

impl State {
    fn memory(&self) -> Memory {
        // A new sandbox starts out like the smallest one measured (a parked or fresh one), not like one
        // that has grown.
        let estimate = self
            .slots
            .iter()
            .filter_map(|s| s.pss)
            .min()
            .unwrap_or(DEFAULT_SANDBOX_BYTES);
        let used = self.slots.iter().map(|s| s.pss.unwrap_or(estimate)).sum();
        Memory { used, estimate }
    }

    fn parked_or_starting_parked(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.parked() && s.phase != Phase::Busy)
            .count()
    }
}

struct Inner {
    config: PoolConfig,
    trenv: PathBuf,
    work_dir: PathBuf,
    state: Mutex<State>,
    /// Signalled whenever a sandbox comes free, goes away, or the memory picture changes.
    freed: Condvar,
    next_id: AtomicU64,
    keeper_stop: AtomicBool,
    /// Held (flock) for the pool's lifetime.
    _lock: File,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox_dir(&self, id: u64) -> PathBuf {
        self.work_dir.join(format!("sandbox-{id}"))
    }

    /// Whether a new sandbox fits under `max_host_mib`. `first_always`: one sandbox may start when none
    /// exists, whatever the cap (else a cap below one sandbox's cost would serve nothing).
    fn memory_admits(&self, state: &State, first_always: bool) -> bool {
        let Some(cap) = self.config.max_host_bytes() else {
            return true;
        };
        let m = state.memory();
        (first_always && state.slots.is_empty()) || m.used.saturating_add(m.estimate) <= cap
    }

    fn remove_slot(&self, id: u64) {
        self.lock().slots.retain(|s| s.id != id);
        self.freed.notify_all();
    }
}

pub struct Pool {
    inner: Arc<Inner>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

/// A sandbox taken out of the pool for one invocation.
struct Lease {
    sandbox: Sandbox,
    path: Path,
    in_place: bool,
}

/// Why an invocation waits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blocked {
    Count,
    Memory,
}

impl Pool {
    /// `trenv` is the VMM binary; sandboxes get directories under `work_dir` (created, locked for this
    /// pool, and cleared of sandboxes a previous pool left behind). Every function's template must have a
    /// vsock device.
    pub fn new(config: PoolConfig, trenv: PathBuf, work_dir: PathBuf) -> Result<Pool, PoolError> {
        let dir_error = |source| PoolError::WorkDir {
            path: work_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&work_dir).map_err(dir_error)?;
        let lock = File::create(work_dir.join(LOCK_FILE)).map_err(dir_error)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(PoolError::WorkDirBusy(work_dir));
        }
        let stale = sandbox::remove_stale(&work_dir);
        if stale > 0 {
            log::warn!(
                "removed {stale} sandbox director(y/ies) a previous pool left in {}",
                work_dir.display()
            );
        }
        for name in config.functions.keys() {
            let template = config.template(name).unwrap_or_default();
            config::template_vsock_cid(&template).map_err(|reason| PoolError::Template {
                function: name.clone(),
                reason,
            })?;
        }
        let inner = Arc::new(Inner {
            config,
            trenv,
            work_dir,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
            next_id: AtomicU64::new(1),
            keeper_stop: AtomicBool::new(false),
            _lock: lock,
        });
        let keeper_inner = inner.clone();
        let keeper = std::thread::Builder::new()
            .name("pool-keeper".into())
            .spawn(move || keep(&keeper_inner))
            .map_err(PoolError::Thread)?;
        Ok(Pool {
            inner,
            keeper: Some(keeper),
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
        let timeout = inner.config.invoke_timeout(function);
        let Lease {
            mut sandbox,
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
                drop(sandbox);
                inner.remove_slot(id);
                Err(InvokeError::Sandbox { id, source })
            }
        }
    }

    fn acquire(&self, function: &str, timeout: Duration) -> Result<Lease, InvokeError> {
        let inner = &*self.inner;
        let started = Instant::now();
        let deadline = started + timeout;
        let template = inner
            .config
            .template(function)
            .ok_or_else(|| InvokeError::UnknownFunction(function.to_string()))?;
        let mut state = inner.lock();
        loop {
            if state.stopping {
                return Err(InvokeError::ShuttingDown);
            }
            let same = state
                .slots
                .iter()
                .position(|s| s.idle() && s.function.as_deref() == Some(function));
            if let Some(i) = same {
                let slot = &mut state.slots[i];
                slot.phase = Phase::Busy;
                let sandbox = slot.sandbox.take().expect("idle slots hold a sandbox");
                return Ok(Lease {
                    sandbox,
                    path: Path::Reuse,
                    in_place: false,
                });
            }
            // Another function's idle sandbox: a parked one (it holds nothing), else the least recently used.
            let other = state
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.idle())
                .min_by_key(|(_, s)| (!s.parked(), s.last_used))
                .map(|(i, _)| i);
            if let Some(i) = other {
                let slot = &mut state.slots[i];
                slot.phase = Phase::Busy;
                slot.function = Some(function.to_string());
                let mut sandbox = slot.sandbox.take().expect("idle slots hold a sandbox");
                let id = sandbox.id;
                drop(state);
                return match sandbox.repurpose(&template) {
                    Ok(true) => {
                        log::info!("sandbox {id} repurposed to {function} in place");
                        Ok(Lease {
                            sandbox,
                            path: Path::Repurpose,
                            in_place: true,
                        })
                    }
                    Ok(false) => {
                        // The VMM restored a new VM with the template's own devices, whose vsock socket
                        // need not be this sandbox's: start the sandbox afresh instead.
                        log::info!(
                            "sandbox {id}: {function}'s template does not fit in place; restoring"
                        );
                        drop(sandbox);
                        if let Some(slot) = inner.lock().slots.iter_mut().find(|s| s.id == id) {
                            (slot.phase, slot.pid, slot.pss) = (Phase::Starting, None, None);
                        }
                        self.start(id, function, &template, timeout)
                    }
                    Err(source) => {
                        drop(sandbox);
                        inner.remove_slot(id);
                        Err(InvokeError::Sandbox { id, source })
                    }
                };
            }
            let blocked = if state.slots.len() >= inner.config.max_sandboxes {
                Some(Blocked::Count)
            } else if !inner.memory_admits(&state, true) {
                Some(Blocked::Memory)
            } else {
                None
            };
            if blocked.is_none() {
                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                state.slots.push(Slot {
                    id,
                    phase: Phase::Starting,
                    sandbox: None,
                    function: Some(function.to_string()),
                    pid: None,
                    last_used: Instant::now(),
                    pss: None,
                });
                drop(state);
                return self.start(id, function, &template, timeout);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let waited_ms = started.elapsed().as_millis() as u64;
                return Err(match blocked {
                    Some(Blocked::Memory) => {
                        let m = state.memory();
                        InvokeError::MemoryCap {
                            sandboxes: state.slots.len(),
                            used_mib: m.used >> 20,
                            cap_mib: inner.config.max_host_mib.unwrap_or(0),
                            waited_ms,
                        }
                    }
                    _ => InvokeError::Busy {
                        max: inner.config.max_sandboxes,
                        waited_ms,
                    },
                });
            }
            state = inner
                .freed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Restores sandbox `id` (its slot is reserved) for `function`.
    fn start(
        &self,
        id: u64,
        function: &str,
        template: &std::path::Path,
        timeout: Duration,
    ) -> Result<Lease, InvokeError> {
        let inner = &*self.inner;
        let restored = Sandbox::restore(Launch {
            trenv: &inner.trenv,
            dir: inner.sandbox_dir(id),
            id,
            template,
            resume: true,
            timeout,
        });
        match restored {
            Ok(sandbox) => {
                log::info!(
                    "sandbox {id} restored for {function} (pid {})",
                    sandbox.pid()
                );
                let mut state = inner.lock();
                if let Some(slot) = state.slots.iter_mut().find(|s| s.id == id) {
                    slot.phase = Phase::Busy;
                    slot.pid = Some(sandbox.pid());
                }
                Ok(Lease {
                    sandbox,
                    path: Path::Restore,
                    in_place: false,
                })
            }
            Err(source) => {
                inner.remove_slot(id);
                Err(InvokeError::Sandbox { id, source })
            }
        }
    }

    /// Puts a sandbox back as idle (or destroys it if the pool is stopping).
    fn release(&self, sandbox: Sandbox) {
        let mut state = self.inner.lock();
        let stopping = state.stopping;
        match state.slots.iter_mut().find(|s| s.id == sandbox.id) {
            Some(slot) if !stopping => {
                slot.sandbox = Some(sandbox);
                slot.phase = Phase::Idle;
                slot.last_used = Instant::now();
            }
            _ => {
                drop(state);
                drop(sandbox);
            }
        }
        self.inner.freed.notify_all();
    }

    /// The pool as JSON: `{"sandboxes": [{"id", "state", "function", "pid", "pss_kib"}], "host_kib",
    /// "max_host_mib", "max_sandboxes", "prewarm"}`. `state` is starting, idle, busy or parked (idle
    /// without a function); `host_kib` sums the sandboxes' last measured PSS.
    pub fn status(&self) -> serde_json::Value {
        let state = self.inner.lock();
        let list: Vec<serde_json::Value> = state
            .slots
            .iter()
            .map(|s| {
                let phase = match s.phase {
                    Phase::Starting => "starting",
                    Phase::Busy => "busy",
                    Phase::Idle if s.parked() => "parked",
                    Phase::Idle => "idle",
                };
                serde_json::json!({
                    "id": s.id,
                    "state": phase,
                    "function": s.function,
                    "pid": s.pid,
                    "pss_kib": s.pss.map(|b| b >> 10),
                })
            })
            .collect();
        let host: u64 = state.slots.iter().filter_map(|s| s.pss).sum();
        serde_json::json!({
            "sandboxes": list,
            "host_kib": host >> 10,
            "max_host_mib": self.inner.config.max_host_mib,
            "max_sandboxes": self.inner.config.max_sandboxes,
            "prewarm": self.inner.config.prewarm,
        })
    }

    /// Kills every idle sandbox now and makes busy ones die when their invocation ends.
    pub fn shutdown(&self) {
        let gone: Vec<Sandbox> = {
            let mut state = self.inner.lock();
            state.stopping = true;
            let gone = state
                .slots
                .iter_mut()
                .filter_map(|s| s.sandbox.take())
                .collect();
            state.slots.retain(|s| s.phase != Phase::Idle);
            gone
        };
        drop(gone);
        self.inner.freed.notify_all();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.keeper_stop.store(true, Ordering::Relaxed);
        self.shutdown();
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
        let _ = std::fs::remove_file(self.inner.work_dir.join(LOCK_FILE));
    }
}

/// The keeper thread: keep-alive, memory accounting and eviction, and prewarming.
fn keep(inner: &Inner) {
    let mut measured = Instant::now() - MEASURE_EVERY;
    let mut prewarm_after = Instant::now();
    while !inner.keeper_stop.load(Ordering::Relaxed) {
        let expired = expire(inner);
        if !expired.is_empty() {
            log::info!(
                "destroying {} idle sandbox(es) past keep-alive or dead",
                expired.len()
            );
            drop(expired);
            inner.freed.notify_all();
        }
        if measured.elapsed() >= MEASURE_EVERY {
            measured = Instant::now();
            measure(inner);
            let evicted = evict_over_cap(inner);
            if !evicted.is_empty() {
                log::info!(
                    "evicting {} idle sandbox(es): the pool is over max_host_mib",
                    evicted.len()
                );
                drop(evicted);
            }
            inner.freed.notify_all();
        }
        if Instant::now() >= prewarm_after && !prewarm_one(inner) {
            prewarm_after = Instant::now() + PREWARM_BACKOFF;
        }
        std::thread::sleep(TICK);
    }
}

/// Takes out idle function sandboxes unused for longer than keep-alive (parked ones stay), and idle
/// sandboxes whose VMM has died (killed from outside).
fn expire(inner: &Inner) -> Vec<Sandbox> {
    let keep = Duration::from_millis(inner.config.keep_alive_ms);
    let mut state = inner.lock();
    let mut gone = Vec::new();
    state.slots.retain_mut(|s| {
        let dead = s.sandbox.as_mut().is_some_and(|b| b.has_exited());
        let expired = dead || (s.idle() && !s.parked() && s.last_used.elapsed() >= keep);
        if expired {
            gone.extend(s.sandbox.take());
        }
        !expired
    });
    gone
}

/// Reads every sandbox's PSS (outside the lock: smaps_rollup walks the process's page tables).
fn measure(inner: &Inner) {
    let pids: Vec<(u64, u32)> = inner
        .lock()
        .slots
        .iter()
        .filter_map(|s| Some((s.id, s.pid?)))
        .collect();
    let sizes: Vec<(u64, Option<u64>)> = pids
        .into_iter()
        .map(|(id, pid)| {
            let pss = memory_template::sharing::process_memory(pid).ok();
            (id, pss.map(|m| m.pss))
        })
        .collect();
    let mut state = inner.lock();
    for (id, pss) in sizes {
        if let (Some(slot), Some(pss)) = (state.slots.iter_mut().find(|s| s.id == id), pss) {
            slot.pss = Some(pss);
        }
    }
}

/// The idle slots to evict, in order, to bring `used` bytes under `cap`: parked ones first (they are the
/// cheapest to make again), then the least recently used. `idle` is (index, parked, last used, PSS).
fn eviction_order(
    mut idle: Vec<(usize, bool, Instant, u64)>,
    mut used: u64,
    cap: u64,
) -> Vec<usize> {
    idle.sort_by_key(|&(_, parked, last_used, _)| (!parked, last_used));
    let mut victims = Vec::new();
    for (i, _, _, pss) in idle {
        if used <= cap {
            break;
        }
        used = used.saturating_sub(pss);
        victims.push(i);
    }
    victims
}

/// Takes out idle sandboxes while the pool is over `max_host_mib`.
fn evict_over_cap(inner: &Inner) -> Vec<Sandbox> {
    let Some(cap) = inner.config.max_host_bytes() else {
        return Vec::new();
    };
    let mut state = inner.lock();
    let m = state.memory();
    if m.used <= cap {
        return Vec::new();
    }
    let idle = state
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.idle())
        .map(|(i, s)| (i, s.parked(), s.last_used, s.pss.unwrap_or(m.estimate)))
        .collect();
    let mut victims = eviction_order(idle, m.used, cap);
    victims.sort_unstable_by(|a, b| b.cmp(a));
    victims
        .into_iter()
        .filter_map(|i| state.slots.remove(i).sandbox)
        .collect()
}

/// Starts one parked sandbox if fewer than `prewarm` are parked or on their way, and the caps allow.
/// Returns false if that failed (the caller backs off).
fn prewarm_one(inner: &Inner) -> bool {
    let config = &inner.config;
    let id = {
        let mut state = inner.lock();
        let wanted = !state.stopping
            && state.parked_or_starting_parked() < config.prewarm
            && state.slots.len() < config.max_sandboxes
            // Prewarming never pushes the pool to the cap's edge, and never evicts anything.
            && inner.memory_admits(&state, false);
        if !wanted {
            return true;
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        state.slots.push(Slot {
            id,
            phase: Phase::Starting,
            sandbox: None,
            function: None,
            pid: None,
            last_used: Instant::now(),
            pss: None,
        });
        id
    };
    let function = config.prewarm_function();
    let template = config.template(function).unwrap_or_default();
    let parked = Sandbox::restore(Launch {
        trenv: &inner.trenv,
        dir: inner.sandbox_dir(id),
        id,
        template: &template,
        resume: false,
        timeout: config.invoke_timeout(function),
    })
    .and_then(|mut sandbox| sandbox.park().map(|()| sandbox));
    match parked {
        Ok(sandbox) => {
            log::info!("sandbox {id} parked (pid {})", sandbox.pid());
            let mut state = inner.lock();
            let stopping = state.stopping;
            match state.slots.iter_mut().find(|s| s.id == id) {
                Some(slot) if !stopping => {
                    slot.pid = Some(sandbox.pid());
                    slot.phase = Phase::Idle;
                    slot.last_used = Instant::now();
                    slot.sandbox = Some(sandbox);
                }
                _ => {
                    state.slots.retain(|s| s.id != id);
                    drop(state);
                    drop(sandbox);
                }
            }
            inner.freed.notify_all();
            true
        }
        Err(e) => {
            log::warn!("cannot prewarm a parked sandbox: {e}");
            inner.remove_slot(id);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_parked_sandboxes_first_then_the_least_recently_used() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        const MIB: u64 = 1 << 20;
        // (index, parked, last used, PSS)
        let idle = vec![
            (0, false, at(30), 40 * MIB),
            (1, true, at(50), 5 * MIB),
            (2, false, at(10), 20 * MIB),
            (3, true, at(20), 5 * MIB),
        ];
        // Under the cap: nothing.
        assert!(eviction_order(idle.clone(), 90 * MIB, 100 * MIB).is_empty());
        // 8 MiB over: both parked ones (5 + 5) suffice.
        assert_eq!(eviction_order(idle.clone(), 108 * MIB, 100 * MIB), [3, 1]);
        // 25 MiB over: parked ones, then the oldest idle one.
        assert_eq!(
            eviction_order(idle.clone(), 125 * MIB, 100 * MIB),
            [3, 1, 2]
        );
        // Far over: everything idle goes.
        assert_eq!(eviction_order(idle, 500 * MIB, 100 * MIB), [3, 1, 2, 0]);
    }

    fn slot(id: u64, phase: Phase, function: Option<&str>, pss_mib: Option<u64>) -> Slot {
        Slot {
            id,
            phase,
            sandbox: None,
            function: function.map(str::to_string),
            pid: None,
            last_used: Instant::now(),
            pss: pss_mib.map(|m| m << 20),
        }
    }

    #[test]
    fn memory_counts_unmeasured_sandboxes_like_the_smallest() {
        let mut state = State::default();
        assert_eq!(state.memory().used, 0);
        assert_eq!(state.memory().estimate, DEFAULT_SANDBOX_BYTES);
        state.slots.push(slot(1, Phase::Busy, Some("a"), Some(70)));
        state.slots.push(slot(2, Phase::Idle, None, Some(5)));
        state.slots.push(slot(3, Phase::Starting, Some("b"), None));
        state.slots.push(slot(4, Phase::Starting, None, None));
        let m = state.memory();
        assert_eq!((m.used >> 20, m.estimate >> 20), (85, 5));
        // Parked (idle without a function) and parked-to-be count toward prewarm; busy ones do not.
        assert_eq!(state.parked_or_starting_parked(), 2);
    }
}
