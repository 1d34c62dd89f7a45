//! Devices of a TrEnv VM: the port-I/O and MMIO buses that vCPU exits are dispatched on, the legacy
//! platform devices a Linux guest expects on x86_64 (16550 UART, i8042 reset, ACPI sleep/reset registers),
//! the interrupt controller the VMM emulates under a split irqchip (IOAPIC), and TrEnv's guest-signal
//! device through which a guest timestamps its milestones. Later: the virtio transports and devices.

pub mod acpi_pm;
pub mod bus;
pub mod console_socket;
pub mod exit;
pub mod guest_idle;
pub mod guest_signal;
pub mod ioapic;
pub mod legacy;
pub mod pci;
pub mod virtio;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub use acpi_pm::AcpiPmDevice;
pub use bus::{Bus, BusDevice, BusError, SharedBusDevice};
pub use exit::{ExitNotifier, ExitReason};
pub use guest_signal::{monotonic_ns, GuestEvent, GuestSignalDevice};
pub use ioapic::{Ioapic, IoapicError, IoapicState, IrqLine, KvmMsiSender, MsiMessage, MsiSender};
pub use legacy::{I8042Device, SerialDevice, SerialError};

#[doc(hidden)]
pub use log as __log;

/// Messages one call site may log per second before it is muted until the next second.
const LOG_BURST_PER_SEC: u32 = 10;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Per-call-site log limiter: a guest can reach these paths at will, and must not flood the host log.
///
/// Used through [`warn_ratelimited!`]; slightly racy under contention (a window may admit a message or
/// two extra), which is fine for logging.
#[doc(hidden)]
pub struct RateLimit {
    window_start_ns: AtomicU64,
    in_window: AtomicU32,
    suppressed: AtomicU64,
}

impl RateLimit {
    #[allow(clippy::new_without_default)] // must be const for use in statics
    pub const fn new() -> Self {
        Self {
            window_start_ns: AtomicU64::new(0),
            in_window: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if the caller may log now, `n` being how many messages were muted since the last one.
    pub fn admit(&self) -> Option<u64> {
        let now = monotonic_ns();
        let start = self.window_start_ns.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= NS_PER_SEC
            && self
                .window_start_ns
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < LOG_BURST_PER_SEC {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::warn!` limited to a few messages per second per call site, for paths a guest can trigger.
#[macro_export]
macro_rules! warn_ratelimited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::RateLimit = $crate::RateLimit::new();
        match LIMIT.admit() {
            Some(0) => $crate::__log::warn!($($arg)+),
            Some(muted) => $crate::__log::warn!(
                "{} ({} similar messages suppressed)",
                format_args!($($arg)+),
                muted
            ),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_admits_a_burst_then_mutes() {
        let limit = RateLimit::new();
        for _ in 0..LOG_BURST_PER_SEC {
            assert_eq!(limit.admit(), Some(0));
        }
        assert_eq!(limit.admit(), None);
        assert_eq!(limit.admit(), None);
        // A new window reports how many were muted.
        limit.window_start_ns.store(0, Ordering::Relaxed);
        assert_eq!(limit.admit(), Some(2));
    }
}
