//! `rng bytes=N`: reads N bytes (default 64, at most 4096) from the first virtio-rng device on PCI bus 0,
//! prints them in hex and checks they are not all zero.

use super::Context;
use crate::cmdline::{self, Tokens};
use crate::pci::VIRTIO_TYPE_RNG;
use crate::protocol::*;
use crate::serial::println;
use crate::virtio::ring::Buffer;
use crate::virtio::{self, dma_slice, Device, Dma};

const DEFAULT_BYTES: u64 = 64;
const MAX_BYTES: u64 = 4096;
/// Empty answers tolerated before giving up (a device may return 0 bytes when its source is dry).
const MAX_EMPTY: u32 = 16;

/// Ok(N).
pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let bytes = cmdline::param_u64(params, "bytes", DEFAULT_BYTES).map_err(|e| {
        println!("rng: error: {e}");
        FAIL_BAD_PARAMETER
    })?;
    if bytes == 0 || bytes > MAX_BYTES {
        println!("rng: error: bytes={bytes} must be between 1 and {MAX_BYTES}");
        return Err(FAIL_BAD_PARAMETER);
    }
    let Some((dev, func, _)) = virtio::find(VIRTIO_TYPE_RNG) else {
        println!("rng: error: no virtio-rng device on PCI bus 0");
        return Err(FAIL_NO_DEVICE);
    };
    let fail = |e: virtio::Error| {
        println!("rng: error: 00:{dev:02x}.{func}: {e}");
        FAIL_DEVICE
    };
    let Some(mut dma) = Dma::new(ctx.e820, 64 << 10) else {
        println!("rng: error: no usable RAM for the virtqueue");
        return Err(FAIL_NO_MEMORY);
    };
    let mut device = Device::open(dev, func).map_err(fail)?;
    device.init(0).map_err(fail)?;
    let mut queue = device.setup_queue(0, &mut dma).map_err(fail)?;
    device.driver_ok().map_err(fail)?;
    let buf = dma.alloc(bytes, 64).map_err(fail)?;

    let mut filled = 0u64;
    let mut empty = 0;
    while filled < bytes {
        let want = bytes - filled;
        let chain = [Buffer {
            addr: buf + filled,
            len: want as u32,
            device_writes: true,
        }];
        let used = device.transact(&mut queue, &chain).map_err(fail)?;
        // A device claiming more than the buffer holds is clamped, not trusted.
        let got = u64::from(used.len).min(want);
        if got == 0 {
            empty += 1;
            if empty >= MAX_EMPTY {
                println!("rng: error: the device returned no bytes {MAX_EMPTY} times in a row");
                return Err(FAIL_DEVICE);
            }
        }
        filled += got;
    }
    // SAFETY: `buf` is a DMA allocation of `bytes` bytes; the device is done with it (all chains used).
    let data = unsafe { dma_slice(buf, bytes as usize) };
    println!("rng: {}", Hex(data));
    if data.iter().all(|&b| b == 0) {
        println!("rng: error: all {bytes} bytes are zero");
        return Err(FAIL_DEVICE);
    }
    println!("rng: ok");
    Ok(bytes)
}

/// Bytes as lowercase hex, no separators.
struct Hex<'a>(&'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
