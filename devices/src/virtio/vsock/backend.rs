//! The vsock data path, run by the device's worker thread: the three queues, the Unix listener and one
//! Unix stream per connection, with the per-connection state machine and credit accounting.
//!
//! Ordering rule: packets without payload (RESPONSE, RST, SHUTDOWN, credit messages) wait in a bounded
//! control queue for rx buffers; socket data goes to the guest only when that queue is empty, so a
//! connection's RESPONSE always precedes its data and its SHUTDOWN follows it. When the control queue is
//! full the tx queue is not served (the guest's own requests are what fill it), so it stays bounded.
//!
//! Sockets are level-triggered in the epoll set; a connection that cannot go on (no rx buffers, no guest
//! credit) drops its read interest until the guest refills the queue or grants credit.
//!
//! Timers: a connection waiting on its peer has one deadline (the handshake line, the guest's answer to
//! a REQUEST, the guest's end of a connection the host closed). The worker wakes at the earliest
//! ([`QueueHandler::next_deadline`]); an expired one closes the host socket and resets the connection.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;
use super::{
    ResetFlag, BUF_ALLOC, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_PKT_LEN,
    SHUTDOWN_TIMEOUT,
};
use crate::virtio::chain::{parse_chain, ParsedChain};
use crate::virtio::worker::QueueHandler;
use crate::virtio::{GuestMemory, VirtioInterrupt, VirtioInterruptType};
use crate::warn_ratelimited;

/// Worker event indices (the order `Vsock::activate` passes them in).
pub(crate) const EV_RX: usize = 0;
pub(crate) const EV_TX: usize = 1;
pub(crate) const EV_EVENT: usize = 2;
pub(crate) const EV_SOCKETS: usize = 3;
pub(crate) const EV_CONTROL: usize = 4;

/// Control packets waiting for rx buffers at most; past it the tx queue waits.
pub(crate) const MAX_CONTROL_QUEUE: usize = 1024;
/// `CONNECT <port>\n` is at most this long.
const MAX_CONNECT_LINE: usize = 32;
const LISTENER_TOKEN: u64 = 0;
/// Host ports for host-initiated connections count up from here (clear of well-known guest ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const SOCKET_EVENTS_PER_WAKE: usize = 64;

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// A host client that has not sent its `CONNECT <port>\n` yet.
    Handshake {
        line: Vec<u8>,
    },
    /// REQUEST sent to the guest, waiting for RESPONSE.
    LocalInit,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// The host side's port (`dst_port` of the guest's packets).
    local_port: u32,
    /// The guest side's port.
    peer_port: u32,
    /// Interest registered in the epoll set; `None` once removed from it.
    interest: Option<EventSet>,
    // Host -> guest: bytes sent, and the guest's buffer as it last told us.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    // Guest -> host: bytes received, written to the socket, and the last fwd_cnt the guest was told.
    rx_cnt: u32,
    fwd_cnt: u32,
    announced_fwd_cnt: u32,
    /// Guest bytes the socket did not take yet (at most BUF_ALLOC: the guest's credit).
    pending: VecDeque<u8>,
    /// The host client sent EOF (we told the guest SHUTDOWN/SEND).
    host_eof: bool,
    /// The host client closed completely (the socket is out of the epoll set).
    host_hup: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    write_shut: bool,
    /// When the connection is given up on unless its peer acts (it is in `Backend::timers` too).
    deadline: Option<Instant>,
}

impl Conn {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            interest: None,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            rx_cnt: 0,
            fwd_cnt: 0,
            announced_fwd_cnt: 0,
            pending: VecDeque::new(),
            host_eof: false,
            host_hup: false,
            peer_shutdown: 0,
            write_shut: false,
            deadline: None,
        }
    }

    /// Bytes the guest can still take on this connection. A guest claiming to have forwarded more than
    /// it was sent gets no credit (only its own connection stalls).
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest should hear about freed buffer space: its view of our free space is below half
    /// and we forwarded something since we last told it.
    fn wants_credit_update(&self) -> bool {
        let unannounced_used = self.rx_cnt.wrapping_sub(self.announced_fwd_cnt);
        self.fwd_cnt != self.announced_fwd_cnt && unannounced_used > BUF_ALLOC / 2
    }
}

pub(crate) struct Params {
    pub mem: GuestMemory,
    /// rx, tx, event.
    pub queues: [Queue; 3],
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub cid: u64,
    pub socket: PathBuf,
    pub listener: UnixListener,
    pub epoll: Epoll,
    pub reset_requested: Arc<ResetFlag>,
}

pub(crate) struct Backend {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    events: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<u64, Conn>,
    /// (host port, guest port) -> connection token.
    by_ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Header>,
    /// Connections with socket data waiting for rx buffers or guest credit.
    blocked: BTreeSet<u64>,
    /// Every connection's deadline, earliest first.
    timers: BTreeSet<(Instant, u64)>,
    tx_stalled: bool,
    reset_requested: Arc<ResetFlag>,
    reset_pending: bool,
    scratch: Vec<u8>,
}

/// Why a queue operation failed badly enough to need a device reset.
type QResult<T> = Result<T, String>;

/// `send(2)` with MSG_NOSIGNAL: a closed peer is an EPIPE error, never a signal.
fn send(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid slice for the duration of the call; `fd` is a socket we own.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A non-blocking connect to a Unix socket: refused, missing or with a full backlog are all errors
/// (a connect that would wait must not stall the worker thread).
fn connect_nonblocking(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in with its length checked.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that the stream now owns (closed on error by its drop).
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the given size.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// `CONNECT <port>` (the newline already stripped; a trailing CR is tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = std::str::from_utf8(line.strip_prefix(b"CONNECT ")?).ok()?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl Backend {
    pub(crate) fn new(p: Params) -> std::io::Result<Backend> {
        let [rx, tx, events] = p.queues;
        p.epoll.ctl(
            ControlOperation::Add,
            p.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Backend {
            mem: p.mem,
            rx,
            tx,
            events,
            interrupt: p.interrupt,
            cid: p.cid,
            socket: p.socket,
            listener: p.listener,
            epoll: p.epoll,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_token: 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            blocked: BTreeSet::new(),
            timers: BTreeSet::new(),
            tx_stalled: false,
            reset_requested: p.reset_requested,
            reset_pending: false,
            scratch: vec![0u8; MAX_PKT_LEN as usize],
        })
    }

    /// Picks up a reset asked for while the device was inactive.
    pub(crate) fn start(&mut self) {
        if self.reset_requested.take() {
            self.reset_pending = true;
            // Nothing to drop yet; the event goes out when the driver gives an event buffer.
            let _ = self.deliver_reset();
        }
    }

    /// A TRANSPORT_RESET event waits for an event buffer.
    pub(crate) fn reset_pending(&self) -> bool {
        self.reset_pending
    }

    #[cfg(test)]
    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn notify(&mut self, queue: u16) -> QResult<()> {
        let q = match queue {
            0 => &mut self.rx,
            1 => &mut self.tx,
            _ => &mut self.events,
        };
        if crate::virtio::needs_interrupt(q, &self.mem)? {
            self.interrupt.trigger(VirtioInterruptType::Queue(queue));
        }
        Ok(())
    }

    // ---- rx side -------------------------------------------------------------------------------

    /// The next usable rx chain (device-writable, in guest RAM, room for a header); unusable ones are
    /// returned to the guest empty.
    fn next_rx_chain(&mut self) -> QResult<Option<(u16, ParsedChain)>> {
        loop {
            let chain = match self.rx.iter(&self.mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => return Err(format!("rx available ring: {e}")),
            };
            let Some(chain) = chain else {
                return Ok(None);
            };
            let head = chain.head_index();
            let checked = parse_chain(chain).and_then(|p| p.check_memory(&self.mem).map(|_| p));
            match checked {
                Ok(p) if p.writable_len() >= HEADER_LEN as u64 => return Ok(Some((head, p))),
                Ok(_) => {
                    warn_ratelimited!("virtio-vsock: rx buffer smaller than a header: dropped")
                }
                Err(e) => warn_ratelimited!("virtio-vsock: rx buffer dropped: {e}"),
            }
            if head < self.rx.size() {
                self.rx
                    .add_used(&self.mem, head, 0)
                    .map_err(|e| format!("rx used ring: {e}"))?;
            }
        }
    }

    /// Writes `header` and `payload` into the chain and returns it to the guest.
    fn complete_rx(
        &mut self,
        head: u16,
        chain: &ParsedChain,
        header: &Header,
        payload: &[u8],
    ) -> QResult<()> {
        let mut len = 0u32;
        match chain.write_at(&self.mem, 0, &header.to_bytes()) {
            Ok(()) => len = HEADER_LEN as u32,
            Err(e) => warn_ratelimited!("virtio-vsock: rx buffer: {e}"),
        }
        if len > 0 && !payload.is_empty() {
            match chain.write_at(&self.mem, HEADER_LEN as u64, payload) {
                Ok(()) => len += payload.len() as u32,
                Err(e) => warn_ratelimited!("virtio-vsock: rx buffer: {e}"),
            }
        }
        self.rx
            .add_used(&self.mem, head, len)
            .map_err(|e| format!("rx used ring: {e}"))
    }

    /// Delivers queued control packets while there are rx buffers.
    fn flush_control(&mut self) -> QResult<()> {
        let mut sent = false;
        while !self.control.is_empty() {
            let Some((head, chain)) = self.next_rx_chain()? else {
                break;
            };
            let Some(h) = self.control.pop_front() else {
                break;
            };
            self.complete_rx(head, &chain, &h, &[])?;
            sent = true;
        }
        if sent {
            self.notify(0)?;
        }
        Ok(())
    }

    /// A packet of `op` on connection `c`, carrying our current credit.
    fn conn_header(&self, c: &Conn, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
    }

    fn queue_conn_packet(&mut self, token: u64, op: u16, flags: u32) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.announced_fwd_cnt = c.fwd_cnt;
        let h = Header {
            flags,
            ..self.conn_header(&self.conns[&token], op)
        };
        self.control.push_back(h);
    }

    /// RST in answer to a guest packet (never to an RST: two sides must not bounce resets).
    fn queue_rst_reply(&mut self, to: &Header) {
        if to.op != OP_RST {
            self.control.push_back(to.reply(OP_RST));
        }
    }

    /// Reads socket data into rx buffers while the guest has credit and buffers.
    fn pump_socket(&mut self, token: u64) -> QResult<()> {
        loop {
            let Some(c) = self.conns.get_mut(&token) else {
                return Ok(());
            };
            if c.state != State::Established || c.host_eof || c.peer_shutdown & SHUTDOWN_RCV != 0 {
                self.blocked.remove(&token);
                break;
            }
            let credit = c.peer_credit();
            if credit == 0 {
                self.blocked.insert(token);
                if !c.credit_requested {
                    c.credit_requested = true;
                    self.queue_conn_packet(token, OP_CREDIT_REQUEST, 0);
                    self.flush_control()?;
                }
                break;
            }
            if !self.control.is_empty() {
                self.flush_control()?;
                if !self.control.is_empty() {
                    self.blocked.insert(token);
                    break;
                }
            }
            let Some((head, chain)) = self.next_rx_chain()? else {
                self.blocked.insert(token);
                break;
            };
            let room = (chain.writable_len() - HEADER_LEN as u64)
                .min(u64::from(MAX_PKT_LEN))
                .min(u64::from(credit)) as usize;
            if room == 0 {
                // Only a header fits: useless for data, give it back empty.
                self.rx
                    .add_used(&self.mem, head, 0)
                    .map_err(|e| format!("rx used ring: {e}"))?;
                continue;
            }
            let Some(c) = self.conns.get_mut(&token) else {
                return Ok(());
            };
            match c.stream.read(&mut self.scratch[..room]) {
                Ok(0) => {
                    self.rx.go_to_previous_position();
                    self.host_closed(token)?;
                    break;
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    c.credit_requested = false;
                    c.announced_fwd_cnt = c.fwd_cnt;
                    let h = Header {
                        len: n as u32,
                        ..self.conn_header(&self.conns[&token], OP_RW)
                    };
                    let data = std::mem::take(&mut self.scratch);
                    let result = self.complete_rx(head, &chain, &h, &data[..n]);
                    self.scratch = data;
                    result?;
                    self.notify(0)?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.rx.go_to_previous_position();
                    self.blocked.remove(&token);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {
                    self.rx.go_to_previous_position();
                }
                Err(e) => {
                    self.rx.go_to_previous_position();
                    log::debug!("virtio-vsock: host socket read: {e}");
                    self.reset_conn(token);
                    break;
                }
            }
        }
        self.update_interest(token);
        Ok(())
    }

    /// The host client sent EOF: tell the guest, close if both directions are done.
    fn host_closed(&mut self, token: u64) -> QResult<()> {
        let Some(c) = self.conns.get_mut(&token) else {
            return Ok(());
        };
        c.host_eof = true;
        self.blocked.remove(&token);
        let flags = if c.host_hup {
            SHUTDOWN_SEND | SHUTDOWN_RCV
        } else {
            SHUTDOWN_SEND
        };
        self.queue_conn_packet(token, OP_SHUTDOWN, flags);
        if flags & SHUTDOWN_RCV != 0 {
            // Nothing on the host side is left: the guest has a while to end its side.
            self.set_deadline(token, Some(Instant::now() + SHUTDOWN_TIMEOUT));
        }
        self.flush_control()?;
        self.maybe_close(token);
        Ok(())
    }

    // ---- tx side -------------------------------------------------------------------------------

    fn process_tx(&mut self) -> QResult<()> {
        let mut used = false;
        self.tx_stalled = false;
        loop {
            if self.control.len() >= MAX_CONTROL_QUEUE {
                self.tx_stalled = true;
                break;
            }
            let chain = match self.tx.iter(&self.mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => return Err(format!("tx available ring: {e}")),
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            match self.read_tx_packet(chain) {
                Ok((h, parsed)) => self.handle_packet(&h, &parsed)?,
                Err(e) => warn_ratelimited!("virtio-vsock: tx packet dropped: {e}"),
            }
            if head >= self.tx.size() {
                continue;
            }
            self.tx
                .add_used(&self.mem, head, 0)
                .map_err(|e| format!("tx used ring: {e}"))?;
            used = true;
        }
        if used {
            self.notify(1)?;
        }
        self.flush_control()
    }

    fn read_tx_packet<M>(
        &self,
        chain: virtio_queue::DescriptorChain<M>,
    ) -> Result<(Header, ParsedChain), String>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let parsed = parse_chain(chain).map_err(|e| e.to_string())?;
        parsed.check_memory(&self.mem).map_err(|e| e.to_string())?;
        let readable = parsed.readable_len();
        if readable < HEADER_LEN as u64 {
            return Err(format!("{readable} readable bytes, less than a header"));
        }
        let mut raw = [0u8; HEADER_LEN];
        parsed
            .read_at(&self.mem, 0, &mut raw)
            .map_err(|e| e.to_string())?;
        let h = Header::from_bytes(&raw);
        if h.len > MAX_PKT_LEN {
            return Err(format!("payload of {} bytes (max {MAX_PKT_LEN})", h.len));
        }
        if u64::from(h.len) > readable - HEADER_LEN as u64 {
            return Err(format!(
                "header says {} payload bytes, the buffers hold {}",
                h.len,
                readable - HEADER_LEN as u64
            ));
        }
        Ok((h, parsed))
    }

    fn handle_packet(&mut self, h: &Header, chain: &ParsedChain) -> QResult<()> {
        if h.src_cid != self.cid {
            // Not from this guest's address: nothing sensible to answer to.
            warn_ratelimited!(
                "virtio-vsock: packet from CID {} (guest is {}): dropped",
                h.src_cid,
                self.cid
            );
            return Ok(());
        }
        if h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            self.queue_rst_reply(h);
            return Ok(());
        }
        let key = (h.dst_port, h.src_port);
        let token = self.by_ports.get(&key).copied();
        if h.op == OP_REQUEST {
            if let Some(t) = token {
                // The guest reuses a live connection's ports: both ends are confused, reset it.
                self.remove_conn(t);
                self.queue_rst_reply(h);
                return Ok(());
            }
            self.connect_to_host(h);
            return Ok(());
        }
        let Some(token) = token else {
            self.queue_rst_reply(h);
            return Ok(());
        };
        {
            let Some(c) = self.conns.get_mut(&token) else {
                return Ok(());
            };
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_RESPONSE => {
                if self.conns[&token].state != State::LocalInit {
                    self.reset_conn(token);
                    return Ok(());
                }
                self.established(token);
            }
            OP_RW => {
                if self.conns[&token].state != State::Established {
                    self.reset_conn(token);
                    return Ok(());
                }
                self.forward_to_host(token, h, chain);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_conn_packet(token, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                }
                self.maybe_close(token);
            }
            OP_RST => {
                self.remove_conn(token);
                return Ok(());
            }
            _ => {
                warn_ratelimited!("virtio-vsock: unknown op {}: connection reset", h.op);
                self.reset_conn(token);
                return Ok(());
            }
        }
        // Any packet may carry new credit.
        if self.blocked.contains(&token) {
            self.pump_socket(token)?;
        } else {
            self.update_interest(token);
        }
        Ok(())
    }

    /// Guest REQUEST to host port `dst_port`: connect to `<socket>_<port>`.
    fn connect_to_host(&mut self, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn_ratelimited!("virtio-vsock: {MAX_CONNECTIONS} connections open: request refused");
            self.queue_rst_reply(h);
            return;
        }
        let mut path = OsString::from(self.socket.as_os_str());
        path.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(std::path::Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "virtio-vsock: guest port {} -> {}: {e}",
                    h.src_port,
                    std::path::Path::new(&path).display()
                );
                self.queue_rst_reply(h);
                return;
            }
        };
        let mut c = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let token = self.insert_conn(c);
        self.queue_conn_packet(token, OP_RESPONSE, 0);
        self.update_interest(token);
    }

    /// Guest bytes to the host socket; anything the socket does not take now waits in `pending`.
    fn forward_to_host(&mut self, token: u64, h: &Header, chain: &ParsedChain) {
        let len = h.len as usize;
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.peer_shutdown & SHUTDOWN_SEND != 0 {
            warn_ratelimited!("virtio-vsock: data after SHUTDOWN: connection reset");
            self.reset_conn(token);
            return;
        }
        if c.pending.len() + len > BUF_ALLOC as usize {
            warn_ratelimited!(
                "virtio-vsock: guest sent {len} bytes with {} credit: connection reset",
                BUF_ALLOC as usize - c.pending.len()
            );
            self.reset_conn(token);
            return;
        }
        if len == 0 {
            return;
        }
        if let Err(e) = chain.read_at(&self.mem, HEADER_LEN as u64, &mut self.scratch[..len]) {
            warn_ratelimited!("virtio-vsock: tx payload: {e}");
            self.reset_conn(token);
            return;
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
        let mut written = 0;
        if c.pending.is_empty() && !c.host_hup {
            match send(c.stream.as_raw_fd(), &self.scratch[..len]) {
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    log::debug!("virtio-vsock: host socket write: {e}");
                    self.reset_conn(token);
                    return;
                }
            }
        }
        c.fwd_cnt = c.fwd_cnt.wrapping_add(written as u32);
        c.pending.extend(&self.scratch[written..len]);
        if c.host_hup && !c.pending.is_empty() {
            // Nobody will ever read it.
            self.reset_conn(token);
            return;
        }
        if c.wants_credit_update() {
            self.queue_conn_packet(token, OP_CREDIT_UPDATE, 0);
        }
    }

    /// Writes what the socket takes of `pending`.
    fn flush_pending(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        while !c.pending.is_empty() {
            let (front, _) = c.pending.as_slices();
            match send(c.stream.as_raw_fd(), front) {
                Ok(0) => break,
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("virtio-vsock: host socket write: {e}");
                    self.reset_conn(token);
                    return;
                }
            }
        }
        if c.wants_credit_update() || (c.pending.is_empty() && c.fwd_cnt != c.announced_fwd_cnt) {
            self.queue_conn_packet(token, OP_CREDIT_UPDATE, 0);
        }
        self.maybe_close(token);
    }

    /// Ends the connection once both directions are finished: the guest will not send (and all it sent
    /// is written) and either it will not receive or the host has nothing more to send.
    fn maybe_close(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let guest_done = c.peer_shutdown & SHUTDOWN_SEND != 0 && c.pending.is_empty();
        if guest_done && !c.write_shut {
            // The host client sees EOF.
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            c.write_shut = true;
        }
        if guest_done && (c.peer_shutdown & SHUTDOWN_RCV != 0 || c.host_eof) {
            self.reset_conn(token);
        } else {
            self.update_interest(token);
        }
    }

    // ---- connections ---------------------------------------------------------------------------

    fn insert_conn(&mut self, c: Conn) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        if !matches!(c.state, State::Handshake { .. }) {
            self.by_ports.insert((c.local_port, c.peer_port), token);
        }
        self.conns.insert(token, c);
        token
    }

    /// Closes the host socket and forgets the connection.
    fn remove_conn(&mut self, token: u64) {
        self.blocked.remove(&token);
        if let Some(c) = self.conns.remove(&token) {
            if let Some(at) = c.deadline {
                self.timers.remove(&(at, token));
            }
            if c.interest.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            if self.by_ports.get(&(c.local_port, c.peer_port)) == Some(&token) {
                self.by_ports.remove(&(c.local_port, c.peer_port));
            }
        }
    }

    /// Tells the guest RST (if it knows the connection) and removes it.
    fn reset_conn(&mut self, token: u64) {
        let Some(c) = self.conns.get(&token) else {
            return;
        };
        let knows = match c.state {
            State::Handshake { .. } => false,
            // A REQUEST still waiting for an rx buffer is withdrawn instead: the guest never hears of
            // the connection.
            State::LocalInit => {
                let ports = (c.local_port, c.peer_port);
                !self.withdraw_request(ports)
            }
            State::Established => true,
        };
        if knows {
            self.queue_conn_packet(token, OP_RST, 0);
        }
        self.remove_conn(token);
    }

    /// Drops the queued REQUEST from host port `local` to guest port `peer`; false if none is queued.
    fn withdraw_request(&mut self, (local, peer): (u32, u32)) -> bool {
        let before = self.control.len();
        self.control
            .retain(|h| !(h.op == OP_REQUEST && h.src_port == local && h.dst_port == peer));
        self.control.len() != before
    }

    /// Arms the connection's timer for `deadline`, or disarms it.
    fn set_deadline(&mut self, token: u64, deadline: Option<Instant>) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if let Some(old) = c.deadline.take() {
            self.timers.remove(&(old, token));
        }
        if let Some(at) = deadline {
            self.timers.insert((at, token));
            c.deadline = Some(at);
        }
    }

    /// Gives up on every connection whose deadline is `now` or earlier.
    fn expire(&mut self, now: Instant) -> QResult<()> {
        while let Some(&(at, token)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            c.deadline = None;
            let port = c.peer_port;
            match c.state {
                State::Handshake { .. } => {
                    warn_ratelimited!(
                        "virtio-vsock: no CONNECT line in {HANDSHAKE_TIMEOUT:?}: closed"
                    )
                }
                State::LocalInit => warn_ratelimited!(
                    "virtio-vsock: guest port {port} did not answer in {CONNECT_TIMEOUT:?}: reset"
                ),
                State::Established => log::debug!(
                    "virtio-vsock: guest port {port} did not close in {SHUTDOWN_TIMEOUT:?}: reset"
                ),
            }
            self.reset_conn(token);
        }
        self.flush_control()
    }

    /// Brings the epoll registration in line with what the connection can do now.
    fn update_interest(&mut self, token: u64) {
        let blocked = self.blocked.contains(&token);
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.host_hup {
            return;
        }
        let mut want = EventSet::empty();
        match c.state {
            State::Handshake { .. } => want |= EventSet::IN,
            State::LocalInit => {}
            State::Established => {
                if !c.host_eof && c.peer_shutdown & SHUTDOWN_RCV == 0 && !blocked {
                    want |= EventSet::IN;
                }
                if !c.pending.is_empty() {
                    want |= EventSet::OUT;
                }
            }
        }
        if c.interest == Some(want) {
            return;
        }
        let op = if c.interest.is_some() {
            ControlOperation::Modify
        } else {
            ControlOperation::Add
        };
        match self
            .epoll
            .ctl(op, c.stream.as_raw_fd(), EpollEvent::new(want, token))
        {
            Ok(()) => c.interest = Some(want),
            Err(e) => {
                log::warn!("virtio-vsock: epoll: {e}: connection reset");
                self.reset_conn(token);
            }
        }
    }

    fn established(&mut self, token: u64) {
        self.set_deadline(token, None);
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.state = State::Established;
        let ok = format!("OK {}\n", c.local_port);
        // A fresh socket's send buffer is empty: a short write means the client is gone.
        match send(c.stream.as_raw_fd(), ok.as_bytes()) {
            Ok(n) if n == ok.len() => self.update_interest(token),
            _ => self.reset_conn(token),
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn_ratelimited!("virtio-vsock: accept: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                warn_ratelimited!(
                    "virtio-vsock: {MAX_CONNECTIONS} connections open: client closed"
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.insert_conn(Conn::new(
                stream,
                State::Handshake { line: Vec::new() },
                0,
                0,
            ));
            self.set_deadline(token, Some(Instant::now() + HANDSHAKE_TIMEOUT));
            self.update_interest(token);
        }
    }

    /// Reads the client's `CONNECT <port>\n` a byte at a time (so no data after it is consumed).
    fn handshake(&mut self, token: u64) {
        let port = loop {
            let Some(c) = self.conns.get_mut(&token) else {
                return;
            };
            let mut byte = [0u8; 1];
            match c.stream.read(&mut byte) {
                Ok(0) => return self.remove_conn(token),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.remove_conn(token),
            }
            let State::Handshake { line } = &mut c.state else {
                return;
            };
            if byte[0] == b'\n' {
                match parse_connect(line) {
                    Some(port) => break port,
                    None => {
                        warn_ratelimited!("virtio-vsock: bad CONNECT line from a host client");
                        return self.remove_conn(token);
                    }
                }
            }
            line.push(byte[0]);
            if line.len() > MAX_CONNECT_LINE {
                warn_ratelimited!("virtio-vsock: CONNECT line too long");
                return self.remove_conn(token);
            }
        };
        let local_port = self.allocate_local_port(port);
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.state = State::LocalInit;
        c.local_port = local_port;
        c.peer_port = port;
        self.by_ports.insert((local_port, port), token);
        self.queue_conn_packet(token, OP_REQUEST, 0);
        // Counted from now, not from delivery: a guest that takes no rx buffers must not hold the client.
        self.set_deadline(token, Some(Instant::now() + CONNECT_TIMEOUT));
        self.update_interest(token);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(p) => p,
                None => FIRST_LOCAL_PORT,
            };
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            if !self.by_ports.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn process_sockets(&mut self) -> QResult<()> {
        let mut ready = [EpollEvent::default(); SOCKET_EVENTS_PER_WAKE];
        let n = match self.epoll.wait(0, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(format!("socket epoll: {e}")),
        };
        for ev in &ready[..n] {
            let token = ev.data();
            let set = ev.event_set();
            if token == LISTENER_TOKEN {
                self.accept();
                continue;
            }
            let Some(c) = self.conns.get(&token) else {
                continue;
            };
            match c.state {
                State::Handshake { .. } => {
                    self.handshake(token);
                    continue;
                }
                State::LocalInit => {
                    if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                        self.reset_conn(token);
                    }
                    continue;
                }
                State::Established => {}
            }
            if set.contains(EventSet::OUT) {
                self.flush_pending(token);
            }
            let hup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
            if hup {
                let Some(c) = self.conns.get_mut(&token) else {
                    continue;
                };
                if c.host_eof || !c.pending.is_empty() {
                    // It can take nothing more that the guest sends: give up on the connection.
                    self.reset_conn(token);
                    continue;
                }
                // Out of the epoll set (a hung-up socket is always ready); what it still holds is
                // drained as rx buffers and credit allow.
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                c.interest = None;
                c.host_hup = true;
            }
            if hup || set.contains(EventSet::IN) {
                self.pump_socket(token)?;
            }
        }
        self.flush_control()
    }

    /// Retries connections waiting for rx buffers or credit.
    fn unblock(&mut self) -> QResult<()> {
        let waiting: Vec<u64> = self.blocked.iter().copied().collect();
        for token in waiting {
            self.pump_socket(token)?;
        }
        Ok(())
    }

    // ---- event queue ---------------------------------------------------------------------------

    /// Drops every connection and queues the transport-reset event.
    fn reset_transport(&mut self) -> QResult<()> {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for token in tokens {
            self.remove_conn(token);
        }
        // Packets for connections that no longer exist would only confuse the driver.
        self.control.clear();
        self.reset_pending = true;
        self.deliver_reset()
    }

    fn deliver_reset(&mut self) -> QResult<()> {
        if !self.reset_pending {
            return Ok(());
        }
        loop {
            let chain = match self.events.iter(&self.mem) {
                Ok(mut chains) => chains.next(),
                Err(_) => return Ok(()), // Not set up: the event waits.
            };
            let Some(chain) = chain else {
                return Ok(());
            };
            let head = chain.head_index();
            let parsed = parse_chain(chain).and_then(|p| p.check_memory(&self.mem).map(|_| p));
            let mut len = 0;
            if let Ok(p) = &parsed {
                if p.writable_len() >= EVENT_LEN as u64
                    && p.write_at(&self.mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())
                        .is_ok()
                {
                    len = EVENT_LEN as u32;
                }
            }
            if head >= self.events.size() {
                continue;
            }
            self.events
                .add_used(&self.mem, head, len)
                .map_err(|e| format!("event used ring: {e}"))?;
            self.notify(2)?;
            if len > 0 {
                self.reset_pending = false;
                log::info!("virtio-vsock: transport reset sent to the guest");
                return Ok(());
            }
            warn_ratelimited!("virtio-vsock: unusable event buffer dropped");
        }
    }
}

impl QueueHandler for Backend {
    fn handle_queue(&mut self, index: usize) -> Result<(), String> {
        match index {
            EV_RX => {
                self.flush_control()?;
                self.unblock()?;
                if self.tx_stalled {
                    self.process_tx()?;
                }
                Ok(())
            }
            EV_TX => self.process_tx(),
            EV_EVENT => self.deliver_reset(),
            EV_SOCKETS => self.process_sockets(),
            EV_CONTROL => {
                if self.reset_requested.take() {
                    self.reset_transport()?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn queues(&self) -> Vec<&Queue> {
        vec![&self.rx, &self.tx, &self.events]
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|&(at, _)| at)
    }

    fn handle_deadline(&mut self, now: Instant) -> Result<(), String> {
        self.expire(now)
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"connect 5",
            b"CONNECT 5 6",
            b"\xff\xfe",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
