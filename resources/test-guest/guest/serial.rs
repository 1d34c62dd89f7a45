//! The console: a 16550 UART, either an MMIO alias (`earlycon=uart8250,mmio,ADDR`) or COM1 on port 0x3f8
//! through the int3 service. Every register access is a VM exit (~30 us for MMIO at CPL3), so the line
//! status is checked once per FIFO's worth (16 bytes), not per byte.

use crate::boot;
use crate::global::Global;

const THR: u8 = 0; // transmit holding (DLAB = 0) / divisor latch low (DLAB = 1)
const IER: u8 = 1; // interrupt enable / divisor latch high
const FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const SCR: u8 = 7;
const LSR_THRE: u8 = 1 << 5;
const FIFO_DEPTH: u8 = 16;
/// Bounded wait for THRE: a UART that never drains must not hang the guest.
const THRE_POLLS: u32 = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Uart {
    Mmio {
        base: u64,
        stride: u8,
    },
    Port(u16),
    /// No UART answered the probe: output is dropped.
    None,
}

#[derive(Clone, Copy)]
struct State {
    uart: Uart,
    /// Bytes written since the FIFO was last seen empty.
    in_fifo: u8,
}

// Before `init`, COM1 without setup: good enough for a fault report that happens very early.
static STATE: Global<State> = Global::new(State {
    uart: Uart::Port(crate::protocol::SERIAL_PORT),
    in_fifo: FIFO_DEPTH,
});

fn write_reg(uart: Uart, reg: u8, value: u8) {
    match uart {
        Uart::Mmio { base, stride } => {
            let addr = base + u64::from(reg) * u64::from(stride);
            // SAFETY: a UART register inside the identity-mapped MMIO hole.
            unsafe {
                if stride == 4 {
                    (addr as *mut u32).write_volatile(u32::from(value));
                } else {
                    (addr as *mut u8).write_volatile(value);
                }
            }
        }
        Uart::Port(port) => boot::outb(port + u16::from(reg), value),
        Uart::None => {}
    }
}

fn read_reg(uart: Uart, reg: u8) -> u8 {
    match uart {
        Uart::Mmio { base, stride } => {
            let addr = base + u64::from(reg) * u64::from(stride);
            // SAFETY: as in `write_reg`.
            unsafe {
                if stride == 4 {
                    (addr as *const u32).read_volatile() as u8
                } else {
                    (addr as *const u8).read_volatile()
                }
            }
        }
        Uart::Port(port) => boot::inb(port + u16::from(reg)),
        Uart::None => 0xff,
    }
}

/// Probes (scratch register round trip) and programs the UART: 115200 8N1, FIFO on, no interrupts.
/// Returns what the console now uses.
pub fn init(uart: Uart) -> Uart {
    write_reg(uart, SCR, 0x5a);
    let uart = if read_reg(uart, SCR) == 0x5a {
        uart
    } else {
        Uart::None
    };
    write_reg(uart, IER, 0);
    write_reg(uart, LCR, 0x80); // DLAB
    write_reg(uart, THR, 1); // divisor 1: 115200 baud
    write_reg(uart, IER, 0);
    write_reg(uart, LCR, 0x03); // 8N1, DLAB off
    write_reg(uart, FCR, 0x07); // FIFO on, both cleared
    write_reg(uart, MCR, 0x03); // DTR | RTS
    STATE.set(State {
        uart,
        in_fifo: FIFO_DEPTH,
    });
    uart
}

pub fn uart() -> Uart {
    STATE.get().uart
}

fn put(state: &mut State, byte: u8) {
    if state.in_fifo >= FIFO_DEPTH {
        for _ in 0..THRE_POLLS {
            if read_reg(state.uart, LSR) & LSR_THRE != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        state.in_fifo = 0;
    }
    write_reg(state.uart, THR, byte);
    state.in_fifo += 1;
}

pub fn write_bytes(bytes: &[u8]) {
    let mut state = STATE.get();
    if state.uart == Uart::None {
        return;
    }
    for &b in bytes {
        put(&mut state, b);
    }
    STATE.set(state);
}

/// `core::fmt` sink for the console.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints a line on the console (`\n` only: the host reads these lines).
macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Console, format_args!($($arg)*));
        $crate::serial::write_bytes(b"\n");
    }};
}
pub(crate) use println;
