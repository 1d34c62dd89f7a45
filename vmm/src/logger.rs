//! The process logger: `-v` raises the level (warn, info, debug, trace), `--log-file` redirects it.
//! Lines carry the time since the VMM started, which is what boot and restore timing is read against.

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    start: Instant,
    sink: Mutex<Box<dyn Write + Send>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.start.elapsed();
        let thread = std::thread::current();
        let line = format!(
            "[{:>4}.{:06} {:<5} {}] {}\n",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.level(),
            thread.name().unwrap_or("?"),
            record.args()
        );
        if let Ok(mut sink) = self.sink.lock() {
            // Losing a log line is better than failing the VM over a full disk.
            let _ = sink.write_all(line.as_bytes());
            let _ = sink.flush();
        }
    }

    fn flush(&self) {
        if let Ok(mut sink) = self.sink.lock() {
            let _ = sink.flush();
        }
    }
}

pub fn level_for_verbosity(verbosity: u8) -> LevelFilter {
    match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Installs the logger once per process; later calls only change the level.
pub fn init(verbosity: u8, log_file: Option<&std::path::Path>) -> std::io::Result<()> {
    let sink: Box<dyn Write + Send> = match log_file {
        Some(path) => Box::new(File::options().create(true).append(true).open(path)?),
        None => Box::new(std::io::stderr()),
    };
    let logger = LOGGER.get_or_init(|| Logger {
        start: Instant::now(),
        sink: Mutex::new(sink),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level_for_verbosity(verbosity));
    Ok(())
}
