//! Notification ioeventfds: one per queue at BAR 0 + `NOTIFY_OFFSET` + 4 n, registered with KVM so that a
//! driver's notify write signals the queue's eventfd without a VMM exit. They follow BAR 0 when it moves
//! (a write at the old address must no longer reach the device, one at the new address must).

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioPciDevice, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER};
use crate::pci::PciError;

/// Where notification eventfds are registered: KVM (`KVM_IOEVENTFD`) in the VMM, a recorder in tests.
pub trait IoEventRegistrar: Send + Sync {
    /// From now on a guest write of any width at MMIO address `addr` signals `event`.
    fn register(&self, addr: u64, event: &EventFd) -> std::io::Result<()>;
    /// Undoes [`Self::register`] for the same address and eventfd.
    fn unregister(&self, addr: u64, event: &EventFd) -> std::io::Result<()>;
}

impl IoEventRegistrar for kvm_ioctls::VmFd {
    fn register(&self, addr: u64, event: &EventFd) -> std::io::Result<()> {
        self.register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(Into::into)
    }

    fn unregister(&self, addr: u64, event: &EventFd) -> std::io::Result<()> {
        self.unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(Into::into)
    }
}

/// The eventfds are registered with `registrar` for BAR 0 at `bar`.
pub(super) struct Registration {
    registrar: Arc<dyn IoEventRegistrar>,
    bar: u64,
}

/// Queue `index`'s notification address for BAR 0 at `bar`.
pub(super) fn notify_addr(bar: u64, index: usize) -> u64 {
    bar + NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

/// Registers every eventfd for BAR 0 at `bar`; all or nothing.
fn register_all(
    registrar: &dyn IoEventRegistrar,
    bar: u64,
    events: &[EventFd],
) -> Result<(), PciError> {
    for (index, event) in events.iter().enumerate() {
        let addr = notify_addr(bar, index);
        if let Err(source) = registrar.register(addr, event) {
            unregister_all(registrar, bar, &events[..index]);
            return Err(PciError::Ioeventfd { addr, source });
        }
    }
    Ok(())
}

/// Unregisters every eventfd for BAR 0 at `bar`; failures are logged (KVM then keeps a stale one, which
/// only ever signals this device's own eventfd).
fn unregister_all(registrar: &dyn IoEventRegistrar, bar: u64, events: &[EventFd]) {
    for (index, event) in events.iter().enumerate() {
        let addr = notify_addr(bar, index);
        if let Err(e) = registrar.unregister(addr, event) {
            log::warn!("virtio-pci: cannot unregister the ioeventfd at {addr:#x}: {e}");
        }
    }
}

impl VirtioPciDevice {
    /// Registers the queues' notification eventfds with `registrar` at their addresses in BAR 0; from
    /// then on they follow the BAR when it moves, until [`Self::unregister_ioeventfds`]. All or nothing.
    /// Registering again first unregisters the earlier registration.
    pub fn register_ioeventfds(
        &mut self,
        registrar: Arc<dyn IoEventRegistrar>,
    ) -> Result<(), PciError> {
        self.unregister_ioeventfds();
        register_all(registrar.as_ref(), self.bar_addr, &self.queue_events)?;
        self.notify = Some(Registration {
            registrar,
            bar: self.bar_addr,
        });
        Ok(())
    }

    /// Unregisters what [`Self::register_ioeventfds`] registered (before the BAR's range is reused: KVM
    /// refuses a second ioeventfd at an address, and a stale one would swallow the next device's
    /// notifications).
    pub fn unregister_ioeventfds(&mut self) {
        if let Some(r) = self.notify.take() {
            unregister_all(r.registrar.as_ref(), r.bar, &self.queue_events);
        }
    }

    /// Moves the registered eventfds (if any) to BAR 0 at `bar`: registered there first, so that a failure
    /// leaves the old ones in place; on error nothing changed.
    pub(super) fn move_ioeventfds(&mut self, bar: u64) -> Result<(), PciError> {
        let Some(r) = self.notify.as_mut() else {
            return Ok(());
        };
        if r.bar == bar {
            return Ok(());
        }
        register_all(r.registrar.as_ref(), bar, &self.queue_events)?;
        unregister_all(r.registrar.as_ref(), r.bar, &self.queue_events);
        r.bar = bar;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    /// KVM's side of ioeventfds, in memory: which eventfd each address signals. Like KVM it refuses a
    /// second registration at an address and unregistering what is not there.
    #[derive(Default)]
    pub struct RecordingRegistrar {
        pub registered: Mutex<BTreeMap<u64, EventFd>>,
        /// Registrations at this address fail.
        pub refuse: Mutex<Option<u64>>,
    }

    impl IoEventRegistrar for RecordingRegistrar {
        fn register(&self, addr: u64, event: &EventFd) -> std::io::Result<()> {
            if *self.refuse.lock().unwrap() == Some(addr) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let mut map = self.registered.lock().unwrap();
            if map.contains_key(&addr) {
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            map.insert(addr, event.try_clone()?);
            Ok(())
        }

        fn unregister(&self, addr: u64, _event: &EventFd) -> std::io::Result<()> {
            match self.registered.lock().unwrap().remove(&addr) {
                Some(_) => Ok(()),
                None => Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
            }
        }
    }

    impl RecordingRegistrar {
        /// A guest write at `addr` as KVM would see it: true if an ioeventfd caught it (and was signalled).
        pub fn guest_write(&self, addr: u64) -> bool {
            match self.registered.lock().unwrap().get(&addr) {
                Some(event) => {
                    event.write(1).unwrap();
                    true
                }
                None => false,
            }
        }

        pub fn addresses(&self) -> Vec<u64> {
            self.registered.lock().unwrap().keys().copied().collect()
        }
    }
}
