//! Builds the freestanding test guest (guest/main.rs) with rustc directly: it is not a cargo target, so no
//! cargo profile (panic strategy, opt-level) or workspace setting changes for it. The ELF lands in OUT_DIR
//! and src/lib.rs embeds it.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    let output = out_dir.join("test-guest.elf");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    println!("cargo:rerun-if-changed=guest");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");

    let mut cmd = Command::new(&rustc);
    cmd.arg(guest_dir.join("main.rs"))
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "test_guest",
        ])
        .args(["-C", "panic=abort"])
        .args(["-C", "opt-level=2"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "target-cpu=x86-64"])
        .args(["-C", "debuginfo=0"])
        // Nothing unwinds (panic=abort, no_std); the linker script discards .eh_frame anyway.
        .args(["-C", "force-unwind-tables=no"])
        .arg("-o")
        .arg(&output);
    let script = guest_dir.join("linker.ld");
    for arg in [
        "-nostartfiles".to_string(),
        "-nostdlib".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        "-Wl,--build-id=none".to_string(),
        format!("-T{}", script.display()),
    ] {
        cmd.arg("-C").arg(format!("link-arg={arg}"));
    }
    // Flags meant for the host crates (e.g. coverage or sanitizers) must not leak into the guest.
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");

    let result = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc:?}: {e}"));
    if !result.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&result.stderr));
        panic!(
            "building the test guest with {rustc:?} failed ({})",
            result.status
        );
    }
    // Warnings are shown by `cargo build -vv`.
    let warnings = String::from_utf8_lossy(&result.stderr);
    for line in warnings.lines().filter(|l| l.starts_with("warning")) {
        println!("cargo:warning=test guest: {line}");
    }
}
