//! Virtio (OASIS virtio 1.2): a transport-independent device abstraction, the modern virtio-pci transport,
//! descriptor-chain validation shared by the devices, a per-device worker thread, and the devices.
//!
//! A device is split in two: the [`VirtioDevice`] object owned by the transport (features, config space,
//! lifecycle) and, once the driver sets DRIVER_OK, a worker thread that owns the queues and serves
//! notifications. Reset stops the worker and drops the queues.

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

/// A device's saved state: its negotiated features and queues plus device-specific bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub acked_features: u64,
    pub queues: Vec<QueueSnapshot>,
    pub device: Vec<u8>,
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

    fn state(&self) -> Result<VirtioDeviceState, SnapshotError> {
        Err(SnapshotError::Unsupported(self.name()))
    }
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
    if completed > 0
        && queue
            .needs_notification(mem)
            .map_err(|e| format!("used ring: {e}"))?
    {
        interrupt.trigger(VirtioInterruptType::Queue(queue_index));
    }
    Ok(())
}
