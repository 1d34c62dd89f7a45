//! `restore`: makes one template of the test guest's `serve` workload (a heap built before the snapshot,
//! the stand-in for a runtime after its imports), then for each memory mode restores N instances from it
//! one after another, all kept alive, and measures:
//! - restore latency: VMM process spawn to the restored guest's SERVE_RESTORED signal (it noticed its new
//!   generation ID, i.e. it runs the restored workload);
//! - host memory once every instance has verified its heap and written `dirty_mib` of private data: the sum
//!   of the instances' PSS (shared page-cache pages count once in total) and each one's private memory.

use std::process::Child;
use std::time::Duration;

use devices::guest_signal::event_name;
use memory_template::sharing::process_memory;
use serde_json::json;
use vmm::event_monitor::monotonic_ns;

use crate::common::{round3, stage_guest, summary, vmm_command, wait_event, Scratch};

pub struct Params {
    pub mem_mib: u64,
    pub instances: usize,
    pub dirty_mib: u64,
    pub heap_mib: u64,
    pub modes: Vec<String>,
}

const TIMEOUT: Duration = Duration::from_secs(60);

struct Instance {
    child: Child,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api(
    socket: &std::path::Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> Result<(), String> {
    let (status, text) = api::client::ApiClient::new(socket)
        .request(method, endpoint, body, &[])
        .map_err(|e| format!("{endpoint}: {e}"))?;
    if status >= 300 {
        return Err(format!("{endpoint}: HTTP {status}: {text}"));
    }
    Ok(())
}

/// Boots `serve`, waits for READY, pauses and snapshots it into `scratch/template`.
fn make_template(scratch: &Scratch, p: &Params) -> Result<std::path::PathBuf, String> {
    let guest = stage_guest(scratch)?;
    let socket = scratch.path("template.sock");
    let events = scratch.path("template-events.jsonl");
    let mut child = vmm_command()
        .arg("--api-socket")
        .arg(&socket)
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--cmdline",
            &format!(
                "{} serve heap={} seed=1 dirty={}",
                vmm::TEST_GUEST_CONSOLE,
                p.heap_mib,
                p.dirty_mib
            ),
        ])
        .args([
            "--memory",
            &format!("size={}M", p.mem_mib),
            "--serial",
            "null",
        ])
        .arg("--event-monitor")
        .arg(format!("path={}", events.display()))
        .spawn()
        .map_err(|e| format!("cannot start the VMM: {e}"))?;
    // The heap is built once SERVE_HEAP is signalled; any snapshot after it is a finished runtime.
    let heap = event_name(test_guest::SIGNAL_SERVE_HEAP);
    wait_event(&events, "guest", &heap, &mut child, TIMEOUT)?;
    let template = scratch.path("template");
    api(&socket, "PUT", "vm.pause", None)?;
    let body = json!({"destination_url": format!("file://{}", template.display())}).to_string();
    api(&socket, "PUT", "vm.snapshot", Some(&body))?;
    api(&socket, "PUT", "vmm.shutdown", None)?;
    let _ = child.wait();
    Ok(template)
}

fn run_mode(
    scratch: &Scratch,
    template: &std::path::Path,
    mode: &str,
    p: &Params,
) -> Result<serde_json::Value, String> {
    let restored = event_name(test_guest::SIGNAL_SERVE_RESTORED);
    let verified = event_name(test_guest::SIGNAL_SERVE_VERIFIED);
    let mut instances = Vec::with_capacity(p.instances);
    let mut latencies = Vec::with_capacity(p.instances);
    for i in 0..p.instances {
        let events = scratch.path(&format!("{mode}-{i}.jsonl"));
        let t0 = monotonic_ns();
        let child = vmm_command()
            .arg("--restore")
            .arg(format!(
                "source_url=file://{},memory_restore_mode={mode},resume=on",
                template.display()
            ))
            .args(["--serial", "null"])
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()))
            .spawn()
            .map_err(|e| format!("cannot start the VMM: {e}"))?;
        let mut instance = Instance { child };
        let e = wait_event(&events, "guest", &restored, &mut instance.child, TIMEOUT)?;
        latencies.push(e.monotonic_ns.saturating_sub(t0) as f64 / 1e6);
        // Wait until this instance has written its private data, so that instances do not overlap.
        wait_event(&events, "guest", &verified, &mut instance.child, TIMEOUT)?;
        instances.push(instance);
    }
    let mut pss_total = 0u64;
    let mut private = Vec::with_capacity(instances.len());
    for instance in &instances {
        let usage = process_memory(instance.child.id()).map_err(|e| e.to_string())?;
        pss_total += usage.pss;
        private.push(usage.private());
    }
    let mib = |bytes: u64| round3(bytes as f64 / (1 << 20) as f64);
    let private_avg = private.iter().sum::<u64>() / private.len().max(1) as u64;
    let mut out = json!({
        "host_pss_total_mib": mib(pss_total),
        "private_per_instance_mib": mib(private_avg),
        "private_max_mib": mib(private.iter().copied().max().unwrap_or(0)),
    });
    out.as_object_mut()
        .unwrap()
        .extend(summary("restore_", &mut latencies));
    Ok(out)
}

pub fn run(p: &Params) -> Result<serde_json::Value, String> {
    if p.dirty_mib > p.heap_mib {
        return Err("--dirty-mib must not exceed --heap-mib".into());
    }
    let scratch = Scratch::new("restore", true)?;
    let template = make_template(&scratch, p)?;
    let manifest = memory_template::format::read_manifest(&template).map_err(|e| e.to_string())?;
    let mut modes = serde_json::Map::new();
    for mode in &p.modes {
        if !["cow", "copy", "ondemand"].contains(&mode.as_str()) {
            return Err(format!("unknown mode {mode}"));
        }
        modes.insert(mode.clone(), run_mode(&scratch, &template, mode, p)?);
    }
    let p50 = |m: &str| modes.get(m).and_then(|v| v["restore_p50_ms"].as_f64());
    let speedup = match (p50("copy"), p50("cow")) {
        (Some(copy), Some(cow)) if cow > 0.0 => Some(round3(copy / cow)),
        _ => None,
    };
    Ok(json!({
        "bench": "restore",
        "what": "VMM spawn to the restored guest running (SERVE_RESTORED); memory after every instance wrote dirty_mib",
        "mem_mib": p.mem_mib,
        "instances": p.instances,
        "dirty_mib": p.dirty_mib,
        "heap_mib": p.heap_mib,
        "template_data_mib": round3(manifest.data_bytes() as f64 / (1 << 20) as f64),
        "template_on": "tmpfs (/dev/shm)",
        "modes": modes,
        "cow_speedup_over_copy": speedup,
        "targets": {
            "cow_restore_p50_ms": 5.0,
            "cow_restore_p99_ms": 8.0,
            "cow_speedup_over_copy": 5.0,
            "private_per_instance_mib": p.dirty_mib + 1,
            "host_pss_total_mib": p.mem_mib + p.instances as u64 * (p.dirty_mib + 1),
        },
    }))
}
