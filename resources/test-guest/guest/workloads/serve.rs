//! `serve heap=H seed=S dirty=D`: the stand-in for a function runtime that a template is taken of.
//!
//! Builds a heap of H MiB from the seed (the "imports"), signals READY (the VMM snapshots it here), then
//! waits for work. Whenever the VM generation ID changes, the guest is a new clone restored from a
//! template: it signals SERVE_RESTORED at once, verifies the heap checksum, records what the heap's first
//! word held (the template's value: another instance's writes must never show), writes instance-private
//! data (the generation ID into the first word, and D MiB of instance-specific pattern at the heap's end),
//! prints a report and signals SERVE_VERIFIED. Then it waits for the next generation change.

use super::Context;
use crate::cmdline::{self, Tokens};
use crate::pattern;
use crate::protocol::*;
use crate::serial::println;
use crate::signal;

const MIB: u64 = 1 << 20;

pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let param = |key, default| {
        cmdline::param_u64(params.clone(), key, default).map_err(|e| {
            println!("serve: error: {e}");
            FAIL_BAD_PARAMETER
        })
    };
    let (heap_mib, seed, dirty_mib) = (param("heap", 16)?, param("seed", 1)?, param("dirty", 0)?);
    // Read before anything else, so that a snapshot taken at any later point is seen as a clone.
    let mut generation = signal::generation();
    if heap_mib == 0 || dirty_mib > heap_mib {
        println!("serve: error: need heap >= 1 and dirty <= heap (MiB)");
        return Err(FAIL_BAD_PARAMETER);
    }
    let len = heap_mib * MIB;
    let image_end = crate::image_range().1;
    let Some(base) = ctx.e820.find_usable(image_end, len, GUEST_IDENTITY_MAP_END) else {
        println!("serve: error: no {heap_mib} MiB of usable RAM for the heap");
        return Err(FAIL_NO_MEMORY);
    };
    let heap = base as *mut u64;
    let words = (len / 8) as usize;
    for i in 0..words {
        // SAFETY: [base, base + len) is usable RAM above the image, identity-mapped, ours alone.
        unsafe {
            heap.add(i)
                .write_volatile(pattern::word(seed, base + i as u64 * 8))
        };
    }
    let checksum = pattern::checksum(seed, base, len);
    println!("serve: heap mib={heap_mib} seed={seed} base={base:#x} checksum={checksum:#018x}");
    signal::send(SIGNAL_SERVE_HEAP, base);
    signal::send(SIGNAL_READY, WORKLOAD_ID_SERVE);

    let mut instances = 0u64;
    loop {
        let now = signal::generation();
        if now == generation {
            // Only a restore (which wakes the idle device) changes the generation.
            signal::idle_long();
            continue;
        }
        generation = now;
        instances += 1;
        signal::send(SIGNAL_SERVE_RESTORED, now as u64);

        // The template's first word, before this instance writes it.
        // SAFETY: as above.
        let first_before = unsafe { heap.read_volatile() };
        let mut sum = 0u64;
        for i in 0..words {
            // SAFETY: as above.
            sum = sum.wrapping_add(unsafe { heap.add(i).read_volatile() });
        }
        let heap_ok = sum == checksum;
        // Instance-private data: the generation ID, then D MiB at the heap's end.
        // SAFETY: as above.
        unsafe { heap.write_volatile(now as u64) };
        let dirty_words = (dirty_mib * MIB / 8) as usize;
        let instance_seed = seed ^ now as u64;
        for i in words - dirty_words..words {
            // SAFETY: as above.
            unsafe {
                heap.add(i)
                    .write_volatile(pattern::word(instance_seed, base + i as u64 * 8))
            };
        }
        // SAFETY: as above.
        let first_after = unsafe { heap.read_volatile() };
        // SAFETY: the VMGenID buffer is 16 bytes of reserved RAM below 1 MiB, identity-mapped.
        let acpi_id = unsafe { (VMGENID_ADDR as *const u128).read_volatile() };
        println!(
            "serve: restored generation={now:#034x} heap={} checksum={sum:#018x} first_before={first_before:#018x} first_after={first_after:#018x} dirty_mib={dirty_mib} instance={instances} vmgenid={acpi_id:#034x}",
            if heap_ok { "ok" } else { "CORRUPT" }
        );
        if !heap_ok {
            signal::send(SIGNAL_FAILURE, FAIL_MISMATCH);
            continue;
        }
        signal::send(SIGNAL_SERVE_VERIFIED, sum);
    }
}
