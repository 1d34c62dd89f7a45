//! `net pings=N`: drives the first virtio-net function on PCI bus 0 (one queue pair, feature MAC only).
//!
//! For each sequence number 0..N it broadcasts a `trenv-net ping <seq>` frame (EtherType 0x88b5) and waits
//! for a `trenv-net pong <seq>` frame addressed to its MAC, resending the ping every second, for at most
//! 20 s. Other frames (the host's IPv6 neighbour discovery, say) are counted and ignored.

use super::Context;
use crate::cmdline::{self, Tokens};
use crate::pci::VIRTIO_TYPE_NET;
use crate::protocol::*;
use crate::serial::println;
use crate::signal;
use crate::virtio::net::{self, Mac, HDR_LEN, RX_BUFFER};
use crate::virtio::ring::Buffer;
use crate::virtio::{self, dma_slice, Device, Dma, Queue};

const DEFAULT_PINGS: u64 = 1;
const MAX_PINGS: u64 = 1000;
/// Receive buffers kept posted.
const RX_BUFFERS: usize = 16;
const RESEND_NS: u64 = 1_000_000_000;
const TIMEOUT_NS: u64 = 20_000_000_000;

struct Rx {
    queue: Queue,
    /// Buffer address by head descriptor index.
    addr_of: [u64; 256],
}

impl Rx {
    fn post(&mut self, addr: u64) -> Result<(), virtio::Error> {
        let head = self.queue.ring.add(&[Buffer {
            addr,
            len: RX_BUFFER as u32,
            device_writes: true,
        }])?;
        self.addr_of[usize::from(head)] = addr;
        Ok(())
    }
}

/// Ok(N).
pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let pings = cmdline::param_u64(params, "pings", DEFAULT_PINGS).map_err(|e| {
        println!("net: error: {e}");
        FAIL_BAD_PARAMETER
    })?;
    if pings == 0 || pings > MAX_PINGS {
        println!("net: error: pings={pings} must be between 1 and {MAX_PINGS}");
        return Err(FAIL_BAD_PARAMETER);
    }
    let Some((dev, func, _)) = virtio::find(VIRTIO_TYPE_NET) else {
        println!("net: error: no virtio-net device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    let fail = |e: virtio::Error| {
        println!("net: error: {e}");
        FAIL_DEVICE
    };
    let Some(mut dma) = Dma::new(ctx.e820, 256 << 10) else {
        println!("net: error: no usable RAM for the virtqueues");
        return Err(FAIL_NO_MEMORY);
    };
    let mut device = Device::open(dev, func).map_err(fail)?;
    let features = device.init(net::F_MAC).map_err(fail)?;
    if features & net::F_MAC == 0 {
        println!("net: error: the device offers no MAC address");
        return Err(FAIL_DEVICE);
    }
    let Some((lo, hi)) = device.read_config(|c| (c.read32(net::CONFIG_MAC), c.read32(4))) else {
        println!("net: error: no stable device configuration");
        return Err(FAIL_DEVICE);
    };
    let mut mac = [0u8; 6];
    mac[..4].copy_from_slice(&lo.to_le_bytes());
    mac[4..].copy_from_slice(&hi.to_le_bytes()[..2]);
    println!("net: mac={}", Mac(mac));
    let rx_queue = device.setup_queue(net::RX_QUEUE, &mut dma).map_err(fail)?;
    let mut tx = device.setup_queue(net::TX_QUEUE, &mut dma).map_err(fail)?;
    device.driver_ok().map_err(fail)?;
    let mut rx = Rx {
        queue: rx_queue,
        addr_of: [0; 256],
    };
    let pool = dma
        .alloc((RX_BUFFERS * RX_BUFFER) as u64, 64)
        .map_err(fail)?;
    for i in 0..RX_BUFFERS {
        rx.post(pool + (i * RX_BUFFER) as u64).map_err(fail)?;
    }
    device.kick(&mut rx.queue);
    let txbuf = dma.alloc(RX_BUFFER as u64, 64).map_err(fail)?;

    let mut ignored = 0u64;
    for seq in 0..pings {
        let start = signal::now_ns().unwrap_or(0);
        let mut last_sent = None;
        let mut sends = 0;
        loop {
            let now = signal::now_ns().unwrap_or(0);
            if now.saturating_sub(start) > TIMEOUT_NS {
                println!("net: error: no pong for seq={seq} within 20 s ({sends} pings sent, {ignored} other frames)");
                return Err(FAIL_DEVICE);
            }
            if last_sent.is_none_or(|t: u64| now.saturating_sub(t) > RESEND_NS) {
                // SAFETY: the transmit buffer; the device is done with it (every send is waited for).
                let buf = unsafe { dma_slice(txbuf, RX_BUFFER) };
                buf[..HDR_LEN].fill(0);
                let mut payload = [0u8; 40];
                let plen = net::tagged(&mut payload, net::PING, seq);
                let flen = net::build_frame(
                    &mut buf[HDR_LEN..],
                    net::BROADCAST,
                    mac,
                    net::ETHERTYPE,
                    &payload[..plen],
                )
                .unwrap_or(0);
                device
                    .transact(
                        &mut tx,
                        &[Buffer {
                            addr: txbuf,
                            len: (HDR_LEN + flen) as u32,
                            device_writes: false,
                        }],
                    )
                    .map_err(fail)?;
                if sends == 0 {
                    println!("net: sent ping seq={seq}");
                }
                sends += 1;
                last_sent = Some(now);
            }
            let Some(used) = rx.queue.ring.poll_used().map_err(|e| fail(e.into()))? else {
                signal::idle();
                continue;
            };
            let addr = rx.addr_of[usize::from(used.head)];
            let len = (used.len as usize).min(RX_BUFFER);
            // SAFETY: a receive buffer the device returned.
            let data = unsafe { dma_slice(addr, len) };
            let pong = data
                .get(HDR_LEN..)
                .and_then(net::parse_frame)
                .filter(|f| f.ethertype == net::ETHERTYPE && f.dst == mac)
                .and_then(|f| Some((f.src, net::parse_tagged(f.payload, net::PONG)?)));
            rx.post(addr).map_err(fail)?;
            device.kick(&mut rx.queue);
            match pong {
                Some((src, n)) if n == seq => {
                    println!("net: pong seq={seq} from {} bytes={len}", Mac(src));
                    break;
                }
                _ => ignored += 1,
            }
        }
    }
    device.check_status().map_err(fail)?;
    println!("net: ignored {ignored} other frames");
    println!("net: ok");
    Ok(pings)
}
