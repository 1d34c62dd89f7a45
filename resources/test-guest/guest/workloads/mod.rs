//! Workloads: what the guest does after setup, chosen by the first bare word of the command line.
//!
//! To add one: write `workloads/<name>.rs` with a `run(&Context, Tokens) -> Result<u64, u64>` (Ok = the
//! WORKLOAD_DONE argument, Err = a FAIL_* code, after printing why), give it an id in protocol.rs and an
//! entry in `WORKLOADS` listing the parameters it accepts. See PROTOCOL.md.

mod barmove;
mod blk;
mod boot;
mod console;
mod devstate;
mod fault;
mod function;
mod hotplug;
mod idle;
mod net;
mod pci;
mod pmem;
mod rng;
mod serve;
mod touch;
mod vsock;

use crate::bootinfo::BootInfo;
use crate::cmdline::Tokens;
use crate::e820;

/// What every workload gets.
pub struct Context<'a> {
    pub info: BootInfo,
    pub cmdline: &'a str,
    pub e820: &'a e820::Map,
}

pub struct Workload {
    pub name: &'static str,
    pub id: u64,
    /// Keys accepted as `key=value` after the name; anything else fails before the workload starts.
    pub params: &'static [&'static str],
    pub run: fn(&Context<'_>, Tokens<'_>) -> Result<u64, u64>,
}

pub static WORKLOADS: &[Workload] = &[
    Workload {
        name: "boot",
        id: crate::protocol::WORKLOAD_ID_BOOT,
        params: &[],
        run: boot::run,
    },
    Workload {
        name: "touch",
        id: crate::protocol::WORKLOAD_ID_TOUCH,
        params: &["mib", "seed"],
        run: touch::run,
    },
    Workload {
        name: "idle",
        id: crate::protocol::WORKLOAD_ID_IDLE,
        params: &["secs"],
        run: idle::run,
    },
    Workload {
        name: "serve",
        id: crate::protocol::WORKLOAD_ID_SERVE,
        params: &["heap", "seed", "dirty"],
        run: serve::run,
    },
    Workload {
        name: "fault",
        id: crate::protocol::WORKLOAD_ID_FAULT,
        params: &["kind"],
        run: fault::run,
    },
    Workload {
        name: "pci",
        id: crate::protocol::WORKLOAD_ID_PCI,
        params: &[],
        run: pci::run,
    },
    Workload {
        name: "blk",
        id: crate::protocol::WORKLOAD_ID_BLK,
        params: &["sectors", "seed", "write", "mode", "count"],
        run: blk::run,
    },
    Workload {
        name: "rng",
        id: crate::protocol::WORKLOAD_ID_RNG,
        params: &["bytes"],
        run: rng::run,
    },
    Workload {
        name: "console",
        id: crate::protocol::WORKLOAD_ID_CONSOLE,
        params: &["text", "echo"],
        run: console::run,
    },
    Workload {
        name: "net",
        id: crate::protocol::WORKLOAD_ID_NET,
        params: &["pings"],
        run: net::run,
    },
    Workload {
        name: "pmem",
        id: crate::protocol::WORKLOAD_ID_PMEM,
        params: &["bytes", "write", "flush", "seed", "passes", "hold"],
        run: pmem::run_pmem,
    },
    Workload {
        name: "blkread",
        id: crate::protocol::WORKLOAD_ID_BLKREAD,
        params: &["bytes", "hold"],
        run: pmem::run_blkread,
    },
    Workload {
        name: "vsock",
        id: crate::protocol::WORKLOAD_ID_VSOCK,
        params: &["port", "mode", "bytes", "count"],
        run: vsock::run,
    },
    Workload {
        name: "function",
        id: crate::protocol::WORKLOAD_ID_FUNCTION,
        params: &["seed", "heap", "port", "cold"],
        run: function::run,
    },
    Workload {
        name: "devstate",
        id: crate::protocol::WORKLOAD_ID_DEVSTATE,
        params: &["port", "seed", "sectors"],
        run: devstate::run,
    },
    Workload {
        name: "hotplug",
        id: crate::protocol::WORKLOAD_ID_HOTPLUG,
        params: &["sectors", "count"],
        run: hotplug::run,
    },
    Workload {
        name: "barmove",
        id: crate::protocol::WORKLOAD_ID_BARMOVE,
        params: &["to", "restore"],
        run: barmove::run,
    },
];

pub fn find(name: &str) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name == name)
}
