//! The i8042 keyboard controller, reduced to what a VM needs: the CPU reset command.
//!
//! Ports 0x60..0x65: offset 0 is the data port (0x60), offset 4 the command/status port (0x64). Linux's
//! keyboard reboot method waits for the input buffer to drain (status bit 1) and then writes command 0xFE
//! (pulse the reset line), which we turn into [`ExitReason::Reset`]. No keyboard or mouse exists: status
//! reads 0 (nothing to read, ready for input), every other read is 0 and other writes are ignored.

use crate::exit::{ExitNotifier, ExitReason};

pub const DATA_OFFSET: u64 = 0;
pub const COMMAND_OFFSET: u64 = 4;
pub const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042Device {
    exit: ExitNotifier,
}

impl I8042Device {
    pub fn new(exit: ExitNotifier) -> Self {
        Self { exit }
    }
}

impl crate::BusDevice for I8042Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("i8042: guest requested a CPU reset");
            self.exit.notify(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn reset_command_requests_reset() {
        let exit = ExitNotifier::new().unwrap();
        let mut dev = I8042Device::new(exit.clone());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn other_accesses_do_nothing() {
        let exit = ExitNotifier::new().unwrap();
        let mut dev = I8042Device::new(exit.clone());
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xad]);
        dev.write(COMMAND_OFFSET, &[]);
        dev.write(u64::MAX, &[CMD_RESET_CPU]);
        let mut data = [0xffu8; 4];
        dev.read(DATA_OFFSET, &mut data);
        assert_eq!(data, [0; 4]);
        assert_eq!(exit.reason(), None);
        assert!(exit.eventfd().read().is_err());
    }
}
