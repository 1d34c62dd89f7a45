//! `blk`: virtio-blk throughput seen by the test guest against the host's own pread on the same file.
//!
//! The guest runs its `blk mode=...` benchmark (one VM per mode, timed with the guest-signal clock, i.e.
//! host CLOCK_MONOTONIC read from inside the guest): 4 KiB random reads, 1 MiB sequential reads and 4 KiB
//! random writes, a batch of requests in flight (the guest driver's batch: 64). The host then preads the
//! same file in the same patterns (one request at a time, from the page cache the guest run warmed).
//! The ratios say how much of the host's rate the device delivers.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{round3, stage_guest, vmm_command, Scratch};

pub struct Params {
    pub image_mib: u64,
    pub rand_count: u64,
    pub seq_mib: u64,
    pub write_count: u64,
}

const TIMEOUT: Duration = Duration::from_secs(300);

fn write_image(path: &Path, mib: u64) -> Result<(), String> {
    let mut file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    file.sync_all().map_err(|e| e.to_string())
}

/// Runs the guest's `blk mode=<mode> count=<count>` on `image`; returns the guest-measured seconds.
fn guest_run(
    scratch: &Scratch,
    guest: &Path,
    image: &Path,
    mode: &str,
    count: u64,
) -> Result<f64, String> {
    let serial = scratch.path(&format!("serial-{mode}.txt"));
    let mut child = vmm_command()
        .arg("--kernel")
        .arg(guest)
        .args([
            "--cmdline",
            &format!("{} blk mode={mode} count={count}", vmm::TEST_GUEST_CONSOLE),
        ])
        .args(["--memory", "size=256M"])
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .arg("--disk")
        .arg(format!("path={}", image.display()))
        .spawn()
        .map_err(|e| format!("cannot start the VMM: {e}"))?;
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the {mode} run did not finish within {TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    if !status.success() {
        return Err(format!("the {mode} run failed ({status}):\n{out}"));
    }
    let ns: u64 = out
        .lines()
        .find(|l| l.starts_with("blk: bench "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("ns="))
                .and_then(|v| v.parse().ok())
        })
        .ok_or_else(|| format!("the {mode} run printed no result:\n{out}"))?;
    Ok(ns as f64 / 1e9)
}

/// Host pread of `count` random 4 KiB pages; returns seconds.
fn host_rand4k(image: &Path, count: u64) -> Result<f64, String> {
    let file = std::fs::File::open(image).map_err(|e| e.to_string())?;
    let pages = file.metadata().map_err(|e| e.to_string())?.len() / 4096;
    let mut buf = vec![0u8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let t0 = Instant::now();
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        file.read_exact_at(&mut buf, (x % pages) * 4096)
            .map_err(|e| e.to_string())?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Host pread of `mib` sequential MiB (wrapping); returns seconds.
fn host_seq1m(image: &Path, mib: u64) -> Result<f64, String> {
    let file = std::fs::File::open(image).map_err(|e| e.to_string())?;
    let mibs = (file.metadata().map_err(|e| e.to_string())?.len() >> 20).max(1);
    let mut buf = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    for i in 0..mib {
        file.read_exact_at(&mut buf, (i % mibs) << 20)
            .map_err(|e| e.to_string())?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

pub fn run(p: &Params) -> Result<serde_json::Value, String> {
    if p.image_mib == 0 {
        return Err("the image needs at least 1 MiB".into());
    }
    let scratch = Scratch::new("blk", false)?;
    let guest = stage_guest(&scratch)?;
    let image = scratch.path("disk.img");
    write_image(&image, p.image_mib)?;

    let rand_s = guest_run(&scratch, &guest, &image, "rand4k", p.rand_count)?;
    let seq_s = guest_run(&scratch, &guest, &image, "seq1m", p.seq_mib)?;
    let write_s = guest_run(&scratch, &guest, &image, "randw4k", p.write_count)?;
    let host_rand_s = host_rand4k(&image, p.rand_count)?;
    let host_seq_s = host_seq1m(&image, p.seq_mib)?;

    let read_iops = p.rand_count as f64 / rand_s;
    let write_iops = p.write_count as f64 / write_s;
    let read_mib_s = p.seq_mib as f64 / seq_s;
    let host_read_iops = p.rand_count as f64 / host_rand_s;
    let host_read_mib_s = p.seq_mib as f64 / host_seq_s;
    Ok(json!({
        "bench": "blk",
        "what": "test guest through virtio-blk (4 KiB random reads and writes, 1 MiB sequential reads, \
                 64 requests in flight) against host pread on the same file (one at a time, page cache)",
        "image_mib": p.image_mib,
        "rand_count": p.rand_count,
        "seq_mib": p.seq_mib,
        "write_count": p.write_count,
        "read_iops": round3(read_iops),
        "write_iops": round3(write_iops),
        "read_mib_s": round3(read_mib_s),
        "host_read_iops": round3(host_read_iops),
        "host_read_mib_s": round3(host_read_mib_s),
        "read_iops_ratio": round3(read_iops / host_read_iops),
        "read_mib_s_ratio": round3(read_mib_s / host_read_mib_s),
    }))
}
