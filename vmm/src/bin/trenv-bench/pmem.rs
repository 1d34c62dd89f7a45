//! `pmem`: host memory of one image read by N guests through virtio-pmem, against the same through
//! virtio-blk.
//!
//! Each guest reads the whole image (the test guest's `pmem` / `blkread` workloads, which print the same
//! checksum) and then holds, so that every guest is alive when memory is measured:
//! - pmem: the image's host page cache, counted once (`mincore`), plus every guest's private copies inside
//!   its pmem mapping (none for reads). The sum of the mappings' PSS is printed too: page cache shared by
//!   N mappers is split N ways there, so it adds up to the image once as well.
//! - blk: the same page cache (the device reads the file through it), plus what each guest's RAM holds of
//!   its copy: the VMM's anonymous memory in the blk run minus the same VMM's in the pmem run (same guest,
//!   same RAM size; the difference is the copy).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use devices::guest_signal::event_name;
use memory_template::sharing::process_memory;
use serde_json::json;
use virtio_pmem_share::accounting::{file_cached_bytes, file_mappings_usage};

use crate::common::{round3, stage_guest, vmm_command, wait_event, Scratch};

pub struct Params {
    pub vms: usize,
    pub image_mib: u64,
}

const TIMEOUT: Duration = Duration::from_secs(120);
/// How long each guest stays up after reading (it is killed as soon as memory is measured).
const HOLD_SECS: u64 = 600;

struct Guest {
    child: Child,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mib(bytes: u64) -> f64 {
    round3(bytes as f64 / (1 << 20) as f64)
}

/// Writes `mib` MiB of pseudo-random bytes (xorshift) and returns their checksum as the guests compute it.
fn write_image(path: &Path, mib: u64) -> Result<u64, String> {
    let mut file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut sum = 0u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sum = sum.wrapping_add(x);
            word.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    file.sync_all().map_err(|e| e.to_string())?;
    Ok(sum)
}

/// One half of the comparison.
struct Phase<'a> {
    tag: &'a str,
    workload: &'a str,
    /// The device flag and its value.
    device: (&'a str, String),
    /// The guest signal that says the image is read (its argument is the checksum).
    done: u32,
}

/// Starts `vms` guests for `phase` one after another, each checked to have read the whole image; returns
/// them (still running) and the mean spawn-to-read time in ms.
fn start_guests(
    scratch: &Scratch,
    guest: &Path,
    phase: &Phase<'_>,
    (mem_mib, vms): (u64, usize),
    checksum: u64,
) -> Result<(Vec<Guest>, f64), String> {
    let Phase {
        tag,
        workload,
        device,
        done,
    } = phase;
    let done = event_name(*done);
    let mut guests = Vec::with_capacity(vms);
    let t0 = Instant::now();
    for i in 0..vms {
        let events = scratch.path(&format!("{tag}-{i}.jsonl"));
        let child = vmm_command()
            .arg("--kernel")
            .arg(guest)
            .args([
                "--cmdline",
                &format!("{} {workload} hold={HOLD_SECS}", vmm::TEST_GUEST_CONSOLE),
            ])
            .args(["--memory", &format!("size={mem_mib}M"), "--serial", "null"])
            .args([device.0, &device.1])
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()))
            .spawn()
            .map_err(|e| format!("cannot start the VMM: {e}"))?;
        let mut g = Guest { child };
        let event = wait_event(&events, "guest", &done, &mut g.child, TIMEOUT)?;
        let got = event.properties["arg"]
            .as_str()
            .and_then(|a| a.parse::<u64>().ok());
        if got != Some(checksum) {
            return Err(format!(
                "{tag} guest {i}: checksum {got:x?}, the image's is {checksum:#x}"
            ));
        }
        guests.push(g);
    }
    Ok((guests, t0.elapsed().as_secs_f64() * 1e3 / vms as f64))
}

pub fn run(p: &Params) -> Result<serde_json::Value, String> {
    if p.image_mib == 0 || !p.image_mib.is_multiple_of(2) {
        return Err(
            "--image-mib must be a non-zero multiple of 2 (pmem sizes are 2 MiB multiples)".into(),
        );
    }
    // On disk, like a real image: its page cache is what the guests share.
    let scratch = Scratch::new("pmem", false)?;
    let guest = stage_guest(&scratch)?;
    let image: PathBuf = scratch.path("image.raw");
    let checksum = write_image(&image, p.image_mib)?;
    let image_bytes = p.image_mib << 20;
    // Room for the blk copy, the guest and its rings.
    let mem_mib = p.image_mib + 64;

    let pmem_arg = format!("file={},discard_writes=on", image.display());
    let pmem_phase = Phase {
        tag: "pmem",
        workload: "pmem",
        device: ("--pmem", pmem_arg),
        done: test_guest::SIGNAL_PMEM_DONE,
    };
    let (pmem_guests, pmem_ms) =
        start_guests(&scratch, &guest, &pmem_phase, (mem_mib, p.vms), checksum)?;
    let mut pmem_pss = 0u64;
    let mut pmem_copied = 0u64;
    let mut pmem_resident = 0u64;
    let mut baseline_anon = 0u64;
    for g in &pmem_guests {
        let pid = g.child.id();
        let u = file_mappings_usage(pid, &image)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("VMM {pid} does not map the image"))?;
        pmem_pss += u.pss;
        pmem_copied += u.copied;
        pmem_resident += u.resident;
        baseline_anon += process_memory(pid).map_err(|e| e.to_string())?.anonymous;
    }
    let pmem_cache = file_cached_bytes(&image).map_err(|e| e.to_string())?;
    drop(pmem_guests);
    let pmem_host = pmem_cache + pmem_copied;

    let disk_arg = format!("path={},readonly=on", image.display());
    let blk_phase = Phase {
        tag: "blk",
        workload: "blkread",
        device: ("--disk", disk_arg),
        done: test_guest::SIGNAL_BLKREAD_DONE,
    };
    let (blk_guests, blk_ms) =
        start_guests(&scratch, &guest, &blk_phase, (mem_mib, p.vms), checksum)?;
    let mut blk_anon = 0u64;
    for g in &blk_guests {
        blk_anon += process_memory(g.child.id())
            .map_err(|e| e.to_string())?
            .anonymous;
    }
    let blk_cache = file_cached_bytes(&image).map_err(|e| e.to_string())?;
    drop(blk_guests);
    let blk_copies = blk_anon.saturating_sub(baseline_anon);
    let blk_host = blk_cache + blk_copies;

    let ratio = if pmem_host > 0 {
        Some(round3(blk_host as f64 / pmem_host as f64))
    } else {
        None
    };
    Ok(json!({
        "bench": "pmem",
        "what": "host memory attributable to one image read whole by N guests: virtio-pmem (mapped, DAX-style loads) vs virtio-blk (copied into guest RAM)",
        "vms": p.vms,
        "image_mib": p.image_mib,
        "guest_mem_mib": mem_mib,
        "pmem_host_mib": mib(pmem_host),
        "blk_host_mib": mib(blk_host),
        "saving_ratio": ratio,
        "pmem": {
            "page_cache_mib": mib(pmem_cache),
            "copied_mib": mib(pmem_copied),
            "mappings_pss_sum_mib": mib(pmem_pss),
            "mappings_resident_sum_mib": mib(pmem_resident),
            "per_vm_start_to_read_ms": round3(pmem_ms),
        },
        "blk": {
            "page_cache_mib": mib(blk_cache),
            "guest_copies_mib": mib(blk_copies),
            "per_vm_start_to_read_ms": round3(blk_ms),
        },
        "targets": {
            "pmem_host_mib_max": round3(1.1 * image_bytes as f64 / (1 << 20) as f64),
        },
        "pmem_within_target": pmem_host as f64 <= 1.1 * image_bytes as f64,
    }))
}
