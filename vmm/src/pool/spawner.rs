//! Starts sandbox processes so that they cannot outlive the pool, even when it is killed with SIGKILL.
//!
//! Each child asks the kernel for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`). The kernel sends it
//! when the *thread* that forked the child exits, not the process, so every child is forked by one thread
//! that lives as long as the process: the spawner, fed through a channel.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

struct Request {
    command: Command,
    reply: Sender<io::Result<Child>>,
}

static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();

fn start() -> Mutex<Sender<Request>> {
    let (sender, receiver) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("pool-spawner".into())
        .spawn(move || serve(receiver));
    if let Err(e) = spawned {
        // Requests then fail (the receiver is gone) and say so.
        log::error!("cannot start the sandbox spawner thread: {e}");
    }
    Mutex::new(sender)
}

/// Never returns while the process lives: the senders sit in a static.
fn serve(requests: Receiver<Request>) {
    let parent = std::process::id() as libc::pid_t;
    for Request { mut command, reply } in requests {
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system calls.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The pool may have died between the fork and the prctl: no signal would come then.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let _ = reply.send(command.spawn());
    }
}

/// Spawns `command` from the spawner thread; its process gets SIGKILL when this process dies.
pub fn spawn(command: Command) -> io::Result<Child> {
    let (reply, answer) = mpsc::channel();
    let sent = SPAWNER
        .get_or_init(start)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(Request { command, reply });
    let gone = || io::Error::other("the sandbox spawner thread is gone");
    sent.map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// That the death signal is delivered is tested end to end (tests/integration/tests/pool.rs kills a pool
    /// with SIGKILL); here: children start, from this process, and their exit status comes back.
    #[test]
    fn spawns_children_of_this_process() {
        let mut command = Command::new("grep");
        command.args(["^PPid:", "/proc/self/status"]);
        command.stdout(std::process::Stdio::piped());
        let out = spawn(command).unwrap().wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let ppid = text.trim().trim_start_matches("PPid:").trim();
        assert_eq!(ppid, std::process::id().to_string());
        assert!(spawn(Command::new("/nonexistent/binary")).is_err());
    }
}
