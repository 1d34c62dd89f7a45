//! `trenvctl`: a virsh-like CLI for trenv VMs on this host (logic in `vmm::ctl`).

fn main() -> std::process::ExitCode {
    vmm::ctl::main_with_args(std::env::args_os())
}
