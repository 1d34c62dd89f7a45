//! How devices ask the VMM to end the VM: the guest powers off (ACPI S5) or resets the CPU (i8042).
//!
//! Devices run on vCPU threads; the VMM's main thread polls the eventfd and then reads the reason.

use std::io;
use std::sync::{Arc, OnceLock};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reset,
}

struct Inner {
    evt: EventFd,
    // A guest that writes reset and then poweroff (or two vCPUs racing) gets the first one it asked for.
    reason: OnceLock<ExitReason>,
}

/// Shared exit request: every clone signals the same eventfd and records into the same reason.
#[derive(Clone)]
pub struct ExitNotifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ExitNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitNotifier")
            .field("reason", &self.reason())
            .finish()
    }
}

impl ExitNotifier {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                evt: EventFd::new(EFD_NONBLOCK)?,
                reason: OnceLock::new(),
            }),
        })
    }

    /// Records `reason` unless one was recorded already, and wakes the VMM.
    pub fn notify(&self, reason: ExitReason) {
        let _ = self.inner.reason.set(reason);
        // The only failure is a counter overflow (EAGAIN), which still leaves the eventfd readable.
        if let Err(e) = self.inner.evt.write(1) {
            crate::warn_ratelimited!("exit notifier: eventfd write failed: {e}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.inner.reason.get().copied()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_eventfd_fires() {
        let exit = ExitNotifier::new().unwrap();
        assert_eq!(exit.reason(), None);
        assert!(exit.eventfd().read().is_err(), "nothing signalled yet");
        let clone = exit.clone();
        clone.notify(ExitReason::Reset);
        exit.notify(ExitReason::PowerOff);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(exit.eventfd().read().unwrap(), 2);
    }
}
