//! `console text=T echo=N`: drives the first virtio-console function on PCI bus 0 (port 0 only).
//!
//! With echo=N (> 0) it first reads N bytes of host input from the receiveq (waiting up to 20 s, so the
//! host has time to connect to a console socket). Then it writes `T\n` and, with echo, the N bytes it
//! read, in one transmit buffer: the host sees exactly `T\n<input>`.

use super::Context;
use crate::cmdline::{self, Token, Tokens};
use crate::pci::VIRTIO_TYPE_CONSOLE;
use crate::protocol::*;
use crate::serial::println;
use crate::signal;
use crate::virtio::console::{MAX_ECHO, MAX_TEXT, RX_QUEUE, TX_QUEUE};
use crate::virtio::ring::Buffer;
use crate::virtio::{self, dma_slice, Device, Dma};

const DEFAULT_TEXT: &str = "hello from the trenv test guest";
const ECHO_TIMEOUT_NS: u64 = 20_000_000_000;
const RX_BUFFER: u32 = 256;

/// Ok(bytes written).
pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let bad = |e| {
        println!("console: error: {e}");
        FAIL_BAD_PARAMETER
    };
    let echo = cmdline::param_u64(params.clone(), "echo", 0).map_err(bad)?;
    let text = params
        .filter_map(|t| match t {
            Token::KeyValue("text", v) => Some(v),
            _ => None,
        })
        .last()
        .unwrap_or(DEFAULT_TEXT);
    if text.len() > MAX_TEXT || echo > MAX_ECHO {
        println!("console: error: text is at most {MAX_TEXT} bytes, echo at most {MAX_ECHO}");
        return Err(FAIL_BAD_PARAMETER);
    }
    let Some((dev, func, _)) = virtio::find(VIRTIO_TYPE_CONSOLE) else {
        println!("console: error: no virtio-console device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    let fail = |e: virtio::Error| {
        println!("console: error: {e}");
        FAIL_DEVICE
    };
    let Some(mut dma) = Dma::new(ctx.e820, 64 << 10) else {
        println!("console: error: no usable RAM for the virtqueues");
        return Err(FAIL_NO_MEMORY);
    };
    let mut device = Device::open(dev, func).map_err(fail)?;
    device.init(0).map_err(fail)?;
    let mut rx = device.setup_queue(RX_QUEUE, &mut dma).map_err(fail)?;
    let mut tx = device.setup_queue(TX_QUEUE, &mut dma).map_err(fail)?;
    device.driver_ok().map_err(fail)?;
    let out = dma
        .alloc((MAX_TEXT + 1) as u64 + MAX_ECHO, 64)
        .map_err(fail)?;
    let inbuf = dma.alloc(u64::from(RX_BUFFER), 64).map_err(fail)?;
    // SAFETY: a DMA allocation of this size; the device only reads it after `transact` below.
    let bytes = unsafe { dma_slice(out, MAX_TEXT + 1 + MAX_ECHO as usize) };
    bytes[..text.len()].copy_from_slice(text.as_bytes());
    bytes[text.len()] = b'\n';
    let mut len = text.len() + 1;

    if echo > 0 {
        println!("console: waiting for {echo} bytes of input");
        let start = signal::now_ns().unwrap_or(0);
        let mut got = 0u64;
        while got < echo {
            let want = (echo - got).min(u64::from(RX_BUFFER)) as u32;
            rx.ring
                .add(&[Buffer {
                    addr: inbuf,
                    len: want,
                    device_writes: true,
                }])
                .map_err(|e| fail(e.into()))?;
            device.kick(&mut rx);
            let used = loop {
                if let Some(used) = rx.ring.poll_used().map_err(|e| fail(e.into()))? {
                    break used;
                }
                // Waits in the VMM (~10 ms) instead of spinning while the host has not typed.
                signal::idle();
                let now = signal::now_ns().unwrap_or(0);
                if now.saturating_sub(start) > ECHO_TIMEOUT_NS {
                    println!("console: error: only {got} of {echo} input bytes within 20 s");
                    return Err(FAIL_DEVICE);
                }
            };
            // A device claiming more than the buffer is clamped.
            let n = used.len.min(want) as usize;
            // SAFETY: the input buffer, returned by the device.
            let input = unsafe { dma_slice(inbuf, n) };
            bytes[len..len + n].copy_from_slice(input);
            len += n;
            got += n as u64;
        }
        println!("console: received {got} bytes");
    }

    device
        .transact(
            &mut tx,
            &[Buffer {
                addr: out,
                len: len as u32,
                device_writes: false,
            }],
        )
        .map_err(fail)?;
    device.check_status().map_err(fail)?;
    println!("console: wrote {len} bytes");
    println!("console: ok");
    Ok(len as u64)
}
