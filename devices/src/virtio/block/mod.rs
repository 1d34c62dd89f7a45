//! virtio-blk (§5.2) on a raw file: read, write, flush, get-id, discard and write-zeroes, with a read-only
//! mode and a bound on the size of each request.
//!
//! One request queue. Requests run synchronously on the device's worker thread with positional file I/O
//! straight between the file and guest memory (through vm-memory).

mod request;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::Queue;

use crate::virtio::worker::{pause_worker, resume_worker, saved_queues, QueueHandler, Worker};
use crate::virtio::{
    check_common_state, read_config_bytes, ActivateContext, ActivateError, GuestMemory,
    SnapshotError, VirtioDevice, VirtioDeviceState, VirtioInterrupt, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};

pub use request::{RequestError, MAX_REQUEST_BYTES, SECTOR_SIZE};

// Feature bits (§5.2.3).
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

pub const DEFAULT_QUEUE_SIZE: u16 = 128;
/// The split-ring limit (§2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest buffer segment the driver may use; with [`SEG_MAX`] this keeps requests within
/// [`MAX_REQUEST_BYTES`].
pub const SIZE_MAX: u32 = 256 << 10;
pub const SEG_MAX: u32 = (MAX_REQUEST_BYTES / SIZE_MAX as u64) as u32;
/// Discard and write-zeroes: one segment per request, at most this many sectors.
pub const MAX_DISCARD_SECTORS: u32 = (MAX_REQUEST_BYTES / SECTOR_SIZE) as u32;
const CONFIG_LEN: usize = 60;
/// GET_ID answers with up to 20 bytes (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot size disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid queue size {0} (a power of two, 2..=32768)")]
    QueueSize(u16),
}

/// How to build a block device.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// GET_ID answer; defaults to the device id. Truncated to 20 bytes.
    pub serial: Option<String>,
    pub queue_size: u16,
}

pub struct Block {
    id: String,
    path: PathBuf,
    file: File,
    capacity_sectors: u64,
    readonly: bool,
    serial: [u8; ID_BYTES],
    queue_sizes: [u16; 1],
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    worker: Option<Worker>,
}

fn open(path: &Path, readonly: bool) -> Result<File, BlockError> {
    OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })
}

impl Block {
    pub fn new(id: String, cfg: &BlockConfig) -> Result<Self, BlockError> {
        let size = cfg.queue_size;
        if size < 2 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(BlockError::QueueSize(size));
        }
        let mut file = open(&cfg.path, cfg.readonly)?;
        // Seek rather than metadata: also right for block devices.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: cfg.path.clone(),
                source,
            })?;
        let capacity_sectors = bytes / SECTOR_SIZE;
        if bytes % SECTOR_SIZE != 0 {
            log::warn!(
                "disk {}: size {bytes} is not a multiple of {SECTOR_SIZE}; the tail is not visible",
                cfg.path.display()
            );
        }
        let mut serial = [0u8; ID_BYTES];
        let name = cfg.serial.as_deref().unwrap_or(&id).as_bytes();
        let n = name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&name[..n]);

        let mut config = [0u8; CONFIG_LEN];
        let mut put =
            |off: usize, bytes: &[u8]| config[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &capacity_sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        Ok(Self {
            id,
            path: cfg.path.clone(),
            file,
            capacity_sectors,
            readonly: cfg.readonly,
            serial,
            queue_sizes: [size],
            acked_features: 0,
            config,
            worker: None,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Some(active) = ctx.queues.into_iter().find(|q| q.index == 0) else {
            return Err(ActivateError::MissingQueue(0));
        };
        let file = self.file.try_clone().map_err(ActivateError::Thread)?;
        let handler = BlockHandler {
            mem: ctx.mem,
            queue: active.queue,
            disk: Disk {
                file,
                capacity_sectors: self.capacity_sectors,
                readonly: self.readonly,
                serial: self.serial,
            },
            interrupt: ctx.interrupt.clone(),
        };
        let worker = Worker::spawn("blk", vec![active.event], Box::new(handler), ctx.interrupt)
            .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
        self.acked_features = 0;
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn pause(&mut self) -> Result<(), SnapshotError> {
        let name = self.name();
        pause_worker(&mut self.worker, name)
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_worker(&mut self.worker)
    }

    /// Device bytes: the capacity in sectors (le64) the guest was told. Requests run synchronously, so a
    /// paused device has nothing in flight beyond its queue.
    fn state(&self) -> Result<VirtioDeviceState, SnapshotError> {
        Ok(VirtioDeviceState {
            acked_features: self.acked_features,
            queues: saved_queues(&self.worker, self.name())?,
            device: self.capacity_sectors.to_le_bytes().to_vec(),
        })
    }

    /// A disk whose size changed since the snapshot is refused: the guest's view of it would be wrong.
    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        check_common_state(
            self.name(),
            self.features(),
            state,
            Some(&self.capacity_sectors.to_le_bytes()),
        )
    }

    fn set_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        if self.worker.is_some() {
            return Err(SnapshotError::Active(self.name()));
        }
        self.check_state(state)?;
        self.acked_features = state.acked_features;
        Ok(())
    }
}

/// The backing file as requests see it.
pub(crate) struct Disk {
    file: File,
    capacity_sectors: u64,
    readonly: bool,
    serial: [u8; ID_BYTES],
}

/// The worker's side: the queue and the disk.
pub(crate) struct BlockHandler {
    mem: GuestMemory,
    queue: Queue,
    disk: Disk,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl QueueHandler for BlockHandler {
    fn handle_queue(&mut self, _index: usize) -> Result<(), String> {
        let BlockHandler {
            mem,
            queue,
            disk,
            interrupt,
            ..
        } = self;
        crate::virtio::serve_available(queue, mem, interrupt.as_ref(), 0, "virtio-blk", |chain| {
            request::process(disk, mem, chain)
        })
    }

    fn queues(&self) -> Vec<&Queue> {
        vec![&self.queue]
    }
}

#[cfg(test)]
mod tests;
