//! virtio-net (§5.1) on a tap device: one receive queue (0) and one transmit queue (1), features
//! VERSION_1 and MAC (and MTU when one is configured); no offloads, no mergeable receive buffers.
//!
//! Every buffer starts with a 12-byte virtio_net_hdr (§5.1.6). Since no offload is negotiated the
//! guest's transmit header carries nothing: the device writes a zero header of its own to the tap
//! instead of passing guest bytes to the host kernel. Received frames get a zero header with
//! num_buffers = 1.
//!
//! The worker thread waits on the queues' notifications and on the tap (edge-triggered). A frame read
//! from the tap while the guest has posted no receive buffer stays pending (the tap is not read further)
//! until a buffer arrives.

mod tap;

use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::virtio::chain::{parse_checked, ParsedChain};
use crate::virtio::worker::{
    pause_worker, resume_worker, saved_queues, QueueHandler, Source, Worker,
};
use crate::virtio::{
    check_common_state, read_config_bytes, ActivateContext, ActivateError, GuestMemory,
    SnapshotError, VirtioDevice, VirtioDeviceState, VirtioInterrupt, VirtioInterruptType, TYPE_NET,
    VIRTIO_F_VERSION_1,
};
use crate::warn_ratelimited;

pub use tap::{Tap, TapError, VNET_HDR_LEN};

// Feature bits (§5.1.3).
pub const VIRTIO_NET_F_MTU: u32 = 3;
pub const VIRTIO_NET_F_MAC: u32 = 5;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest frame either way without GSO: 64 KiB plus an Ethernet header with a VLAN tag.
pub const MAX_FRAME: usize = 65535 + 18;
/// mac[6], status le16, max_virtqueue_pairs le16, mtu le16.
const CONFIG_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("invalid queue size {0} (a power of two, 2..=32768)")]
    QueueSize(u16),
}

/// How to build a net device.
#[derive(Clone, Debug)]
pub struct NetParams {
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
    pub queue_size: u16,
}

/// A locally administered unicast MAC that differs between devices and processes.
pub fn generated_mac(n: u32) -> [u8; 6] {
    let seed = std::process::id().wrapping_mul(2654435761) ^ n.wrapping_mul(40503);
    let b = seed.to_le_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3] ^ n as u8]
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    mtu: Option<u16>,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    acked_features: u64,
    worker: Option<Worker>,
}

impl Net {
    pub fn new(tap: Tap, params: &NetParams) -> Result<Self, NetError> {
        let size = params.queue_size;
        if size < 2 || !size.is_power_of_two() || size > 32768 {
            return Err(NetError::QueueSize(size));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&params.mac);
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&params.mtu.unwrap_or(0).to_le_bytes());
        Ok(Self {
            tap,
            mac: params.mac,
            mtu: params.mtu,
            config,
            queue_sizes: [size; 2],
            acked_features: 0,
            worker: None,
        })
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC;
        if self.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
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
        let mut rx = None;
        let mut tx = None;
        for q in ctx.queues {
            match q.index {
                RX_QUEUE => rx = Some(q),
                TX_QUEUE => tx = Some(q),
                _ => {}
            }
        }
        let rx = rx.ok_or(ActivateError::MissingQueue(RX_QUEUE))?;
        let tx = tx.ok_or(ActivateError::MissingQueue(TX_QUEUE))?;
        let handler = NetHandler::new(
            ctx.mem,
            rx.queue,
            tx.queue,
            self.tap.try_clone().map_err(ActivateError::Thread)?,
            ctx.interrupt.clone(),
        );
        // The tap is waited on edge-triggered and read by the handler (see `TOKEN_TAP`).
        let tap_fd: OwnedFd = handler
            .tap
            .as_fd()
            .try_clone_to_owned()
            .map_err(ActivateError::Thread)?;
        let sources = vec![
            Source::Event(rx.event),
            Source::Event(tx.event),
            Source::Edge(tap_fd),
        ];
        self.worker = Some(
            Worker::spawn_sources("net", sources, Box::new(handler), ctx.interrupt)
                .map_err(ActivateError::Thread)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
        self.acked_features = 0;
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn pause(&mut self) -> Result<(), SnapshotError> {
        let name = self.name();
        pause_worker(&mut self.worker, name)
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_worker(&mut self.worker)
    }

    /// Nothing beyond the queues: a frame read from the tap and not yet delivered stays with the paused
    /// device (delivered after a resume) but is not part of a snapshot; a restored guest has lost it, as
    /// a frame lost on a wire.
    fn state(&self) -> Result<VirtioDeviceState, SnapshotError> {
        Ok(VirtioDeviceState {
            acked_features: self.acked_features,
            queues: saved_queues(&self.worker, self.name())?,
            device: Vec::new(),
        })
    }

    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        check_common_state(self.name(), self.features(), state, Some(&[]))
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

/// The data path, owned by the worker thread.
pub(crate) struct NetHandler {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    tap: Tap,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The tap may have frames (edge-triggered: set on an edge, cleared on EAGAIN).
    tap_readable: bool,
    /// Bytes of a frame read from the tap and not yet delivered (`rx_buf[..n]`, header included).
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

/// A chain that passed structural and memory checks, or None (logged) for garbage.
fn checked<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Option<ParsedChain>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    parse_checked(mem, chain, "virtio-net")
}

impl NetHandler {
    fn new(
        mem: GuestMemory,
        rx: Queue,
        tx: Queue,
        tap: Tap,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            tap,
            interrupt,
            tap_readable: true,
            pending: None,
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
        }
    }

    fn notify(&mut self, which: u16) -> Result<(), String> {
        let queue = if which == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        if crate::virtio::needs_interrupt(queue, &self.mem)? {
            self.interrupt.trigger(VirtioInterruptType::Queue(which));
        }
        Ok(())
    }

    /// Moves frames from the tap into receive buffers while both last.
    fn process_rx(&mut self) -> Result<(), String> {
        let mut completed = 0;
        loop {
            if self.pending.is_none() {
                if !self.tap_readable {
                    break;
                }
                match self.tap.read(&mut self.rx_buf) {
                    Ok(n) => self.pending = Some(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.tap_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // e.g. EIO while the interface is down: wait for the next edge.
                        warn_ratelimited!("virtio-net: tap read: {e}");
                        self.tap_readable = false;
                        break;
                    }
                }
            }
            let chain = match self.rx.iter(&self.mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => return Err(format!("receive queue available ring: {e}")),
            };
            let Some(chain) = chain else {
                // No buffer: the frame waits for the driver's next notification.
                break;
            };
            let head = chain.head_index();
            let n = self.pending.take().unwrap_or(0);
            let len = match checked(&self.mem, chain) {
                Some(p) => self.deliver(&p, n),
                None => 0,
            };
            if head >= self.rx.size() {
                warn_ratelimited!("virtio-net: available ring names descriptor {head}");
                continue;
            }
            self.rx
                .add_used(&self.mem, head, len)
                .map_err(|e| format!("receive queue used ring: {e}"))?;
            completed += 1;
        }
        if completed > 0 {
            self.notify(RX_QUEUE)?;
        }
        Ok(())
    }

    /// Writes the frame in `rx_buf[..n]` into `p` behind a fresh header; returns the used length (0 and
    /// the frame dropped if the buffer is unusable).
    fn deliver(&self, p: &ParsedChain, n: usize) -> u32 {
        let skip = if self.tap.has_vnet_hdr() {
            VNET_HDR_LEN
        } else {
            0
        };
        let Some(frame) = self.rx_buf.get(skip..n) else {
            warn_ratelimited!("virtio-net: short read of {n} bytes from the tap: dropped");
            return 0;
        };
        if !p.readable.is_empty() {
            warn_ratelimited!("virtio-net: receive buffer is device-readable: frame dropped");
            return 0;
        }
        let total = (VNET_HDR_LEN + frame.len()) as u64;
        if p.writable_len() < total {
            warn_ratelimited!(
                "virtio-net: receive buffer of {} bytes for a {total}-byte frame: dropped",
                p.writable_len()
            );
            return 0;
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        // num_buffers (§5.1.6.4): always one buffer without VIRTIO_NET_F_MRG_RXBUF.
        hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
        let written = p
            .write_at(&self.mem, 0, &hdr)
            .and_then(|()| p.write_at(&self.mem, VNET_HDR_LEN as u64, frame));
        match written {
            Ok(()) => total as u32,
            Err(e) => {
                warn_ratelimited!("virtio-net: receive buffer: {e}");
                0
            }
        }
    }

    /// Sends every transmit buffer's frame to the tap.
    fn process_tx(&mut self) -> Result<(), String> {
        let mut completed = 0;
        loop {
            let chain = match self.tx.iter(&self.mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => return Err(format!("transmit queue available ring: {e}")),
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            if let Some(p) = checked(&self.mem, chain) {
                self.transmit(&p);
            }
            if head >= self.tx.size() {
                warn_ratelimited!("virtio-net: available ring names descriptor {head}");
                continue;
            }
            self.tx
                .add_used(&self.mem, head, 0)
                .map_err(|e| format!("transmit queue used ring: {e}"))?;
            completed += 1;
        }
        if completed > 0 {
            self.notify(TX_QUEUE)?;
        }
        Ok(())
    }

    /// One frame to the tap; a malformed one is dropped (logged), as is one the tap refuses.
    fn transmit(&mut self, p: &ParsedChain) {
        if !p.writable.is_empty() {
            warn_ratelimited!("virtio-net: transmit buffer is device-writable: dropped");
            return;
        }
        let len = p.readable_len();
        if len < VNET_HDR_LEN as u64 || len - (VNET_HDR_LEN as u64) > MAX_FRAME as u64 {
            warn_ratelimited!("virtio-net: transmit buffer of {len} bytes: dropped");
            return;
        }
        let frame_len = len as usize - VNET_HDR_LEN;
        self.tx_buf.resize(frame_len, 0);
        if let Err(e) = p.read_at(&self.mem, VNET_HDR_LEN as u64, &mut self.tx_buf) {
            warn_ratelimited!("virtio-net: transmit buffer: {e}");
            return;
        }
        let hdr = [0u8; VNET_HDR_LEN];
        let parts = [IoSlice::new(&hdr), IoSlice::new(&self.tx_buf)];
        let parts = if self.tap.has_vnet_hdr() {
            &parts[..]
        } else {
            &parts[1..]
        };
        if let Err(e) = self.tap.write_vectored(parts) {
            // A full or downed tap drops the frame, like a wire would.
            warn_ratelimited!("virtio-net: tap write: {e}");
        }
    }
}

/// Worker source indices: the two queues' notifications, then the tap (an edge: it has frames).
const TOKEN_RX: usize = 0;
const TOKEN_TX: usize = 1;
const TOKEN_TAP: usize = 2;

impl QueueHandler for NetHandler {
    fn handle_queue(&mut self, index: usize) -> Result<(), String> {
        match index {
            TOKEN_TX => self.process_tx(),
            TOKEN_RX => self.process_rx(),
            TOKEN_TAP => {
                self.tap_readable = true;
                self.process_rx()
            }
            _ => Ok(()),
        }
    }

    fn queues(&self) -> Vec<&Queue> {
        vec![&self.rx, &self.tx]
    }
}

#[cfg(test)]
mod tests;
