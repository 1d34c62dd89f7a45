//! The virtio-pci modern transport (virtio 1.2, §4.1).
//!
//! BAR 0 (32-bit memory, [`VIRTIO_PCI_BAR_SIZE`] bytes) holds everything:
//! ```text
//! 0x0000 common configuration (§4.1.4.3)     0x3000 notifications: queue n at 0x3000 + 4n
//! 0x1000 ISR status (read clears)            0x4000 MSI-X table
//! 0x2000 device-specific configuration       0x6000 MSI-X pending bit array
//! ```
//! described by the vendor capabilities of §4.1.4 plus VIRTIO_PCI_CAP_PCI_CFG and MSI-X.
//! Notifications arrive on ioeventfds registered with KVM at the notify addresses (a write reaching the
//! BAR itself signals the same eventfd, so the device also works without KVM). Interrupts go out through
//! MSI-X only: these functions have no INTx pin.
//!
//! The guest may move BAR 0 (see `pci::configuration`); the owner moves its mapping and calls
//! [`PciDevice::move_bar`], which moves the ioeventfds with it (the MSI-X table and PBA are inside the BAR
//! and follow through the mapping).
//!
//! The driver is not trusted: out-of-range queue selections read as absent queues, queue configuration
//! is frozen once the queue is enabled or the device is live, features outside the offer or without
//! VIRTIO_F_VERSION_1 keep FEATURES_OK clear, status bits cannot be cleared except by a reset, and a
//! queue whose rings are not in guest RAM puts the device in DEVICE_NEEDS_RESET at DRIVER_OK.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pci::configuration::{BarMove, PciBarInfo, PciConfiguration, PciHeader};
use crate::pci::msi::InterruptRouter;
use crate::pci::msix::{MsixConfig, MsixError, MSIX_CTRL_OFFSET};
use crate::pci::{PciDevice, PciError};
use crate::virtio::chain::{check_segment, Segment};
use crate::virtio::{
    ActivateContext, ActiveQueue, GuestMemory, QueueSnapshot, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR,
};
use crate::warn_ratelimited;

pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8000;
const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Up to queue_device (the 1.0 layout): queue_notify_data and queue_reset need features not offered.
const COMMON_CFG_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
const VIRTIO_PCI_REVISION: u8 = 1;

// Capability types (§4.1.4).
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const VIRTIO_CAP_LEN: usize = 16;
const VIRTIO_CAP_EXT_LEN: usize = 20;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

// Common configuration fields (offset, width).
const DEVICE_FEATURE_SELECT: (u64, u64) = (0x00, 4);
const DRIVER_FEATURE_SELECT: (u64, u64) = (0x08, 4);
const DRIVER_FEATURE: (u64, u64) = (0x0c, 4);
const CONFIG_MSIX_VECTOR: (u64, u64) = (0x10, 2);
const DEVICE_STATUS: (u64, u64) = (0x14, 1);
const QUEUE_SELECT: (u64, u64) = (0x16, 2);
const QUEUE_SIZE: (u64, u64) = (0x18, 2);
const QUEUE_MSIX_VECTOR: (u64, u64) = (0x1a, 2);
const QUEUE_ENABLE: (u64, u64) = (0x1c, 2);
const QUEUE_DESC_LO: (u64, u64) = (0x20, 4);
const QUEUE_DESC_HI: (u64, u64) = (0x24, 4);
const QUEUE_DRIVER_LO: (u64, u64) = (0x28, 4);
const QUEUE_DRIVER_HI: (u64, u64) = (0x2c, 4);
const QUEUE_DEVICE_LO: (u64, u64) = (0x30, 4);
const QUEUE_DEVICE_HI: (u64, u64) = (0x34, 4);
/// The writable fields, in the order a combined write applies them.
const WRITABLE_FIELDS: [(u64, u64); 15] = [
    DEVICE_FEATURE_SELECT,
    DRIVER_FEATURE_SELECT,
    DRIVER_FEATURE,
    CONFIG_MSIX_VECTOR,
    QUEUE_SELECT,
    QUEUE_SIZE,
    QUEUE_MSIX_VECTOR,
    QUEUE_DESC_LO,
    QUEUE_DESC_HI,
    QUEUE_DRIVER_LO,
    QUEUE_DRIVER_HI,
    QUEUE_DEVICE_LO,
    QUEUE_DEVICE_HI,
    QUEUE_ENABLE,
    // Status last: a write covering queue fields and status configures before it acts.
    DEVICE_STATUS,
];

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("PCI configuration")]
    Pci(#[from] PciError),
    #[error("MSI-X")]
    Msix(#[from] MsixError),
    #[error("device queue {index} has invalid maximum size {size}")]
    QueueSize { index: usize, size: u16 },
    #[error("device has {0} queues; the transport supports 1..=1024")]
    QueueCount(usize),
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
}

struct InterruptState {
    msix: MsixConfig,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

/// The transport's side of interrupts, shared with the device's worker thread.
struct PciInterrupt {
    status: AtomicU8,
    isr: AtomicU8,
    state: Mutex<InterruptState>,
    /// Told of every interrupt the device raises, delivered or not (see
    /// [`VirtioPciDevice::set_interrupt_observer`]).
    observer: std::sync::OnceLock<InterruptObserver>,
}

/// Called whenever a device raises an interrupt condition.
pub type InterruptObserver = Arc<dyn Fn() + Send + Sync>;

impl PciInterrupt {
    fn lock(&self) -> MutexGuard<'_, InterruptState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) {
        let mut state = self.lock();
        let vector = match kind {
            VirtioInterruptType::Config => {
                self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
                state.config_vector
            }
            VirtioInterruptType::Queue(q) => {
                self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
                state
                    .queue_vectors
                    .get(usize::from(q))
                    .copied()
                    .unwrap_or(VIRTIO_MSI_NO_VECTOR)
            }
        };
        if vector != VIRTIO_MSI_NO_VECTOR && !state.msix.trigger(vector) {
            warn_ratelimited!("virtio-pci: interrupt while MSI-X is disabled (no INTx): dropped");
        }
        drop(state);
        if let Some(observer) = self.observer.get() {
            observer();
        }
    }

    fn set_needs_reset(&self) {
        let old = self
            .status
            .fetch_or(STATUS_DEVICE_NEEDS_RESET, Ordering::SeqCst);
        // Only a live device reports it, and only once.
        if old & STATUS_DRIVER_OK != 0 && old & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.trigger(VirtioInterruptType::Config);
        }
    }
}

fn pci_class(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        crate::virtio::TYPE_BLOCK => (0x01, 0x80, 0x00),
        crate::virtio::TYPE_NET => (0x02, 0x00, 0x00),
        crate::virtio::TYPE_CONSOLE => (0x07, 0x80, 0x00),
        _ => (0xff, 0x00, 0x00),
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() {
        VIRTIO_CAP_EXT_LEN
    } else {
        VIRTIO_CAP_LEN
    };
    let mut cap = vec![0u8; len];
    cap[0] = PCI_CAP_ID_VENDOR;
    cap[2] = len as u8;
    cap[3] = cfg_type;
    cap[4] = 0; // BAR 0
    cap[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
    cap[12..16].copy_from_slice(&(length as u32).to_le_bytes());
    if let Some(extra) = extra {
        cap[16..20].copy_from_slice(&extra.to_le_bytes());
    }
    cap
}

fn overlaps(offset: u64, len: u64, field: (u64, u64)) -> bool {
    offset < field.0 + field.1 && field.0 < offset.saturating_add(len)
}

pub struct VirtioPciDevice {
    id: String,
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    bar_addr: u64,
    interrupt: Arc<PciInterrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    /// Nothing here changes the device configuration under the driver, so this only carries a restored
    /// value over (a driver comparing generations across a snapshot sees no change).
    config_generation: u8,
    msix_cap: usize,
    pci_cfg_cap: usize,
    /// Where the queue eventfds are registered as ioeventfds, if they are.
    notify: Option<notify::Registration>,
}

impl VirtioPciDevice {
    /// A device whose BAR 0 is at `bar_addr` (aligned to [`VIRTIO_PCI_BAR_SIZE`]); one MSI-X vector for
    /// configuration changes and one per queue, their GSIs taken from `router`.
    pub fn new(
        id: String,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        bar_addr: u64,
        router: Arc<InterruptRouter>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > (NOTIFY_LEN / 4) as usize {
            return Err(VirtioPciError::QueueCount(max_sizes.len()));
        }
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in max_sizes.iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| VirtioPciError::QueueSize { index, size })?);
            queue_events.push(EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?);
        }
        let msix = MsixConfig::new(max_sizes.len() as u16 + 1, router)?;

        let device_type = device.device_type();
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            revision: VIRTIO_PCI_REVISION,
            class: pci_class(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config.add_bar(0, bar_addr, VIRTIO_PCI_BAR_SIZE)?;
        config.add_capability(&virtio_cap(
            CAP_COMMON_CFG,
            COMMON_CFG_OFFSET,
            COMMON_CFG_LEN,
            None,
        ))?;
        config.add_capability(&virtio_cap(
            CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            max_sizes.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
            Some(NOTIFY_OFF_MULTIPLIER),
        ))?;
        config.add_capability(&virtio_cap(CAP_ISR_CFG, ISR_OFFSET, 1, None))?;
        config.add_capability(&virtio_cap(
            CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_LEN,
            None,
        ))?;
        let pci_cfg_cap = config.add_capability(&virtio_cap(CAP_PCI_CFG, 0, 0, Some(0)))?;
        // bar, offset, length and data of the PCI configuration access window are the driver's.
        config.set_writable(pci_cfg_cap + 4, 0xff, 1);
        config.set_writable(pci_cfg_cap + 8, u32::MAX, 4);
        config.set_writable(pci_cfg_cap + 12, u32::MAX, 4);
        config.set_writable(pci_cfg_cap + 16, u32::MAX, 4);
        let msix_cap = config.add_capability(&msix.capability(
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        ))?;
        config.set_writable(msix_cap + MSIX_CTRL_OFFSET, 0xc000, 2);

        let interrupt = Arc::new(PciInterrupt {
            status: AtomicU8::new(0),
            isr: AtomicU8::new(0),
            state: Mutex::new(InterruptState {
                msix,
                config_vector: VIRTIO_MSI_NO_VECTOR,
                queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; max_sizes.len()],
            }),
            observer: std::sync::OnceLock::new(),
        });
        Ok(Self {
            id,
            config,
            device,
            mem,
            bar_addr,
            interrupt,
            queues,
            queue_events,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            msix_cap,
            pci_cfg_cap,
            notify: None,
        })
    }

    /// Has `observer` called on every interrupt condition the device raises (ISR set), whether or not a
    /// vector delivers it: the VMM wakes a guest waiting in its idle device, as an interrupt ends `hlt`.
    /// Set once; later calls are ignored.
    pub fn set_interrupt_observer(&self, observer: InterruptObserver) {
        let _ = self.interrupt.observer.set(observer);
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Where BAR 0 decodes now (it moves when the guest reprograms it).
    pub fn bar_addr(&self) -> u64 {
        self.bar_addr
    }

    /// (guest address, eventfd) per queue at the current BAR 0 (what [`Self::register_ioeventfds`]
    /// registers; the tests check it follows BAR moves).
    #[cfg(test)]
    pub(crate) fn ioeventfds(&self) -> Vec<(u64, &EventFd)> {
        self.queue_events
            .iter()
            .enumerate()
            .map(|(i, e)| (notify::notify_addr(self.bar_addr, i), e))
            .collect()
    }

    /// (GSI, irqfd) per MSI-X vector, to register with KVM.
    pub fn irqfds(&self) -> std::io::Result<Vec<(u32, EventFd)>> {
        self.interrupt
            .lock()
            .msix
            .irqfds()
            .map(|(gsi, fd)| Ok((gsi, fd.try_clone()?)))
            .collect()
    }

    pub fn status(&self) -> u8 {
        self.interrupt.status.load(Ordering::SeqCst)
    }

    fn set_status_bits(&self, bits: u8) {
        self.interrupt.status.fetch_or(bits, Ordering::SeqCst);
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue if the driver may still configure it.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        let status = self.status();
        let select = self.queue_select;
        let Some(queue) = self.queues.get_mut(usize::from(select)) else {
            warn_ratelimited!("virtio-pci: write to nonexistent queue {select}");
            return None;
        };
        if queue.ready() || status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET) != 0 {
            warn_ratelimited!("virtio-pci: queue {select} configuration written while in use");
            return None;
        }
        Some(queue)
    }

    fn common_image(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let mut img = [0u8; COMMON_CFG_LEN as usize];
        let mut put = |field: (u64, u64), value: u64| {
            let (off, len) = (field.0 as usize, field.1 as usize);
            img[off..off + len].copy_from_slice(&value.to_le_bytes()[..len]);
        };
        let features = self.device.features();
        put(DEVICE_FEATURE_SELECT, self.device_feature_select.into());
        let device_features = match self.device_feature_select {
            0 => features & 0xffff_ffff,
            1 => features >> 32,
            _ => 0,
        };
        put((0x04, 4), device_features);
        put(DRIVER_FEATURE_SELECT, self.driver_feature_select.into());
        let driver_features = match self.driver_feature_select {
            0 => self.driver_features & 0xffff_ffff,
            1 => self.driver_features >> 32,
            _ => 0,
        };
        put(DRIVER_FEATURE, driver_features);
        let state = self.interrupt.lock();
        put(CONFIG_MSIX_VECTOR, state.config_vector.into());
        put((0x12, 2), self.queues.len() as u64);
        put(DEVICE_STATUS, self.status().into());
        put((0x15, 1), self.config_generation.into());
        put(QUEUE_SELECT, self.queue_select.into());
        let select = usize::from(self.queue_select);
        if let Some(q) = self.selected_queue() {
            put(QUEUE_SIZE, q.size().into());
            put(QUEUE_MSIX_VECTOR, state.queue_vectors[select].into());
            put(QUEUE_ENABLE, q.ready().into());
            put((0x1e, 2), select as u64); // queue_notify_off
            put((0x20, 8), q.desc_table());
            put((0x28, 8), q.avail_ring());
            put((0x30, 8), q.used_ring());
        } else {
            // An absent queue has size 0 (§4.1.4.3.2) and no vector.
            put(QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR.into());
        }
        img
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.common_image(), offset, data);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut img = self.common_image();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| img.get_mut(o))
            {
                *slot = *b;
            }
        }
        for field in WRITABLE_FIELDS {
            if !overlaps(offset, data.len() as u64, field) {
                continue;
            }
            let (off, len) = (field.0 as usize, field.1 as usize);
            let mut bytes = [0u8; 8];
            bytes[..len].copy_from_slice(&img[off..off + len]);
            self.write_field(field, u64::from_le_bytes(bytes));
        }
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        // A vector the table does not have maps to NO_VECTOR, which the driver reads back (§4.1.5.1.2).
        if vector < self.interrupt.lock().msix.num_vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_field(&mut self, field: (u64, u64), value: u64) {
        let v32 = value as u32;
        match field {
            DEVICE_FEATURE_SELECT => self.device_feature_select = v32,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = v32,
            DRIVER_FEATURE => {
                let status = self.status();
                if status & STATUS_DRIVER == 0 || status & STATUS_FEATURES_OK != 0 {
                    warn_ratelimited!("virtio-pci: driver features written in status {status:#x}");
                    return;
                }
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
                    _ => {}
                }
            }
            CONFIG_MSIX_VECTOR => {
                let vector = self.valid_vector(value as u16);
                self.interrupt.lock().config_vector = vector;
            }
            DEVICE_STATUS => self.write_status(value as u8),
            QUEUE_SELECT => self.queue_select = value as u16,
            QUEUE_SIZE => {
                let size = value as u16;
                if let Some(q) = self.configurable_queue() {
                    if q.try_set_size(size).is_err() {
                        warn_ratelimited!("virtio-pci: invalid queue size {size} refused");
                    }
                }
            }
            QUEUE_MSIX_VECTOR => {
                let vector = self.valid_vector(value as u16);
                let select = usize::from(self.queue_select);
                if self.configurable_queue().is_some() {
                    self.interrupt.lock().queue_vectors[select] = vector;
                }
            }
            QUEUE_ENABLE => {
                if value != 1 {
                    // Drivers must not write 0 (§4.1.4.3.2); queue reset is not offered.
                    warn_ratelimited!("virtio-pci: queue_enable written with {value}");
                    return;
                }
                if let Some(q) = self.configurable_queue() {
                    q.set_ready(true);
                }
            }
            QUEUE_DESC_LO | QUEUE_DESC_HI | QUEUE_DRIVER_LO | QUEUE_DRIVER_HI | QUEUE_DEVICE_LO
            | QUEUE_DEVICE_HI => self.write_queue_address(field, v32),
            _ => {}
        }
    }

    fn write_queue_address(&mut self, field: (u64, u64), value: u32) {
        let Some(q) = self.configurable_queue() else {
            return;
        };
        let merge = |old: u64, high: bool| {
            if high {
                (old & 0xffff_ffff) | u64::from(value) << 32
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        let result = match field {
            QUEUE_DESC_LO | QUEUE_DESC_HI => q.try_set_desc_table_address(GuestAddress(merge(
                q.desc_table(),
                field == QUEUE_DESC_HI,
            ))),
            QUEUE_DRIVER_LO | QUEUE_DRIVER_HI => q.try_set_avail_ring_address(GuestAddress(merge(
                q.avail_ring(),
                field == QUEUE_DRIVER_HI,
            ))),
            _ => q.try_set_used_ring_address(GuestAddress(merge(
                q.used_ring(),
                field == QUEUE_DEVICE_HI,
            ))),
        };
        if let Err(e) = result {
            warn_ratelimited!("virtio-pci: queue address refused: {e}");
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status();
        // NEEDS_RESET is the device's to set.
        let value = value & !STATUS_DEVICE_NEEDS_RESET;
        if value & old != old & !STATUS_DEVICE_NEEDS_RESET {
            warn_ratelimited!("virtio-pci: status {old:#x} -> {value:#x} clears bits; ignored");
            return;
        }
        let new_bits = value & !old;
        if new_bits & STATUS_FAILED != 0 {
            self.set_status_bits(STATUS_FAILED);
        }
        if new_bits & STATUS_ACKNOWLEDGE != 0 {
            self.set_status_bits(STATUS_ACKNOWLEDGE);
        }
        if new_bits & STATUS_DRIVER != 0 {
            if self.status() & STATUS_ACKNOWLEDGE == 0 {
                warn_ratelimited!("virtio-pci: DRIVER set before ACKNOWLEDGE; ignored");
                return;
            }
            self.set_status_bits(STATUS_DRIVER);
        }
        if new_bits & STATUS_FEATURES_OK != 0 {
            if self.status() & STATUS_DRIVER == 0 {
                warn_ratelimited!("virtio-pci: FEATURES_OK set before DRIVER; ignored");
                return;
            }
            let offered = self.device.features();
            let wanted = self.driver_features;
            if wanted & !offered != 0 || wanted & (1 << VIRTIO_F_VERSION_1) == 0 {
                // FEATURES_OK stays clear: the driver reads it back and gives up (§3.1.1).
                warn_ratelimited!(
                    "virtio-pci: {}: features {wanted:#x} refused (offered {offered:#x}, VERSION_1 required)",
                    self.id
                );
                return;
            }
            self.device.ack_features(wanted);
            self.set_status_bits(STATUS_FEATURES_OK);
        }
        if new_bits & STATUS_DRIVER_OK != 0 {
            if self.status() & STATUS_FEATURES_OK == 0 {
                warn_ratelimited!("virtio-pci: DRIVER_OK set before FEATURES_OK; ignored");
                return;
            }
            self.set_status_bits(STATUS_DRIVER_OK);
            if let Err(e) = self.activate(None) {
                warn_ratelimited!("virtio-pci: {}: activation failed: {e}", self.id);
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// A queue's rings must be in guest RAM (§2.7: descriptor table, driver and device areas).
    fn check_rings(&self, q: &Queue) -> Result<(), String> {
        let size = u32::from(q.size());
        for (name, addr, len) in [
            ("descriptor table", q.desc_table(), 16 * size),
            ("driver area", q.avail_ring(), 6 + 2 * size),
            ("device area", q.used_ring(), 6 + 8 * size),
        ] {
            let segment = Segment {
                addr: GuestAddress(addr),
                len,
            };
            check_segment(&self.mem, &segment)
                .map_err(|_| format!("{name} {addr:#x}+{len:#x} is outside guest memory"))?;
        }
        Ok(())
    }

    /// Starts the device on the enabled queues: from their start, or (a restore) from the positions in
    /// `progress` (one per queue).
    fn activate(
        &mut self,
        progress: Option<&[QueueSnapshot]>,
    ) -> Result<(), crate::virtio::ActivateError> {
        use crate::virtio::ActivateError;
        let mut queues = Vec::new();
        for (index, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            self.check_rings(q).map_err(ActivateError::Device)?;
            let mut state = q.state();
            if let Some(saved) = progress.and_then(|p| p.get(index)) {
                state.next_avail = saved.next_avail;
                state.next_used = saved.next_used;
                state.event_idx_enabled = saved.event_idx_enabled;
            }
            let queue = Queue::try_from(state)
                .map_err(|e| ActivateError::Device(format!("queue {index}: {e}")))?;
            let event = self.queue_events[index]
                .try_clone()
                .map_err(ActivateError::Thread)?;
            queues.push(ActiveQueue {
                index: index as u16,
                queue,
                event,
            });
        }
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
        })
    }

    /// Resets the device as a driver writing status 0 would (used when a VM is repurposed for a new
    /// tenant: nothing queued by the previous one may survive).
    pub fn reset_device(&mut self) {
        self.reset();
    }

    /// Device reset (status 0): the device stops, queues and negotiation return to their initial state.
    /// MSI-X is PCI state and survives.
    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        for e in &self.queue_events {
            // Drop notifications for the old queues.
            let _ = e.read();
        }
        {
            let mut state = self.interrupt.lock();
            state.config_vector = VIRTIO_MSI_NO_VECTOR;
            state.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        }
        self.interrupt.isr.store(0, Ordering::SeqCst);
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
    }

    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_field(cap + 4, 1);
        let offset = u64::from(self.config.read_field(cap + 8, 4));
        let length = self.config.read_field(cap + 12, 4) as usize;
        (bar == 0 && matches!(length, 1 | 2 | 4) && offset % length as u64 == 0)
            .then_some((offset, length))
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        if reg == (self.pci_cfg_cap + 16) / 4 {
            // VIRTIO_PCI_CAP_PCI_CFG: pci_cfg_data reads the BAR at the window (§4.1.4.9).
            if let Some((offset, length)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.bar_read(0, offset, &mut buf[..length]);
                return u32::from_le_bytes(buf);
            }
        }
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        let moves = self.config.write_reg(reg, offset, data);
        if reg == self.msix_cap / 4 && offset + data.len() as u64 > MSIX_CTRL_OFFSET as u64 {
            let ctrl = self.config.read_field(self.msix_cap + MSIX_CTRL_OFFSET, 2) as u16;
            self.interrupt.lock().msix.set_control(ctrl);
        }
        if reg == (self.pci_cfg_cap + 16) / 4 {
            if let Some((bar_offset, length)) = self.pci_cfg_window() {
                let value = self.config.read_reg(reg).to_le_bytes();
                self.bar_write(0, bar_offset, &value[..length]);
            }
        }
        moves
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        self.config.bars()
    }

    /// BAR 0 decodes at `addr` from now on: configuration, notification ioeventfds and [`Self::bar_addr`]
    /// follow. On error nothing changed.
    fn move_bar(&mut self, bar: usize, addr: u64) -> Result<(), PciError> {
        let before = match self.config.bars().first() {
            Some(b) if bar == 0 => b.addr,
            _ => return Err(PciError::InvalidBar(bar)),
        };
        self.config.set_bar_addr(0, addr)?;
        if let Err(e) = self.move_ioeventfds(addr) {
            // `before` was accepted once, so it is accepted again.
            let _ = self.config.set_bar_addr(0, before);
            return Err(e);
        }
        self.bar_addr = addr;
        Ok(())
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < ISR_OFFSET => self.common_read(o - COMMON_CFG_OFFSET, data),
            ISR_OFFSET => {
                // Reading ISR clears it (§4.1.4.5).
                if let Some(b) = data.first_mut() {
                    *b = self.interrupt.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .interrupt
                .lock()
                .msix
                .read_table(o - MSIX_TABLE_OFFSET, data),
            o if (MSIX_PBA_OFFSET..VIRTIO_PCI_BAR_SIZE).contains(&o) => self
                .interrupt
                .lock()
                .msix
                .read_pba(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < ISR_OFFSET => self.common_write(o - COMMON_CFG_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                let status = self.status();
                if status & STATUS_DRIVER == 0 || status & STATUS_DEVICE_NEEDS_RESET != 0 {
                    warn_ratelimited!("virtio-pci: device config written in status {status:#x}");
                    return;
                }
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // Reached only when no ioeventfd caught the write (e.g. no KVM in tests).
                let index = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(e) = self.queue_events.get(index) {
                    let _ = e.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .interrupt
                .lock()
                .msix
                .write_table(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.device.reset();
    }
}

mod notify;
mod state;
#[cfg(test)]
mod tests;

pub use notify::IoEventRegistrar;
pub use state::{PciQueueState, VirtioPciState};
