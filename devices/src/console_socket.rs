//! Host ends of a guest console, shared by the UART (`--serial`) and the virtio console (`--console`):
//! a Unix socket whose one connected client (as with a physical console) receives the guest's output and
//! types its input, and a reader thread that feeds stdin in. Output while nobody is connected is dropped,
//! as on an unplugged line; input waits (bounded) while the guest has not drained its buffer.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where typed bytes go: a device's receive buffer. Returns how many bytes it took (0 = full for now).
pub trait InputSink: Send + Sync + 'static {
    fn push(&self, bytes: &[u8]) -> usize;
}

impl InputSink for Mutex<crate::legacy::serial::SerialDevice> {
    fn push(&self, bytes: &[u8]) -> usize {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(bytes)
            .unwrap_or(0)
    }
}

impl InputSink for crate::virtio::console::ConsoleInput {
    fn push(&self, bytes: &[u8]) -> usize {
        crate::virtio::console::ConsoleInput::push(self, bytes)
    }
}

type Client = Arc<Mutex<Option<UnixStream>>>;

/// A console's output side on a socket: writes to whoever is connected.
pub struct SocketWriter {
    client: Client,
}

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = client.as_mut() {
            if stream.write_all(buf).is_err() {
                // The client went away; the next one gets output from here on.
                *client = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A bound console socket; `attach` starts serving it once the device exists.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
    client: Client,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> std::io::Result<ConsoleSocket> {
        // A socket left by an earlier run would make bind fail; only sockets are removed, never files.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(ConsoleSocket {
            listener: UnixListener::bind(path)?,
            path: path.to_path_buf(),
            client: Arc::new(Mutex::new(None)),
        })
    }

    pub fn writer(&self) -> SocketWriter {
        SocketWriter {
            client: self.client.clone(),
        }
    }

    /// Serves connections on a thread of its own (named `name`) for the life of the process.
    pub fn attach(self, name: &str, input: Arc<dyn InputSink>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for stream in self.listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                    pump(reader, input.as_ref());
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                log::debug!("console socket {} closed", self.path.display());
            })?;
        Ok(())
    }
}

/// Feeds `reader` (e.g. stdin) into `input` until it ends, on a detached thread named `name`.
pub fn spawn_input_pump(
    name: &str,
    reader: impl Read + Send + 'static,
    input: Arc<dyn InputSink>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || pump(reader, input.as_ref()))?;
    Ok(())
}

/// Copies `reader` into `input`, waiting while the guest has not drained its buffer.
fn pump(mut reader: impl Read, input: &dyn InputSink) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = input.push(pending);
            pending = &pending[taken.min(pending.len())..];
            if taken == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
