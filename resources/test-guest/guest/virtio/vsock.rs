//! A virtio-vsock driver (virtio 1.2 §5.10) for the test guest: stream packets over the rx/tx queues,
//! polled, no interrupts.
//!
//! Receive buffers are [`RX_BUFS`] chains of one device-writable descriptor (header + up to 64 KiB of
//! payload); a received packet keeps its buffer until the caller [`Driver::release`]s it, which callers do
//! at once (after copying the payload): a driver sitting on receive buffers while it waits for credit
//! would leave the device no buffer to send that credit in. Transmit chains are a 44-byte header slot
//! plus, for RW, one data descriptor; each carries a caller's tag, handed back when the device used it.

use super::ring::Buffer;
use super::{Device, Dma, Error, Queue};
use crate::e820;

pub const HEADER_LEN: usize = 44;
pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Payload bytes per receive buffer (the device's largest packet).
pub const RX_PAYLOAD: u32 = 64 << 10;
pub const RX_BUFS: usize = 16;
const RX_STRIDE: u64 = (HEADER_LEN as u64 + RX_PAYLOAD as u64).next_multiple_of(64);
pub const TX_SLOTS: usize = 64;
const TX_SLOT_LEN: u64 = 64;
const QUEUE_MAX: usize = super::ring::MAX_SIZE as usize;
const NONE: u8 = u8::MAX;
/// The tag of a chain nobody needs to hear about.
pub const NO_TAG: u32 = u32::MAX;
/// DMA memory the driver needs: rings, receive buffers, header slots, the event buffer.
pub const DMA_BYTES: u64 = RX_STRIDE * RX_BUFS as u64 + (256 << 10);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            src_cid: le(&b[0..8]),
            dst_cid: le(&b[8..16]),
            src_port: le(&b[16..20]) as u32,
            dst_port: le(&b[20..24]) as u32,
            len: le(&b[24..28]) as u32,
            kind: le(&b[28..30]) as u16,
            op: le(&b[30..32]) as u16,
            flags: le(&b[32..36]) as u32,
            buf_alloc: le(&b[36..40]) as u32,
            fwd_cnt: le(&b[40..44]) as u32,
        }
    }

    pub fn bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A received packet; its buffer stays the caller's until released.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub header: Header,
    pub buf: u8,
    /// Guest address of the payload (`header.len` bytes).
    pub data: u64,
}

pub struct Driver {
    dma: Dma,
    device: Device,
    rx: Queue,
    tx: Queue,
    events: Queue,
    pub cid: u64,
    rx_base: u64,
    /// rx head descriptor -> buffer index.
    rx_head_buf: [u8; QUEUE_MAX],
    rx_posted: bool,
    tx_slots: u64,
    tx_free: [u8; TX_SLOTS],
    tx_free_len: usize,
    /// tx head descriptor -> (header slot, caller's tag).
    tx_head: [(u8, u32); QUEUE_MAX],
    tx_added: bool,
    event_buf: u64,
}

impl Driver {
    /// Brings up the device at 00:dev.func: queues, receive and event buffers, DRIVER_OK.
    /// `extra` bytes of DMA memory stay available through [`Driver::alloc`].
    pub fn open(dev: u8, func: u8, map: &e820::Map, extra: u64) -> Result<Driver, Error> {
        let total = DMA_BYTES + extra;
        let mut dma = Dma::new(map, total).ok_or(Error::NoMemory(total))?;
        let mut device = Device::open(dev, func)?;
        device.init(0)?;
        let rx = device.setup_queue(0, &mut dma)?;
        let tx = device.setup_queue(1, &mut dma)?;
        let events = device.setup_queue(2, &mut dma)?;
        let cid = device.read_config(|c| c.read64(0)).unwrap_or(0);
        let rx_base = dma.alloc(RX_STRIDE * RX_BUFS as u64, 64)?;
        let tx_slots = dma.alloc(TX_SLOT_LEN * TX_SLOTS as u64, 64)?;
        let event_buf = dma.alloc(8, 8)?;
        let mut driver = Driver {
            dma,
            device,
            rx,
            tx,
            events,
            cid,
            rx_base,
            rx_head_buf: [NONE; QUEUE_MAX],
            rx_posted: false,
            tx_slots,
            tx_free: [0; TX_SLOTS],
            tx_free_len: TX_SLOTS,
            tx_head: [(NONE, NO_TAG); QUEUE_MAX],
            tx_added: false,
            event_buf,
        };
        for (i, slot) in driver.tx_free.iter_mut().enumerate() {
            *slot = i as u8;
        }
        for b in 0..RX_BUFS {
            driver.release(b as u8);
        }
        driver.post_event()?;
        driver.device.driver_ok()?;
        driver.flush();
        Ok(driver)
    }

    /// Device-visible memory for the caller (zeroed).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, Error> {
        self.dma.alloc(len, align)
    }

    fn rx_addr(&self, buf: u8) -> u64 {
        self.rx_base + RX_STRIDE * u64::from(buf)
    }

    fn post_event(&mut self) -> Result<(), Error> {
        let chain = [Buffer {
            addr: self.event_buf,
            len: 8,
            device_writes: true,
        }];
        self.events.ring.add(&chain)?;
        self.device.kick(&mut self.events);
        Ok(())
    }

    /// Gives receive buffer `buf` back to the device (notified on the next `flush`).
    pub fn release(&mut self, buf: u8) {
        if usize::from(buf) >= RX_BUFS {
            return;
        }
        let chain = [Buffer {
            addr: self.rx_addr(buf),
            len: HEADER_LEN as u32 + RX_PAYLOAD,
            device_writes: true,
        }];
        // The queue has more descriptors than there are buffers: this cannot fail.
        if let Ok(head) = self.rx.ring.add(&chain) {
            self.rx_head_buf[usize::from(head)] = buf;
            self.rx_posted = true;
        }
    }

    /// The next received packet. A packet whose length does not add up is dropped (buffer reposted).
    pub fn poll_rx(&mut self) -> Result<Option<Packet>, Error> {
        loop {
            let Some(used) = self.rx.ring.poll_used()? else {
                return Ok(None);
            };
            let buf = core::mem::replace(&mut self.rx_head_buf[usize::from(used.head)], NONE);
            if usize::from(buf) >= RX_BUFS {
                continue;
            }
            let addr = self.rx_addr(buf);
            let mut raw = [0u8; HEADER_LEN];
            // SAFETY: the buffer is DMA memory of RX_STRIDE bytes that the device has returned.
            raw.copy_from_slice(unsafe { super::dma_slice(addr, HEADER_LEN) });
            let header = Header::parse(&raw);
            let fits = used.len as usize >= HEADER_LEN
                && header.len <= RX_PAYLOAD
                && header.len as usize <= used.len as usize - HEADER_LEN;
            if !fits {
                self.release(buf);
                continue;
            }
            return Ok(Some(Packet {
                header,
                buf,
                data: addr + HEADER_LEN as u64,
            }));
        }
    }

    /// Whether a transmit header slot is free.
    pub fn can_send(&self) -> bool {
        self.tx_free_len > 0
    }

    /// Queues a packet; `data` (address, length) is sent from where it is and must stay until the chain
    /// is used, when `poll_tx` reports `tag` (unless NO_TAG). False if no slot is free.
    pub fn send(
        &mut self,
        header: &Header,
        data: Option<(u64, u32)>,
        tag: u32,
    ) -> Result<bool, Error> {
        if self.tx_free_len == 0 {
            return Ok(false);
        }
        self.tx_free_len -= 1;
        let slot = self.tx_free[self.tx_free_len];
        let at = self.tx_slots + TX_SLOT_LEN * u64::from(slot);
        // SAFETY: header slot `slot` is free (no chain in flight uses it).
        unsafe { super::dma_slice(at, HEADER_LEN) }.copy_from_slice(&header.bytes());
        let hdr = Buffer {
            addr: at,
            len: HEADER_LEN as u32,
            device_writes: false,
        };
        let added = match data {
            Some((addr, len)) if len > 0 => self.tx.ring.add(&[
                hdr,
                Buffer {
                    addr,
                    len,
                    device_writes: false,
                },
            ]),
            _ => self.tx.ring.add(&[hdr]),
        };
        match added {
            Ok(head) => {
                self.tx_head[usize::from(head)] = (slot, tag);
                self.tx_added = true;
                Ok(true)
            }
            Err(e) => {
                self.tx_free[self.tx_free_len] = slot;
                self.tx_free_len += 1;
                Err(e.into())
            }
        }
    }

    /// Reaps used transmit chains: frees their header slots and calls `done` with each tag.
    pub fn poll_tx(&mut self, mut done: impl FnMut(u32)) -> Result<(), Error> {
        while let Some(used) = self.tx.ring.poll_used()? {
            let (slot, tag) =
                core::mem::replace(&mut self.tx_head[usize::from(used.head)], (NONE, NO_TAG));
            if usize::from(slot) < TX_SLOTS {
                self.tx_free[self.tx_free_len] = slot;
                self.tx_free_len += 1;
            }
            if tag != NO_TAG {
                done(tag);
            }
        }
        Ok(())
    }

    /// A transport event (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), if one came; the buffer is reposted.
    pub fn poll_event(&mut self) -> Result<Option<u32>, Error> {
        let Some(used) = self.events.ring.poll_used()? else {
            return Ok(None);
        };
        // SAFETY: the 8-byte event buffer, returned by the device.
        let id = unsafe { (self.event_buf as *const u32).read_volatile() };
        self.post_event()?;
        Ok((used.len >= 4).then_some(id))
    }

    /// Notifies the device of new receive buffers and transmit chains (one MMIO write each).
    pub fn flush(&mut self) {
        if core::mem::take(&mut self.rx_posted) {
            self.device.kick(&mut self.rx);
        }
        if core::mem::take(&mut self.tx_added) {
            self.device.kick(&mut self.tx);
        }
    }

    pub fn check_status(&self) -> Result<(), Error> {
        self.device.check_status()
    }
}
