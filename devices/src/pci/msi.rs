//! The VM's GSI routing table, in one place.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every user of GSIs (the IOAPIC's pins 0-23 under
//! the split irqchip, and MSI-X vectors from [`FIRST_MSI_GSI`] up) goes through this one owner, which
//! keeps the table and installs it whole on every change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_MSI};

use crate::ioapic::{MsiMessage, MsiSender, NUM_PINS};

/// GSIs 0..24 belong to the IOAPIC's pins.
pub const FIRST_MSI_GSI: u32 = NUM_PINS as u32;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
pub const MAX_GSI: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("no free GSI left (limit {MAX_GSI})")]
    NoFreeGsi,
    #[error("GSI {0} is not allocated")]
    UnknownGsi(u32),
    #[error("cannot build the GSI routing table")]
    Table,
    #[error("KVM_SET_GSI_ROUTING failed")]
    SetRouting(#[source] std::io::Error),
}

/// Where the table is installed; KVM in production, a recorder in tests.
pub trait GsiRoutingBackend: Send + Sync {
    fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> std::io::Result<()>;
}

impl GsiRoutingBackend for kvm_ioctls::VmFd {
    fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> std::io::Result<()> {
        let table = KvmIrqRouting::from_entries(entries)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        kvm_ioctls::VmFd::set_gsi_routing(self, &table).map_err(Into::into)
    }
}

impl<T: GsiRoutingBackend + ?Sized> GsiRoutingBackend for Arc<T> {
    fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> std::io::Result<()> {
        (**self).set_gsi_routing(entries)
    }
}

#[derive(Default)]
struct Table {
    /// GSI -> message; an allocated GSI without a route is absent here.
    routes: BTreeMap<u32, MsiMessage>,
    allocated: BTreeSet<u32>,
    /// Freed GSIs below `next_gsi`, reused lowest first.
    free: BTreeSet<u32>,
    next_gsi: u32,
}

pub struct InterruptRouter {
    backend: Box<dyn GsiRoutingBackend>,
    table: Mutex<Table>,
}

fn msi_entry(gsi: u32, msg: &MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = msg.address as u32;
    entry.u.msi.address_hi = (msg.address >> 32) as u32;
    entry.u.msi.data = msg.data;
    entry
}

impl InterruptRouter {
    pub fn new(backend: Box<dyn GsiRoutingBackend>) -> Self {
        Self {
            backend,
            table: Mutex::new(Table {
                next_gsi: FIRST_MSI_GSI,
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A GSI for an MSI vector, from [`FIRST_MSI_GSI`] upward (freed ones are reused).
    pub fn allocate_gsi(&self) -> Result<u32, RouterError> {
        let mut t = self.lock();
        let gsi = match t.free.pop_first() {
            Some(g) => g,
            None if t.next_gsi < MAX_GSI => {
                t.next_gsi += 1;
                t.next_gsi - 1
            }
            None => return Err(RouterError::NoFreeGsi),
        };
        t.allocated.insert(gsi);
        Ok(gsi)
    }

    /// Releases a GSI and drops its route.
    pub fn free_gsi(&self, gsi: u32) -> Result<(), RouterError> {
        let mut t = self.lock();
        if !t.allocated.remove(&gsi) {
            return Err(RouterError::UnknownGsi(gsi));
        }
        t.free.insert(gsi);
        if t.routes.remove(&gsi).is_some() {
            self.commit(&t)?;
        }
        Ok(())
    }

    /// Points an allocated MSI GSI at `msg`, or removes its route with `None`.
    pub fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), RouterError> {
        let mut t = self.lock();
        if !t.allocated.contains(&gsi) {
            return Err(RouterError::UnknownGsi(gsi));
        }
        let changed = match msg {
            Some(m) => t.routes.insert(gsi, m) != Some(m),
            None => t.routes.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&t)?;
        }
        Ok(())
    }

    /// The IOAPIC's routes: `routes[pin]` for GSI `pin`.
    pub fn set_ioapic_routes(&self, routes: &[Option<MsiMessage>]) -> Result<(), RouterError> {
        let mut t = self.lock();
        let mut changed = false;
        for pin in 0..FIRST_MSI_GSI {
            let new = routes.get(pin as usize).copied().flatten();
            let old = match new {
                Some(m) => t.routes.insert(pin, m),
                None => t.routes.remove(&pin),
            };
            changed |= old != new;
        }
        if changed {
            self.commit(&t)?;
        }
        Ok(())
    }

    /// The current table as (GSI, message), for tests and diagnostics.
    pub fn routes(&self) -> Vec<(u32, MsiMessage)> {
        self.lock().routes.iter().map(|(g, m)| (*g, *m)).collect()
    }

    fn commit(&self, t: &Table) -> Result<(), RouterError> {
        let entries: Vec<_> = t.routes.iter().map(|(g, m)| msi_entry(*g, m)).collect();
        self.backend
            .set_gsi_routing(&entries)
            .map_err(RouterError::SetRouting)
    }
}

/// The IOAPIC's [`MsiSender`] when the IOAPIC shares the routing table with PCI: messages go out through
/// `KVM_SIGNAL_MSI`, pin routes land in the router.
pub struct IoapicRouteSender {
    pub vm: Arc<kvm_ioctls::VmFd>,
    pub router: Arc<InterruptRouter>,
}

impl MsiSender for IoapicRouteSender {
    fn send_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
        crate::ioapic::KvmMsiSender(self.vm.clone()).send_msi(address, data)
    }

    fn update_routes(&self, routes: &[Option<MsiMessage>]) -> std::io::Result<()> {
        self.router
            .set_ioapic_routes(routes)
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// One installed table: (GSI, address, data) per entry.
    pub type Table = Vec<(u32, u64, u32)>;

    /// Records every table installed.
    #[derive(Clone, Default)]
    pub struct RecordingBackend(pub Arc<Mutex<Vec<Table>>>);

    impl GsiRoutingBackend for RecordingBackend {
        fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> std::io::Result<()> {
            let table = entries
                .iter()
                .map(|e| {
                    assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
                    // SAFETY: MSI entries are written through the `msi` member.
                    let msi = unsafe { e.u.msi };
                    (
                        e.gsi,
                        u64::from(msi.address_hi) << 32 | u64::from(msi.address_lo),
                        msi.data,
                    )
                })
                .collect();
            self.0.lock().unwrap().push(table);
            Ok(())
        }
    }

    impl RecordingBackend {
        pub fn last(&self) -> Vec<(u32, u64, u32)> {
            self.0.lock().unwrap().last().cloned().unwrap_or_default()
        }
        pub fn commits(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    pub fn router() -> (Arc<InterruptRouter>, RecordingBackend) {
        let backend = RecordingBackend::default();
        (
            Arc::new(InterruptRouter::new(Box::new(backend.clone()))),
            backend,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::router;
    use super::*;

    fn msg(n: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000 | u64::from(n) << 12,
            data: 0x30 + n,
        }
    }

    #[test]
    fn msi_gsis_start_after_ioapic_pins_and_are_reused() {
        let (r, _) = router();
        assert_eq!(r.allocate_gsi().unwrap(), 24);
        assert_eq!(r.allocate_gsi().unwrap(), 25);
        r.free_gsi(24).unwrap();
        assert_eq!(r.allocate_gsi().unwrap(), 24);
        assert!(matches!(r.free_gsi(99), Err(RouterError::UnknownGsi(99))));
        assert!(matches!(
            r.set_msi_route(99, Some(msg(1))),
            Err(RouterError::UnknownGsi(99))
        ));
    }

    #[test]
    fn one_table_holds_ioapic_and_msi_routes() {
        let (r, backend) = router();
        let gsi = r.allocate_gsi().unwrap();
        r.set_msi_route(gsi, Some(msg(1))).unwrap();
        let mut pins = vec![None; 24];
        pins[4] = Some(msg(2));
        r.set_ioapic_routes(&pins).unwrap();
        assert_eq!(
            backend.last(),
            vec![
                (4, msg(2).address, msg(2).data),
                (24, msg(1).address, msg(1).data)
            ]
        );
        // Unchanged routes do not reinstall the table.
        let commits = backend.commits();
        r.set_msi_route(gsi, Some(msg(1))).unwrap();
        r.set_ioapic_routes(&pins).unwrap();
        assert_eq!(backend.commits(), commits);
        r.set_msi_route(gsi, None).unwrap();
        assert_eq!(backend.last(), vec![(4, msg(2).address, msg(2).data)]);
    }

    #[test]
    fn gsis_run_out_cleanly() {
        let (r, _) = router();
        for _ in FIRST_MSI_GSI..MAX_GSI {
            r.allocate_gsi().unwrap();
        }
        assert!(matches!(r.allocate_gsi(), Err(RouterError::NoFreeGsi)));
    }
}
