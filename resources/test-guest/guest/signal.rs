//! The guest-signal device (MMIO at 0xfe000000): events for the host and the host's monotonic clock.
//! If the magic is not there, every call is a no-op (and the clock reads as absent).

use crate::global::Global;
use crate::protocol::*;

static PRESENT: Global<bool> = Global::new(false);

fn reg<T>(offset: u64) -> *mut T {
    (SIGNAL_BASE + offset) as *mut T
}

/// Probes the device; returns its version if present.
pub fn init() -> Option<u32> {
    // SAFETY: the identity map covers the MMIO hole; a read of an absent device is harmless.
    let magic = unsafe { reg::<u32>(SIGNAL_REG_MAGIC).read_volatile() };
    if magic != SIGNAL_MAGIC {
        return None;
    }
    PRESENT.set(true);
    // SAFETY: as above.
    Some(unsafe { reg::<u32>(SIGNAL_REG_VERSION).read_volatile() })
}

/// Sends `code` with `arg` (argument first: the event write is what the host acts on).
pub fn send(code: u32, arg: u64) {
    if !PRESENT.get() {
        return;
    }
    // SAFETY: device registers, present.
    unsafe {
        reg::<u64>(SIGNAL_REG_ARG).write_volatile(arg);
        reg::<u32>(SIGNAL_REG_EVENT).write_volatile(code);
    }
}

/// Host CLOCK_MONOTONIC in ns, if the device is there.
pub fn now_ns() -> Option<u64> {
    if !PRESENT.get() {
        return None;
    }
    // SAFETY: device register, present.
    Some(unsafe { reg::<u64>(SIGNAL_REG_CLOCK_NS).read_volatile() })
}

/// The VM generation ID (0 on a cold boot or without the device).
pub fn generation() -> u128 {
    if !PRESENT.get() {
        return 0;
    }
    // The two halves are separate reads, and the VM can be snapshotted between them (then restored with a
    // new ID): re-read until both halves come from the same generation, as with a seqlock.
    loop {
        // SAFETY: device registers, present.
        let (hi, lo, hi_again) = unsafe {
            (
                reg::<u64>(SIGNAL_REG_GENERATION_HI).read_volatile(),
                reg::<u64>(SIGNAL_REG_GENERATION_LO).read_volatile(),
                reg::<u64>(SIGNAL_REG_GENERATION_HI).read_volatile(),
            )
        };
        if hi == hi_again {
            return (u128::from(hi) << 64) | u128::from(lo);
        }
    }
}

/// Waits without burning the host CPU: blocks in the VMM's guest-idle device until it has news (a restore,
/// a pause) or ~10 ms pass. Without the signal device (not a TrEnv VMM) it spins briefly instead.
pub fn idle() {
    if !PRESENT.get() {
        for _ in 0..10_000 {
            core::hint::spin_loop();
        }
        return;
    }
    // SAFETY: the idle register of a TrEnv VMM (present with the signal device); reads have no side effect
    // on guest state.
    unsafe { (IDLE_BASE as *const u32).read_volatile() };
}

/// Like [`idle`], but waits up to ~1 s: for loops that wait only for news the VMM wakes the guest for (a
/// new generation, a device interrupt), not for time to pass, so that an idle guest rarely exits.
pub fn idle_long() {
    if !PRESENT.get() {
        idle();
        return;
    }
    // SAFETY: the long-wait register of the same device; as above.
    unsafe { ((IDLE_BASE + IDLE_LONG_WAIT) as *const u32).read_volatile() };
}
