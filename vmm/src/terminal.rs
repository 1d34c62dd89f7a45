//! The host terminal when the serial console is `tty`: raw mode while the VM runs (so keys reach the guest
//! unchanged) and a thread feeding stdin into the UART.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::serial::SerialDevice;

/// Restores the terminal's settings when dropped.
pub struct RawTerminal {
    original: libc::termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enable() -> Option<RawTerminal> {
        // SAFETY: isatty/tcgetattr/tcsetattr only read or write the termios struct we own.
        unsafe {
            if libc::isatty(libc::STDIN_FILENO) != 1 {
                return None;
            }
            let mut original: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut original) != 0 {
                return None;
            }
            let mut raw = original;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing so that the VMM's own messages still start at column 0.
            raw.c_oflag = original.c_oflag;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal { original })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.original) };
    }
}

/// Copies stdin into the UART's receive FIFO until stdin closes. The thread is detached: it ends with
/// the process.
pub fn spawn_stdin_pump(serial: Arc<Mutex<SerialDevice>>) {
    let _ = std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let room = {
                        let mut uart = serial.lock().unwrap_or_else(|e| e.into_inner());
                        let room = uart.fifo_capacity().min(pending.len());
                        if room > 0 && uart.enqueue_input(&pending[..room]).is_ok() {
                            room
                        } else {
                            0
                        }
                    };
                    pending = &pending[room..];
                    if room == 0 {
                        // The guest has not drained the FIFO yet.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
}
