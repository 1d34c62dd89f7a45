//! `touch mib=N seed=S`: writes the seeded pattern (pattern.rs) over N MiB of usable RAM above the image,
//! verifies it, and reports timings from the host clock. The first write to each page is what a VMM's
//! memory backend pays for (fault-in, CoW, userfaultfd), so write_ms / pages_per_s measure it.

use super::Context;
use crate::cmdline::{self, Tokens};
use crate::pattern;
use crate::protocol::*;
use crate::serial::println;
use crate::signal;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const DEFAULT_MIB: u64 = 16;
const DEFAULT_SEED: u64 = 1;

/// Ok(checksum of the region).
pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let parsed = cmdline::param_u64(params.clone(), "mib", DEFAULT_MIB)
        .and_then(|mib| Ok((mib, cmdline::param_u64(params, "seed", DEFAULT_SEED)?)));
    let (mib, seed) = parsed.map_err(|e| {
        println!("touch: error: {e}");
        FAIL_BAD_PARAMETER
    })?;
    let Some(len) = mib.checked_mul(MIB).filter(|&l| l > 0) else {
        println!("touch: error: mib={mib} must be between 1 and 4095");
        return Err(FAIL_BAD_PARAMETER);
    };
    let image_end = crate::image_range().1;
    let Some(base) = ctx.e820.find_usable(image_end, len, GUEST_IDENTITY_MAP_END) else {
        println!(
            "touch: error: no {mib} MiB of usable RAM above the image end {image_end:#x} and below 4 GiB"
        );
        return Err(FAIL_NO_MEMORY);
    };
    let pages = len / PAGE;
    signal::send(SIGNAL_TOUCH_REGION, base);

    let words = (len / 8) as usize;
    let region = base as *mut u64;
    let t0 = signal::now_ns();
    for i in 0..words {
        let addr = base + (i as u64) * 8;
        // SAFETY: [base, base + len) is usable RAM below 4 GiB above the image (checked against e820),
        // identity-mapped and owned by nobody else.
        unsafe { region.add(i).write_volatile(pattern::word(seed, addr)) };
    }
    let t1 = signal::now_ns();
    let mut sum = 0u64;
    for i in 0..words {
        let addr = base + (i as u64) * 8;
        // SAFETY: as above.
        let got = unsafe { region.add(i).read_volatile() };
        if got != pattern::word(seed, addr) {
            println!(
                "touch: MISMATCH at {addr:#x}: read {got:#018x}, expected {:#018x}",
                pattern::word(seed, addr)
            );
            return Err(FAIL_MISMATCH);
        }
        sum = sum.wrapping_add(got);
    }
    let t2 = signal::now_ns();

    let (write_ns, verify_ns) = match (t0, t1, t2) {
        (Some(a), Some(b), Some(c)) => (b.saturating_sub(a), c.saturating_sub(b)),
        _ => (0, 0),
    };
    let pages_per_s = match write_ns {
        0 => 0,
        ns => (u128::from(pages) * 1_000_000_000 / u128::from(ns)) as u64,
    };
    println!(
        "touch: mib={mib} seed={seed} pages={pages} write_ms={} verify_ms={} pages_per_s={pages_per_s}",
        Millis(write_ns),
        Millis(verify_ns)
    );
    println!("touch: checksum={sum:#018x}");
    println!("touch: ok");
    Ok(sum)
}

/// Nanoseconds shown as milliseconds with three decimals.
struct Millis(u64);

impl core::fmt::Display for Millis {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1_000_000, (self.0 / 1_000) % 1_000)
    }
}
