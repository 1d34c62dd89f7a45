//! ACPI hardware-reduced sleep registers (ACPI 6.5, 4.8.3.7-8), through which a guest powers off.
//!
//! Two 8-bit ports: offset 0 is SLEEP_CONTROL_REG (0x3c0), offset 1 SLEEP_STATUS_REG (0x3c1). To enter
//! S5 the guest writes `(SLP_TYP << 2) | SLP_EN` to sleep control, SLP_TYP being the `\_S5_` value of our
//! DSDT ([`S5_SLP_TYP`]). Other sleep states are not supported: logged and ignored, the guest resumes.
//! Sleep status reads 0 (WAK_STS clear); there is no reset register here (reset goes through the i8042).

use crate::exit::{ExitNotifier, ExitReason};
use crate::warn_ratelimited;

pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// SLP_EN, bit 5 of SLEEP_CONTROL_REG.
pub const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// Must match `\_S5_` in the DSDT and `layout::S5_SLP_TYP`.
pub const S5_SLP_TYP: u8 = 5;

pub struct AcpiPmDevice {
    exit: ExitNotifier,
}

impl AcpiPmDevice {
    pub fn new(exit: ExitNotifier) -> Self {
        Self { exit }
    }
}

impl crate::BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        if offset != SLEEP_CONTROL_OFFSET || value & SLP_EN == 0 {
            return;
        }
        match (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK {
            S5_SLP_TYP => {
                log::info!("acpi: guest requested power off (S5)");
                self.exit.notify(ExitReason::PowerOff);
            }
            other => warn_ratelimited!("acpi: ignoring request for unsupported sleep type {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn s5_powers_off() {
        let exit = ExitNotifier::new().unwrap();
        let mut dev = AcpiPmDevice::new(exit.clone());
        dev.write(SLEEP_CONTROL_OFFSET, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn other_writes_are_ignored() {
        let exit = ExitNotifier::new().unwrap();
        let mut dev = AcpiPmDevice::new(exit.clone());
        dev.write(SLEEP_CONTROL_OFFSET, &[S5_SLP_TYP << 2]); // SLP_EN clear
        dev.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]); // S3
        dev.write(SLEEP_STATUS_OFFSET, &[(S5_SLP_TYP << 2) | SLP_EN]);
        dev.write(SLEEP_CONTROL_OFFSET, &[]);
        dev.write(7, &[0xff]);
        assert_eq!(exit.reason(), None);
        assert!(exit.eventfd().read().is_err());
        let mut status = [0xffu8; 2];
        dev.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [0, 0]);
    }
}
