//! `fault kind=pf|ud|gp|svc`: raises a CPU exception on purpose, to test the fault report path (the guest
//! prints `FAULT: ...` and signals FAILURE with FAIL_EXCEPTION_BASE + vector) and how the VMM handles a
//! failing guest.

use super::Context;
use crate::cmdline::{Token, Tokens};
use crate::protocol::*;
use crate::serial::println;

/// Never returns Ok: every kind faults.
pub fn run(_ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let mut kind = "pf";
    for token in params {
        if let Token::KeyValue("kind", v) = token {
            kind = v;
        }
    }
    println!("fault: raising {kind}");
    // SAFETY: each of these faults on purpose; the exception stub never returns here.
    unsafe {
        match kind {
            // Not mapped: the identity map ends at 4 GiB.
            "pf" => {
                let _ = core::ptr::read_volatile(0x10_0000_0000u64 as *const u64);
            }
            "ud" => core::arch::asm!("ud2"),
            // Port I/O at CPL3 with IOPL 0.
            "gp" => core::arch::asm!("out dx, al", in("dx") 0x80u16, in("al") 0u8),
            // An int3 service number that does not exist.
            "svc" => core::arch::asm!("int3", in("rax") 0x7777u64),
            _ => {
                println!("fault: error: kind must be pf, ud, gp or svc");
                return Err(FAIL_BAD_PARAMETER);
            }
        }
    }
    println!("fault: error: {kind} did not fault");
    Err(FAIL_BAD_PARAMETER)
}
