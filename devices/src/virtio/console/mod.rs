//! virtio-console (§5.3) with a single port (no VIRTIO_CONSOLE_F_MULTIPORT): queue 0 is the receiveq
//! (host to guest), queue 1 the transmitq (guest to host).
//!
//! Output goes to a `Write` sink (stdout, a file, a socket client, nothing). Input is pushed by the host
//! side into a bounded [`ConsoleInput`] buffer that wakes the worker; bytes wait there until the driver
//! posts receive buffers, and a full buffer pushes back on the producer instead of growing.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::chain::{parse_checked, ParsedChain};
use crate::virtio::worker::{pause_worker, resume_worker, saved_queues, QueueHandler, Worker};
use crate::virtio::{
    check_common_state, read_config_bytes, ActivateContext, ActivateError, GuestMemory,
    SnapshotError, VirtioDevice, VirtioDeviceState, VirtioInterrupt, VirtioInterruptType,
    TYPE_CONSOLE, VIRTIO_F_VERSION_1,
};
use crate::warn_ratelimited;

pub use crate::console_socket::ConsoleSocket;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// Host input held while the guest has no receive buffer posted.
pub const INPUT_CAPACITY: usize = 64 << 10;
/// Largest transmit chain accepted; Linux's hvc sends at most a page per chain. Larger ones are dropped.
pub const MAX_TX_BYTES: u64 = 64 << 10;
/// struct virtio_console_config: cols, rows (le16), max_nr_ports, emerg_wr (le32).
const CONFIG_LEN: usize = 12;

/// Worker event indices: the two queues, then the input wake-up.
const EVENT_RX: usize = 0;
const EVENT_TX: usize = 1;
const EVENT_INPUT: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot create the console input event")]
    Event(#[source] std::io::Error),
}

/// Bytes typed into the console, waiting for the guest's receive buffers.
pub struct ConsoleInput {
    buf: Mutex<VecDeque<u8>>,
    event: EventFd,
}

impl ConsoleInput {
    fn new() -> Result<Self, ConsoleError> {
        Ok(Self {
            buf: Mutex::new(VecDeque::new()),
            event: EventFd::new(EFD_NONBLOCK).map_err(ConsoleError::Event)?,
        })
    }

    /// Queues as much of `bytes` as fits and wakes the device; returns how many were taken (0 when the
    /// buffer is full: retry after the guest has read some).
    pub fn push(&self, bytes: &[u8]) -> usize {
        let taken = {
            let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
            let n = bytes.len().min(INPUT_CAPACITY - buf.len());
            buf.extend(&bytes[..n]);
            n
        };
        if taken > 0 {
            // A failed wake-up only delays delivery to the next queue notification.
            let _ = self.event.write(1);
        }
        taken
    }

    /// Bytes waiting.
    pub fn pending(&self) -> usize {
        self.buf.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Pushes all of `bytes`, waiting while the buffer is full; false if the device stayed full for `patience`.
    pub fn push_all(&self, mut bytes: &[u8], patience: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + patience;
        while !bytes.is_empty() {
            let n = self.push(bytes);
            bytes = &bytes[n..];
            if n == 0 {
                if std::time::Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        true
    }
}

pub type ConsoleOutput = Arc<Mutex<Box<dyn Write + Send>>>;

pub struct Console {
    output: ConsoleOutput,
    input: Arc<ConsoleInput>,
    queue_sizes: [u16; 2],
    acked_features: u64,
    worker: Option<Worker>,
}

impl Console {
    /// A console writing the guest's output to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> Result<Self, ConsoleError> {
        Ok(Self {
            output: Arc::new(Mutex::new(output)),
            input: Arc::new(ConsoleInput::new()?),
            queue_sizes: [QUEUE_SIZE; 2],
            acked_features: 0,
            worker: None,
        })
    }

    /// Where the host side pushes input for the guest.
    pub fn input(&self) -> Arc<ConsoleInput> {
        self.input.clone()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // No F_SIZE / F_MULTIPORT / F_EMERG_WRITE: the fields are present but unused (all zero).
        read_config_bytes(&[0u8; CONFIG_LEN], offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let mut rx = None;
        let mut tx = None;
        for q in ctx.queues {
            match q.index {
                RX_QUEUE => rx = Some(q),
                TX_QUEUE => tx = Some(q),
                _ => {}
            }
        }
        let rx = rx.ok_or(ActivateError::MissingQueue(RX_QUEUE))?;
        let tx = tx.ok_or(ActivateError::MissingQueue(TX_QUEUE))?;
        let input_event = self
            .input
            .event
            .try_clone()
            .map_err(ActivateError::Thread)?;
        let handler = ConsoleHandler {
            mem: ctx.mem,
            rx: rx.queue,
            tx: tx.queue,
            output: self.output.clone(),
            input: self.input.clone(),
            interrupt: ctx.interrupt.clone(),
        };
        self.worker = Some(
            Worker::spawn(
                "console",
                vec![rx.event, tx.event, input_event],
                Box::new(handler),
                ctx.interrupt,
            )
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
        "virtio-console"
    }

    fn pause(&mut self) -> Result<(), SnapshotError> {
        let name = self.name();
        pause_worker(&mut self.worker, name)
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_worker(&mut self.worker)
    }

    /// Nothing beyond the queues: host input not yet delivered is host-side state (the console socket or
    /// terminal of this process) and does not belong to the guest's template; output is written as soon
    /// as the guest transmits it.
    fn state(&self) -> Result<VirtioDeviceState, SnapshotError> {
        Ok(VirtioDeviceState {
            acked_features: self.acked_features,
            queues: saved_queues(&self.worker, self.name())?,
            device: Vec::new(),
        })
    }

    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        check_common_state(self.name(), self.features(), state, Some(&[]))
    }

    fn set_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        if self.worker.is_some() {
            return Err(SnapshotError::Active(self.name()));
        }
        self.check_state(state)?;
        self.acked_features = state.acked_features;
        Ok(())
    }
}

pub(crate) struct ConsoleHandler {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    output: ConsoleOutput,
    input: Arc<ConsoleInput>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A chain that passed structural and memory checks, or None (logged) for garbage.
fn checked<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Option<ParsedChain>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    parse_checked(mem, chain, "virtio-console")
}

impl ConsoleHandler {
    fn finish(&mut self, which: u16, completed: u32) -> Result<(), String> {
        let queue = if which == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        if completed > 0 && crate::virtio::needs_interrupt(queue, &self.mem)? {
            self.interrupt.trigger(VirtioInterruptType::Queue(which));
        }
        Ok(())
    }

    /// Moves buffered input into receive buffers until one of them runs out.
    fn fill_rx(&mut self) -> Result<(), String> {
        let mut completed = 0;
        while self.input.pending() > 0 {
            let chain = match self.rx.iter(&self.mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => return Err(format!("receiveq available ring: {e}")),
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let len = match checked(&self.mem, chain) {
                Some(p) if !p.readable.is_empty() => {
                    warn_ratelimited!("virtio-console: receive buffer is device-readable: dropped");
                    0
                }
                Some(p) => self.deliver(&p),
                None => 0,
            };
            if head >= self.rx.size() {
                warn_ratelimited!("virtio-console: available ring names descriptor {head}");
                continue;
            }
            self.rx
                .add_used(&self.mem, head, len)
                .map_err(|e| format!("receiveq used ring: {e}"))?;
            completed += 1;
        }
        self.finish(RX_QUEUE, completed)
    }

    /// Copies pending input into `p`'s writable buffers; returns the bytes written.
    fn deliver(&self, p: &ParsedChain) -> u32 {
        let mut buf = self.input.buf.lock().unwrap_or_else(|e| e.into_inner());
        let n = (buf.len() as u64).min(p.writable_len()) as usize;
        let bytes: Vec<u8> = buf.iter().take(n).copied().collect();
        match p.write_at(&self.mem, 0, &bytes) {
            Ok(()) => {
                buf.drain(..n);
                n as u32
            }
            Err(e) => {
                // The input stays for the next buffer.
                warn_ratelimited!("virtio-console: receive buffer: {e}");
                0
            }
        }
    }

    /// Writes every transmit buffer's bytes to the output.
    fn drain_tx(&mut self) -> Result<(), String> {
        let mut completed = 0;
        let mut wrote = false;
        loop {
            let chain = match self.tx.iter(&self.mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => return Err(format!("transmitq available ring: {e}")),
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            if let Some(bytes) = checked(&self.mem, chain).and_then(|p| self.tx_bytes(&p)) {
                let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = out.write_all(&bytes) {
                    warn_ratelimited!("virtio-console: output: {e}");
                }
                wrote = true;
            }
            if head >= self.tx.size() {
                warn_ratelimited!("virtio-console: available ring names descriptor {head}");
                continue;
            }
            self.tx
                .add_used(&self.mem, head, 0)
                .map_err(|e| format!("transmitq used ring: {e}"))?;
            completed += 1;
        }
        if wrote {
            let _ = self
                .output
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .flush();
        }
        self.finish(TX_QUEUE, completed)
    }

    /// The bytes of a transmit chain, or None (logged) for one in the wrong direction or too large.
    fn tx_bytes(&self, p: &ParsedChain) -> Option<Vec<u8>> {
        if !p.writable.is_empty() {
            warn_ratelimited!("virtio-console: transmit buffer is device-writable: dropped");
            return None;
        }
        let len = p.readable_len();
        if len > MAX_TX_BYTES {
            warn_ratelimited!(
                "virtio-console: transmit buffer of {len} bytes over {MAX_TX_BYTES}: dropped"
            );
            return None;
        }
        let mut bytes = vec![0u8; len as usize];
        match p.read_at(&self.mem, 0, &mut bytes) {
            Ok(()) => Some(bytes),
            Err(e) => {
                warn_ratelimited!("virtio-console: transmit buffer: {e}");
                None
            }
        }
    }
}

impl QueueHandler for ConsoleHandler {
    fn handle_queue(&mut self, index: usize) -> Result<(), String> {
        match index {
            EVENT_RX | EVENT_INPUT => self.fill_rx(),
            EVENT_TX => self.drain_tx(),
            _ => Ok(()),
        }
    }

    fn queues(&self) -> Vec<&Queue> {
        vec![&self.rx, &self.tx]
    }
}

#[cfg(test)]
mod tests;
