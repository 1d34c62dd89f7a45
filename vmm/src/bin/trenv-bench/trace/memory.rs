//! Host memory of a policy: a sampler thread summing the PSS of the policy's processes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use memory_template::sharing::process_memory;

use super::pool::{POOL_MODE, TRENV_NAME};
use crate::common::VMM_MODE;

pub const MEMORY_METRIC: &str = "peak over the run of the sum of PSS (/proc/PID/smaps_rollup) over every live \
VMM process of the policy plus the pool process (trenv), sampled every 50 ms; PSS charges a page shared by k \
processes 1/k to each, so template pages shared through the page cache count once in the sum";
/// Memory sampling period.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Pid, parent pid, whether it is a zombie, and its command line, for every process.
pub fn processes() -> Vec<(u32, u32, bool, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: the fields follow the last ')'.
        let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
        let zombie = fields.next()? == "Z";
        let ppid = fields.next()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some((pid, ppid, zombie, args))
    })
    .collect()
}

pub fn is_vmm(args: &[String]) -> bool {
    args.get(1).is_some_and(|a| a == VMM_MODE)
        || args
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == TRENV_NAME))
}

/// The policy's processes: this benchmark's VMM children and its pool child, and the pool's VMM children.
/// A child between fork and exec still shows its parent's command line (and, after a vfork, its memory),
/// so only processes that run the VMM, or the pool as a direct child of the benchmark, count.
fn policy_processes() -> Vec<u32> {
    let me = std::process::id();
    let all = processes();
    let pools: Vec<u32> = all
        .iter()
        .filter(|(_, ppid, z, args)| {
            *ppid == me && !z && args.get(1).is_some_and(|a| a == POOL_MODE)
        })
        .map(|p| p.0)
        .collect();
    let vmms = all
        .iter()
        .filter(|(_, ppid, z, args)| !z && (*ppid == me || pools.contains(ppid)) && is_vmm(args))
        .map(|p| p.0);
    pools.iter().copied().chain(vmms).collect()
}

#[derive(Default)]
pub struct MemoryPeak {
    pub peak_bytes: u64,
    pub peak_processes: usize,
    pub samples: usize,
}

pub fn sample_memory(stop: &AtomicBool) -> MemoryPeak {
    let mut peak = MemoryPeak::default();
    while !stop.load(Ordering::Relaxed) {
        let pids = policy_processes();
        // A process that exits between the listing and the read counts nothing.
        let pss: u64 = pids
            .iter()
            .filter_map(|&pid| process_memory(pid).ok())
            .map(|u| u.pss)
            .sum();
        peak.peak_bytes = peak.peak_bytes.max(pss);
        peak.peak_processes = peak.peak_processes.max(pids.len());
        peak.samples += 1;
        std::thread::sleep(SAMPLE_EVERY);
    }
    peak
}
