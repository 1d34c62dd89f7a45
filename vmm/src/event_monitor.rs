//! Machine-readable lifecycle events (`--event-monitor path=..|fd=..`), one JSON object per line, in the
//! shape Cloud Hypervisor's event monitor uses: `{"timestamp":{"secs":..,"nanos":..},"source":..,"event":..,
//! "properties":{..}}`. Timestamps are CLOCK_MONOTONIC, so a parent process can subtract its own monotonic
//! clock reading taken before it spawned the VMM (this is how the boot benchmark measures).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::{Mutex, OnceLock};

use crate::config::{ConfigError, OptionParser};

static MONITOR: OnceLock<Mutex<File>> = OnceLock::new();

/// Where events go, parsed from `path=FILE` or `fd=N`.
pub enum Target {
    Path(std::path::PathBuf),
    Fd(i32),
}

pub fn parse(raw: &str) -> Result<Target, ConfigError> {
    let p = OptionParser::parse("--event-monitor", raw, &["path", "fd"])?;
    match (p.get("path"), p.get("fd")) {
        (Some(path), None) if !path.is_empty() => Ok(Target::Path(path.into())),
        (None, Some(fd)) => fd
            .parse::<i32>()
            .ok()
            .filter(|fd| *fd > 2)
            .map(Target::Fd)
            .ok_or_else(|| p.invalid("fd= needs a descriptor number above 2")),
        _ => Err(p.invalid("expected path=FILE or fd=N")),
    }
}

pub fn open(target: Target) -> std::io::Result<()> {
    let file = match target {
        Target::Path(path) => File::options().create(true).append(true).open(path)?,
        Target::Fd(fd) => {
            // SAFETY: fcntl only queries the descriptor; from_raw_fd takes it over once it is known valid.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            unsafe { File::from_raw_fd(fd) }
        }
    };
    let _ = MONITOR.set(Mutex::new(file));
    Ok(())
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Records an event with the current time.
pub fn emit(source: &str, event: &str, properties: &[(&str, String)]) {
    emit_at(monotonic_ns(), source, event, properties)
}

/// Records an event that happened at `monotonic_ns`.
pub fn emit_at(monotonic_ns: u64, source: &str, event: &str, properties: &[(&str, String)]) {
    let Some(monitor) = MONITOR.get() else {
        return;
    };
    let props: BTreeMap<&str, &str> = properties.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let value = serde_json::json!({
        "timestamp": {
            "secs": monotonic_ns / 1_000_000_000,
            "nanos": monotonic_ns % 1_000_000_000,
        },
        "source": source,
        "event": event,
        "properties": props,
    });
    if let Ok(mut file) = monitor.lock() {
        let _ = writeln!(file, "{value}");
    }
}

/// One record read back from an event-monitor file.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    pub monotonic_ns: u64,
    pub properties: serde_json::Value,
}

/// Finds the first `source`/`event` record in the text of an event-monitor file.
pub fn find_event(events: &str, source: &str, event: &str) -> Option<RecordedEvent> {
    events.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v["source"] != source || v["event"] != event {
            return None;
        }
        let ns =
            v["timestamp"]["secs"].as_u64()? * 1_000_000_000 + v["timestamp"]["nanos"].as_u64()?;
        Some(RecordedEvent {
            monotonic_ns: ns,
            properties: v["properties"].clone(),
        })
    })
}

/// Waits until `source`/`event` appears in the event-monitor file at `path`, failing if `child` (the VMM
/// writing it) exits first or `timeout` passes.
pub fn wait_event(
    path: &std::path::Path,
    source: &str,
    event: &str,
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> Result<RecordedEvent, String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Some(e) = find_event(&text, source, event) {
                return Ok(e);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the VMM exited ({status}) before {source}/{event}"));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("no {source}/{event} within {timeout:?}"));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}
