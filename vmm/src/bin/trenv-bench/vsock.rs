//! `vsock`: host <-> guest over virtio-vsock in hybrid mode. The test guest runs its echo server; the host
//! connects through the VMM's Unix socket (`CONNECT <port>\n`).
//!
//! - Round trip: one connection, `rtt_count` messages of `msg_bytes`, each written and its echo read back
//!   before the next (`rtt_p50_us`, `rtt_p99_us`).
//! - Bulk: one connection, `bulk_mib` MiB written by one thread while another reads the echo; `mib_s` is
//!   payload MiB per second in each direction.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{percentile, round3, stage_guest, vmm_command, Scratch};

pub struct Params {
    pub rtt_count: usize,
    pub msg_bytes: usize,
    pub bulk_mib: usize,
}

const PORT: u32 = 1234;
const TIMEOUT: Duration = Duration::from_secs(60);

struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects through the hybrid socket, retrying while the VMM or the guest's driver is still coming up.
fn connect(socket: &Path, vm: &mut Vm) -> Result<UnixStream, String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(Some(status)) = vm.0.try_wait() {
            return Err(format!("the VMM exited early: {status}"));
        }
        if let Ok(mut s) = UnixStream::connect(socket) {
            s.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            s.write_all(format!("CONNECT {PORT}\n").as_bytes())
                .map_err(|e| e.to_string())?;
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while byte[0] != b'\n' {
                match s.read(&mut byte) {
                    Ok(1) => line.push(byte[0]),
                    _ => break,
                }
            }
            if line.starts_with(b"OK ") {
                return Ok(s);
            }
        }
        if Instant::now() > deadline {
            return Err("the guest's echo server did not answer".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn run(p: &Params) -> Result<serde_json::Value, String> {
    let scratch = Scratch::new("vsock", true)?;
    let guest = stage_guest(&scratch)?;
    let socket = scratch.path("vsock.sock");
    let child = vmm_command()
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--cmdline",
            &format!("{} vsock port={PORT} mode=echo", vmm::TEST_GUEST_CONSOLE),
        ])
        .args(["--memory", "size=128M", "--serial", "null"])
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", socket.display()))
        .spawn()
        .map_err(|e| format!("cannot start the VMM: {e}"))?;
    let mut vm = Vm(child);

    // Round trips.
    let mut s = connect(&socket, &mut vm)?;
    let msg: Vec<u8> = (0..p.msg_bytes).map(|i| i as u8).collect();
    let mut back = vec![0u8; p.msg_bytes];
    let warmup = 20;
    let mut samples = Vec::with_capacity(p.rtt_count);
    for i in 0..p.rtt_count + warmup {
        let t = Instant::now();
        s.write_all(&msg).map_err(|e| format!("rtt write: {e}"))?;
        s.read_exact(&mut back)
            .map_err(|e| format!("rtt read: {e}"))?;
        if i >= warmup {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        if back != msg {
            return Err("round trip: the echo differs".into());
        }
    }
    drop(s);
    samples.sort_by(|a, b| a.total_cmp(b));

    // Bulk.
    let s = connect(&socket, &mut vm)?;
    let total = p.bulk_mib << 20;
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    let mib = p.bulk_mib;
    let t = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..mib {
            writer.write_all(&chunk)?;
        }
        Ok(())
    });
    let mut reader = s;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < total {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("bulk read: {e}"))?;
        if n == 0 {
            return Err(format!("bulk: connection closed after {got} bytes"));
        }
        if buf[..n]
            .iter()
            .enumerate()
            .any(|(k, &b)| b != ((got + k) % (1 << 20) % 251) as u8)
        {
            return Err(format!("bulk: echo differs near byte {got}"));
        }
        got += n;
    }
    let secs = t.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| "bulk writer panicked".to_string())?
        .map_err(|e| format!("bulk write: {e}"))?;

    Ok(json!({
        "bench": "vsock",
        "mode": "hybrid unix socket <-> test guest echo",
        "rtt_count": p.rtt_count,
        "msg_bytes": p.msg_bytes,
        "rtt_p50_us": round3(percentile(&samples, 50.0)),
        "rtt_p99_us": round3(percentile(&samples, 99.0)),
        "rtt_min_us": round3(samples.first().copied().unwrap_or(f64::NAN)),
        "bulk_mib": p.bulk_mib,
        "mib_s": round3(p.bulk_mib as f64 / secs),
    }))
}
