//! `trenv`: the TrEnv VMM, one process per VM, with Cloud Hypervisor's command-line syntax.

fn main() -> std::process::ExitCode {
    vmm::cli::main_with_args(std::env::args_os())
}
