//! What every benchmark shares: running this binary as the VMM, reading its event monitor, statistics.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// First argument that turns this binary into the VMM (`trenv`'s main, unchanged).
pub const VMM_MODE: &str = "__vmm";

/// A command running this executable as the VMM.
pub fn vmm_command() -> Command {
    let exe = std::env::current_exe().expect("cannot find the benchmark's own executable");
    let mut command = Command::new(exe);
    command
        .arg(VMM_MODE)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// A scratch directory removed on drop; on tmpfs when `tmpfs` (where the peers' snapshots were measured).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str, tmpfs: bool) -> Result<Scratch, String> {
        let base = if tmpfs && Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("trenv-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the bundled test guest next to the other scratch files.
pub fn stage_guest(scratch: &Scratch) -> Result<PathBuf, String> {
    let guest = scratch.path("test-guest.elf");
    std::fs::write(&guest, test_guest::IMAGE).map_err(|e| e.to_string())?;
    Ok(guest)
}

pub use vmm::event_monitor::{find_event, wait_event};

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// p50/p99/min/max of samples in ms, as JSON fields with `prefix`.
pub fn summary(prefix: &str, samples: &mut [f64]) -> serde_json::Map<String, serde_json::Value> {
    samples.sort_by(|a, b| a.total_cmp(b));
    let mut map = serde_json::Map::new();
    map.insert(
        format!("{prefix}p50_ms"),
        round3(percentile(samples, 50.0)).into(),
    );
    map.insert(
        format!("{prefix}p99_ms"),
        round3(percentile(samples, 99.0)).into(),
    );
    map.insert(
        format!("{prefix}min_ms"),
        round3(samples.first().copied().unwrap_or(f64::NAN)).into(),
    );
    map.insert(
        format!("{prefix}max_ms"),
        round3(samples.last().copied().unwrap_or(f64::NAN)).into(),
    );
    map
}
