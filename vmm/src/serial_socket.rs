//! The serial console on a Unix socket (`--serial socket=PATH`): the VMM listens on PATH; the connected
//! client (one at a time, as with a physical console) receives the guest's output and its bytes are typed
//! into the UART. Output while nobody is connected is dropped, as on an unplugged serial line.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::serial::SerialDevice;

type Client = Arc<Mutex<Option<UnixStream>>>;

/// The UART's output side: writes to whoever is connected.
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

/// A bound console socket; `attach` starts serving it once the UART exists.
pub struct SerialSocket {
    listener: UnixListener,
    path: PathBuf,
    client: Client,
}

impl SerialSocket {
    pub fn bind(path: &Path) -> std::io::Result<SerialSocket> {
        // A socket file left by a previous run would make bind fail; only remove sockets, never other files.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(SerialSocket {
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
    pub fn attach(self, serial: Arc<Mutex<SerialDevice>>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("serial-socket".into())
            .spawn(move || {
                for stream in self.listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                    pump_input(reader, &serial);
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                log::debug!("serial socket {} closed", self.path.display());
            })?;
        Ok(())
    }
}

/// Feeds the client's bytes to the UART until the client disconnects.
fn pump_input(mut reader: UnixStream, serial: &Arc<Mutex<SerialDevice>>) {
    let mut buf = [0u8; 64];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(pending)
                .unwrap_or(0);
            pending = &pending[taken..];
            if taken == 0 {
                // The guest has not drained its receive FIFO yet.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
