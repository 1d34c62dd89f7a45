//! The device against a scripted driver: three split queues in a small guest memory, real Unix sockets on
//! the host side, the worker's handler called directly (so every step is deterministic).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::backend::{Backend, Params, EV_CONTROL, EV_EVENT, EV_RX, EV_SOCKETS, EV_TX};
use super::packet::*;
use super::*;
use crate::virtio::test_util::{write_descs, Desc, RecordingInterrupt, TempDir, F_NEXT, F_WRITE};
use crate::virtio::worker::QueueHandler;
use crate::virtio::{ActivateContext, ActiveQueue, GuestMemory};

const GUEST_CID: u64 = 3;
const MEM: u64 = 8 << 20;
const QSIZE: u16 = 64;
const DATA: u64 = 0x10_0000;

/// One queue as the driver sees it.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    next_desc: u16,
    seen_used: u16,
}

impl Ring {
    fn new(base: u64) -> (Ring, Queue) {
        let r = Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            next_desc: 0,
            seen_used: 0,
        };
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(r.desc as u32), Some(0));
        q.set_avail_ring_address(Some(r.avail as u32), Some(0));
        q.set_used_ring_address(Some(r.used as u32), Some(0));
        q.set_ready(true);
        (r, q)
    }

    fn publish(&mut self, mem: &GuestMemory, descs: &[Desc]) {
        let first = self.next_desc;
        let mut linked = descs.to_vec();
        for (i, d) in linked.iter_mut().enumerate() {
            if d.flags & F_NEXT != 0 {
                d.next = (first + i as u16 + 1) % QSIZE;
            }
        }
        write_descs(mem, self.desc, first, &linked);
        self.next_desc = (first + descs.len() as u16) % QSIZE;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(first, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// New used elements: (id, len).
    fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen_used != idx {
            let at = self.used + 4 + 8 * u64::from(self.seen_used % QSIZE);
            out.push((
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            ));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}

struct Harness {
    mem: GuestMemory,
    backend: Backend,
    rx: Ring,
    tx: Ring,
    ev: Ring,
    /// Guest address of each rx descriptor's buffer.
    rx_bufs: Vec<u64>,
    control: Arc<Control>,
    _dir: TempDir,
    socket: PathBuf,
    /// Our (guest) credit as sent in every packet.
    buf_alloc: u32,
    fwd_cnt: u32,
    next_buf: u64,
}

impl Harness {
    fn new() -> Harness {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let (rx, rxq) = Ring::new(0x1_0000);
        let (tx, txq) = Ring::new(0x2_0000);
        let (ev, evq) = Ring::new(0x3_0000);
        let dir = TempDir::new();
        let socket = dir.0.join("v.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let control = Arc::new(Control {
            event: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            reset_requested: std::sync::atomic::AtomicBool::new(false),
        });
        let backend = Backend::new(Params {
            mem: mem.clone(),
            queues: [rxq, txq, evq],
            interrupt: Arc::new(RecordingInterrupt::default()),
            cid: GUEST_CID,
            socket: socket.clone(),
            listener,
            epoll: vmm_sys_util::epoll::Epoll::new().unwrap(),
            reset_requested: Arc::new(ResetFlag(control.clone())),
        })
        .unwrap();
        Harness {
            mem,
            backend,
            rx,
            tx,
            ev,
            rx_bufs: vec![0; QSIZE as usize],
            control,
            _dir: dir,
            socket,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
            next_buf: DATA,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_buf;
        self.next_buf += len.next_multiple_of(64);
        assert!(self.next_buf < MEM);
        at
    }

    /// Posts `n` rx buffers of `size` bytes and notifies.
    fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(size));
            self.rx_bufs[usize::from(self.rx.next_desc)] = addr;
            self.rx
                .publish(&self.mem, &[Desc::new(addr, size, F_WRITE, 0)]);
        }
        self.backend.handle_queue(EV_RX).unwrap();
    }

    fn header(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            ..Default::default()
        }
    }

    /// Sends one packet (header and payload in one readable descriptor).
    fn send(&mut self, h: Header, payload: &[u8]) {
        let addr = self.alloc((HEADER_LEN + payload.len()) as u64);
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HEADER_LEN as u64))
            .unwrap();
        let len = (HEADER_LEN + payload.len()) as u32;
        self.send_descs(&[Desc::new(addr, len, 0, 0)]);
    }

    fn send_descs(&mut self, descs: &[Desc]) {
        self.tx.publish(&self.mem, descs);
        self.backend.handle_queue(EV_TX).unwrap();
        for (_, len) in self.tx.take_used(&self.mem) {
            assert_eq!(len, 0, "tx buffers come back with nothing written");
        }
    }

    /// Packets the device delivered since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.take_used(&self.mem);
        used.into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(id, len)| {
                let addr = self.rx_bufs[id as usize];
                let mut raw = [0u8; HEADER_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let h = Header::from_bytes(&raw);
                assert_eq!(len as usize, HEADER_LEN + h.len as usize);
                let mut data = vec![0u8; h.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HEADER_LEN as u64))
                    .unwrap();
                (h, data)
            })
            .collect()
    }

    fn ops(&mut self) -> Vec<u16> {
        self.recv().into_iter().map(|(h, _)| h.op).collect()
    }

    fn sockets(&mut self) {
        for _ in 0..4 {
            self.backend.handle_queue(EV_SOCKETS).unwrap();
        }
    }

    /// Runs the timers as if `after` had passed.
    fn time_passes(&mut self, after: Duration) {
        self.backend
            .handle_deadline(Instant::now() + after)
            .unwrap();
    }

    /// A host client that has sent `bytes` (and gets answers without blocking).
    fn client(&self, bytes: &[u8]) -> UnixStream {
        let mut client = UnixStream::connect(&self.socket).unwrap();
        client.write_all(bytes).unwrap();
        client.set_nonblocking(true).unwrap();
        client
    }

    /// A host client through the hybrid socket, up to the guest's RESPONSE; returns it and the ports.
    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.socket).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        self.sockets();
        let got = self.recv();
        assert_eq!(got.len(), 1, "{got:?}");
        let req = got[0].0;
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(req.dst_port, guest_port);
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        let host_port = req.src_port;
        self.send(self.header(OP_RESPONSE, guest_port, host_port), &[]);
        let mut line = [0u8; 64];
        let n = client.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {host_port}\n")
        );
        (client, host_port)
    }
}

/// The device closed the client (EOF, or a reset if bytes it sent were left unread).
fn assert_closed(client: &mut UnixStream) {
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "got {:?} instead of EOF", &buf[..n]),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

/// The client is still open and got nothing (it must be non-blocking).
fn assert_waiting(client: &mut UnixStream) {
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
        Ok(n) => panic!("expected nothing yet, got {:?}", &buf[..n]),
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn host_initiated_connection_relays_both_ways() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let (mut client, hp) = h.host_connect(1234);

    // Host -> guest.
    client.write_all(b"hello guest").unwrap();
    h.sockets();
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (hp, 1234));
    assert_eq!(got[0].1, b"hello guest");

    // Guest -> host.
    let mut rw = h.header(OP_RW, 1234, hp);
    rw.len = 9;
    h.send(rw, b"hi host!!");
    let mut buf = [0u8; 9];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi host!!");

    // Host closes: the guest hears SHUTDOWN; its SHUTDOWN(both) is answered with RST.
    drop(client);
    h.sockets();
    let got = h.recv();
    assert_eq!(got.last().unwrap().0.op, OP_SHUTDOWN, "{got:?}");
    let mut sd = h.header(OP_SHUTDOWN, 1234, hp);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(sd, &[]);
    assert_eq!(h.ops(), vec![OP_RST]);
    assert_eq!(h.backend.connection_count(), 0);
}

#[test]
fn guest_initiated_connection_reaches_socket_port_path() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let mut path = h.socket.clone().into_os_string();
    path.push("_5000");
    let host = UnixListener::bind(&path).unwrap();
    h.send(h.header(OP_REQUEST, 777, 5000), &[]);
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RESPONSE);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (5000, 777));
    let (mut server, _) = host.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rw = h.header(OP_RW, 777, 5000);
    rw.len = 4;
    h.send(rw, b"ping");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").unwrap();
    h.sockets();
    let got = h.recv();
    assert_eq!(got[0].1, b"pong");
    // The guest resets: the host socket closes.
    h.send(h.header(OP_RST, 777, 5000), &[]);
    assert_eq!(server.read(&mut buf).unwrap(), 0);
    assert_eq!(h.backend.connection_count(), 0);
}

#[test]
fn refused_guest_connection_gets_rst() {
    let mut h = Harness::new();
    h.post_rx(4, 4096);
    h.send(h.header(OP_REQUEST, 777, 6000), &[]);
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (6000, 777));
    assert_eq!(h.backend.connection_count(), 0);
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mut h = Harness::new();
    h.post_rx(4, 4096);
    let (mut good, hp) = h.host_connect(55);
    let long_port = format!("CONNECT {}\n", "1".repeat(40));
    for line in [
        &b"HELLO 5\n"[..],
        b"CONNECT x\n",
        b"CONNECT 4294967296\n",
        b"CONNECT -1\n",
        b"CONNECT 5 6\n",
        b"CONNECT\x005\n",
        b"\xff\xfe\xfd\n",
        b"\n",
        long_port.as_bytes(),
        &[b'A'; 64],
    ] {
        let mut client = h.client(line);
        h.sockets();
        // Closed with the rest of the line unread: EOF or a reset, never an answer.
        assert_closed(&mut client);
    }
    assert!(h.recv().is_empty(), "the guest heard nothing");
    // The established connection is untouched.
    assert_eq!(h.backend.connection_count(), 1);
    let mut rw = h.header(OP_RW, 55, hp);
    rw.len = 5;
    h.send(rw, b"still");
    let mut buf = [0u8; 5];
    good.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still");
}

#[test]
fn a_guest_that_never_answers_gets_rst_and_the_client_is_closed() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let (mut other, other_hp) = h.host_connect(70);
    let before = Instant::now();
    let mut client = h.client(b"CONNECT 71\n");
    h.sockets();
    let req = h.recv();
    assert_eq!(req.len(), 1);
    assert_eq!(req[0].0.op, OP_REQUEST);
    let hp = req[0].0.src_port;
    let due = h.backend.next_deadline().expect("the request is timed");
    assert!(due >= before + CONNECT_TIMEOUT && due <= Instant::now() + CONNECT_TIMEOUT);
    // Not yet.
    h.time_passes(CONNECT_TIMEOUT / 2);
    assert_waiting(&mut client);
    assert!(h.recv().is_empty());
    // Past the deadline: the client is closed and the guest hears RST for exactly that connection.
    h.time_passes(CONNECT_TIMEOUT + Duration::from_millis(1));
    assert_closed(&mut client);
    let got = h.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    let rst = got[0].0;
    assert_eq!(rst.op, OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (hp, 71));
    assert_eq!((rst.src_cid, rst.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(h.backend.connection_count(), 1);
    assert_eq!(
        h.backend.next_deadline(),
        None,
        "established connections are not timed"
    );
    // A late RESPONSE is for a connection that is gone: RST again.
    h.send(h.header(OP_RESPONSE, 71, hp), &[]);
    assert_eq!(h.ops(), vec![OP_RST]);
    // The other connection never noticed.
    let mut rw = h.header(OP_RW, 70, other_hp);
    rw.len = 2;
    h.send(rw, b"ok");
    let mut buf = [0u8; 2];
    other.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
}

#[test]
fn a_request_the_guest_never_took_is_withdrawn() {
    let mut h = Harness::new();
    // No rx buffers: the REQUEST waits in the device.
    let mut client = h.client(b"CONNECT 72\n");
    h.sockets();
    assert_waiting(&mut client);
    h.time_passes(CONNECT_TIMEOUT + Duration::from_millis(1));
    assert_closed(&mut client);
    assert_eq!(h.backend.connection_count(), 0);
    // Buffers come: neither the stale REQUEST nor an RST for it goes out.
    h.post_rx(4, 4096);
    h.sockets();
    assert!(h.recv().is_empty());
}

#[test]
fn a_client_vanishing_before_the_guest_took_the_request_leaves_no_trace() {
    let mut h = Harness::new();
    let client = h.client(b"CONNECT 73\n");
    h.sockets();
    drop(client);
    h.sockets();
    assert_eq!(h.backend.connection_count(), 0);
    assert_eq!(h.backend.next_deadline(), None);
    h.post_rx(4, 4096);
    assert!(h.recv().is_empty());
}

#[test]
fn an_incomplete_connect_line_times_out_without_touching_others() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let mut silent = h.client(b"");
    let mut partial = h.client(b"CONNECT 12");
    h.sockets();
    let (mut good, hp) = h.host_connect(13);
    // Still within the handshake time (and past the guest's answer time, which does not apply here).
    h.time_passes(CONNECT_TIMEOUT + Duration::from_millis(1));
    assert_waiting(&mut silent);
    assert_waiting(&mut partial);
    assert_eq!(h.backend.connection_count(), 3);
    h.time_passes(HANDSHAKE_TIMEOUT + Duration::from_millis(1));
    assert_closed(&mut silent);
    assert_closed(&mut partial);
    assert!(h.recv().is_empty(), "the guest heard nothing");
    assert_eq!(h.backend.connection_count(), 1);
    let mut rw = h.header(OP_RW, 13, hp);
    rw.len = 3;
    h.send(rw, b"yes");
    let mut buf = [0u8; 3];
    good.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"yes");
}

#[test]
fn a_completed_line_stops_the_handshake_timer() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let mut client = h.client(b"CONN");
    h.sockets();
    let handshake_due = h.backend.next_deadline().unwrap();
    client.write_all(b"ECT 14\n").unwrap();
    h.sockets();
    let req = h.recv()[0].0;
    // Now timed by the guest's answer instead.
    assert!(h.backend.next_deadline().unwrap() < handshake_due);
    h.send(h.header(OP_RESPONSE, 14, req.src_port), &[]);
    assert_eq!(h.backend.next_deadline(), None);
    h.time_passes(HANDSHAKE_TIMEOUT * 2);
    let mut line = [0u8; 32];
    let n = client.read(&mut line).unwrap();
    assert_eq!(&line[..n], format!("OK {}\n", req.src_port).as_bytes());
    assert_eq!(h.backend.connection_count(), 1);
}

#[test]
fn a_guest_that_never_ends_a_closed_connection_gets_rst() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let (client, hp) = h.host_connect(15);
    drop(client);
    h.sockets();
    let got = h.recv();
    assert_eq!(got.last().unwrap().0.op, OP_SHUTDOWN);
    assert_eq!(got.last().unwrap().0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert!(h.backend.next_deadline().is_some());
    h.time_passes(SHUTDOWN_TIMEOUT / 2);
    assert_eq!(h.backend.connection_count(), 1);
    h.time_passes(SHUTDOWN_TIMEOUT + Duration::from_millis(1));
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (hp, 15));
    assert_eq!(h.backend.connection_count(), 0);
}

#[test]
fn a_half_closed_client_is_not_timed() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let (mut client, hp) = h.host_connect(16);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    h.sockets();
    let got = h.recv();
    assert_eq!(got.last().unwrap().0.op, OP_SHUTDOWN);
    assert_eq!(got.last().unwrap().0.flags, SHUTDOWN_SEND);
    assert_eq!(h.backend.next_deadline(), None);
    // The guest may take its time to answer.
    let mut rw = h.header(OP_RW, 16, hp);
    rw.len = 4;
    h.send(rw, b"late");
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"late");
}

/// The real device and worker thread: the timeout fires from the worker's own wait, with no
/// notification at all.
#[test]
fn the_worker_closes_an_unanswered_client_after_the_timeout() {
    let dir = TempDir::new();
    let cfg = VsockConfig {
        cid: GUEST_CID,
        socket: dir.0.join("w.sock"),
    };
    let mut dev = Vsock::new(&cfg).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let (mut rx, rxq) = Ring::new(0x1_0000);
    let (_, txq) = Ring::new(0x2_0000);
    let (_, evq) = Ring::new(0x3_0000);
    for i in 0..4u64 {
        rx.publish(&mem, &[Desc::new(DATA + i * 4096, 4096, F_WRITE, 0)]);
    }
    let queues = [rxq, txq, evq]
        .into_iter()
        .enumerate()
        .map(|(i, queue)| ActiveQueue {
            index: i as u16,
            queue,
            event: vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                .unwrap(),
        })
        .collect();
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(RecordingInterrupt::default()),
        queues,
    })
    .unwrap();
    let mut client = UnixStream::connect(&cfg.socket).unwrap();
    client.set_read_timeout(Some(CONNECT_TIMEOUT * 5)).unwrap();
    let start = Instant::now();
    client.write_all(b"CONNECT 99\n").unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "closed, no OK");
    let waited = start.elapsed();
    assert!(
        waited >= CONNECT_TIMEOUT && waited < CONNECT_TIMEOUT * 3,
        "closed after {waited:?}"
    );
    dev.pause().unwrap();
    let ops: Vec<u16> = rx
        .take_used(&mem)
        .into_iter()
        .map(|(id, _)| {
            let mut raw = [0u8; HEADER_LEN];
            mem.read_slice(&mut raw, GuestAddress(DATA + u64::from(id) * 4096))
                .unwrap();
            Header::from_bytes(&raw).op
        })
        .collect();
    assert_eq!(ops, vec![OP_REQUEST, OP_RST]);
    dev.reset();
}

#[test]
fn guest_refusal_closes_the_host_client() {
    let mut h = Harness::new();
    h.post_rx(4, 4096);
    let mut client = UnixStream::connect(&h.socket).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    h.sockets();
    let req = h.recv()[0].0;
    h.send(h.header(OP_RST, 99, req.src_port), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
}

#[test]
fn hostile_headers_are_dropped_or_reset() {
    let mut h = Harness::new();
    h.post_rx(16, 4096);
    // Spoofed source CID: dropped without an answer.
    let mut spoof = h.header(OP_REQUEST, 1, 2);
    spoof.src_cid = 9;
    h.send(spoof, &[]);
    assert!(h.ops().is_empty());
    // Wrong destination CID, wrong type, unknown op, RW to no connection: RST.
    let mut wrong_dst = h.header(OP_REQUEST, 1, 2);
    wrong_dst.dst_cid = 7;
    h.send(wrong_dst, &[]);
    let mut dgram = h.header(OP_REQUEST, 1, 2);
    dgram.kind = 2;
    h.send(dgram, &[]);
    h.send(h.header(99, 1, 2), &[]);
    h.send(h.header(OP_RW, 1, 2), &[]);
    h.send(h.header(OP_RESPONSE, 1, 2), &[]);
    assert_eq!(h.ops(), vec![OP_RST; 5]);
    // An RST to nothing is not answered.
    h.send(h.header(OP_RST, 1, 2), &[]);
    assert!(h.ops().is_empty());
    // Lengths: larger than the limit, larger than the buffer, a short header, writable-only buffers.
    let mut big = h.header(OP_RW, 1, 2);
    big.len = MAX_PKT_LEN + 1;
    h.send(big, &[0; 16]);
    let mut lying = h.header(OP_RW, 1, 2);
    lying.len = 100;
    h.send(lying, &[0; 10]);
    let addr = h.alloc(64);
    h.send_descs(&[Desc::new(addr, 20, 0, 0)]);
    h.send_descs(&[Desc::new(addr, 64, F_WRITE, 0)]);
    // Outside guest memory, and a descriptor loop.
    h.send_descs(&[Desc::new(MEM - 8, 64, 0, 0)]);
    assert!(h.ops().is_empty());
    assert_eq!(h.backend.connection_count(), 0);
}

#[test]
fn header_split_across_descriptors_is_accepted() {
    let mut h = Harness::new();
    h.post_rx(4, 4096);
    let mut path = h.socket.clone().into_os_string();
    path.push("_42");
    let _host = UnixListener::bind(&path).unwrap();
    let bytes = h.header(OP_REQUEST, 5, 42).to_bytes();
    let a = h.alloc(64);
    let b = h.alloc(64);
    h.mem.write_slice(&bytes[..10], GuestAddress(a)).unwrap();
    h.mem.write_slice(&bytes[10..], GuestAddress(b)).unwrap();
    h.send_descs(&[Desc::new(a, 10, F_NEXT, 0), Desc::new(b, 34, 0, 0)]);
    assert_eq!(h.ops(), vec![OP_RESPONSE]);
}

#[test]
fn credit_violation_resets_the_connection() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let mut path = h.socket.clone().into_os_string();
    path.push("_7");
    let host = UnixListener::bind(&path).unwrap();
    h.send(h.header(OP_REQUEST, 70, 7), &[]);
    assert_eq!(h.ops(), vec![OP_RESPONSE]);
    let (server, _) = host.accept().unwrap();
    // Nobody reads the host side: the socket buffer fills, then BUF_ALLOC is the limit.
    let chunk = vec![0x5au8; MAX_PKT_LEN as usize];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..64 {
        let mut rw = h.header(OP_RW, 70, 7);
        rw.len = chunk.len() as u32;
        h.send(rw, &chunk);
        sent += chunk.len();
        if h.ops().contains(&OP_RST) {
            reset = true;
            break;
        }
        h.next_buf = DATA + (1 << 20); // reuse scratch memory
    }
    assert!(reset, "no RST after {sent} bytes");
    assert_eq!(h.backend.connection_count(), 0);
    drop(server);
}

#[test]
fn host_data_waits_for_guest_credit_and_buffers() {
    let mut h = Harness::new();
    h.buf_alloc = 1000;
    h.post_rx(4, 4096);
    let (mut client, hp) = h.host_connect(80);
    client.write_all(&pattern(5000)).unwrap();
    h.sockets();
    let got = h.recv();
    let data: usize = got.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(data, 1000, "exactly the credit");
    assert_eq!(got.last().unwrap().0.op, OP_CREDIT_REQUEST, "{got:?}");
    // More rx buffers alone change nothing.
    h.post_rx(8, 4096);
    h.sockets();
    assert!(h.recv().is_empty());
    // Credit arrives: the rest flows, in order.
    h.fwd_cnt = 1000;
    h.buf_alloc = 1 << 20;
    h.send(h.header(OP_CREDIT_UPDATE, 80, hp), &[]);
    h.sockets();
    let rest: Vec<u8> = h.recv().into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(rest, pattern(5000)[1000..]);

    // No rx buffers: the device reads nothing more from the socket; once buffers come, it does.
    client.write_all(&pattern(3000)).unwrap();
    h.sockets();
    let pending: usize = h.recv().iter().map(|(_, d)| d.len()).sum();
    assert!(pending <= 3000);
    h.post_rx(4, 4096);
    h.sockets();
    let more: usize = h.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(pending + more, 3000);
}

#[test]
fn guest_credit_request_is_answered_and_updates_follow_forwarding() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let (mut client, hp) = h.host_connect(81);
    h.send(h.header(OP_CREDIT_REQUEST, 81, hp), &[]);
    let got = h.recv();
    assert_eq!(got[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!((got[0].0.buf_alloc, got[0].0.fwd_cnt), (BUF_ALLOC, 0));
    let mut rw = h.header(OP_RW, 81, hp);
    rw.len = 100;
    h.send(rw, &[1; 100]);
    let mut buf = [0u8; 100];
    client.read_exact(&mut buf).unwrap();
    // Small traffic needs no explicit update; the next packet carries fwd_cnt anyway.
    client.write_all(b"x").unwrap();
    h.sockets();
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.fwd_cnt, 100);
}

#[test]
fn transport_reset_closes_everything_and_sends_the_event() {
    let mut h = Harness::new();
    h.post_rx(8, 4096);
    let (mut client, _) = h.host_connect(90);
    // No event buffer yet: the event waits for one.
    ResetHandle(h.control.clone()).reset_connections();
    h.backend.handle_queue(EV_CONTROL).unwrap();
    assert_eq!(h.backend.connection_count(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "host socket closed");
    let ev_buf = h.alloc(8);
    h.mem
        .write_obj(0xffff_ffffu32, GuestAddress(ev_buf))
        .unwrap();
    h.ev.publish(&h.mem, &[Desc::new(ev_buf, 8, F_WRITE, 0)]);
    h.backend.handle_queue(EV_EVENT).unwrap();
    assert_eq!(h.ev.take_used(&h.mem), vec![(0, 4)]);
    let id: u32 = h.mem.read_obj(GuestAddress(ev_buf)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    // Only once.
    h.ev.publish(&h.mem, &[Desc::new(ev_buf, 8, F_WRITE, 0)]);
    h.backend.handle_queue(EV_EVENT).unwrap();
    assert!(h.ev.take_used(&h.mem).is_empty());
}

#[test]
fn host_client_vanishing_mid_stream_resets_only_its_connection() {
    let mut h = Harness::new();
    h.post_rx(16, 4096);
    let (client, hp) = h.host_connect(100);
    let (mut other, other_hp) = h.host_connect(101);
    drop(client);
    h.sockets();
    let got = h.recv();
    assert!(got.iter().any(|(p, _)| p.op == OP_SHUTDOWN
        && p.flags == SHUTDOWN_RCV | SHUTDOWN_SEND
        && p.src_port == hp));
    // The guest, not knowing yet, sends data: the connection is reset.
    let mut rw = h.header(OP_RW, 100, hp);
    rw.len = 3;
    h.send(rw, b"abc");
    assert_eq!(h.ops(), vec![OP_RST]);
    // The other connection still works.
    let mut rw = h.header(OP_RW, 101, other_hp);
    rw.len = 2;
    h.send(rw, b"ok");
    let mut buf = [0u8; 2];
    other.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
    assert_eq!(h.backend.connection_count(), 1);
}

#[test]
fn device_contract_and_config() {
    let dir = TempDir::new();
    let socket = dir.0.join("dev.sock");
    for bad in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let cfg = VsockConfig {
            cid: bad,
            socket: socket.clone(),
        };
        assert!(matches!(Vsock::new(&cfg), Err(VsockError::Cid(_))), "{bad}");
    }
    let not_socket = dir.file("plain", b"x");
    let cfg = VsockConfig {
        cid: 3,
        socket: not_socket,
    };
    assert!(matches!(Vsock::new(&cfg), Err(VsockError::NotASocket(_))));
    let cfg = VsockConfig {
        cid: 0x1_2345,
        socket: socket.clone(),
    };
    let dev = Vsock::new(&cfg).unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_eq!(dev.features(), 1 << VIRTIO_F_VERSION_1);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1_2345);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    // A stale socket file is replaced; the file goes away with the device.
    drop(dev);
    assert!(!socket.exists());
    let _stale = UnixListener::bind(&socket).unwrap();
    let dev = Vsock::new(&cfg).unwrap();
    assert!(UnixStream::connect(&socket).is_ok());
    drop(dev);
}
