//! `repurpose`: a warm VM switched in place between two templates (`PUT vm.repurpose`, resume=true),
//! against fresh copy-on-write restores of the same templates. Both are timed to the guest's
//! SERVE_RESTORED signal (it runs the new tenant's workload); the repurpose API round trip is reported too.
//! Each repurpose switches an idle VM whose tenant has done its work (SERVE_VERIFIED: its heap read, its
//! private pages written), as a pool's idle sandboxes are.

use std::time::{Duration, Instant};

use devices::guest_signal::event_name;
use serde_json::json;
use vmm::event_monitor::monotonic_ns;

use crate::common::{stage_guest, summary, vmm_command, wait_event, Scratch};

const TIMEOUT: Duration = Duration::from_secs(30);

fn api(socket: &std::path::Path, endpoint: &str, body: Option<&str>) -> Result<String, String> {
    let (status, text) = api::client::ApiClient::new(socket)
        .request("PUT", endpoint, body, &[])
        .map_err(|e| format!("{endpoint}: {e}"))?;
    if status >= 300 {
        return Err(format!("{endpoint}: HTTP {status}: {text}"));
    }
    Ok(text)
}

fn make_template(
    scratch: &Scratch,
    name: &str,
    seed: u64,
    mem_mib: u64,
) -> Result<std::path::PathBuf, String> {
    let guest = stage_guest(scratch)?;
    let socket = scratch.path(&format!("{name}.sock"));
    let events = scratch.path(&format!("{name}.jsonl"));
    let mut child = vmm_command()
        .arg("--api-socket")
        .arg(&socket)
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--cmdline",
            &format!(
                "{} serve heap=16 seed={seed} dirty=1",
                vmm::TEST_GUEST_CONSOLE
            ),
        ])
        .args(["--memory", &format!("size={mem_mib}M"), "--serial", "null"])
        .arg("--event-monitor")
        .arg(format!("path={}", events.display()))
        .spawn()
        .map_err(|e| e.to_string())?;
    wait_event(
        &events,
        "guest",
        &event_name(test_guest::SIGNAL_SERVE_HEAP),
        &mut child,
        TIMEOUT,
    )?;
    let dir = scratch.path(name);
    api(&socket, "vm.pause", None)?;
    api(
        &socket,
        "vm.snapshot",
        Some(&json!({"destination_url": format!("file://{}", dir.display())}).to_string()),
    )?;
    api(&socket, "vmm.shutdown", None)?;
    let _ = child.wait();
    Ok(dir)
}

/// Per-phase durations (ms) of every in-place repurpose the VMM reported in its `repurposed` events.
fn phase_samples(path: &std::path::Path) -> Vec<(&'static str, Vec<f64>)> {
    const PHASES: [&str; 7] = [
        "us",
        "check_us",
        "pause_us",
        "map_us",
        "devices_us",
        "state_us",
        "resume_us",
    ];
    let mut out: Vec<(&'static str, Vec<f64>)> = PHASES.iter().map(|p| (*p, vec![])).collect();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["source"] != "vm" || v["event"] != "repurposed" {
            continue;
        }
        for (name, samples) in &mut out {
            if let Some(us) = v["properties"][*name]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
            {
                samples.push(us / 1e3);
            }
        }
    }
    out
}

/// Number of `event` records from the guest in the file so far.
fn count(path: &std::path::Path, event: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("\"source\":\"guest\"") && l.contains(&format!("\"event\":\"{event}\""))
        })
        .count()
}

pub fn run(rounds: usize, mem_mib: u64) -> Result<serde_json::Value, String> {
    let scratch = Scratch::new("repurpose", true)?;
    let templates = [
        make_template(&scratch, "a", 1, mem_mib)?,
        make_template(&scratch, "b", 2, mem_mib)?,
    ];
    let restored = event_name(test_guest::SIGNAL_SERVE_RESTORED);
    let verified = event_name(test_guest::SIGNAL_SERVE_VERIFIED);

    // Fresh cow restores, for comparison.
    let mut restore_ms = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let events = scratch.path(&format!("restore-{i}.jsonl"));
        let t0 = monotonic_ns();
        let mut child = vmm_command()
            .arg("--restore")
            .arg(format!(
                "source_url=file://{},resume=on",
                templates[i % 2].display()
            ))
            .args(["--serial", "null"])
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()))
            .spawn()
            .map_err(|e| e.to_string())?;
        let e = wait_event(&events, "guest", &restored, &mut child, TIMEOUT);
        let _ = child.kill();
        let _ = child.wait();
        restore_ms.push(e?.monotonic_ns.saturating_sub(t0) as f64 / 1e6);
    }

    // One warm VM switched back and forth.
    let socket = scratch.path("warm.sock");
    let events = scratch.path("warm.jsonl");
    let mut child = vmm_command()
        .arg("--api-socket")
        .arg(&socket)
        .arg("--restore")
        .arg(format!(
            "source_url=file://{},resume=on",
            templates[0].display()
        ))
        .args(["--serial", "null"])
        .arg("--event-monitor")
        .arg(format!("path={}", events.display()))
        .spawn()
        .map_err(|e| e.to_string())?;
    wait_event(&events, "guest", &verified, &mut child, TIMEOUT)?;
    let mut api_ms = Vec::with_capacity(rounds);
    let mut running_ms = Vec::with_capacity(rounds);
    let mut in_place = 0;
    let mut parked_rss_kib = 0u64;
    let mut parked_ms = Vec::with_capacity(rounds);
    let result = (|| -> Result<(), String> {
        for i in 0..rounds {
            let before = count(&events, &restored);
            let verified_before = count(&events, &verified);
            let body = json!({"template": format!("file://{}", templates[(i + 1) % 2].display()), "resume": true});
            let t0 = Instant::now();
            let reply = api(&socket, "vm.repurpose", Some(&body.to_string()))?;
            api_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            if reply.contains("\"in_place\":true") {
                in_place += 1;
            }
            let deadline = Instant::now() + TIMEOUT;
            while count(&events, &restored) == before {
                if Instant::now() > deadline {
                    return Err("the repurposed guest never signalled".into());
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            running_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            // A pool repurposes idle sandboxes: the next round starts once this tenant has done its
            // work (read its heap, written its private pages), which the repurpose then has to drop.
            while count(&events, &verified) == verified_before {
                if Instant::now() > deadline {
                    return Err("the repurposed guest never finished its work".into());
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let parked = api(&socket, "vm.park", None)?;
        let parked: serde_json::Value = serde_json::from_str(&parked).map_err(|e| e.to_string())?;
        parked_rss_kib = parked["vmm_rss_kib"].as_u64().unwrap_or(0);
        // A pool parks idle sandboxes off the critical path; time repurposing from that state too.
        for i in 0..rounds {
            let body = json!({"template": format!("file://{}", templates[i % 2].display()), "resume": true});
            let t0 = Instant::now();
            api(&socket, "vm.repurpose", Some(&body.to_string()))?;
            parked_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            api(&socket, "vm.park", None)?;
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result?;
    let phases = phase_samples(&events);

    let mut out = json!({
        "bench": "repurpose",
        "what": "warm idle VM (its tenant's 16 MiB heap read, 1 MiB written) switched in place between two templates vs a fresh cow restore, both to the guest running the new tenant",
        "rounds": rounds,
        "mem_mib": mem_mib,
        "in_place": in_place,
        "parked_vmm_rss_mib": (parked_rss_kib as f64 / 1024.0 * 1000.0).round() / 1000.0,
        "targets": {"repurpose_p99_ms": 1.0},
    });
    let map = out.as_object_mut().unwrap();
    map.extend(summary("repurpose_", &mut api_ms));
    map.extend(summary("repurpose_to_running_", &mut running_ms));
    map.extend(summary("fresh_restore_", &mut restore_ms));
    map.extend(summary("repurpose_parked_", &mut parked_ms));
    // Where the time goes, per phase, over every in-place repurpose of the run (warm and parked).
    let mut breakdown = serde_json::Map::new();
    for (name, mut samples) in phases {
        let name = match name.trim_end_matches("us") {
            "" => "in_vmm_total_".to_string(),
            phase => phase.to_string(),
        };
        breakdown.extend(summary(&name, &mut samples));
    }
    map.insert("phases_ms".into(), breakdown.into());
    Ok(out)
}
