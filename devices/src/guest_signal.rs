//! TrEnv's guest-signal device: the guest marks its milestones and the VMM timestamps them.
//!
//! The timestamp is taken on the host (CLOCK_MONOTONIC) while the vCPU is still in the MMIO exit of the
//! event write, so boot and restore latencies are measured without trusting the guest's clock.
//!
//! MMIO at `0xfe00_0000`, 4 KiB. Little-endian registers:
//!
//! | offset | width | access | meaning |
//! | ------ | ----- | ------ | ------- |
//! | 0x00 | u32 | R   | magic `0x4753_5254` (bytes "TRSG") |
//! | 0x04 | u32 | R   | version, 1 |
//! | 0x08 | u64 | R/W | argument for the next event; byte-wise writes merge, reads return it |
//! | 0x10 | u32 | W   | event code: emits `(code, argument, host time)` and clears the argument; reads 0 |
//! | 0x18 | u64 | R   | host CLOCK_MONOTONIC in ns |
//! | 0x20 | u64 | R   | VM generation ID, low half (changes on every restore from a template; 0 on a cold boot) |
//! | 0x28 | u64 | R   | VM generation ID, high half |
//!
//! The generation ID is the same 128-bit value the VMM puts in the ACPI VMGenID buffer for Linux guests:
//! a guest that sees it change knows it is a new clone and must reseed RNGs and renew identities.
//!
//! The clock is sampled by a read that starts at 0x18 and latched; reads starting at 0x19..0x20 return
//! bytes of the latched value. So a guest without 64-bit MMIO reads 0x18 then 0x1c and gets one coherent
//! sample. An event is written with an access starting at 0x10 (1 to 8 bytes; the code is the low 4 bytes,
//! zero-extended); empty writes and writes starting at 0x11..0x18 are ignored, as are writes to read-only registers and
//! accesses beyond 0x20 (they read 0).
//!
//! Event codes are listed in [`event`]: 1 boot complete, 2 ready, 3 workload start, 4 workload done,
//! 5 failure (argument = error code), 0x100 and up custom markers.

use serde::Serialize;

pub const MAGIC: u32 = 0x4753_5254;
pub const VERSION: u32 = 1;

pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_ARG: u64 = 0x08;
pub const REG_EVENT: u64 = 0x10;
pub const REG_CLOCK: u64 = 0x18;
pub const REG_GENERATION_LO: u64 = 0x20;
pub const REG_GENERATION_HI: u64 = 0x28;
const REGS_END: u64 = 0x30;

/// Event codes a guest writes to [`REG_EVENT`].
pub mod event {
    pub const BOOT_COMPLETE: u32 = 1;
    pub const READY: u32 = 2;
    pub const WORKLOAD_START: u32 = 3;
    pub const WORKLOAD_DONE: u32 = 4;
    /// The argument carries the guest's error code.
    pub const FAILURE: u32 = 5;
    /// First code of the free-form markers (a workload's own phases).
    pub const CUSTOM_BASE: u32 = 0x100;
}

/// Human-readable name of an event code, for logs and JSON reports.
pub fn event_name(code: u32) -> String {
    match code {
        event::BOOT_COMPLETE => "boot_complete".into(),
        event::READY => "ready".into(),
        event::WORKLOAD_START => "workload_start".into(),
        event::WORKLOAD_DONE => "workload_done".into(),
        event::FAILURE => "failure".into(),
        c if c >= event::CUSTOM_BASE => format!("custom_{c:#x}"),
        c => format!("unknown_{c:#x}"),
    }
}

/// One milestone written by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestEvent {
    pub code: u32,
    pub arg: u64,
    /// Host CLOCK_MONOTONIC at the moment the event write exited to the VMM.
    pub monotonic_ns: u64,
}

/// CLOCK_MONOTONIC in nanoseconds; the VMM's own timestamps use it too so they compare with events.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(ret, 0);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

pub struct GuestSignalDevice {
    arg: u64,
    clock_latch: u64,
    generation: u128,
    sink: Box<dyn FnMut(GuestEvent) + Send>,
}

impl GuestSignalDevice {
    /// `sink` runs on the vCPU thread inside the exit: keep it short (push to a channel or a vector).
    pub fn new(sink: Box<dyn FnMut(GuestEvent) + Send>) -> Self {
        Self {
            arg: 0,
            clock_latch: 0,
            generation: 0,
            sink,
        }
    }

    /// Sets the VM generation ID the guest reads (on restore from a template).
    pub fn set_generation(&mut self, generation: u128) {
        self.generation = generation;
    }

    pub fn generation(&self) -> u128 {
        self.generation
    }

    fn register_image(&self) -> [u8; REGS_END as usize] {
        let mut regs = [0u8; REGS_END as usize];
        regs[0x00..0x04].copy_from_slice(&MAGIC.to_le_bytes());
        regs[0x04..0x08].copy_from_slice(&VERSION.to_le_bytes());
        regs[0x08..0x10].copy_from_slice(&self.arg.to_le_bytes());
        regs[0x18..0x20].copy_from_slice(&self.clock_latch.to_le_bytes());
        regs[0x20..0x30].copy_from_slice(&self.generation.to_le_bytes());
        regs
    }
}

impl crate::BusDevice for GuestSignalDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == REG_CLOCK {
            self.clock_latch = monotonic_ns();
        }
        let regs = self.register_image();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| regs.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if offset == REG_EVENT {
            let monotonic_ns = monotonic_ns();
            let mut code = [0u8; 4];
            let n = data.len().min(4);
            code[..n].copy_from_slice(&data[..n]);
            let event = GuestEvent {
                code: u32::from_le_bytes(code),
                arg: std::mem::take(&mut self.arg),
                monotonic_ns,
            };
            log::debug!(
                "guest signal: {} arg {:#x}",
                event_name(event.code),
                event.arg
            );
            (self.sink)(event);
            return;
        }
        // Merge whatever bytes of the write fall inside the argument register.
        let mut arg = self.arg.to_le_bytes();
        for (i, byte) in data.iter().enumerate() {
            let Some(pos) = offset.checked_add(i as u64) else {
                break;
            };
            if (REG_ARG..REG_EVENT).contains(&pos) {
                arg[(pos - REG_ARG) as usize] = *byte;
            }
        }
        self.arg = u64::from_le_bytes(arg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use std::sync::{Arc, Mutex};

    fn device() -> (GuestSignalDevice, Arc<Mutex<Vec<GuestEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let dev = GuestSignalDevice::new(Box::new(move |e| sink.lock().unwrap().push(e)));
        (dev, events)
    }

    fn read_u32(dev: &mut GuestSignalDevice, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn read_u64(dev: &mut GuestSignalDevice, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        dev.read(offset, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn identifies_itself() {
        let (mut dev, _) = device();
        assert_eq!(read_u32(&mut dev, REG_MAGIC), MAGIC);
        assert_eq!(read_u32(&mut dev, REG_VERSION), VERSION);
        let mut magic = [0u8; 4];
        dev.read(0, &mut magic);
        assert_eq!(&magic, b"TRSG");
        // Byte-wise and spanning reads.
        let mut b = [0u8; 1];
        dev.read(1, &mut b);
        assert_eq!(b[0], b'R');
        assert_eq!(
            read_u64(&mut dev, 0),
            (u64::from(VERSION) << 32) | u64::from(MAGIC)
        );
    }

    #[test]
    fn events_carry_argument_and_host_time() {
        let (mut dev, events) = device();
        let before = monotonic_ns();
        dev.write(REG_ARG, &0x1234_5678_9abc_def0u64.to_le_bytes());
        assert_eq!(read_u64(&mut dev, REG_ARG), 0x1234_5678_9abc_def0);
        dev.write(REG_EVENT, &event::FAILURE.to_le_bytes());
        dev.write(REG_EVENT, &event::BOOT_COMPLETE.to_le_bytes());
        let after = monotonic_ns();

        let events = events.lock().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].code, event::FAILURE);
        assert_eq!(events[0].arg, 0x1234_5678_9abc_def0);
        assert_eq!(events[1].code, event::BOOT_COMPLETE);
        assert_eq!(events[1].arg, 0, "argument clears after an event");
        assert!(
            before <= events[0].monotonic_ns && events[0].monotonic_ns <= events[1].monotonic_ns
        );
        assert!(events[1].monotonic_ns <= after);
        assert_eq!(read_u64(&mut dev, REG_ARG), 0);
    }

    #[test]
    fn argument_written_in_halves_and_narrow_event_writes() {
        let (mut dev, events) = device();
        dev.write(REG_ARG, &0xdead_beefu32.to_le_bytes());
        dev.write(REG_ARG + 4, &0x0bad_cafeu32.to_le_bytes());
        assert_eq!(read_u32(&mut dev, REG_ARG + 4), 0x0bad_cafe);
        dev.write(REG_EVENT, &[0x01, 0x01]); // u16 write: code 0x101
        let e = events.lock().unwrap()[0];
        assert_eq!((e.code, e.arg), (0x101, 0x0bad_cafe_dead_beef));
        assert_eq!(event_name(e.code), "custom_0x101");
    }

    #[test]
    fn clock_reads_are_monotonic_and_latched_for_split_reads() {
        let (mut dev, _) = device();
        let host = monotonic_ns();
        assert_eq!(read_u64(&mut dev, REG_GENERATION_LO), 0);
        dev.set_generation(0x0102_0304_0506_0708_1112_1314_1516_1718);
        assert_eq!(read_u64(&mut dev, REG_GENERATION_LO), 0x1112_1314_1516_1718);
        assert_eq!(read_u64(&mut dev, REG_GENERATION_HI), 0x0102_0304_0506_0708);
        let t1 = read_u64(&mut dev, REG_CLOCK);
        let t2 = read_u64(&mut dev, REG_CLOCK);
        assert!(host <= t1 && t1 <= t2);

        let lo = read_u32(&mut dev, REG_CLOCK);
        let latched = dev.clock_latch;
        std::thread::sleep(std::time::Duration::from_millis(2));
        let hi = read_u32(&mut dev, REG_CLOCK + 4);
        assert_eq!((u64::from(hi) << 32) | u64::from(lo), latched);
        assert!(latched >= t2);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut dev, events) = device();
        let mut big = [0xffu8; 16];
        dev.read(0x1c, &mut big);
        assert_eq!(&big[4..], &[0u8; 12]);
        dev.read(u64::MAX, &mut big);
        assert_eq!(big, [0u8; 16]);
        dev.read(0, &mut []);
        dev.write(u64::MAX - 1, &[1, 2, 3, 4]);
        dev.write(REG_MAGIC, &[0; 8]);
        dev.write(REG_EVENT + 1, &[1]);
        dev.write(REG_CLOCK, &[1; 8]);
        dev.write(0xfff, &[1]);
        assert!(events.lock().unwrap().is_empty());
        dev.write(REG_EVENT, &[]);
        assert!(events.lock().unwrap().is_empty());
        assert_eq!(read_u32(&mut dev, REG_MAGIC), MAGIC);
    }

    #[test]
    fn names() {
        assert_eq!(event_name(event::BOOT_COMPLETE), "boot_complete");
        assert_eq!(event_name(event::WORKLOAD_DONE), "workload_done");
        assert_eq!(event_name(7), "unknown_0x7");
    }
}
