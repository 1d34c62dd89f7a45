//! The host terminal when the serial console is `tty`: raw mode while the VM runs (so keys reach the guest
//! unchanged) and a thread feeding stdin into the UART.

use std::sync::{Arc, Mutex};

use devices::console_socket::{spawn_input_pump, InputSink};

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

/// Where stdin goes now: the console device of the VM that currently runs (a reboot or repurpose
/// replaces it), fed by one reader thread for the life of the process.
static STDIN_SINK: Mutex<Option<Arc<dyn InputSink>>> = Mutex::new(None);

/// Routes stdin to `sink` (the UART or virtio console in tty mode), starting the reader thread once.
pub fn route_stdin_to(sink: Arc<dyn InputSink>) {
    let first = {
        let mut current = STDIN_SINK.lock().unwrap_or_else(|e| e.into_inner());
        let first = current.is_none();
        *current = Some(sink);
        first
    };
    if first {
        let _ = spawn_input_pump("stdin", std::io::stdin(), Arc::new(CurrentSink));
    }
}

/// Forwards to whatever `route_stdin_to` named last.
struct CurrentSink;

impl InputSink for CurrentSink {
    fn push(&self, bytes: &[u8]) -> usize {
        let sink = STDIN_SINK.lock().unwrap_or_else(|e| e.into_inner()).clone();
        sink.map_or(bytes.len(), |s| s.push(bytes))
    }
}
