//! COM1: a 16550A UART (vm-superio's `Serial`) reachable both by port I/O and by MMIO.
//!
//! The same device is inserted at ports 0x3f8..0x400 and at MMIO 0xfe00_1000 (4 KiB, 1-byte registers,
//! regshift 0), so a guest at CPL3, where port I/O faults, can still drive it. Register = offset;
//! offsets 8 and above read 0 and ignore writes. Wider accesses use their first byte; reads fill the rest
//! with 0. Interrupts are edges on an IOAPIC pin. Guest output goes to a writer whose failures are
//! logged (rate-limited) and otherwise ignored: losing console output must not stop the VM.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, NoEvents, Serial, SerialState};

use crate::ioapic::IrqLine;
use crate::warn_ratelimited;

/// Registers of a 16550 occupy 8 consecutive addresses.
const REGISTER_COUNT: u64 = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SerialError {
    #[error("serial input FIFO is full")]
    FifoFull,
    #[error("serial state holds {0} input bytes, more than the FIFO does")]
    StateFifoTooLong(usize),
}

type Uart = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// Saved UART registers and unread input, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

pub struct SerialDevice {
    uart: Uart,
    irq: IrqLine,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(irq.clone(), out),
            irq,
        }
    }

    /// Queues host input for the guest and raises the receive interrupt if the guest enabled it.
    ///
    /// Returns how many bytes were taken (possibly fewer than given, or 0 while the guest has the UART in
    /// loopback mode); `FifoFull` when none fit. Either way the caller keeps the rest and retries later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(UartError::FullFifo) => Err(SerialError::FifoFull),
            // Triggers cannot fail and enqueueing does not write output.
            Err(UartError::Trigger(never)) => match never {},
            Err(UartError::IOError(_)) => Ok(0),
        }
    }

    /// Free space in the input FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    pub fn state(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    /// Restores registers and unread input, keeping the current output writer. Like a real UART whose
    /// interrupt conditions are pending and enabled, this may raise the IRQ.
    pub fn set_state(&mut self, state: &SerialDeviceState) -> Result<(), SerialError> {
        let len = state.in_buffer.len();
        // vm-superio does not export its FIFO size; free space plus what is queued is exactly that.
        let fifo_size = self.uart.fifo_capacity() + self.uart.state().in_buffer.len();
        if len > fifo_size {
            return Err(SerialError::StateFifoTooLong(len));
        }
        let placeholder = Serial::new(self.irq.clone(), Box::new(std::io::sink()) as Box<_>);
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        match Serial::from_state(&state.into(), self.irq.clone(), NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            // from_state consumed the writer; only an oversized FIFO fails, which we checked above.
            Err(_) => Err(SerialError::StateFifoTooLong(len)),
        }
    }
}

impl crate::BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            if offset < REGISTER_COUNT {
                *first = self.uart.read(offset as u8);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        if offset >= REGISTER_COUNT {
            return;
        }
        match self.uart.write(offset as u8, value) {
            Ok(()) => {}
            Err(UartError::IOError(e)) => warn_ratelimited!("serial: guest output lost: {e}"),
            Err(UartError::Trigger(never)) => match never {},
            Err(UartError::FullFifo) => {} // loopback into a full FIFO drops the byte, as a 16550 would
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioapic::testing::{self, RecordingMsi};
    use crate::ioapic::{Ioapic, MsiMessage};
    use crate::BusDevice;
    use std::sync::{Arc, Mutex};

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DR: u8 = 0x01;
    const LSR_THRE_TEMT: u8 = 0x60;
    const IIR_NONE: u8 = 0x01;
    const IIR_FIFO: u8 = 0xc0;
    const IIR_THRE: u8 = 0x02;
    const IIR_RDA: u8 = 0x04;

    /// An output sink the test can inspect after handing it to the device.
    #[derive(Clone, Default)]
    struct SharedOut(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct BrokenOut;

    impl Write for BrokenOut {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::EPIPE))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        serial: SerialDevice,
        out: SharedOut,
        msi: RecordingMsi,
    }

    /// COM1 on IOAPIC pin 4, routed edge-triggered to vector 0x24 on APIC 2.
    fn rig() -> Rig {
        let (mut ioapic, msi) = testing::ioapic();
        testing::program(&mut ioapic, 4, 0x24 | (2 << 56));
        let ioapic: Arc<Mutex<Ioapic>> = Arc::new(Mutex::new(ioapic));
        let out = SharedOut::default();
        let serial = SerialDevice::new(IrqLine::new(ioapic, 4), Box::new(out.clone()));
        Rig { serial, out, msi }
    }

    fn com1_msi() -> MsiMessage {
        MsiMessage {
            address: 0xfee0_2000,
            data: 0x4024,
        }
    }

    fn read(serial: &mut SerialDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        serial.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn transmitted_bytes_reach_the_writer() {
        let mut rig = rig();
        for &b in b"hi\n" {
            rig.serial.write(THR, &[b]);
        }
        assert_eq!(&*rig.out.0.lock().unwrap(), b"hi\n");
        assert_eq!(read(&mut rig.serial, LSR) & LSR_THRE_TEMT, LSR_THRE_TEMT);
        assert!(rig.msi.take().is_empty(), "no interrupt while IER is 0");
    }

    #[test]
    fn thr_empty_interrupt_and_iir() {
        let mut rig = rig();
        assert_eq!(read(&mut rig.serial, IIR), IIR_FIFO | IIR_NONE);
        // Enabling THRE interrupts raises one at once: the holding register is always empty.
        rig.serial.write(IER, &[IER_THRE]);
        assert_eq!(rig.msi.take(), vec![com1_msi()]);
        assert_eq!(read(&mut rig.serial, IIR), IIR_FIFO | IIR_THRE);
        assert_eq!(
            read(&mut rig.serial, IIR),
            IIR_FIFO | IIR_NONE,
            "read of IIR acks THRE"
        );
        rig.serial.write(THR, b"x");
        assert_eq!(rig.msi.take(), vec![com1_msi()]);
    }

    #[test]
    fn input_raises_the_receive_interrupt() {
        let mut rig = rig();
        let capacity = rig.serial.fifo_capacity();
        assert_eq!(rig.serial.enqueue_input(b"ab"), Ok(2));
        assert_eq!(rig.serial.fifo_capacity(), capacity - 2);
        assert!(rig.msi.take().is_empty(), "RX interrupt not enabled yet");
        assert_eq!(read(&mut rig.serial, LSR) & LSR_DR, LSR_DR);

        // Enabling RDA with data pending interrupts immediately.
        rig.serial.write(IER, &[IER_RDA]);
        assert_eq!(rig.msi.take(), vec![com1_msi()]);
        assert_eq!(read(&mut rig.serial, IIR), IIR_FIFO | IIR_RDA);
        assert_eq!(read(&mut rig.serial, THR), b'a');
        assert_eq!(read(&mut rig.serial, THR), b'b');
        assert_eq!(read(&mut rig.serial, LSR) & LSR_DR, 0);

        rig.serial.enqueue_input(b"c").unwrap();
        assert_eq!(rig.msi.take(), vec![com1_msi()]);
    }

    #[test]
    fn full_fifo_is_an_error_the_caller_retries() {
        let mut rig = rig();
        let capacity = rig.serial.fifo_capacity();
        let big = vec![b'z'; capacity + 10];
        assert_eq!(rig.serial.enqueue_input(&big), Ok(capacity));
        assert_eq!(
            rig.serial.enqueue_input(b"more"),
            Err(SerialError::FifoFull)
        );
        read(&mut rig.serial, THR);
        assert_eq!(rig.serial.enqueue_input(b"more"), Ok(1));
    }

    #[test]
    fn register_window_and_access_widths() {
        let mut rig = rig();
        rig.serial.write(SCR, &[0x5a, 0xff, 0xff, 0xff]);
        let mut wide = [0xffu8; 4];
        rig.serial.read(SCR, &mut wide);
        assert_eq!(wide, [0x5a, 0, 0, 0]);
        // The MMIO alias is 4 KiB; everything past the 8 registers is inert.
        rig.serial.write(8, b"!");
        rig.serial.write(0xfff, b"!");
        rig.serial.write(u64::MAX, b"!");
        rig.serial.write(THR, &[]);
        rig.serial.read(0x10, &mut wide);
        assert_eq!(wide, [0; 4]);
        rig.serial.read(THR, &mut []);
        assert!(rig.out.0.lock().unwrap().is_empty());
        // DLAB switches offsets 0/1 to the divisor latch.
        rig.serial.write(LCR, &[0x80]);
        rig.serial.write(THR, &[0x0c]);
        assert_eq!(read(&mut rig.serial, THR), 0x0c);
        assert!(rig.out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn loopback_feeds_output_back_as_input() {
        let mut rig = rig();
        rig.serial.write(MCR, &[0x10 | 0x08]);
        rig.serial.write(THR, b"q");
        assert_eq!(read(&mut rig.serial, THR), b'q');
        assert!(rig.out.0.lock().unwrap().is_empty());
        assert_eq!(rig.serial.enqueue_input(b"x"), Ok(0));
    }

    #[test]
    fn output_errors_do_not_stop_the_uart() {
        let (mut ioapic, msi) = testing::ioapic();
        testing::program(&mut ioapic, 4, 0x24 | (2 << 56));
        let line = IrqLine::new(Arc::new(Mutex::new(ioapic)), 4);
        let mut serial = SerialDevice::new(line, Box::new(BrokenOut));
        serial.write(IER, &[IER_THRE]);
        msi.take();
        read(&mut serial, IIR);
        serial.write(THR, b"lost");
        // The guest still sees its THRE interrupt, so its driver does not stall.
        assert_eq!(msi.take(), vec![com1_msi()]);
        serial.write(SCR, &[7]);
        assert_eq!(read(&mut serial, SCR), 7);
    }

    #[test]
    fn state_round_trip_keeps_the_writer() {
        let mut source = rig();
        source.serial.write(SCR, &[0x42]);
        source.serial.write(LCR, &[0x03]);
        source.serial.enqueue_input(b"in").unwrap();
        let state = source.serial.state();
        let json = serde_json::to_string(&state).unwrap();
        let parsed: SerialDeviceState = serde_json::from_str(&json).unwrap();

        let mut other = rig();
        other.serial.set_state(&parsed).unwrap();
        // Inserted once on the port bus and once on the MMIO bus.
        let _on_bus: crate::SharedBusDevice = Arc::new(Mutex::new(source.serial));
        assert_eq!(other.serial.state(), state);
        assert_eq!(read(&mut other.serial, SCR), 0x42);
        assert_eq!(read(&mut other.serial, THR), b'i');
        other.serial.write(THR, b"o");
        assert_eq!(&*other.out.0.lock().unwrap(), b"o");

        let mut bad = state;
        bad.in_buffer = vec![0; 65];
        assert_eq!(
            other.serial.set_state(&bad),
            Err(SerialError::StateFifoTooLong(65))
        );
        other.serial.write(THR, b"k");
        assert_eq!(&*other.out.0.lock().unwrap(), b"ok");
    }
}
