//! Power off: ACPI S5 through the FADT's SLEEP_CONTROL_REG (hardware-reduced ACPI 5+), else an i8042
//! reset. Neither returns on a working VMM; if both are ignored the guest spins (`hlt` faults at CPL3).

use crate::acpi::{self, AddressSpace};
use crate::boot;
use crate::bootinfo::Identity;
use crate::global::Global;
use crate::protocol::*;
use crate::serial::println;

/// boot_params.acpi_rsdp_addr, saved at start so power-off works from any path (including faults).
pub static RSDP_HINT: Global<u64> = Global::new(0);

/// `trenv.exit=reset` on the command line: end with an i8042 reset instead of S5, so that the VMM's reset
/// path is exercised too.
pub static RESET_INSTEAD: Global<bool> = Global::new(false);

fn acpi_s5() -> Result<bool, acpi::AcpiError> {
    let mem = &Identity;
    let rsdp = acpi::find_rsdp(mem, RSDP_HINT.get())?;
    let fadt = acpi::find_table(mem, &rsdp, b"FACP")?;
    let Some(reg) = acpi::fadt_sleep_control(mem, fadt)? else {
        return Ok(false);
    };
    match reg.space {
        AddressSpace::SystemIo => match u16::try_from(reg.address) {
            Ok(port) => boot::out_sized(port, u32::from(SLEEP_CONTROL_S5), reg.width),
            Err(_) => return Ok(false),
        },
        AddressSpace::SystemMemory => {
            if Identity::slice(reg.address, 1).is_none() {
                return Ok(false);
            }
            // SAFETY: an MMIO register below 4 GiB named by the FADT.
            unsafe { (reg.address as *mut u8).write_volatile(SLEEP_CONTROL_S5) };
        }
    }
    Ok(true)
}

pub fn power_off() -> ! {
    if RESET_INSTEAD.get() {
        boot::outb(I8042_COMMAND_PORT, I8042_CMD_RESET);
    }
    match acpi_s5() {
        Ok(true) => {
            // The VMM may act on the write asynchronously: give it time before falling back.
            for _ in 0..5_000_000 {
                core::hint::spin_loop();
            }
            println!(
                "power: S5 via the FADT sleep control register had no effect, trying i8042 reset"
            );
        }
        Ok(false) => {}
        Err(e) => println!("power: no ACPI power-off ({e}), trying i8042 reset"),
    }
    boot::outb(I8042_COMMAND_PORT, I8042_CMD_RESET);
    loop {
        core::hint::spin_loop();
    }
}
