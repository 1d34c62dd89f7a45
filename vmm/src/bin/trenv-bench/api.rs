//! `api`: round trips of `GET vmm.ping` on one keep-alive connection (what an orchestrator polling the VMM
//! pays), and `PUT vm.create` + `PUT vm.boot` until vm.info says Running (the API's share of a cold start).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{round3, stage_guest, summary, vmm_command, Scratch};

/// A minimal keep-alive HTTP/1.1 client: the benchmark measures the server, not a client library.
struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    fn open(socket: &std::path::Path) -> Result<Connection, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    let writer = stream.try_clone().map_err(|e| e.to_string())?;
                    return Ok(Connection {
                        reader: BufReader::new(stream),
                        writer,
                    });
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(format!("cannot connect to {}: {e}", socket.display())),
            }
        }
    }

    fn request(
        &mut self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        let body = body.unwrap_or("");
        let head = format!(
            "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.writer
            .write_all(format!("{head}{body}").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut length = 0;
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((k, v)) = trimmed.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| e.to_string())?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

pub fn run(pings: usize, boots: usize) -> Result<serde_json::Value, String> {
    let scratch = Scratch::new("api", false)?;
    let guest = stage_guest(&scratch)?;
    let config = json!({
        "payload": {"kernel": guest, "cmdline": format!("{} idle", vmm::TEST_GUEST_CONSOLE)},
        "memory": {"size": 256u64 << 20},
        "serial": {"mode": "Null"},
    })
    .to_string();

    let mut ping_us = Vec::with_capacity(pings);
    let mut boot_ms = Vec::with_capacity(boots);
    for round in 0..boots {
        let socket = scratch.path(&format!("api-{round}.sock"));
        let mut child = vmm_command()
            .arg("--api-socket")
            .arg(&socket)
            .spawn()
            .map_err(|e| format!("cannot start the VMM: {e}"))?;
        let result = (|| -> Result<(), String> {
            let mut conn = Connection::open(&socket)?;
            if round == 0 {
                for _ in 0..pings {
                    let t = Instant::now();
                    let (status, _) = conn.request("GET", "vmm.ping", None)?;
                    ping_us.push(t.elapsed().as_secs_f64() * 1e6);
                    if status != 200 {
                        return Err(format!("vmm.ping answered {status}"));
                    }
                }
            }
            let t = Instant::now();
            let (status, text) = conn.request("PUT", "vm.create", Some(&config))?;
            if status != 204 {
                return Err(format!("vm.create: {status} {text}"));
            }
            let (status, text) = conn.request("PUT", "vm.boot", None)?;
            if status != 204 {
                return Err(format!("vm.boot: {status} {text}"));
            }
            let (_, info) = conn.request("GET", "vm.info", None)?;
            if !info.contains("\"Running\"") {
                return Err(format!("not Running after boot: {info}"));
            }
            boot_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let _ = conn.request("PUT", "vmm.shutdown", None);
            Ok(())
        })();
        let _ = child.kill();
        let _ = child.wait();
        result?;
    }
    ping_us.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| round3(crate::common::percentile(&ping_us, q));
    let mut out = json!({
        "bench": "api",
        "pings": pings,
        "ping_p50_us": p(50.0),
        "ping_p99_us": p(99.0),
        "boots": boots,
        "targets": {"ping_p99_us": 500.0},
    });
    let boot = summary("create_boot_", &mut boot_ms);
    out.as_object_mut().unwrap().extend(boot);
    Ok(out)
}
