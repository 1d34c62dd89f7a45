//! `trenvctl console`: attaches stdin/stdout to a VM's serial console socket. On a terminal, stdin goes raw
//! (keys reach the guest as typed) and Ctrl+] detaches, as in virsh. When stdin ends (a pipe or
//! /dev/null), output keeps streaming until the VM closes the socket.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;

use super::CtlError;

/// Ctrl+]: virsh's escape character.
pub const ESCAPE: u8 = 0x1d;

/// Puts a terminal into raw mode and restores it when dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// None when `fd` is not a terminal.
    fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: isatty/tcgetattr/tcsetattr on a descriptor we own for the process's life, with a
        // zeroed termios that tcgetattr fills.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            // Keep newline translation on output: guests such as the test guest end lines with a bare
            // '\n', which would otherwise staircase across the terminal.
            raw.c_oflag |= libc::OPOST | libc::ONLCR;
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved by `enter` on the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

enum Event {
    /// The user pressed the escape key.
    Detach,
    /// The VM side closed the socket.
    Closed,
}

/// Where the escape key is in `buf`, if anywhere.
pub fn escape_position(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|b| *b == ESCAPE)
}

/// Relays until detach or until the socket closes. Returns true on detach.
pub fn attach(name: &str, socket: &Path) -> Result<bool, CtlError> {
    let stream = UnixStream::connect(socket).map_err(|e| CtlError::Console {
        name: name.to_string(),
        message: format!("cannot connect to {}: {e}", socket.display()),
    })?;
    let mut reader = stream.try_clone().map_err(|e| CtlError::Console {
        name: name.to_string(),
        message: e.to_string(),
    })?;
    let mut writer = stream;
    eprintln!("Connected to domain '{name}'\nEscape character is ^] (Ctrl + ])");
    let _raw = RawMode::enter(std::io::stdin().as_raw_fd());
    let (tx, rx) = mpsc::channel();

    let tx_out = tx.clone();
    std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout.write_all(&buf[..n]).is_err() || stdout.flush().is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx_out.send(Event::Closed);
    });

    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                // End of input: stop sending; output keeps flowing until the VM closes the socket.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let chunk = &buf[..n];
                    if let Some(at) = escape_position(chunk) {
                        let _ = writer.write_all(&chunk[..at]);
                        // Report first: the shutdown makes the output side see the socket close.
                        let _ = tx.send(Event::Detach);
                        let _ = writer.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if writer.write_all(chunk).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let detached = matches!(rx.recv(), Ok(Event::Detach));
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_key_is_found() {
        assert_eq!(escape_position(b"abc\x1ddef"), Some(3));
        assert_eq!(escape_position(b"plain"), None);
    }

    #[test]
    fn not_a_terminal_stays_cooked() {
        // A pipe is not a terminal: no raw mode to enter.
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(RawMode::enter(r.as_raw_fd()).is_none());
    }
}
