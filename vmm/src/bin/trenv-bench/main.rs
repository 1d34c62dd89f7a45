//! `trenv-bench`: TrEnv's benchmarks. Each prints one JSON object on stdout.
//!
//! - `boot`: VMM process spawn to the test guest's boot-complete signal, and the VMM's peak RSS.
//! - `restore`: template restores in every memory mode, and the host memory N instances cost.
//! - `pmem`: host memory of one image read by N guests through virtio-pmem against virtio-blk.
//! - `blk`: virtio-blk IOPS and MiB/s from the test guest against the host's pread on the same file.
//! - `api`: API round trips (ping) and vm.create+vm.boot latency.
//! - `vsock`: host <-> guest round trips and bulk throughput over hybrid virtio-vsock.
//! - `trace`: a bursty multi-function trace against fresh boots, on-demand restores and the warm pool.
//!
//! The VMM is this very binary re-executed in VMM mode (`trenv-bench __vmm ...` runs exactly `trenv`'s
//! main), so `cargo run --bin trenv-bench` needs no other binary built first. Run under the name `trenv`
//! (a link the `trace` bench gives its pool) it is the VMM too, and `trenv-bench __pool ...` is the pool.

mod api;
mod blk;
mod boot;
mod common;
mod pmem;
mod repurpose;
mod restore;
mod trace;
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
    /// A seeded bursty multi-function trace replayed against fresh boots, restores and the warm pool.
    Trace {
        #[arg(long, default_value_t = 20)]
        functions: usize,
        /// Trace length, replayed once per policy.
        #[arg(long, default_value_t = 60.0)]
        duration_s: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Base arrivals per second (bursts run at several times this).
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Policies to run, comma separated.
        #[arg(long, default_value = "fresh,restore,trenv")]
        policies: String,
        /// MiB of heap each function's template built.
        #[arg(long, default_value_t = 16)]
        heap_mib: u64,
        #[arg(long, default_value_t = 128)]
        mem_mib: u64,
        #[arg(long, default_value_t = 4)]
        pool_max_sandboxes: usize,
        #[arg(long, default_value_t = 30_000)]
        pool_keep_alive_ms: u64,
        /// Parked sandboxes the pool keeps ready (0: the configuration leaves `prewarm` out).
        #[arg(long, default_value_t = 2)]
        pool_prewarm: usize,
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
    let as_trenv = args.first().is_some_and(|a| {
        std::path::Path::new(a)
            .file_name()
            .is_some_and(|n| n == trace::TRENV_NAME)
    });
    if as_trenv {
        return vmm::cli::main_with_args(args);
    }
    if args.get(1).is_some_and(|a| a == trace::POOL_MODE) {
        return trace::pool_main(&args[2..]);
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
        Bench::Trace {
            functions,
            duration_s,
            seed,
            rate,
            policies,
            heap_mib,
            mem_mib,
            pool_max_sandboxes,
            pool_keep_alive_ms,
            pool_prewarm,
            ..
        } => trace::run(&trace::Params {
            functions,
            duration_s,
            seed,
            rate,
            policies: policies.split(',').map(|m| m.trim().to_string()).collect(),
            heap_mib,
            mem_mib,
            pool_max_sandboxes: pool_max_sandboxes.max(1),
            pool_keep_alive_ms,
            pool_prewarm,
        }),
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
