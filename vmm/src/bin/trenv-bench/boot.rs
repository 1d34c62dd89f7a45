//! `boot`: VMM process spawn to the test guest's boot-complete signal (its first code at CPL3), and the
//! VMM's peak RSS.

use devices::guest_signal::{event, event_name};
use serde_json::json;
use vmm::event_monitor::monotonic_ns;

use crate::common::{find_event, round3, stage_guest, summary, vmm_command, Scratch};

struct Sample {
    boot_ms: f64,
    hwm_kib: u64,
}

fn boot_once(
    guest: &std::path::Path,
    scratch: &Scratch,
    run: usize,
    memory: &str,
    vcpus: u8,
) -> Result<Sample, String> {
    let events_path = scratch.path(&format!("events-{run}.jsonl"));
    let t0 = monotonic_ns();
    let status = vmm_command()
        .arg("--kernel")
        .arg(guest)
        .args(["--cmdline", &format!("{} boot", vmm::TEST_GUEST_CONSOLE)])
        .args(["--memory", &format!("size={memory}")])
        .args(["--cpus", &format!("boot={vcpus}")])
        .args(["--serial", "null"])
        .arg("--event-monitor")
        .arg(format!("path={}", events_path.display()))
        .status()
        .map_err(|e| format!("cannot start the VMM: {e}"))?;
    if !status.success() {
        return Err(format!("VMM run {run} failed: {status}"));
    }
    let events = std::fs::read_to_string(&events_path).map_err(|e| format!("no event log: {e}"))?;
    let boot = find_event(&events, "guest", &event_name(event::BOOT_COMPLETE))
        .ok_or_else(|| format!("run {run}: the guest never signalled boot-complete"))?;
    let shutdown = find_event(&events, "vm", "shutdown").ok_or("no shutdown event")?;
    let hwm_kib = shutdown.properties["vmm_hwm_kib"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Sample {
        boot_ms: boot.monotonic_ns.saturating_sub(t0) as f64 / 1e6,
        hwm_kib,
    })
}

pub fn run(runs: usize, memory: &str, vcpus: u8) -> Result<serde_json::Value, String> {
    let scratch = Scratch::new("boot", false)?;
    let guest = stage_guest(&scratch)?;
    // One untimed run warms the page cache and the binary, as every later start would find them.
    boot_once(&guest, &scratch, 0, memory, vcpus)?;
    let mut samples = Vec::with_capacity(runs);
    for run in 1..=runs {
        samples.push(boot_once(&guest, &scratch, run, memory, vcpus)?);
    }
    let mut times: Vec<f64> = samples.iter().map(|s| s.boot_ms).collect();
    let hwm_mib = samples.iter().map(|s| s.hwm_kib).max().unwrap_or(0) as f64 / 1024.0;
    let mut out = json!({
        "bench": "boot",
        "what": "VMM process spawn to the test guest's boot-complete signal (first CPL3 code)",
        "runs": runs,
        "memory": memory,
        "vcpus": vcpus,
        "vmm_rss_mib": round3(hwm_mib),
        "vmm_rss_note": "peak RSS (VmHWM) of the VMM process over the whole run",
        "targets": {"p50_ms": 6.0, "p99_ms": 10.0, "vmm_rss_mib": 8.0},
    });
    out.as_object_mut().unwrap().extend(summary("", &mut times));
    Ok(out)
}
