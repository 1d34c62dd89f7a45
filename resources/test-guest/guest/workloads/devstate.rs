//! `devstate port=P seed=S sectors=N`: uses virtio-blk, -rng and -vsock across a snapshot and restore
//! without ever initialising them again, so that a restored copy works only if the VMM saved and restored
//! the devices' state (negotiated features, queues and their positions, MSI-X, configuration space).
//!
//! Before the snapshot it brings all three up, writes the seeded pattern over sectors [0, N) and reads it
//! back, reads random bytes, listens on vsock port P (the `vsock` echo server), prints `devstate: ready`
//! and signals DEVSTATE_READY. It then serves echo connections; each connection the host closes is
//! followed by a device check (re-read and verify the sectors written so far, read random bytes).
//! When the generation ID changes (a restored copy), the same queues carry on: the copy writes the pattern
//! of seed S + k (k-th restore) over sectors [N, 2N), verifies [0, 2N), reads random bytes, waits for the
//! vsock TRANSPORT_RESET event (its connections did not survive) and serves echo connections again.

use super::vsock::{Echo, ECHO_DMA};
use super::Context;
use crate::cmdline::{self, Tokens};
use crate::pci::{VIRTIO_TYPE_BLOCK, VIRTIO_TYPE_RNG, VIRTIO_TYPE_VSOCK};
use crate::protocol::*;
use crate::serial::println;
use crate::signal;
use crate::virtio::blk::{self, SECTOR_SIZE};
use crate::virtio::ring::Buffer;
use crate::virtio::vsock::{Driver, DMA_BYTES};
use crate::virtio::{self, dma_slice, Device, Dma, Queue};

const MAX_SECTORS: u64 = 128;
const RNG_BYTES: u64 = 32;
/// The vsock driver's arena starts right above the image; the blk and rng memory goes above this much.
const VSOCK_RESERVE: u64 = 8 << 20;
const _: () = assert!(DMA_BYTES + ECHO_DMA < VSOCK_RESERVE);
/// Echo passes without a packet before the guest looks at the generation ID and idles between passes.
const QUIET_PASSES: u64 = 1 << 12;
/// How long a restored copy waits for the TRANSPORT_RESET event.
const RESET_WAIT_NS: u64 = 10_000_000_000;

fn device_error(what: &str, e: virtio::Error) -> u64 {
    println!("devstate: error: {what}: {e}");
    FAIL_DEVICE
}

/// virtio-blk with one request at a time: header, data, status.
struct Disk {
    device: Device,
    queue: Queue,
    /// 16-byte header then the status byte.
    slot: u64,
    data: u64,
    sectors: u64,
}

impl Disk {
    fn request(&mut self, kind: u32, sector: u64, sectors: u64) -> Result<(), u64> {
        // SAFETY: the request slot (DMA memory); no chain of ours is in flight.
        let head = unsafe { dma_slice(self.slot, blk::HEADER_LEN + 1) };
        head[..blk::HEADER_LEN].copy_from_slice(&blk::header(kind, sector));
        head[blk::HEADER_LEN] = 0xff;
        let header = Buffer {
            addr: self.slot,
            len: blk::HEADER_LEN as u32,
            device_writes: false,
        };
        let status = Buffer {
            addr: self.slot + blk::HEADER_LEN as u64,
            len: 1,
            device_writes: true,
        };
        let data = Buffer {
            addr: self.data,
            len: (sectors * SECTOR_SIZE) as u32,
            device_writes: kind == blk::T_IN,
        };
        let with_data = [header, data, status];
        let without = [header, status];
        let chain: &[Buffer] = if sectors == 0 { &without } else { &with_data };
        self.device
            .transact(&mut self.queue, chain)
            .map_err(|e| device_error("blk", e))?;
        // SAFETY: the status byte, written by the device before it returned the chain.
        let status = unsafe { ((self.slot + blk::HEADER_LEN as u64) as *const u8).read_volatile() };
        if status != blk::S_OK {
            println!(
                "devstate: error: blk status={status} ({}) type={kind} sector={sector}",
                blk::status_name(status)
            );
            return Err(FAIL_DEVICE);
        }
        Ok(())
    }

    fn buffer(&self) -> &'static mut [u8] {
        // SAFETY: the data buffer (DMA memory of `sectors` sectors); no request is in flight.
        unsafe { dma_slice(self.data, (self.sectors * SECTOR_SIZE) as usize) }
    }

    /// Writes the pattern of `seed` over the half starting at `first`, flushes, and reads it back.
    fn write_half(&mut self, seed: u64, first: u64) -> Result<(), u64> {
        blk::fill_pattern(seed, first * SECTOR_SIZE, self.buffer());
        self.request(blk::T_OUT, first, self.sectors)?;
        self.request(blk::T_FLUSH, 0, 0)?;
        self.check_half(seed, first)
    }

    /// Reads the half starting at `first` and checks it holds the pattern of `seed`.
    fn check_half(&mut self, seed: u64, first: u64) -> Result<(), u64> {
        self.buffer().fill(0);
        self.request(blk::T_IN, first, self.sectors)?;
        if let Some(at) = blk::pattern_mismatch(seed, first * SECTOR_SIZE, self.buffer()) {
            println!(
                "devstate: error: blk sector {} byte {at} does not hold the pattern of seed {seed}",
                first + at as u64 / SECTOR_SIZE
            );
            return Err(FAIL_MISMATCH);
        }
        Ok(())
    }
}

/// virtio-rng: one device-writable buffer per request.
struct Entropy {
    device: Device,
    queue: Queue,
    buf: u64,
}

impl Entropy {
    /// Reads RNG_BYTES and checks they are not all zero; returns them as hex.
    fn read(&mut self) -> Result<Hex, u64> {
        // SAFETY: the entropy buffer (DMA memory); no chain is in flight.
        let bytes = unsafe { dma_slice(self.buf, RNG_BYTES as usize) };
        bytes.fill(0);
        let chain = [Buffer {
            addr: self.buf,
            len: RNG_BYTES as u32,
            device_writes: true,
        }];
        let used = self
            .device
            .transact(&mut self.queue, &chain)
            .map_err(|e| device_error("rng", e))?;
        if u64::from(used.len) != RNG_BYTES || bytes.iter().all(|&b| b == 0) {
            println!(
                "devstate: error: rng returned {} bytes, all zero or short",
                used.len
            );
            return Err(FAIL_DEVICE);
        }
        let mut hex = Hex([0; RNG_BYTES as usize]);
        hex.0.copy_from_slice(bytes);
        Ok(hex)
    }
}

struct Hex([u8; RNG_BYTES as usize]);

impl core::fmt::Display for Hex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

pub fn run(ctx: &Context<'_>, params: Tokens<'_>) -> Result<u64, u64> {
    let param = |key, default| {
        cmdline::param_u64(params.clone(), key, default).map_err(|e| {
            println!("devstate: error: {e}");
            FAIL_BAD_PARAMETER
        })
    };
    let (port, seed, sectors) = (
        param("port", 5000)?,
        param("seed", 1)?,
        param("sectors", 16)?,
    );
    // Read first: a snapshot taken at any later point is then seen as a clone.
    let mut generation = signal::generation();
    if port > u64::from(u32::MAX) || sectors == 0 || sectors > MAX_SECTORS {
        println!("devstate: error: need port <= 4294967295 and 1 <= sectors <= {MAX_SECTORS}");
        return Err(FAIL_BAD_PARAMETER);
    }
    let find = |kind, name| {
        virtio::find(kind).ok_or_else(|| {
            println!("devstate: error: no virtio-{name} device on PCI bus 0");
            FAIL_NO_DEVICE
        })
    };
    let (blk_dev, blk_func, _) = find(VIRTIO_TYPE_BLOCK, "blk")?;
    let (rng_dev, rng_func, _) = find(VIRTIO_TYPE_RNG, "rng")?;
    let (vsock_dev, vsock_func, _) = find(VIRTIO_TYPE_VSOCK, "vsock")?;

    // vsock first: its driver takes the arena right above the image.
    let mut drv = Driver::open(vsock_dev, vsock_func, ctx.e820, ECHO_DMA)
        .map_err(|e| device_error("vsock", e))?;
    let mut echo = Echo::new(&mut drv, port as u32)?;
    let image_end = crate::image_range().1;
    let bytes = sectors * SECTOR_SIZE;
    let Some(mut dma) = Dma::new_above(ctx.e820, image_end + VSOCK_RESERVE, bytes + (64 << 10))
    else {
        println!("devstate: error: no usable RAM for the blk and rng queues");
        return Err(FAIL_NO_MEMORY);
    };

    let mut device = Device::open(blk_dev, blk_func).map_err(|e| device_error("blk", e))?;
    device
        .init(blk::F_FLUSH)
        .map_err(|e| device_error("blk", e))?;
    let Some(capacity) = device.read_config(|c| c.read64(blk::CONFIG_CAPACITY)) else {
        println!("devstate: error: blk has no stable configuration");
        return Err(FAIL_DEVICE);
    };
    if capacity < 2 * sectors {
        println!(
            "devstate: error: {} sectors needed, the disk has {capacity}",
            2 * sectors
        );
        return Err(FAIL_BAD_PARAMETER);
    }
    let queue = device
        .setup_queue(0, &mut dma)
        .map_err(|e| device_error("blk", e))?;
    device.driver_ok().map_err(|e| device_error("blk", e))?;
    let slot = dma.alloc(64, 64).map_err(|e| device_error("blk", e))?;
    let data = dma
        .alloc(bytes, virtio::dma::PAGE)
        .map_err(|e| device_error("blk", e))?;
    let mut disk = Disk {
        device,
        queue,
        slot,
        data,
        sectors,
    };

    let mut device = Device::open(rng_dev, rng_func).map_err(|e| device_error("rng", e))?;
    device.init(0).map_err(|e| device_error("rng", e))?;
    let queue = device
        .setup_queue(0, &mut dma)
        .map_err(|e| device_error("rng", e))?;
    device.driver_ok().map_err(|e| device_error("rng", e))?;
    let buf = dma
        .alloc(RNG_BYTES, 64)
        .map_err(|e| device_error("rng", e))?;
    let mut rng = Entropy { device, queue, buf };

    disk.write_half(seed, 0)?;
    println!("devstate: blk wrote sectors=0..{sectors} seed={seed}");
    println!("devstate: rng {}", rng.read()?);
    println!(
        "devstate: listening port={port} cid={} generation={generation:#034x}",
        drv.cid
    );
    println!("devstate: ready");
    signal::send(SIGNAL_DEVSTATE_READY, WORKLOAD_ID_DEVSTATE);

    // Restores so far (the k-th wrote seed + k over the second half).
    let mut restores = 0u64;
    let mut checks = 0u64;
    let mut reset_seen = false;
    let mut quiet = 0u64;
    loop {
        let pass = echo.pass(&mut drv)?;
        reset_seen |= pass.reset;
        if pass.closed > 0 {
            // A connection ended: look at every device again through the same queues.
            disk.check_half(seed, 0)?;
            if restores > 0 {
                disk.check_half(seed + restores, sectors)?;
            }
            let random = rng.read()?;
            checks += 1;
            println!("devstate: check n={checks} blk=ok rng={random}");
            signal::send(SIGNAL_DEVSTATE_CHECKED, checks);
        }
        if pass.packets > 0 || pass.closed > 0 {
            quiet = 0;
            continue;
        }
        quiet += 1;
        if quiet < QUIET_PASSES {
            core::hint::spin_loop();
            continue;
        }
        let now = signal::generation();
        if now == generation {
            signal::idle();
            continue;
        }
        // A restored copy: the devices are live and mid-conversation, exactly as at the snapshot.
        generation = now;
        restores += 1;
        println!("devstate: restored generation={generation:#034x}");
        disk.write_half(seed + restores, sectors)?;
        disk.check_half(seed, 0)?;
        println!(
            "devstate: blk wrote sectors={sectors}..{} seed={} (same queue)",
            2 * sectors,
            seed + restores
        );
        println!("devstate: rng {} (same queue)", rng.read()?);
        // Its host connections are gone: the device says so on the event queue.
        let deadline = signal::now_ns().map(|t| t + RESET_WAIT_NS);
        while !reset_seen {
            let pass = echo.pass(&mut drv)?;
            reset_seen |= pass.reset;
            if deadline.is_some_and(|d| signal::now_ns().is_some_and(|t| t > d)) {
                println!("devstate: error: no vsock TRANSPORT_RESET after the restore");
                return Err(FAIL_DEVICE);
            }
        }
        reset_seen = false;
        println!("devstate: restored ok listening port={port}");
        signal::send(SIGNAL_DEVSTATE_RESTORED, generation as u64);
    }
}
