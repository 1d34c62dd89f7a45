//! `trenv-remote`: a ch-remote-compatible client for trenv's HTTP API (logic in `vmm::remote`).

fn main() -> std::process::ExitCode {
    vmm::remote::main_with_args(std::env::args_os())
}
