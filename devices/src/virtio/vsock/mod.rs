//! virtio-vsock (virtio 1.2 §5.10) in hybrid mode, as Firecracker and Cloud Hypervisor do it: the host
//! side of every guest stream socket is a Unix socket.
//!
//! - Host-initiated: the VMM listens on `socket`; a client connects, writes `CONNECT <port>\n`, the device
//!   sends REQUEST to the guest's port and, on RESPONSE, writes `OK <host_port>\n` back; then bytes are
//!   relayed both ways.
//! - Guest-initiated: a REQUEST to host (CID 2) port P connects to the Unix socket `<socket>_P`; RST if
//!   nothing listens there.
//!
//! Stream sockets only, with credit-based flow control in both directions (§5.10.6.3): the device never
//! holds more than [`BUF_ALLOC`] unsent guest bytes per connection and reads a host socket only while the
//! guest has credit and rx buffers, so neither side can make the VMM buffer without bound. The Unix
//! sockets are served by the device's worker thread: their epoll set is one level-triggered source of the
//! worker's (sockets come and go with connections and their interest changes with credit, which the
//! worker's fixed source list does not model; Firecracker and Cloud Hypervisor nest the same way).
//!
//! Nobody waits forever on a peer that does not answer (the worker wakes at the earliest deadline):
//! - a host client has [`HANDSHAKE_TIMEOUT`] to send its `CONNECT <port>\n` line (at most 32 bytes; a
//!   malformed line, an over-long one or a port above u32 closes it at once);
//! - the guest has [`CONNECT_TIMEOUT`] from the CONNECT line to answer the REQUEST: then the host client
//!   is closed and the guest gets RST (or, if the REQUEST never left for want of rx buffers, nothing);
//! - after the host client closed, the guest has [`SHUTDOWN_TIMEOUT`] to end its side, then RST.
//!
//! A paused device serves nothing, timers included: what expired during a pause fires on resume.
//!
//! [`ResetHandle::reset_connections`] drops every connection and sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
//! on the event queue (what a restored guest needs: its host sockets did not survive the snapshot).

mod backend;
pub mod packet;
#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::worker::{pause_worker, resume_worker, saved_queues, Source, Worker};
use crate::virtio::{
    check_common_state, read_config_bytes, ActivateContext, ActivateError, SnapshotError,
    VirtioDevice, VirtioDeviceState, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use backend::Backend;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
/// Receive buffer the device offers each connection (guest -> host bytes not yet written to the socket).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload of one packet, either direction (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_LEN: u32 = 64 << 10;
/// Connections (including host clients still sending their CONNECT line) at most.
pub const MAX_CONNECTIONS: usize = 256;
/// The highest CID a guest can have (u32::MAX is VMADDR_CID_ANY).
pub const MAX_GUEST_CID: u64 = 0xffff_fffe;
/// How long the guest has to answer a host-initiated REQUEST (Firecracker's CONN_REQUEST_TIMEOUT_MS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host client has, from its connect, to send its whole `CONNECT <port>\n` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to end a connection the host client closed (Firecracker's
/// CONN_SHUTDOWN_TIMEOUT_MS).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("invalid guest CID {0} (must be 3..=4294967294)")]
    Cid(u64),
    #[error("{0} exists and is not a Unix socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the VMM's `--vsock cid=N,socket=PATH` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

/// Shared with [`ResetHandle`]: asks the worker to reset the transport.
struct Control {
    event: EventFd,
    reset_requested: AtomicBool,
}

/// Asks a vsock device to reset its transport, from any thread.
#[derive(Clone)]
pub struct ResetHandle(Arc<Control>);

impl ResetHandle {
    /// Drops every connection (closing the host sockets) and sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET to
    /// the driver. On an inactive device the event goes out once the driver starts it again.
    pub fn reset_connections(&self) {
        self.0.reset_requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.0.event.write(1) {
            log::error!("virtio-vsock: cannot signal a transport reset: {e}");
        }
    }
}

pub struct Vsock {
    config: VsockConfig,
    listener: UnixListener,
    queue_sizes: [u16; 3],
    control: Arc<Control>,
    acked_features: u64,
    worker: Option<Worker>,
}

/// Device-specific bytes of a saved vsock device: `le64 guest_cid; u8 reset_pending`.
const STATE_LEN: usize = 9;

/// Binds `path`, replacing a stale socket file left by an earlier VMM (anything else there is an error).
fn listen(path: &Path) -> Result<UnixListener, VsockError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VsockError::NotASocket(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listen_err = |source| VsockError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok(listener)
}

impl Vsock {
    /// Validates the CID and starts listening on the socket (clients wait in its backlog until the
    /// driver starts the device).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if !(3..=MAX_GUEST_CID).contains(&config.cid) {
            return Err(VsockError::Cid(config.cid));
        }
        let listener = listen(&config.socket)?;
        let event = EventFd::new(EFD_NONBLOCK).map_err(|source| VsockError::Listen {
            path: config.socket.clone(),
            source,
        })?;
        Ok(Self {
            config: config.clone(),
            listener,
            queue_sizes: [QUEUE_SIZE; 3],
            control: Arc::new(Control {
                event,
                reset_requested: AtomicBool::new(false),
            }),
            acked_features: 0,
            worker: None,
        })
    }

    pub fn cid(&self) -> u64 {
        self.config.cid
    }

    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// A handle for [`ResetHandle::reset_connections`] that outlives moving the device into its transport.
    pub fn reset_handle(&self) -> ResetHandle {
        ResetHandle(self.control.clone())
    }

    /// See [`ResetHandle::reset_connections`].
    pub fn reset_connections(&self) {
        self.reset_handle().reset_connections();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        // The socket file is ours (bound in `new`); leave no stale file behind.
        let _ = std::fs::remove_file(&self.config.socket);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        // Stream sockets only: VIRTIO_VSOCK_F_STREAM is implied when no type feature is offered.
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; } (§5.10.4)
        read_config_bytes(&self.config.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let mut queues = ctx.queues;
        let mut take = |index: u16| {
            queues
                .iter()
                .position(|q| q.index == index)
                .map(|at| queues.swap_remove(at))
                .ok_or(ActivateError::MissingQueue(index))
        };
        let (rx, tx, ev) = (take(RX_QUEUE)?, take(TX_QUEUE)?, take(EVENT_QUEUE)?);
        let thread_err = ActivateError::Thread;
        let listener = self.listener.try_clone().map_err(thread_err)?;
        let epoll = Epoll::new().map_err(thread_err)?;
        // The sockets' epoll set joins the worker's wait as a level-triggered source: an epoll fd is
        // readable while it has ready events, and the backend serves them a batch at a time.
        // SAFETY: `epoll` owns the descriptor and outlives this borrow, which is only duplicated.
        let sockets_ready = unsafe { BorrowedFd::borrow_raw(epoll.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(thread_err)?;
        let control = self.control.event.try_clone().map_err(thread_err)?;
        let mut backend = Backend::new(backend::Params {
            mem: ctx.mem,
            queues: [rx.queue, tx.queue, ev.queue],
            interrupt: ctx.interrupt.clone(),
            cid: self.config.cid,
            socket: self.config.socket.clone(),
            listener,
            epoll,
            reset_requested: Arc::new(ResetFlag(self.control.clone())),
        })
        .map_err(thread_err)?;
        backend.start();
        // In the order of backend::EV_*.
        let sources = vec![
            Source::Event(rx.event),
            Source::Event(tx.event),
            Source::Event(ev.event),
            Source::Level(sockets_ready),
            Source::Event(control),
        ];
        self.worker = Some(
            Worker::spawn_sources("vsock", sources, Box::new(backend), ctx.interrupt)
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
        "virtio-vsock"
    }

    /// While paused, host clients wait in the listener's backlog and socket data in the kernel's buffers.
    fn pause(&mut self) -> Result<(), SnapshotError> {
        let name = self.name();
        pause_worker(&mut self.worker, name)
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_worker(&mut self.worker)
    }

    /// The queues (the event queue included) plus the CID the guest was given and whether a
    /// TRANSPORT_RESET event still waits for an event buffer. Connections are host-side state: they survive
    /// a pause and resume, but not a restore (see [`ResetHandle::reset_connections`]).
    fn state(&self) -> Result<VirtioDeviceState, SnapshotError> {
        let name = self.name();
        let reset_pending = self
            .worker
            .as_ref()
            .and_then(|w| w.handler())
            .and_then(|h| (h as &dyn std::any::Any).downcast_ref::<Backend>())
            .is_some_and(Backend::reset_pending);
        let mut device = self.config.cid.to_le_bytes().to_vec();
        device.push(u8::from(reset_pending));
        Ok(VirtioDeviceState {
            acked_features: self.acked_features,
            queues: saved_queues(&self.worker, name)?,
            device,
        })
    }

    /// Another CID than the saved one is accepted: the guest re-reads it on the TRANSPORT_RESET a restore
    /// sends.
    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        check_common_state(self.name(), self.features(), state, None)?;
        let bad = |why: String| Err(SnapshotError::InvalidState(format!("virtio-vsock: {why}")));
        let Ok(bytes) = <[u8; STATE_LEN]>::try_from(state.device.as_slice()) else {
            return bad(format!(
                "{} device-specific bytes, expected {STATE_LEN}",
                state.device.len()
            ));
        };
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&bytes[..8]);
        let cid = u64::from_le_bytes(cid);
        if !(3..=MAX_GUEST_CID).contains(&cid) {
            return bad(format!("saved guest CID {cid} is not a valid guest CID"));
        }
        if bytes[8] > 1 {
            return bad(format!("reset_pending is {}, not 0 or 1", bytes[8]));
        }
        Ok(())
    }

    fn set_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        if self.worker.is_some() {
            return Err(SnapshotError::Active(self.name()));
        }
        self.check_state(state)?;
        self.acked_features = state.acked_features;
        let cid = u64::from_le_bytes(state.device[..8].try_into().unwrap_or_default());
        if cid != self.config.cid {
            log::info!(
                "virtio-vsock: guest CID {cid} in the snapshot, {} now: the guest learns it at the transport reset",
                self.config.cid
            );
        }
        if state.device[8] == 1 {
            // The event goes out once the transport activates the device.
            self.control.reset_requested.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// The worker's view of a pending reset request.
pub(crate) struct ResetFlag(Arc<Control>);

impl ResetFlag {
    /// Whether a reset was asked for since the last call.
    pub(crate) fn take(&self) -> bool {
        self.0.reset_requested.swap(false, Ordering::SeqCst)
    }
}
