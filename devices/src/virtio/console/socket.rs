//! Host ends of the virtio console: a Unix socket (`--console socket=PATH`: one client at a time gets the
//! guest's output and types its input, as with the serial socket) and a reader thread for stdin.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ConsoleInput;

type Client = Arc<Mutex<Option<UnixStream>>>;

/// The console's output side on a socket: writes to whoever is connected; output while nobody is
/// connected is dropped, like an unplugged line.
pub struct SocketWriter {
    client: Client,
}

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = client.as_mut() {
            if stream.write_all(buf).is_err() {
                *client = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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

    /// Serves connections on a thread of its own for the life of the process.
    pub fn attach(self, input: Arc<ConsoleInput>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("console-socket".into())
            .spawn(move || {
                for stream in self.listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                    pump(reader, &input);
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                log::debug!("console socket {} closed", self.path.display());
            })?;
        Ok(())
    }
}

/// Feeds `reader` (e.g. stdin) into the console until it ends, on a detached thread.
pub fn spawn_input_pump(
    reader: impl Read + Send + 'static,
    input: Arc<ConsoleInput>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || pump(reader, &input))?;
    Ok(())
}

/// Copies `reader` into `input`, waiting while the guest has not drained the buffer.
fn pump(mut reader: impl Read, input: &ConsoleInput) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = input.push(pending);
            pending = &pending[taken..];
            if taken == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
