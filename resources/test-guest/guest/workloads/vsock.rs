//! `vsock port=P mode=echo|connect [bytes=N] [count=K]` over the first virtio-vsock device on PCI bus 0.
//!
//! - `echo`: listens on port P (prints `vsock: listening port=P cid=C`), accepts connections (up to
//!   [`MAX_CONNS`] at once) and sends every byte back (copied from the receive buffers into a 256 KiB ring
//!   per connection, its advertised buf_alloc, so receive buffers go back at once); a connection
//!   ends when the host closes it (`vsock: closed port=.. bytes=..`). Serves K connections (default: until
//!   stopped), then prints `vsock: ok` and returns K.
//! - `connect`: K times (default 1) connects to the host (CID 2) port P, sends N bytes (default 4096) of
//!   the pattern `byte[o] = o % 251`, reads N bytes back and checks them, closes; prints `vsock: ok` and
//!   returns N * K.
//!
//! Flow control follows §5.10.6.3: never more in flight than the host's buf_alloc minus what it has not
//! forwarded; our own fwd_cnt rides on every packet, with a CREDIT_UPDATE when it has moved a lot.

use super::Context;
use crate::cmdline::{self, Token, Tokens};
use crate::pci::VIRTIO_TYPE_VSOCK;
use crate::protocol::*;
use crate::serial::println;
use crate::signal;
use crate::virtio;
use crate::virtio::vsock::*;

pub const MAX_CONNS: usize = 8;
/// What the guest tells the host it can hold per connection.
const BUF_ALLOC: u32 = 256 << 10;
const DEFAULT_BYTES: u64 = 4096;
const PATTERN_PERIOD: u64 = 251;
/// No progress for this long fails `connect`.
const STALL_NS: u64 = 10_000_000_000;
const STALL_POLLS: u64 = 1 << 30;
/// First local port of `connect`.
const FIRST_LOCAL_PORT: u32 = 49152;

#[derive(Clone, Copy, Default)]
struct Conn {
    live: bool,
    /// Bumped on every reuse of the slot, so held data of an old connection is not echoed on a new one.
    gen: u32,
    local_port: u32,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    announced: u32,
    peer_shutdown: u32,
    closing: bool,
    connected: bool,
    /// Echo: bytes copied into the connection's ring (`tx_cnt` of them are echoed, `fwd_cnt` of those
    /// used by the device, so their ring space is free).
    filled: u32,
    bytes: u64,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn header(&mut self, cid: u64, op: u16, len: u32, flags: u32) -> Header {
        self.announced = self.fwd_cnt;
        Header {
            src_cid: cid,
            dst_cid: HOST_CID,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }
}

fn device_error(e: virtio::Error) -> u64 {
    println!("vsock: error: {e}");
    FAIL_DEVICE
}

fn reply(drv: &mut Driver, to: &Header, op: u16) -> Result<(), u64> {
    let h = Header {
        src_cid: to.dst_cid,
        dst_cid: to.src_cid,
        src_port: to.dst_port,
        dst_port: to.src_port,
        kind: TYPE_STREAM,
        op,
        buf_alloc: BUF_ALLOC,
        ..Default::default()
    };
    // Best effort: a full transmit queue drops the reply (the host side times out or resets).
    drv.send(&h, None, NO_TAG).map(|_| ()).map_err(device_error)
}

pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let bad = |e| {
        println!("vsock: error: {e}");
        FAIL_BAD_PARAMETER
    };
    let port = cmdline::param_u64(params.clone(), "port", u64::MAX).map_err(bad)?;
    let bytes = cmdline::param_u64(params.clone(), "bytes", DEFAULT_BYTES).map_err(bad)?;
    let count = cmdline::param_u64(params.clone(), "count", 0).map_err(bad)?;
    let mut mode = "";
    for token in params {
        if let Token::KeyValue("mode", v) = token {
            mode = v;
        }
    }
    if port > u64::from(u32::MAX) {
        println!("vsock: error: port=P (0..=4294967295) is required");
        return Err(FAIL_BAD_PARAMETER);
    }
    let port = port as u32;
    let Some((dev, func, _)) = virtio::find(VIRTIO_TYPE_VSOCK) else {
        println!("vsock: error: no virtio-vsock device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    match mode {
        "echo" => {
            let mut drv = Driver::open(dev, func, ctx.e820, ECHO_DMA).map_err(device_error)?;
            echo(&mut drv, port, count)
        }
        "connect" => {
            if bytes == 0 || bytes > (1 << 32) {
                println!("vsock: error: bytes={bytes} must be between 1 and 4 GiB");
                return Err(FAIL_BAD_PARAMETER);
            }
            let pattern_len = u64::from(RX_PAYLOAD) + PATTERN_PERIOD;
            let mut drv =
                Driver::open(dev, func, ctx.e820, pattern_len + 64).map_err(device_error)?;
            let pattern = drv.alloc(pattern_len, 64).map_err(device_error)?;
            for i in 0..pattern_len {
                // SAFETY: inside the allocation just made, which the device never writes.
                unsafe { ((pattern + i) as *mut u8).write((i % PATTERN_PERIOD) as u8) };
            }
            let k = count.max(1);
            for i in 0..k {
                connect(&mut drv, port, FIRST_LOCAL_PORT + i as u32, bytes, pattern)?;
            }
            println!("vsock: ok");
            Ok(bytes * k)
        }
        _ => {
            println!("vsock: error: mode={mode} must be echo or connect");
            Err(FAIL_BAD_PARAMETER)
        }
    }
}

/// Tag of an echo chain: the connection's slot and generation and its byte count (at most 64 KiB).
fn echo_tag(slot: usize, gen: u32, bytes: u32) -> u32 {
    ((gen & 0xff) << 24) | ((slot as u32) << 20) | bytes
}

/// The driver memory (`extra` of `Driver::open`) an [`Echo`] server needs: one ring per connection.
pub const ECHO_DMA: u64 = BUF_ALLOC as u64 * MAX_CONNS as u64 + 4096;

fn echo(drv: &mut Driver, port: u32, count: u64) -> Result<u64, u64> {
    let mut server = Echo::new(drv, port)?;
    println!("vsock: listening port={port} cid={}", drv.cid);
    let mut served = 0u64;
    loop {
        served += u64::from(server.pass(drv)?.closed);
        if count > 0 && served >= count {
            println!("vsock: ok");
            return Ok(served);
        }
        core::hint::spin_loop();
    }
}

/// What one [`Echo::pass`] saw.
#[derive(Clone, Copy, Default)]
pub struct Pass {
    /// Packets received.
    pub packets: u32,
    /// Connections that ended (the host's RST).
    pub closed: u32,
    /// A TRANSPORT_RESET event came: every connection was dropped.
    pub reset: bool,
}

/// The echo server: listens on a port and sends every byte back (also used by `devstate`).
pub struct Echo {
    port: u32,
    ring_base: u64,
    conns: [Conn; MAX_CONNS],
}

impl Echo {
    /// Takes [`ECHO_DMA`] bytes of the driver's memory for the connections' rings.
    pub fn new(drv: &mut Driver, port: u32) -> Result<Echo, u64> {
        let ring_base = drv
            .alloc(u64::from(BUF_ALLOC) * MAX_CONNS as u64, 4096)
            .map_err(device_error)?;
        Ok(Echo {
            port,
            ring_base,
            conns: [Conn::default(); MAX_CONNS],
        })
    }

    /// Serves what the device has: reaps transmit chains, handles the event queue and every received
    /// packet, echoes what credit allows, and notifies the device.
    pub fn pass(&mut self, drv: &mut Driver) -> Result<Pass, u64> {
        let cid = drv.cid;
        let port = self.port;
        let ring_base = self.ring_base;
        let conns = &mut self.conns;
        let mut pass = Pass::default();
        drv.poll_tx(|tag| {
            let (gen, slot, bytes) = (tag >> 24, ((tag >> 20) & 0xf) as usize, tag & 0xf_ffff);
            if let Some(c) = conns.get_mut(slot) {
                if c.live && c.gen & 0xff == gen {
                    // The device completes transmit chains in order: the oldest bytes are free.
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(bytes);
                }
            }
        })
        .map_err(device_error)?;
        if drv.poll_event().map_err(device_error)? == Some(EVENT_TRANSPORT_RESET) {
            println!("vsock: transport reset");
            pass.reset = true;
            for c in conns.iter_mut() {
                c.live = false;
            }
        }
        while let Some(pkt) = drv.poll_rx().map_err(device_error)? {
            pass.packets += 1;
            let h = pkt.header;
            if h.dst_cid != cid || h.src_cid != HOST_CID || h.kind != TYPE_STREAM {
                drv.release(pkt.buf);
                continue;
            }
            let found = conns
                .iter()
                .position(|c| c.live && c.local_port == h.dst_port && c.peer_port == h.src_port);
            let Some(i) = found else {
                drv.release(pkt.buf);
                if h.op == OP_REQUEST && h.dst_port == port {
                    if let Some(i) = conns.iter().position(|c| !c.live) {
                        let gen = conns[i].gen.wrapping_add(1);
                        conns[i] = Conn {
                            live: true,
                            gen,
                            local_port: port,
                            peer_port: h.src_port,
                            peer_buf_alloc: h.buf_alloc,
                            peer_fwd_cnt: h.fwd_cnt,
                            connected: true,
                            ..Default::default()
                        };
                        let r = conns[i].header(cid, OP_RESPONSE, 0, 0);
                        drv.send(&r, None, NO_TAG).map_err(device_error)?;
                        continue;
                    }
                }
                if h.op != OP_RST {
                    reply(drv, &h, OP_RST)?;
                }
                continue;
            };
            let c = &mut conns[i];
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            match h.op {
                OP_RW => {
                    // Credit bounds what the host may send to what the ring has room for.
                    let held = c.filled.wrapping_sub(c.fwd_cnt);
                    if held as u64 + u64::from(h.len) > u64::from(BUF_ALLOC) {
                        println!("vsock: error: the host overran its credit");
                        let r = c.header(cid, OP_RST, 0, 0);
                        c.live = false;
                        drv.send(&r, None, NO_TAG).map_err(device_error)?;
                    } else {
                        let ring = ring_base + u64::from(BUF_ALLOC) * i as u64;
                        // SAFETY: the payload inside its receive buffer, ours until released.
                        let data = unsafe { virtio::dma_slice(pkt.data, h.len as usize) };
                        let mut at = c.filled % BUF_ALLOC;
                        for piece in data.chunks(BUF_ALLOC as usize) {
                            let first = piece.len().min((BUF_ALLOC - at) as usize);
                            // SAFETY: [at, at + n) lies inside this connection's ring.
                            unsafe {
                                virtio::dma_slice(ring + u64::from(at), first)
                                    .copy_from_slice(&piece[..first]);
                                virtio::dma_slice(ring, piece.len() - first)
                                    .copy_from_slice(&piece[first..]);
                            }
                            at = (at + piece.len() as u32) % BUF_ALLOC;
                        }
                        c.filled = c.filled.wrapping_add(h.len);
                        c.bytes += u64::from(h.len);
                    }
                }
                OP_CREDIT_REQUEST => {
                    let u = c.header(cid, OP_CREDIT_UPDATE, 0, 0);
                    drv.send(&u, None, NO_TAG).map_err(device_error)?;
                }
                OP_SHUTDOWN => c.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND),
                OP_RST => {
                    c.live = false;
                    pass.closed += 1;
                    println!("vsock: closed port={} bytes={}", c.peer_port, c.bytes);
                }
                _ => {}
            }
            drv.release(pkt.buf);
        }
        for (i, c) in conns.iter_mut().enumerate() {
            if !c.live {
                continue;
            }
            let ring = ring_base + u64::from(BUF_ALLOC) * i as u64;
            // Echo what arrived, in contiguous pieces of the ring, as far as credit and slots allow.
            while c.tx_cnt != c.filled && drv.can_send() {
                let at = c.tx_cnt % BUF_ALLOC;
                let n = c
                    .filled
                    .wrapping_sub(c.tx_cnt)
                    .min(BUF_ALLOC - at)
                    .min(RX_PAYLOAD)
                    .min(c.credit());
                if n == 0 {
                    break;
                }
                let h = c.header(cid, OP_RW, n, 0);
                let tag = echo_tag(i, c.gen, n);
                drv.send(&h, Some((ring + u64::from(at), n)), tag)
                    .map_err(device_error)?;
                c.tx_cnt = c.tx_cnt.wrapping_add(n);
            }
            if c.fwd_cnt.wrapping_sub(c.announced) >= BUF_ALLOC / 4 {
                let u = c.header(cid, OP_CREDIT_UPDATE, 0, 0);
                drv.send(&u, None, NO_TAG).map_err(device_error)?;
            }
            // The host is done sending and everything is echoed: close our side too.
            let drained = c.tx_cnt == c.filled;
            if !c.closing && c.peer_shutdown & SHUTDOWN_SEND != 0 && drained {
                let h = c.header(cid, OP_SHUTDOWN, 0, SHUTDOWN_RCV | SHUTDOWN_SEND);
                if drv.send(&h, None, NO_TAG).map_err(device_error)? {
                    c.closing = true;
                }
            }
        }
        drv.flush();
        Ok(pass)
    }
}

/// One connection to the host's port `port`: send `bytes` of pattern, check they come back, close.
fn connect(drv: &mut Driver, port: u32, local: u32, bytes: u64, pattern: u64) -> Result<(), u64> {
    let cid = drv.cid;
    let mut c = Conn {
        live: true,
        local_port: local,
        peer_port: port,
        ..Default::default()
    };
    let h = c.header(cid, OP_REQUEST, 0, 0);
    drv.send(&h, None, NO_TAG).map_err(device_error)?;
    drv.flush();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut last_progress = signal::now_ns();
    let mut polls = 0u64;
    let mut closed = false;
    while !closed {
        let mut progress = false;
        drv.poll_tx(|_| {}).map_err(device_error)?;
        while let Some(pkt) = drv.poll_rx().map_err(device_error)? {
            let h = pkt.header;
            let ours = h.src_cid == HOST_CID
                && h.dst_cid == cid
                && h.src_port == port
                && h.dst_port == local;
            if !ours {
                drv.release(pkt.buf);
                continue;
            }
            progress = true;
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            match h.op {
                OP_RESPONSE => c.connected = true,
                OP_RST if !c.connected => {
                    drv.release(pkt.buf);
                    println!("vsock: error: connection to port {port} refused");
                    return Err(FAIL_DEVICE);
                }
                OP_RST => closed = true,
                OP_RW => {
                    // SAFETY: the packet's payload inside its receive buffer, ours until released.
                    let data = unsafe { virtio::dma_slice(pkt.data, h.len as usize) };
                    for (k, &b) in data.iter().enumerate() {
                        let at = received + k as u64;
                        if at >= bytes || b != (at % PATTERN_PERIOD) as u8 {
                            drv.release(pkt.buf);
                            println!("vsock: error: mismatch at byte {at}: got {b:#04x}");
                            return Err(FAIL_MISMATCH);
                        }
                    }
                    received += u64::from(h.len);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(h.len);
                }
                OP_CREDIT_REQUEST => {
                    let u = c.header(cid, OP_CREDIT_UPDATE, 0, 0);
                    drv.send(&u, None, NO_TAG).map_err(device_error)?;
                }
                OP_SHUTDOWN if received < bytes => {
                    drv.release(pkt.buf);
                    println!("vsock: error: host closed after {received} of {bytes} bytes");
                    return Err(FAIL_MISMATCH);
                }
                _ => {}
            }
            drv.release(pkt.buf);
        }
        if c.connected && sent < bytes && drv.can_send() {
            let n = (bytes - sent)
                .min(u64::from(RX_PAYLOAD))
                .min(u64::from(c.credit())) as u32;
            if n > 0 {
                let h = c.header(cid, OP_RW, n, 0);
                let from = pattern + sent % PATTERN_PERIOD;
                if drv
                    .send(&h, Some((from, n)), NO_TAG)
                    .map_err(device_error)?
                {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n);
                    sent += u64::from(n);
                    progress = true;
                }
            }
        }
        if c.fwd_cnt.wrapping_sub(c.announced) >= BUF_ALLOC / 2 {
            let u = c.header(cid, OP_CREDIT_UPDATE, 0, 0);
            drv.send(&u, None, NO_TAG).map_err(device_error)?;
        }
        if received >= bytes && !c.closing {
            let h = c.header(cid, OP_SHUTDOWN, 0, SHUTDOWN_RCV | SHUTDOWN_SEND);
            if drv.send(&h, None, NO_TAG).map_err(device_error)? {
                c.closing = true;
            }
        }
        drv.flush();
        // Stall detection: the clock is an MMIO read, so look at it only now and then.
        polls += 1;
        if progress {
            polls = 0;
            last_progress = None;
        } else if polls.is_multiple_of(1 << 14) {
            let now = signal::now_ns();
            let stalled = match (last_progress, now) {
                (Some(t0), Some(t)) => t.saturating_sub(t0) > STALL_NS,
                (None, Some(_)) => {
                    last_progress = now;
                    false
                }
                _ => polls > STALL_POLLS,
            };
            if stalled {
                drv.check_status().map_err(device_error)?;
                if received >= bytes {
                    break; // All verified; only the host's RST is missing.
                }
                println!("vsock: error: stalled at sent={sent} received={received} of {bytes}");
                return Err(FAIL_DEVICE);
            }
        }
        core::hint::spin_loop();
    }
    if received < bytes {
        println!("vsock: error: connection reset after {received} of {bytes} bytes");
        return Err(FAIL_DEVICE);
    }
    Ok(())
}
