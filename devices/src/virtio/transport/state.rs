//! Snapshots of a virtio-pci function: pausing its data path, its saved state, and loading a saved state
//! (untrusted: from a template) after checking every field.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{VirtioPciDevice, ISR_CONFIG, ISR_QUEUE};
use crate::pci::msix::{MsixState, MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK, MSIX_CTRL_OFFSET};
use crate::virtio::{
    SnapshotError, VirtioDeviceState, VirtioInterrupt, STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR,
};

/// VIRTIO_F_RING_EVENT_IDX (§6): a saved queue may only use event indices if it was negotiated.
const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
const KNOWN_STATUS: u8 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_DEVICE_NEEDS_RESET
    | STATUS_FAILED;

/// Whether a device in `status` serves its queues (and is started again by a restore).
fn is_live(status: u8) -> bool {
    status & STATUS_DRIVER_OK != 0 && status & STATUS_DEVICE_NEEDS_RESET == 0
}

/// A queue as the driver configured it through the common configuration structure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciQueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub msix_vector: u16,
}

/// Saved state of a virtio-pci function: the transport's registers, MSI-X, the configuration space (of
/// which only the guest-writable bits are loaded back) and the device's own state. Untrusted on restore:
/// [`VirtioPciDevice::check_state`] validates every field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub device_type: u32,
    pub status: u8,
    pub isr: u8,
    pub config_generation: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub config_msix_vector: u16,
    pub queues: Vec<PciQueueState>,
    pub msix: MsixState,
    /// The 64 configuration-space dwords (command register, BAR values, MSI-X control, ...).
    pub config_space: Vec<u32>,
    pub device: VirtioDeviceState,
}

impl VirtioPciDevice {
    /// Stops the device's data path, keeping its state (see [`VirtioDevice::pause`]): from here until
    /// [`Self::resume`] the device writes no guest memory. Idempotent.
    pub fn pause(&mut self) -> Result<(), SnapshotError> {
        self.device.pause()
    }

    /// Serves again after [`Self::pause`]; a device that cannot is marked DEVICE_NEEDS_RESET.
    pub fn resume(&mut self) {
        if let Err(e) = self.device.resume() {
            log::error!("virtio-pci: {}: cannot resume the device: {e}", self.id);
            self.interrupt.set_needs_reset();
        }
    }

    /// The function's state; an active device must be paused first.
    pub fn state(&self) -> Result<VirtioPciState, SnapshotError> {
        let mut device = self.device.state()?;
        if !is_live(self.status()) {
            // A device waiting for a reset keeps its (broken) queues, but a restore does not start it.
            device.queues.clear();
        }
        let irq = self.interrupt.lock();
        let queues = self
            .queues
            .iter()
            .zip(&irq.queue_vectors)
            .map(|(q, &msix_vector)| PciQueueState {
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                msix_vector,
            })
            .collect();
        Ok(VirtioPciState {
            device_type: self.device.device_type(),
            status: self.status(),
            isr: self.interrupt.isr.load(Ordering::SeqCst),
            config_generation: self.config_generation,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            config_msix_vector: irq.config_vector,
            queues,
            msix: irq.msix.state(),
            config_space: self.config.registers(),
            device,
        })
    }

    /// A queue with `saved`'s configuration, validated as the driver's writes would have been (size a
    /// power of two up to the maximum, aligned ring addresses).
    fn configured_queue(max_size: u16, saved: &PciQueueState) -> Result<Queue, String> {
        Queue::try_from(QueueState {
            max_size,
            size: saved.size,
            ready: saved.ready,
            desc_table: saved.desc_table,
            avail_ring: saved.avail_ring,
            used_ring: saved.used_ring,
            ..Default::default()
        })
        .map_err(|e| e.to_string())
    }

    /// Whether `s` (untrusted: read from a template) can be loaded into this function; changes nothing.
    pub fn check_state(&self, s: &VirtioPciState) -> Result<(), SnapshotError> {
        self.check_state_inner(s)
            .map_err(|why| SnapshotError::InvalidState(format!("{}: {why}", self.id)))?;
        self.device.check_state(&s.device)
    }

    fn check_state_inner(&self, s: &VirtioPciState) -> Result<(), String> {
        let device_type = self.device.device_type();
        if s.device_type != device_type {
            return Err(format!(
                "saved as device type {}, this is type {device_type}",
                s.device_type
            ));
        }
        // PCI side: configuration space, MSI-X, vectors.
        self.config
            .check_writable(&s.config_space)
            .map_err(|e| e.to_string())?;
        let byte = |offset: usize| (s.config_space[offset / 4] >> (8 * (offset % 4))) as u16;
        let ctrl = byte(self.msix_cap + MSIX_CTRL_OFFSET)
            | byte(self.msix_cap + MSIX_CTRL_OFFSET + 1) << 8;
        if (ctrl & MSIX_CTRL_ENABLE != 0) != s.msix.enabled
            || (ctrl & MSIX_CTRL_FUNCTION_MASK != 0) != s.msix.function_masked
        {
            return Err(format!(
                "MSI-X control {ctrl:#06x} disagrees with the saved MSI-X state"
            ));
        }
        let vectors = {
            let irq = self.interrupt.lock();
            irq.msix.check_state(&s.msix).map_err(|e| e.to_string())?;
            irq.msix.num_vectors()
        };
        let vector_ok = |v: u16| v == VIRTIO_MSI_NO_VECTOR || v < vectors;
        if !vector_ok(s.config_msix_vector) {
            return Err(format!(
                "configuration MSI-X vector {} (the table has {vectors})",
                s.config_msix_vector
            ));
        }
        // Status: known bits, set in the order of §3.1.1.
        let status = s.status;
        let requires = [
            (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
            (STATUS_FEATURES_OK, STATUS_DRIVER),
            (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
        ];
        if status & !KNOWN_STATUS != 0
            || requires
                .iter()
                .any(|&(bit, needs)| status & bit != 0 && status & needs == 0)
        {
            return Err(format!(
                "device status {status:#x} is not one a driver can reach"
            ));
        }
        if s.isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(format!("ISR {:#x} has undefined bits", s.isr));
        }
        // Features: a subset of the offer, and what the device was told.
        let offered = self.device.features();
        if s.driver_features & !offered != 0 {
            return Err(format!(
                "driver features {:#x} were never offered ({offered:#x})",
                s.driver_features
            ));
        }
        let features_ok = status & STATUS_FEATURES_OK != 0;
        if features_ok && s.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err("FEATURES_OK without VIRTIO_F_VERSION_1".into());
        }
        let acked = if features_ok { s.driver_features } else { 0 };
        if s.device.acked_features != acked {
            return Err(format!(
                "the device acknowledged {:#x}, the transport {acked:#x}",
                s.device.acked_features
            ));
        }
        // Queues.
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        for (index, (saved, q)) in s.queues.iter().zip(&self.queues).enumerate() {
            let queue = Self::configured_queue(q.max_size(), saved).map_err(|e| {
                format!(
                    "queue {index}: {e} (size {}, max {})",
                    saved.size,
                    q.max_size()
                )
            })?;
            if !vector_ok(saved.msix_vector) {
                return Err(format!(
                    "queue {index}: MSI-X vector {} (the table has {vectors})",
                    saved.msix_vector
                ));
            }
            if saved.ready {
                self.check_rings(&queue)
                    .map_err(|e| format!("queue {index}: {e}"))?;
            }
        }
        if !is_live(status) {
            if !s.device.queues.is_empty() {
                return Err("queue positions saved for a device that was not live".into());
            }
            return Ok(());
        }
        if s.device.queues.len() != s.queues.len() {
            return Err(format!(
                "the live device saved {} queues of {}",
                s.device.queues.len(),
                s.queues.len()
            ));
        }
        for (index, ((live, saved), q)) in s
            .device
            .queues
            .iter()
            .zip(&s.queues)
            .zip(&self.queues)
            .enumerate()
        {
            let configured = (
                saved.size,
                saved.ready,
                saved.desc_table,
                saved.avail_ring,
                saved.used_ring,
            );
            let used = (
                live.size,
                live.ready,
                live.desc_table,
                live.avail_ring,
                live.used_ring,
            );
            if live.max_size != q.max_size() || configured != used {
                return Err(format!(
                    "queue {index}: the device's queue differs from the transport's configuration"
                ));
            }
            if live.event_idx_enabled && s.driver_features & (1 << VIRTIO_F_RING_EVENT_IDX) == 0 {
                return Err(format!(
                    "queue {index}: event indices without VIRTIO_F_RING_EVENT_IDX"
                ));
            }
            // The device never holds more chains than the ring has.
            if live.next_avail.wrapping_sub(live.next_used) > live.size {
                return Err(format!(
                    "queue {index}: {} chains in flight on a queue of {}",
                    live.next_avail.wrapping_sub(live.next_used),
                    live.size
                ));
            }
        }
        Ok(())
    }

    /// Loads `s` (checked first; nothing changes if it is refused): the function is reset, its registers,
    /// MSI-X table (and GSI routes) and configuration space take the saved values, and a device that was
    /// live is activated on its queues from the saved positions. Any buffer the driver made available
    /// before the snapshot is looked at again, as if notified.
    pub fn set_state(&mut self, s: &VirtioPciState) -> Result<(), SnapshotError> {
        self.check_state(s)?;
        self.reset();
        let result = self.load_state(s);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn load_state(&mut self, s: &VirtioPciState) -> Result<(), SnapshotError> {
        let invalid = |e: String| SnapshotError::InvalidState(e);
        self.config
            .load_writable(&s.config_space)
            .map_err(|e| invalid(e.to_string()))?;
        for (queue, saved) in self.queues.iter_mut().zip(&s.queues) {
            *queue = Self::configured_queue(queue.max_size(), saved).map_err(invalid)?;
        }
        {
            let mut irq = self.interrupt.lock();
            irq.msix
                .set_state(&s.msix)
                .map_err(|e| invalid(e.to_string()))?;
            irq.config_vector = s.config_msix_vector;
            for (vector, saved) in irq.queue_vectors.iter_mut().zip(&s.queues) {
                *vector = saved.msix_vector;
            }
        }
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        self.device.set_state(&s.device)?;
        self.interrupt.isr.store(s.isr, Ordering::SeqCst);
        self.interrupt.status.store(s.status, Ordering::SeqCst);
        if is_live(s.status) {
            self.activate(Some(&s.device.queues))
                .map_err(|e| invalid(format!("{}: cannot activate: {e}", self.id)))?;
            for (q, event) in self.queues.iter().zip(&self.queue_events) {
                if q.ready() {
                    // Requests published before the snapshot may not have been seen yet.
                    let _ = event.write(1);
                }
            }
        }
        Ok(())
    }
}
