//! `trenv-bench`: TrEnv's benchmarks. Each prints one JSON object on stdout.
//!
//! - `boot`: VMM process spawn to the test guest's boot-complete signal, and the VMM's peak RSS.
//! - `restore`: template restores in every memory mode, and the host memory N instances cost.
//! - `pmem`: host memory of one image read by N guests through virtio-pmem against virtio-blk.
//! - `blk`: virtio-blk IOPS and MiB/s from the test guest against the host's pread on the same file.
//! - `api`: API round trips (ping) and vm.create+vm.boot latency.
//! - `vsock`: host <-> guest round trips and bulk throughput over hybrid virtio-vsock.
//!
//! The VMM is this very binary re-executed in VMM mode (`trenv-bench __vmm ...` runs exactly `trenv`'s
//! main), so `cargo run --bin trenv-bench` needs no other binary built first.

mod api;
mod blk;
mod boot;
mod common;
mod pmem;
mod repurpose;
mod restore;
mod vsock;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "trenv-bench", about = "TrEnv benchmarks (JSON output)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// VMM start to the test guest's boot-complete signal.
    Boot {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value = "256M")]
        memory: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Print JSON (the only format; accepted for symmetry).
        #[arg(long)]
        json: bool,
    },
    /// Restores from one template in each memory mode: latency and host memory of many instances.
    Restore {
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        #[arg(long, default_value_t = 32)]
        instances: usize,
        /// MiB each instance writes after its restore.
        #[arg(long, default_value_t = 8)]
        dirty_mib: u64,
        /// MiB of heap the template's guest built before the snapshot.
        #[arg(long, default_value_t = 64)]
        heap_mib: u64,
        /// Modes to run, comma separated.
        #[arg(long, default_value = "cow,copy,ondemand")]
        modes: String,
        #[arg(long)]
        json: bool,
    },
    /// A warm VM repurposed in place between two templates, against fresh cow restores.
    Repurpose {
        #[arg(long, default_value_t = 50)]
        rounds: usize,
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        #[arg(long)]
        json: bool,
    },
    /// Host memory of one image read whole by N guests: virtio-pmem (shared mapping) vs virtio-blk.
    Pmem {
        #[arg(long, default_value_t = 16)]
        vms: usize,
        #[arg(long, default_value_t = 256)]
        image_mib: u64,
        #[arg(long)]
        json: bool,
    },
    /// virtio-blk from the test guest (4 KiB random read/write, 1 MiB sequential read) vs host pread.
    Blk {
        #[arg(long, default_value_t = 256)]
        image_mib: u64,
        /// 4 KiB random reads.
        #[arg(long, default_value_t = 20000)]
        rand_count: u64,
        /// MiB read sequentially.
        #[arg(long, default_value_t = 512)]
        seq_mib: u64,
        /// 4 KiB random writes.
        #[arg(long, default_value_t = 20000)]
        write_count: u64,
        #[arg(long)]
        json: bool,
    },
    /// API latency: vmm.ping round trips and vm.create + vm.boot to Running.
    Api {
        #[arg(long, default_value_t = 2000)]
        pings: usize,
        #[arg(long, default_value_t = 20)]
        boots: usize,
        #[arg(long)]
        json: bool,
    },
    /// virtio-vsock (hybrid): round-trip latency of small messages and bulk echo throughput.
    Vsock {
        #[arg(long, default_value_t = 2000)]
        rtt_count: usize,
        #[arg(long, default_value_t = 64)]
        msg_bytes: usize,
        #[arg(long, default_value_t = 256)]
        bulk_mib: usize,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == common::VMM_MODE) {
        args.remove(1);
        return vmm::cli::main_with_args(args);
    }
    let result = match Cli::parse().bench {
        Bench::Boot {
            runs,
            memory,
            vcpus,
            ..
        } => boot::run(runs.max(1), &memory, vcpus),
        Bench::Restore {
            mem_mib,
            instances,
            dirty_mib,
            heap_mib,
            modes,
            ..
        } => restore::run(&restore::Params {
            mem_mib,
            instances: instances.max(1),
            dirty_mib,
            heap_mib,
            modes: modes.split(',').map(|m| m.trim().to_string()).collect(),
        }),
        Bench::Pmem { vms, image_mib, .. } => pmem::run(&pmem::Params {
            vms: vms.max(1),
            image_mib,
        }),
        Bench::Blk {
            image_mib,
            rand_count,
            seq_mib,
            write_count,
            ..
        } => blk::run(&blk::Params {
            image_mib,
            rand_count: rand_count.max(1),
            seq_mib: seq_mib.max(1),
            write_count: write_count.max(1),
        }),
        Bench::Api { pings, boots, .. } => api::run(pings.max(1), boots.max(1)),
        Bench::Vsock {
            rtt_count,
            msg_bytes,
            bulk_mib,
            ..
        } => vsock::run(&vsock::Params {
            rtt_count: rtt_count.max(1),
            msg_bytes: msg_bytes.max(1),
            bulk_mib: bulk_mib.max(1),
        }),
        Bench::Repurpose {
            rounds, mem_mib, ..
        } => repurpose::run(rounds.max(1), mem_mib),
    };
    match result {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trenv-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
