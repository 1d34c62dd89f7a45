//! `trace`: one bursty multi-function arrival trace replayed against three ways of serving it.
//!
//! The trace (`arrivals`) is seeded, so runs compare: `functions` functions whose popularity follows a Zipf
//! law (a few hot functions and a long tail of rare ones, the shape of the Azure Functions traces), Poisson
//! arrivals at `rate` per second, and bursts of several times that rate. The replay is open loop: a
//! dispatcher hands each invocation to a fixed set of [`WORKERS`] threads at its arrival time, whatever
//! earlier invocations are doing, and latency runs from the arrival time to the answer, so waiting for a
//! worker or for the host's two CPUs shows in it.
//!
//! Every function is a template of the test guest's `function` workload with its own seed, made once at the
//! start and used by every policy:
//! - `fresh`: per invocation a new VMM boots the test guest (`function ... cold=1`: it serves at once instead
//!   of waiting for a clone), the invocation goes over hybrid vsock once the guest listens, and the VMM is
//!   killed;
//! - `restore`: per invocation a new VMM restores the function's template with its memory loaded on demand
//!   by a userfaultfd handler into private memory (`memory_restore_mode=ondemand`, how E2B runs Firecracker
//!   snapshots), then the same;
//! - `trenv`: the warm pool (`vmm::pool`, the code `trenv-pool` runs, in a process of its own) serves
//!   `POST /invoke/{function}` on its Unix socket.
//!
//! Every answer is checked against the function's seed and heap. Memory: see [`MEMORY_METRIC`].

mod arrivals;
mod function;
mod memory;
mod pool;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{percentile, round3, stage_guest, summary, vmm_command, Scratch};
use arrivals::{generate, Arrival, Trace, TraceParams, BURST_FACTOR, ZIPF_EXPONENT};
use function::{check, function_cmdline, make_function, pool_invoke, vsock_invoke, Function};
use memory::{sample_memory, MemoryPeak, MEMORY_METRIC};
use pool::start_pool;
pub use pool::{pool_main, POOL_MODE, TRENV_NAME};

/// Threads issuing invocations (the most in flight at once; later arrivals wait, and their wait counts).
const WORKERS: usize = 32;
const PORT: u32 = 5000;
const TIMEOUT: Duration = Duration::from_secs(30);
/// The pool's own limit for waiting on a sandbox, and then for the guest's answer.
const POOL_INVOKE_TIMEOUT_MS: u64 = 10_000;

pub struct Params {
    pub functions: usize,
    pub duration_s: f64,
    pub seed: u64,
    /// Base arrival rate per second.
    pub rate: f64,
    pub policies: Vec<String>,
    pub heap_mib: u64,
    pub mem_mib: u64,
    pub pool_max_sandboxes: usize,
    pub pool_keep_alive_ms: u64,
    pub pool_prewarm: usize,
}

/// The trace's shape, for the report.
fn shape(trace: &Trace, p: &Params) -> serde_json::Value {
    let counts = trace.per_function();
    let n = trace.arrivals.len().max(1) as f64;
    let mut sorted = counts.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let bursts: Vec<serde_json::Value> = trace
        .bursts
        .iter()
        .map(|b| json!({"start_s": round3(b.start_s), "end_s": round3(b.end_s)}))
        .collect();
    json!({
        "seed": p.seed,
        "functions": trace.functions,
        "functions_invoked": counts.iter().filter(|&&c| c > 0).count(),
        "invocations": trace.arrivals.len(),
        "duration_s": trace.duration_s,
        "base_rate_per_s": p.rate,
        "mean_rate_per_s": round3(trace.arrivals.len() as f64 / trace.duration_s),
        "peak_arrival_rate_per_s": trace.peak_in_window(1.0),
        "peak_note": "most arrivals within any 1 s window",
        "popularity": format!("Zipf, exponent {ZIPF_EXPONENT}"),
        "hottest_share": round3(sorted.first().copied().unwrap_or(0) as f64 / n),
        "top3_share": round3(sorted.iter().take(3).sum::<usize>() as f64 / n),
        "per_function": counts,
        "burst_factor": BURST_FACTOR,
        "bursts": bursts,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Open-loop replay.

struct Sample {
    latency_ms: f64,
    /// Ok: the pool's path (reuse, repurpose, restore) for `trenv`, None for the others.
    result: Result<Option<String>, String>,
}

/// Replays the trace: each arrival is handed to a worker at its time; latency runs from that time.
fn replay<F>(trace: &Trace, invoke: F) -> (Vec<Sample>, f64)
where
    F: Fn(usize, &Arrival) -> Result<Option<String>, String> + Sync,
{
    let (tx, rx) = mpsc::channel::<(usize, Instant)>();
    let rx = Mutex::new(rx);
    let samples = Mutex::new(Vec::with_capacity(trace.arrivals.len()));
    // A short lead so that the first arrivals do not find the workers still starting.
    let start = Instant::now() + Duration::from_millis(100);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| loop {
                let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((i, due)) = next else {
                    return;
                };
                let result = invoke(i, &trace.arrivals[i]);
                let latency_ms = due.elapsed().as_secs_f64() * 1e3;
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Sample { latency_ms, result });
            });
        }
        for (i, a) in trace.arrivals.iter().enumerate() {
            let due = start + Duration::from_secs_f64(a.at_s);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if tx.send((i, due)).is_err() {
                break;
            }
        }
        drop(tx);
    });
    let wall = start.elapsed().as_secs_f64();
    (
        samples.into_inner().unwrap_or_else(|e| e.into_inner()),
        wall,
    )
}

fn report(samples: Vec<Sample>, wall_s: f64, memory: &MemoryPeak) -> serde_json::Value {
    let mut latencies = Vec::with_capacity(samples.len());
    let mut errors = Vec::new();
    let mut paths: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in &samples {
        match &s.result {
            Ok(path) => {
                latencies.push(s.latency_ms);
                if let Some(path) = path {
                    paths.entry(path.clone()).or_default().push(s.latency_ms);
                }
            }
            Err(e) => errors.push(e.clone()),
        }
    }
    let mean = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64;
    let mut out = json!({
        "invocations": samples.len(),
        "ok": latencies.len(),
        "errors": errors.len(),
        "mean_ms": round3(mean),
        "peak_host_mib": round3(memory.peak_bytes as f64 / (1 << 20) as f64),
        "peak_processes": memory.peak_processes,
        "memory_samples": memory.samples,
        "wall_s": round3(wall_s),
    });
    let map = out.as_object_mut().expect("an object");
    map.extend(summary("", &mut latencies));
    if !paths.is_empty() {
        // How the pool served its invocations, and what each way cost end to end.
        let by_path: serde_json::Map<String, serde_json::Value> = paths
            .into_iter()
            .map(|(path, mut ms)| {
                ms.sort_by(f64::total_cmp);
                let stats = json!({
                    "count": ms.len(),
                    "p50_ms": round3(percentile(&ms, 50.0)),
                    "p99_ms": round3(percentile(&ms, 99.0)),
                });
                (path, stats)
            })
            .collect();
        map.insert("paths".into(), by_path.into());
    }
    if !errors.is_empty() {
        errors.truncate(3);
        map.insert("first_errors".into(), json!(errors));
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Policies.

#[derive(Clone, Copy, PartialEq)]
enum PerInvocation {
    Fresh,
    Restore,
}

/// A VMM of one invocation: killed, reaped and its directory removed on drop.
struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Ctx<'a> {
    p: &'a Params,
    functions: &'a [Function],
    guest: &'a Path,
    run_dir: PathBuf,
}

fn invoke_in_new_vm(
    ctx: &Ctx<'_>,
    kind: PerInvocation,
    i: usize,
    a: &Arrival,
) -> Result<Option<String>, String> {
    let f = &ctx.functions[a.function];
    let dir = ctx.run_dir.join(format!("vm-{i}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("vmm.log")).map_err(|e| e.to_string())?;
    let mut command = vmm_command();
    command.current_dir(&dir).stderr(log);
    match kind {
        PerInvocation::Fresh => command
            .arg("--kernel")
            .arg(ctx.guest)
            .args(["--cmdline", &function_cmdline(f.seed, ctx.p, true)])
            .args(["--memory", &format!("size={}M", ctx.p.mem_mib)])
            .args(["--serial", "null", "--vsock", "cid=3,socket=vsock.sock"]),
        PerInvocation::Restore => command.arg("--restore").arg(format!(
            "source_url=file://{},memory_restore_mode=ondemand,resume=on",
            f.template.display()
        )),
    };
    let deadline = Instant::now() + TIMEOUT;
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start the VMM: {e}"))?;
    let mut vm = Vm { child, dir };
    let answer =
        vsock_invoke(&vm.dir.join("vsock.sock"), a.n, &mut vm.child, deadline).map_err(|e| {
            let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap_or_default();
            let last = log.lines().last().unwrap_or("").to_string();
            format!("{}: {e} (VMM: {last})", f.name)
        })?;
    check(f, ctx.p.heap_mib, a.n, &answer)?;
    Ok(None)
}

fn run_per_invocation(
    ctx: &Ctx<'_>,
    trace: &Trace,
    kind: PerInvocation,
) -> Result<serde_json::Value, String> {
    std::fs::create_dir_all(&ctx.run_dir).map_err(|e| e.to_string())?;
    let stop = AtomicBool::new(false);
    let (samples, wall, memory) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| sample_memory(&stop));
        let (samples, wall) = replay(trace, |i, a| invoke_in_new_vm(ctx, kind, i, a));
        stop.store(true, Ordering::Relaxed);
        let memory = sampler.join().unwrap_or_default();
        (samples, wall, memory)
    });
    let _ = std::fs::remove_dir_all(&ctx.run_dir);
    Ok(report(samples, wall, &memory))
}

fn run_pool(scratch: &Scratch, ctx: &Ctx<'_>, trace: &Trace) -> Result<serde_json::Value, String> {
    let stop = AtomicBool::new(false);
    let run = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| sample_memory(&stop));
        let run = start_pool(scratch, ctx.functions, ctx.p).map(|pool| {
            let (samples, wall) = replay(trace, |_, a| {
                let f = &ctx.functions[a.function];
                let (answer, path) = pool_invoke(&pool.socket, &f.name, a.n)
                    .map_err(|e| format!("{}: {e}", f.name))?;
                check(f, ctx.p.heap_mib, a.n, &answer)?;
                Ok(Some(path))
            });
            (pool, samples, wall)
        });
        stop.store(true, Ordering::Relaxed);
        let memory = sampler.join().unwrap_or_default();
        run.map(|(pool, samples, wall)| (pool, samples, wall, memory))
    });
    let (pool, samples, wall, memory) = run?;
    let orphans = pool.stop();
    let mut out = report(samples, wall, &memory);
    let map = out.as_object_mut().expect("an object");
    map.insert(
        "pool".into(),
        json!({
            "max_sandboxes": ctx.p.pool_max_sandboxes,
            "keep_alive_ms": ctx.p.pool_keep_alive_ms,
            "prewarm": ctx.p.pool_prewarm,
            "invoke_timeout_ms": POOL_INVOKE_TIMEOUT_MS,
            "sandbox_restore_mode": "cow",
            "orphaned_vmms_after_stop": orphans,
        }),
    );
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------

/// The host's 1-minute load average.
fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

pub fn run(p: &Params) -> Result<serde_json::Value, String> {
    if p.functions == 0 || p.functions > 100 {
        return Err("--functions must be 1 to 100".into());
    }
    // Written so that NaN fails too.
    let within = |v: f64, max: f64| v > 0.0 && v <= max;
    if !within(p.duration_s, 3600.0) || !within(p.rate, 1000.0) {
        return Err("need 0 < --duration-s <= 3600 and 0 < --rate <= 1000".into());
    }
    // The guest places its heap 4 MiB above its image and needs room for the vsock driver below it.
    if p.heap_mib == 0 || p.heap_mib > 1024 || p.heap_mib.saturating_add(16) > p.mem_mib {
        return Err("--heap-mib must be 1 to 1024 and at least 16 MiB below --mem-mib".into());
    }
    for policy in &p.policies {
        if !["fresh", "restore", "trenv"].contains(&policy.as_str()) {
            return Err(format!("unknown policy {policy}"));
        }
    }
    let trace = generate(&TraceParams {
        functions: p.functions,
        duration_s: p.duration_s,
        rate: p.rate,
        seed: p.seed,
    });
    let scratch = Scratch::new("trace", true)?;
    let guest = stage_guest(&scratch)?;
    let started = Instant::now();
    let functions = (0..p.functions)
        .map(|i| make_function(&scratch, &guest, i, p))
        .collect::<Result<Vec<_>, _>>()?;
    let templates_s = started.elapsed().as_secs_f64();

    let mut policies = serde_json::Map::new();
    for policy in &p.policies {
        let ctx = Ctx {
            p,
            functions: &functions,
            guest: &guest,
            run_dir: scratch.path(&format!("run-{policy}")),
        };
        let load_before = load_average();
        let (mut result, how) = match policy.as_str() {
            "fresh" => (
                run_per_invocation(&ctx, &trace, PerInvocation::Fresh)?,
                "a new VMM boots the test guest per invocation (function cold=1), killed after its answer",
            ),
            "restore" => (
                run_per_invocation(&ctx, &trace, PerInvocation::Restore)?,
                "a new VMM per invocation restores the template with memory_restore_mode=ondemand \
                 (userfaultfd into private memory; the template's recorded working set is prefetched, \
                 the rest faulted in), killed after its answer",
            ),
            _ => (
                run_pool(&scratch, &ctx, &trace)?,
                "the warm pool (vmm::pool) over its Unix-socket HTTP API: reuse, in-place repurpose or \
                 cow restore",
            ),
        };
        let map = result.as_object_mut().expect("an object");
        map.insert("how".into(), how.into());
        // The two cores are shared: the load around a policy says how much noise it saw.
        map.insert(
            "load_avg_1m".into(),
            json!({"before": load_before, "after": load_average()}),
        );
        policies.insert(policy.clone(), result);
    }

    let get = |policy: &str, key: &str| policies.get(policy).and_then(|v| v[key].as_f64());
    let errors = |policy: &str| policies.get(policy).and_then(|v| v["errors"].as_u64());
    let p99_ratio = match (get("restore", "p99_ms"), get("trenv", "p99_ms")) {
        (Some(r), Some(t)) if t > 0.0 => Some(round3(r / t)),
        _ => None,
    };
    let saving = match (
        get("restore", "peak_host_mib"),
        get("trenv", "peak_host_mib"),
    ) {
        (Some(r), Some(t)) if r > 0.0 => Some(round3(1.0 - t / r)),
        _ => None,
    };
    // A policy that failed invocations has no honest p99 to claim a target with.
    let clean = errors("restore") == Some(0) && errors("trenv") == Some(0);
    let met = |v: Option<f64>, target: f64| v.map(|v| clean && v >= target);
    Ok(json!({
        "bench": "trace",
        "what": "a seeded bursty multi-function trace replayed open loop against fresh boots, on-demand restores and the trenv pool; latency from arrival to answer",
        "trace": shape(&trace, p),
        "function_template": {
            "workload": format!("function heap={} port={PORT}, seed 100 + index", p.heap_mib),
            "mem_mib": p.mem_mib,
            "templates": functions.len(),
            "templates_s": round3(templates_s),
            "on": "tmpfs (/dev/shm)",
        },
        "workers": WORKERS,
        "memory_metric": MEMORY_METRIC,
        "policies": policies,
        "restore_p99_over_trenv_p99": p99_ratio,
        "trenv_peak_mem_saving": saving,
        "targets": {"restore_p99_over_trenv_p99": 3.0, "trenv_peak_mem_saving": 0.4},
        "targets_met": {
            "p99": met(p99_ratio, 3.0),
            "memory": met(saving, 0.4),
            "note": (!clean).then_some("restore or trenv had errors (or did not run): no target is claimed"),
        },
    }))
}
