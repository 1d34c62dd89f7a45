//! `trenv-bench`: TrEnv's benchmarks. Each prints one JSON object on stdout.
//!
//! `trenv-bench boot [--runs N] [--memory SIZE] [--json]`: VMM process start (spawn) to the test guest's
//! boot-complete signal, and the VMM's peak RSS. The VMM is this very binary re-executed in VMM mode
//! (`trenv-bench __vmm ...` runs exactly `trenv`'s main), so `cargo run --bin trenv-bench` needs no other
//! binary built first.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use clap::{Parser, Subcommand};
use serde_json::json;
use devices::guest_signal::{event, event_name};
use vmm::event_monitor::monotonic_ns;

const VMM_MODE: &str = "__vmm";

#[derive(Parser)]
#[command(name = "trenv-bench", about = "TrEnv benchmarks (JSON output)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// VMM start to the test guest's boot-complete signal.
    Boot {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value = "256M")]
        memory: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Print JSON (the only format; accepted for symmetry with the other benchmarks).
        #[arg(long)]
        json: bool,
    },
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest-rank: the smallest value with at least p% of the samples at or below it.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Finds the monotonic timestamp of `event` (from `source`) in an event-monitor file, and its properties.
fn find_event(events: &str, source: &str, event: &str) -> Option<(u64, serde_json::Value)> {
    events.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v["source"] != source || v["event"] != event {
            return None;
        }
        let ts =
            v["timestamp"]["secs"].as_u64()? * 1_000_000_000 + v["timestamp"]["nanos"].as_u64()?;
        Some((ts, v["properties"].clone()))
    })
}

struct BootSample {
    boot_ms: f64,
    hwm_kib: u64,
}

fn boot_once(
    exe: &Path,
    guest: &Path,
    dir: &Path,
    run: usize,
    memory: &str,
    vcpus: u8,
) -> Result<BootSample, String> {
    let events_path = dir.join(format!("events-{run}.jsonl"));
    let _ = std::fs::remove_file(&events_path);
    let t0 = monotonic_ns();
    let status = Command::new(exe)
        .arg(VMM_MODE)
        .arg("--kernel")
        .arg(guest)
        .args(["--cmdline", &format!("{} boot", vmm::TEST_GUEST_CONSOLE)])
        .args(["--memory", &format!("size={memory}")])
        .args(["--cpus", &format!("boot={vcpus}")])
        .args(["--serial", "null"])
        .arg("--event-monitor")
        .arg(format!("path={}", events_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot start the VMM: {e}"))?;
    if !status.success() {
        return Err(format!("VMM run {run} failed: {status}"));
    }
    let events = std::fs::read_to_string(&events_path).map_err(|e| format!("no event log: {e}"))?;
    let (boot_ns, _) = find_event(&events, "guest", &event_name(event::BOOT_COMPLETE))
        .ok_or_else(|| format!("run {run}: the guest never signalled boot-complete"))?;
    let (_, props) = find_event(&events, "vm", "shutdown").ok_or("no shutdown event")?;
    let hwm_kib = props["vmm_hwm_kib"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(BootSample {
        boot_ms: (boot_ns.saturating_sub(t0)) as f64 / 1e6,
        hwm_kib,
    })
}

fn bench_boot(runs: usize, memory: &str, vcpus: u8) -> Result<serde_json::Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("trenv-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let guest = dir.join("test-guest.elf");
    std::fs::write(&guest, test_guest::IMAGE).map_err(|e| e.to_string())?;
    // One untimed run warms the page cache and the binary, as every later start would find them.
    boot_once(&exe, &guest, &dir, 0, memory, vcpus)?;
    let mut samples = Vec::with_capacity(runs);
    for run in 1..=runs {
        samples.push(boot_once(&exe, &guest, &dir, run, memory, vcpus)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut times: Vec<f64> = samples.iter().map(|s| s.boot_ms).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let hwm_mib = samples.iter().map(|s| s.hwm_kib).max().unwrap_or(0) as f64 / 1024.0;
    Ok(json!({
        "bench": "boot",
        "what": "VMM process spawn to the test guest's boot-complete signal (first CPL3 code)",
        "runs": runs,
        "memory": memory,
        "vcpus": vcpus,
        "p50_ms": round3(percentile(&times, 50.0)),
        "p99_ms": round3(percentile(&times, 99.0)),
        "min_ms": round3(times.first().copied().unwrap_or(f64::NAN)),
        "max_ms": round3(times.last().copied().unwrap_or(f64::NAN)),
        "vmm_rss_mib": round3(hwm_mib),
        "vmm_rss_note": "peak RSS (VmHWM) of the VMM process over the whole run",
        "targets": {"p50_ms": 6.0, "p99_ms": 10.0, "vmm_rss_mib": 8.0},
    }))
}

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == VMM_MODE) {
        args.remove(1);
        return vmm::cli::main_with_args(args);
    }
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Boot {
            runs,
            memory,
            vcpus,
            json: _,
        } => bench_boot(runs.max(1), &memory, vcpus),
    };
    match result {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trenv-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
