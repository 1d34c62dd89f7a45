//! `function seed=S heap=H port=P`: a function runtime that a warm pool serves invocations with.
//!
//! Builds an H MiB heap from the seed (like `serve`), brings up the vsock device and listens on port P
//! (`function: listening ..`), then prints `function: heap ..` and signals SERVE_HEAP and READY: the host
//! takes the function's template here, with the device live, so a sandbox restored or repurposed from it
//! serves at once on the template's queues instead of initialising the device (many MMIO exits). Each
//! request line `<n>\n` is answered `<seed> <checksum>\n`: the checksum sums [`READ_PAGES`] heap pages
//! chosen from n (never written, so the host can recompute it from the seed), and [`WRITE_PAGES`] pages of
//! the heap's scratch tail are written (the instance's private state).
//!
//! A restore or repurpose (a new VM generation ID) drops every host connection: the device says so with a
//! TRANSPORT_RESET event, on which the guest marks its connections stale and keeps listening on the same
//! queues (`function: reset port=P`, printed once it is idle, off the request path). Stale connections are
//! not dropped at once, because the event can come after the device has already handed over a new
//! connection: a stale one keeps serving, ends on the device's RST, and gives its slot to a new REQUEST. Replies carry the CID each
//! connection was addressed to, so a device whose CID differs from the template's still works. If a new
//! generation brings no reset event within [`RESET_WAIT_NS`] (a device restored fresh, without saved
//! state), the device is brought up again from scratch.
//!
//! Control lines, for testing a pool's failure handling (any order, space-separated): `dirty=M` writes one
//! word in each page of M MiB above the heap (private memory the host sees grow), `sleep=MS` answers only
//! after MS ms of host time, `crash` raises #UD (the fault reporter signals FAILURE and powers off, so the
//! VMM exits mid-invocation). The answer is `<seed> ok sleep=MS dirty=M`.

use super::Context;
use crate::cmdline::{self, Tokens};
use crate::pattern;
use crate::pci::VIRTIO_TYPE_VSOCK;
use crate::protocol::*;
use crate::serial::println;
use crate::signal;
use crate::virtio;
use crate::virtio::vsock::*;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const MAX_CONNS: usize = 8;
const BUF_ALLOC: u32 = 64 << 10;
const LINE_MAX: usize = 32;
/// The longest `sleep=` a request may ask for.
const MAX_SLEEP_MS: u64 = 600_000;
/// Heap pages read per request.
pub const READ_PAGES: u64 = 4;
/// Pages of the scratch tail written per request.
pub const WRITE_PAGES: u64 = 2;
/// The heap's last pages: written by requests, never read by them.
pub const SCRATCH_PAGES: u64 = 16;
/// Answer buffers, one per transmit slot: the device completes chains in order, so a buffer is free
/// again by the time its index comes round.
const ANSWER_BUFS: u64 = TX_SLOTS as u64;
const ANSWER_LEN: u64 = 64;
/// Room left below the heap for the vsock driver's DMA arena (which starts at the image's end).
const DMA_RESERVE: u64 = 4 * MIB;
/// Busy polls after the last packet before waiting in the idle device between polls.
const SPIN_POLLS: u64 = 1 << 16;
/// How long a new generation may go without a TRANSPORT_RESET before its device counts as restored fresh.
const RESET_WAIT_NS: u64 = 200_000_000;

/// The i-th heap page request `n` reads (of `pages` readable ones); the host recomputes it.
pub fn page_of(n: u64, i: u64, pages: u64) -> u64 {
    let mut z = n.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % pages
}

#[derive(Clone, Copy, Default)]
struct Conn {
    live: bool,
    /// The guest CID the host addressed this connection to.
    cid: u64,
    /// A TRANSPORT_RESET came since it was accepted: the host side is probably gone.
    stale: bool,
    local_port: u32,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    line: [u8; LINE_MAX],
    line_len: usize,
}

impl Conn {
    fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: self.cid,
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

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

struct Heap {
    base: u64,
    pages: u64,
    seed: u64,
    /// Free usable RAM above the heap that `dirty=` writes: (start, bytes).
    spare: (u64, u64),
}

/// What one request line asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Request {
    Sum(u64),
    Control {
        sleep_ms: u64,
        dirty_mib: u64,
        crash: bool,
    },
}

impl Heap {
    /// Sums the request's pages and writes its scratch pages.
    fn invoke(&self, n: u64) -> u64 {
        let readable = self.pages - SCRATCH_PAGES;
        let mut sum = 0u64;
        for i in 0..READ_PAGES {
            let page = self.base + page_of(n, i, readable) * PAGE;
            for w in 0..PAGE / 8 {
                // SAFETY: inside the heap (usable RAM above the DMA arena, identity-mapped, ours alone).
                sum = sum.wrapping_add(unsafe { ((page + w * 8) as *const u64).read_volatile() });
            }
        }
        for i in 0..WRITE_PAGES {
            let page = self.base + (readable + (n + i) % SCRATCH_PAGES) * PAGE;
            for w in 0..PAGE / 8 {
                // SAFETY: as above (the scratch tail).
                unsafe { ((page + w * 8) as *mut u64).write_volatile(n ^ w) };
            }
        }
        sum
    }

    /// Carries out a control line; returns false if it cannot (too much to dirty).
    fn control(&self, sleep_ms: u64, dirty_mib: u64, crash: bool) -> bool {
        let dirty = dirty_mib.saturating_mul(MIB);
        if dirty > self.spare.1 {
            return false;
        }
        for page in 0..dirty / PAGE {
            // SAFETY: inside the spare RAM above the heap (usable, identity-mapped, ours alone).
            unsafe { ((self.spare.0 + page * PAGE) as *mut u64).write_volatile(page) };
        }
        if let Some(start) = signal::now_ns() {
            let until = start.saturating_add(sleep_ms.saturating_mul(1_000_000));
            while signal::now_ns().is_some_and(|now| now < until) {
                signal::idle();
            }
        }
        if crash {
            // SAFETY: faults on purpose; the exception stub reports it and powers off, never returning.
            unsafe { core::arch::asm!("ud2") };
        }
        true
    }
}

fn device_error(e: virtio::Error) -> u64 {
    println!("function: error: {e}");
    FAIL_DEVICE
}

pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let param = |key, default| {
        cmdline::param_u64(params.clone(), key, default).map_err(|e| {
            println!("function: error: {e}");
            FAIL_BAD_PARAMETER
        })
    };
    let (seed, heap_mib, port) = (param("seed", 1)?, param("heap", 4)?, param("port", 5000)?);
    // `cold=1` (the trace benchmark's fresh boots) is still accepted: the guest now always serves from
    // the moment it signals READY, so a cold boot and a clone behave alike.
    param("cold", 0)?;
    // Read first, so that a template taken at any later point is seen as a clone.
    let mut generation = signal::generation();
    if heap_mib == 0 || heap_mib > 1024 || port > u64::from(u32::MAX) {
        println!("function: error: need 1 <= heap <= 1024 (MiB) and port <= 4294967295");
        return Err(FAIL_BAD_PARAMETER);
    }
    let Some((dev, func, _)) = virtio::find(VIRTIO_TYPE_VSOCK) else {
        println!("function: error: no virtio-vsock device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    let len = heap_mib * MIB;
    let image_end = crate::image_range().1;
    let Some(base) = ctx
        .e820
        .find_usable(image_end + DMA_RESERVE, len, GUEST_IDENTITY_MAP_END)
    else {
        println!("function: error: no {heap_mib} MiB of usable RAM for the heap");
        return Err(FAIL_NO_MEMORY);
    };
    for i in 0..len / 8 {
        // SAFETY: [base, base + len) is usable RAM above the DMA reserve, identity-mapped, ours alone.
        unsafe { ((base + i * 8) as *mut u64).write_volatile(pattern::word(seed, base + i * 8)) };
    }
    let checksum = pattern::checksum(seed, base, len);
    // The usable RAM between the heap and the end of its e820 entry is free for `dirty=`.
    let heap_end = base + len;
    let spare_end = ctx
        .e820
        .entries()
        .iter()
        .find(|e| e.kind == crate::e820::E820_USABLE && e.addr <= heap_end && heap_end < e.end())
        .map_or(heap_end, |e| {
            e.end().min(GUEST_IDENTITY_MAP_END) & !(PAGE - 1)
        });
    let heap = Heap {
        base,
        pages: len / PAGE,
        seed,
        spare: (heap_end, spare_end.saturating_sub(heap_end)),
    };
    if heap.pages <= SCRATCH_PAGES {
        println!("function: error: heap too small");
        return Err(FAIL_BAD_PARAMETER);
    }
    // The device goes live before the template point: clones carry it, queues and all.
    let mut link = Link::open(dev, func, ctx, port as u32, seed)?;
    println!("function: heap mib={heap_mib} seed={seed} base={base:#x} checksum={checksum:#018x}");
    signal::send(SIGNAL_SERVE_HEAP, base);
    signal::send(SIGNAL_READY, WORKLOAD_ID_FUNCTION);
    loop {
        serve(&mut link, &heap, port as u32, &mut generation)?;
        // A new generation whose device came without its saved state: bring it up from scratch.
        link = Link::open(dev, func, ctx, port as u32, seed)?;
    }
}

/// The live device and the memory answers are sent from.
struct Link {
    drv: Driver,
    answers: u64,
}

impl Link {
    /// Brings up the vsock device (reset, queues, DRIVER_OK) and prints `function: listening ..`.
    fn open(dev: u8, func: u8, ctx: &Context<'_>, port: u32, seed: u64) -> Result<Link, u64> {
        let mut drv =
            Driver::open(dev, func, ctx.e820, ANSWER_BUFS * ANSWER_LEN).map_err(device_error)?;
        let answers = drv
            .alloc(ANSWER_BUFS * ANSWER_LEN, 64)
            .map_err(device_error)?;
        println!(
            "function: listening port={port} seed={seed} cid={}",
            drv.cid
        );
        Ok(Link { drv, answers })
    }
}

/// Serves for good, across generations; returns only when a new generation's device has to be brought
/// up again (no TRANSPORT_RESET came for it: it was restored fresh, its queues are gone).
fn serve(link: &mut Link, heap: &Heap, port: u32, generation: &mut u128) -> Result<(), u64> {
    let drv = &mut link.drv;
    let answers = link.answers;
    let mut next_answer = 0u64;
    let mut conns = [Conn::default(); MAX_CONNS];
    let mut quiet = 0u64;
    // TRANSPORT_RESET events not yet matched with a generation change, and not yet reported.
    let mut resets = 0u64;
    let mut unreported = 0u64;
    // When a generation change without a reset event was noticed (host ns).
    let mut missing_since: Option<u64> = None;
    loop {
        drv.poll_tx(|_| {}).map_err(device_error)?;
        if drv.poll_event().map_err(device_error)? == Some(EVENT_TRANSPORT_RESET) {
            // Every host connection the device had is gone (a clone). The event can reach us after the
            // device has already handed us a new connection, so ours are not dropped but only marked
            // stale: a stale one keeps serving what comes for it and gives its slot to a new REQUEST.
            for c in conns.iter_mut() {
                c.stale = true;
            }
            resets += 1;
            unreported += 1;
        }
        let mut progress = false;
        while let Some(pkt) = drv.poll_rx().map_err(device_error)? {
            progress = true;
            let h = pkt.header;
            if h.src_cid != HOST_CID || h.kind != TYPE_STREAM {
                drv.release(pkt.buf);
                continue;
            }
            let found = conns.iter().position(|c| {
                c.live
                    && c.cid == h.dst_cid
                    && c.local_port == h.dst_port
                    && c.peer_port == h.src_port
            });
            // A REQUEST on a stale connection's ports is a new connection: it takes that slot.
            let found = found.filter(|&i| !(h.op == OP_REQUEST && conns[i].stale));
            let Some(i) = found else {
                drv.release(pkt.buf);
                let free = conns
                    .iter()
                    .position(|c| {
                        !c.live
                            || (c.stale && c.local_port == h.dst_port && c.peer_port == h.src_port)
                    })
                    .or_else(|| conns.iter().position(|c| c.stale));
                if let (OP_REQUEST, true, Some(i)) = (h.op, h.dst_port == port, free) {
                    // The device delivered it, so its destination is our CID (which a restore may change).
                    conns[i] = Conn {
                        live: true,
                        cid: h.dst_cid,
                        local_port: port,
                        peer_port: h.src_port,
                        peer_buf_alloc: h.buf_alloc,
                        peer_fwd_cnt: h.fwd_cnt,
                        ..Default::default()
                    };
                    let r = conns[i].header(OP_RESPONSE, 0, 0);
                    drv.send(&r, None, NO_TAG).map_err(device_error)?;
                } else if h.op != OP_RST {
                    let r = Header {
                        src_cid: h.dst_cid,
                        dst_cid: h.src_cid,
                        src_port: h.dst_port,
                        dst_port: h.src_port,
                        kind: TYPE_STREAM,
                        op: OP_RST,
                        buf_alloc: BUF_ALLOC,
                        ..Default::default()
                    };
                    drv.send(&r, None, NO_TAG).map_err(device_error)?;
                }
                continue;
            };
            let c = &mut conns[i];
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            match h.op {
                OP_RW => {
                    // SAFETY: the payload inside its receive buffer, ours until released.
                    let data = unsafe { virtio::dma_slice(pkt.data, h.len as usize) };
                    // Consumed at once: the whole payload is handled before the buffer goes back.
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(h.len);
                    for &b in data.iter() {
                        if b != b'\n' {
                            if c.line_len < LINE_MAX {
                                c.line[c.line_len] = b;
                            }
                            c.line_len += 1;
                            continue;
                        }
                        let n = parse_line(&c.line[..c.line_len.min(LINE_MAX)], c.line_len);
                        c.line_len = 0;
                        let at = answers + (next_answer % ANSWER_BUFS) * ANSWER_LEN;
                        next_answer += 1;
                        let mut out = Writer { at, len: 0 };
                        out.num(heap.seed);
                        match n {
                            Some(Request::Sum(n)) => {
                                let sum = heap.invoke(n);
                                out.byte(b' ');
                                out.hex(sum);
                            }
                            Some(Request::Control {
                                sleep_ms,
                                dirty_mib,
                                crash,
                            }) if heap.control(sleep_ms, dirty_mib, crash) => {
                                out.bytes(b" ok sleep=");
                                out.num(sleep_ms);
                                out.bytes(b" dirty=");
                                out.num(dirty_mib);
                            }
                            _ => out.bytes(b" error"),
                        }
                        out.byte(b'\n');
                        let len = out.len as u32;
                        // Answers are tiny; a host that grants no credit for one loses it.
                        if c.credit() >= len {
                            let hdr = c.header(OP_RW, len, 0);
                            if drv
                                .send(&hdr, Some((at, len)), NO_TAG)
                                .map_err(device_error)?
                            {
                                c.tx_cnt = c.tx_cnt.wrapping_add(len);
                            }
                        }
                    }
                }
                OP_CREDIT_REQUEST => {
                    let u = c.header(OP_CREDIT_UPDATE, 0, 0);
                    drv.send(&u, None, NO_TAG).map_err(device_error)?;
                }
                OP_SHUTDOWN => {
                    // The host is done: close our side; its RST ends the connection.
                    let s = c.header(OP_SHUTDOWN, 0, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    drv.send(&s, None, NO_TAG).map_err(device_error)?;
                }
                OP_RST => c.live = false,
                _ => {}
            }
            drv.release(pkt.buf);
        }
        drv.flush();
        if progress {
            quiet = 0;
            continue;
        }
        quiet += 1;
        if quiet < SPIN_POLLS {
            core::hint::spin_loop();
            continue;
        }
        // Long quiet: nobody waits on us, so the console line and the generation check go here.
        if unreported > 0 {
            unreported = 0;
            println!("function: reset port={port}");
        }
        let now = signal::generation();
        if now != *generation {
            *generation = now;
            if resets > 0 {
                resets -= 1;
            } else {
                missing_since = missing_since.or(signal::now_ns());
            }
        }
        if let Some(since) = missing_since {
            if resets > 0 {
                resets -= 1;
                missing_since = None;
            } else if signal::now_ns().is_some_and(|t| t.saturating_sub(since) > RESET_WAIT_NS) {
                println!(
                    "function: no transport reset after a restore: bringing the device up again"
                );
                return Ok(());
            }
        }
        // Waits in the idle device between polls: a packet or a restore ends the wait, so the long wait
        // serves, unless a missing reset is being timed.
        if missing_since.is_some() {
            signal::idle();
        } else {
            signal::idle_long();
        }
    }
}

/// `n` in decimal, or control words (surrounding spaces and a trailing `\r` allowed); None if malformed
/// or too long.
fn parse_line(line: &[u8], len: usize) -> Option<Request> {
    if len > LINE_MAX {
        return None;
    }
    let s = core::str::from_utf8(line).ok()?.trim();
    if let Ok(n) = s.parse() {
        return Some(Request::Sum(n));
    }
    if s.is_empty() {
        return None;
    }
    let (mut sleep_ms, mut dirty_mib, mut crash) = (0, 0, false);
    for word in s.split_ascii_whitespace() {
        match word.split_once('=') {
            Some(("sleep", v)) => sleep_ms = v.parse().ok().filter(|&ms| ms <= MAX_SLEEP_MS)?,
            Some(("dirty", v)) => dirty_mib = v.parse().ok()?,
            None if word == "crash" => crash = true,
            _ => return None,
        }
    }
    Some(Request::Control {
        sleep_ms,
        dirty_mib,
        crash,
    })
}

/// Formats an answer into DMA memory.
struct Writer {
    at: u64,
    len: u64,
}

impl Writer {
    fn byte(&mut self, b: u8) {
        if self.len < ANSWER_LEN {
            // SAFETY: inside this answer's ANSWER_LEN bytes of DMA memory.
            unsafe { ((self.at + self.len) as *mut u8).write_volatile(b) };
            self.len += 1;
        }
    }

    fn bytes(&mut self, s: &[u8]) {
        for &b in s {
            self.byte(b);
        }
    }

    fn num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for i in (0..n).rev() {
            self.byte(digits[i]);
        }
    }

    fn hex(&mut self, v: u64) {
        self.bytes(b"0x");
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            self.byte(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}
