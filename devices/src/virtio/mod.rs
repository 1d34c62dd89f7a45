//! Virtio (OASIS virtio 1.2): a transport-independent device abstraction, the modern virtio-pci transport,
//! descriptor-chain validation shared by the devices, a per-device worker thread, and the devices.
//!
//! A device is split in two: the [`VirtioDevice`] object owned by the transport (features, config space,
//! lifecycle) and, once the driver sets DRIVER_OK, a worker thread that owns the queues and serves
//! notifications. Reset stops the worker and drops the queues; pause stops it but keeps them, so that a
//! snapshot can read the queues (and write guest memory that no device changes meanwhile) and the device
//! can serve on afterwards. A restore loads the saved state into a reset device and activates it on the
//! saved queue positions.

pub mod block;
pub mod chain;
pub mod console;
pub mod net;
pub mod rng;
pub mod transport;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use transport::{VirtioPciDevice, VIRTIO_PCI_BAR_SIZE};

/// The guest memory type devices access. Devices write guest memory only through vm-memory, so a bitmap
/// backend (dirty tracking) can be slotted in here.
pub type GuestMemory = vm_memory::GuestMemoryMmap;

// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

// Reserved feature bits (§6).
pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// Device IDs (§5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_NET: u32 = 1;
pub const TYPE_VSOCK: u32 = 19;

/// MSI-X vector value meaning "no vector" (§4.1.5.1.2).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// What a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    Config,
    Queue(u16),
}

/// How a device interrupts the driver, whatever the transport.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: VirtioInterruptType);
    /// The device hit an error it cannot recover from without a reset: sets DEVICE_NEEDS_RESET and
    /// raises a configuration change (§2.1.2).
    fn set_needs_reset(&self);
}

/// A queue handed to a device at activation.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled when the driver notifies the queue.
    pub event: EventFd,
}

pub struct ActivateContext {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<ActiveQueue>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled no usable queue (need queue {0})")]
    MissingQueue(u16),
    #[error("the device is already active")]
    AlreadyActive,
    #[error("cannot start the device thread")]
    Thread(#[source] std::io::Error),
    #[error("{0}")]
    Device(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0} does not support snapshots yet")]
    Unsupported(&'static str),
    #[error("invalid saved state: {0}")]
    InvalidState(String),
    #[error("{0} is serving its queues: pause it before reading its state")]
    NotPaused(&'static str),
    #[error("{0}: data path")]
    Worker(&'static str, #[source] worker::WorkerError),
    #[error("{0} is active: reset it before loading a state")]
    Active(&'static str),
}

/// Saved state of a device's queues, for snapshots (a serde mirror of virtio-queue's `QueueState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for virtio_queue::QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// A device's saved state: its negotiated features, its live queues (one per queue, in index order, while
/// the device is active; none otherwise) plus device-specific bytes (each device documents its layout).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub acked_features: u64,
    pub queues: Vec<QueueSnapshot>,
    pub device: Vec<u8>,
}

/// The checks every device makes of a saved state: features it offers, and the device-specific bytes it
/// expects (`device_bytes`, compared exactly when given).
pub fn check_common_state(
    name: &str,
    offered: u64,
    state: &VirtioDeviceState,
    device_bytes: Option<&[u8]>,
) -> Result<(), SnapshotError> {
    let extra = state.acked_features & !offered;
    if extra != 0 {
        return Err(SnapshotError::InvalidState(format!(
            "{name}: acknowledged features {extra:#x} were never offered"
        )));
    }
    if let Some(expected) = device_bytes {
        if state.device != expected {
            return Err(SnapshotError::InvalidState(format!(
                "{name}: device-specific state {:02x?} does not match this device ({expected:02x?})",
                state.device
            )));
        }
    }
    Ok(())
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (§5).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// The driver accepted `features` (a subset of [`Self::features`], checked by the transport).
    fn ack_features(&mut self, features: u64);
    /// Reads device-specific configuration; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration; read-only fields ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving and forgets negotiated state, back to the state after creation.
    fn reset(&mut self);
    /// A short name for logs.
    fn name(&self) -> &'static str;

    // Snapshots. A device that does not implement them fails loudly rather than restoring half a device.

    /// Stops the data path without losing anything: until [`Self::resume`] the device touches neither
    /// guest memory nor its queues (its backends may still buffer host-side input). Idempotent; a no-op
    /// for a device that is not active.
    fn pause(&mut self) -> Result<(), SnapshotError> {
        Err(SnapshotError::Unsupported(self.name()))
    }
    /// Serves again after [`Self::pause`].
    fn resume(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }
    /// The device's state; an active device must be paused.
    fn state(&self) -> Result<VirtioDeviceState, SnapshotError> {
        Err(SnapshotError::Unsupported(self.name()))
    }
    /// Whether `state` (untrusted) can be loaded into this device; changes nothing.
    fn check_state(&self, _state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        Err(SnapshotError::Unsupported(self.name()))
    }
    /// Loads `state` into a reset device (checked with [`Self::check_state`] first). The queues are the
    /// transport's to hand over: it activates the device with them afterwards.
    fn set_state(&mut self, _state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        Err(SnapshotError::Unsupported(self.name()))
    }
}

/// Bytes `offset..offset + data.len()` of `config`, zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod state_tests;
#[cfg(test)]
pub(crate) mod test_util;

/// Serves every chain the driver has made available on a request/response queue: `serve` handles one chain
/// and returns how many bytes it wrote into it; each chain is returned in the used ring and the driver is
/// interrupted once (if it wants to be). An error means the ring itself is unusable (the caller sets
/// DEVICE_NEEDS_RESET); a bad chain is the `serve` function's to fail.
pub fn serve_available(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &dyn VirtioInterrupt,
    queue_index: u16,
    device: &str,
    mut serve: impl FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
) -> Result<(), String> {
    use virtio_queue::{QueueOwnedT, QueueT};
    let mut completed = 0u32;
    loop {
        let chain = match queue.iter(mem) {
            Ok(mut chains) => chains.next(),
            // The available index ran more than a queue ahead: the ring is garbage.
            Err(e) => return Err(format!("available ring: {e}")),
        };
        let Some(chain) = chain else {
            break;
        };
        let head = chain.head_index();
        let used_len = serve(chain);
        if head >= queue.size() {
            // Not a descriptor of this queue: nothing to give back.
            crate::warn_ratelimited!("{device}: available ring names descriptor {head}: dropped");
            continue;
        }
        queue
            .add_used(mem, head, used_len)
            .map_err(|e| format!("used ring: {e}"))?;
        completed += 1;
    }
    if completed > 0 && needs_interrupt(queue, mem)? {
        interrupt.trigger(VirtioInterruptType::Queue(queue_index));
    }
    Ok(())
}

/// The available ring flag by which a driver without VIRTIO_F_EVENT_IDX asks not to be interrupted.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for what was just put in `queue`'s used ring: its used_event
/// index when VIRTIO_F_EVENT_IDX was negotiated (virtio-queue's check), else the available ring's
/// VIRTQ_AVAIL_F_NO_INTERRUPT flag (§2.7.7.1), which virtio-queue does not look at. A polling driver
/// (Linux NAPI) sets it to spare itself interrupts.
pub fn needs_interrupt(queue: &mut Queue, mem: &GuestMemory) -> Result<bool, String> {
    use virtio_queue::QueueT;
    use vm_memory::Bytes;
    // Always asked: it also resets the count of used entries added since the last check.
    let by_event_idx = queue
        .needs_notification(mem)
        .map_err(|e| format!("used ring: {e}"))?;
    if queue.event_idx_enabled() {
        return Ok(by_event_idx);
    }
    let flags: u16 = mem
        .read_obj(vm_memory::GuestAddress(queue.avail_ring()))
        .map_err(|e| format!("available ring flags: {e}"))?;
    Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
}
