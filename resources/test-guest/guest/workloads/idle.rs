//! `idle secs=N`: stays alive (N = 0: until the VMM stops it), printing `idle: tick K` once a second by the
//! host clock, so host tests have a running guest to pause, resume, snapshot or inspect.

use super::Context;
use crate::cmdline::{self, Tokens};
use crate::protocol::*;
use crate::serial::println;
use crate::signal;

pub fn run(_ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let secs = cmdline::param_u64(params, "secs", 0).map_err(|e| {
        println!("idle: error: {e}");
        FAIL_BAD_PARAMETER
    })?;
    let Some(start) = signal::now_ns() else {
        println!("idle: error: needs the guest-signal clock");
        return Err(FAIL_BAD_PARAMETER);
    };
    println!("idle: running for {secs} s (0 = until stopped)");
    signal::send(SIGNAL_READY, WORKLOAD_ID_IDLE);
    let mut ticks = 0u64;
    loop {
        // Blocks in the VMM for up to ~10 ms instead of spinning: `hlt` faults at CPL3 here.
        signal::idle();
        let now = signal::now_ns().unwrap_or(start);
        let elapsed_s = now.saturating_sub(start) / 1_000_000_000;
        if elapsed_s > ticks {
            ticks = elapsed_s;
            println!("idle: tick {ticks}");
        }
        if secs != 0 && ticks >= secs {
            println!("idle: done");
            return Ok(ticks);
        }
    }
}
