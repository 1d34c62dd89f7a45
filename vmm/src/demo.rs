//! `trenv demo`: the bundled test guest, cold-booted and then as a memory template with copy-on-write
//! clones, showing boot time, restore times and how much memory the clones share.
//!
//! The cold boots run in this process; the template and its clones are separate `trenv` processes (this
//! executable re-run with `--api-socket` / `--restore`), as an orchestrator would run them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use devices::guest_signal::event_name;

use crate::config::{self, ConsoleConfig, ConsoleMode, VmConfig};
use crate::event_monitor::{monotonic_ns, wait_event};
use crate::{error_chain, runner, TEST_GUEST_CONSOLE};

const CLONES: usize = 4;
const HEAP_MIB: u64 = 32;
const DIRTY_MIB: u64 = 4;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Kills a child VMM when dropped, so that an error on the way never leaves one behind.
struct ChildVmm(Child);

impl Drop for ChildVmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn boot_config(image: &Path, memory: &str, cmdline: &str) -> Result<VmConfig, String> {
    let config = VmConfig {
        payload: config::PayloadConfig {
            kernel: Some(image.to_path_buf()),
            cmdline: Some(format!("{TEST_GUEST_CONSOLE} {cmdline}")),
            ..Default::default()
        },
        memory: config::parse_memory(&format!("size={memory}")).map_err(|e| e.to_string())?,
        serial: ConsoleConfig::with_mode(ConsoleMode::Tty),
        ..Default::default()
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

pub fn run(memory: &str, start_ns: u64) -> Result<(), String> {
    let image =
        crate::test_guest_image().map_err(|e| format!("cannot stage the test guest: {e}"))?;
    println!("== trenv demo: booting the bundled test guest ({memory} RAM, 1 vCPU)");
    let report = runner::run_vm(&boot_config(&image, memory, "boot")?, start_ns)
        .map_err(|e| error_chain(&e))?;
    println!(
        "== guest {:?}: boot-complete signal {} after VMM start, powered off after {:.2} ms",
        report.exit,
        report
            .boot_complete
            .map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "never seen".into()),
        report.total.as_secs_f64() * 1e3
    );
    println!("== touching 64 MiB in the guest at native speed (CPL3)");
    let t0 = monotonic_ns();
    let report = runner::run_vm(&boot_config(&image, memory, "touch mib=64 seed=7")?, t0)
        .map_err(|e| error_chain(&e))?;
    println!(
        "== guest {:?} after {:.2} ms",
        report.exit,
        report.total.as_secs_f64() * 1e3
    );
    templates(memory)
}

fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))
}

fn vmm(args: &[String]) -> Result<ChildVmm, String> {
    Command::new(exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map(ChildVmm)
        .map_err(|e| format!("cannot start a VMM: {e}"))
}

fn api(socket: &Path, endpoint: &str, body: Option<&str>) -> Result<(), String> {
    let (status, text) = api::client::ApiClient::new(socket)
        .request("PUT", endpoint, body, &[])
        .map_err(|e| format!("{endpoint}: {e}"))?;
    if status >= 300 {
        return Err(format!(
            "{endpoint}: HTTP {status}: {}",
            api::client::error_message(&text)
        ));
    }
    Ok(())
}

fn templates(memory: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("trenv-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let scratch = Scratch(dir);
    let path = |name: &str| scratch.0.join(name);
    let image = path("test-guest.elf");
    std::fs::write(&image, test_guest::IMAGE).map_err(|e| e.to_string())?;

    println!(
        "== memory templates: a guest builds a {HEAP_MIB} MiB heap (its 'runtime'), is paused and snapshotted"
    );
    let socket = path("template.sock");
    let events = path("template.jsonl");
    let template = path("template");
    let mut source = vmm(&[
        "--api-socket".into(),
        socket.display().to_string(),
        "--kernel".into(),
        image.display().to_string(),
        "--cmdline".into(),
        format!("{TEST_GUEST_CONSOLE} serve heap={HEAP_MIB} seed=7 dirty={DIRTY_MIB}"),
        "--memory".into(),
        format!("size={memory}"),
        "--serial".into(),
        "null".into(),
        "--event-monitor".into(),
        format!("path={}", events.display()),
    ])?;
    let heap = event_name(test_guest::SIGNAL_SERVE_HEAP);
    wait_event(&events, "guest", &heap, &mut source.0, TIMEOUT)?;
    let t0 = monotonic_ns();
    api(&socket, "vm.pause", None)?;
    let body = serde_json::json!({"destination_url": format!("file://{}", template.display())});
    api(&socket, "vm.snapshot", Some(&body.to_string()))?;
    let snapshot_ms = (monotonic_ns() - t0) as f64 / 1e6;
    api(&socket, "vmm.shutdown", None)?;
    drop(source);
    let manifest = memory_template::format::read_manifest(&template).map_err(|e| e.to_string())?;
    println!(
        "== template: {} MiB guest RAM, {:.1} MiB of data (zero pages are holes), paused + written in {snapshot_ms:.1} ms",
        manifest.memory_bytes() >> 20,
        manifest.data_bytes() as f64 / (1 << 20) as f64
    );

    println!("== restoring {CLONES} clones, copy-on-write; each checks its heap and writes {DIRTY_MIB} MiB of its own");
    let restored = event_name(test_guest::SIGNAL_SERVE_RESTORED);
    let verified = event_name(test_guest::SIGNAL_SERVE_VERIFIED);
    let mut clones = Vec::new();
    for i in 0..CLONES {
        let events = path(&format!("clone-{i}.jsonl"));
        let serial = path(&format!("clone-{i}.log"));
        let t0 = monotonic_ns();
        let mut clone = vmm(&[
            "--restore".into(),
            format!(
                "source_url=file://{},memory_restore_mode=cow,resume=on",
                template.display()
            ),
            "--serial".into(),
            format!("file={}", serial.display()),
            "--event-monitor".into(),
            format!("path={}", events.display()),
        ])?;
        let e = wait_event(&events, "guest", &restored, &mut clone.0, TIMEOUT)?;
        let restore_ms = e.monotonic_ns.saturating_sub(t0) as f64 / 1e6;
        wait_event(&events, "guest", &verified, &mut clone.0, TIMEOUT)?;
        let report = std::fs::read_to_string(&serial).unwrap_or_default();
        let line = report
            .lines()
            .find(|l| l.starts_with("serve: restored"))
            .unwrap_or("")
            .to_string();
        clones.push((clone, restore_ms, line));
    }
    println!("   clone  restore(ms)  PSS(MiB)  private(MiB)  shared(MiB)");
    let mut pss_total = 0.0;
    for (i, (clone, restore_ms, _)) in clones.iter().enumerate() {
        let usage =
            memory_template::sharing::process_memory(clone.0.id()).map_err(|e| e.to_string())?;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        pss_total += mib(usage.pss);
        println!(
            "   {i:>5}  {restore_ms:>11.2}  {:>8.1}  {:>12.1}  {:>11.1}",
            mib(usage.pss),
            mib(usage.private()),
            mib(usage.shared())
        );
    }
    println!(
        "== {CLONES} clones use {pss_total:.1} MiB in total (PSS): the template's pages are shared page cache, \
         each clone pays only for what it wrote"
    );
    if let Some((_, _, line)) = clones.first() {
        println!("== clone 0 reports: {line}");
    }
    Ok(())
}
