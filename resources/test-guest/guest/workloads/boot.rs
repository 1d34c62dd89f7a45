//! `boot`: reports what the VMM handed over (command line, e820 map, ACPI CPUs) in Linux's formats, so
//! host tests can check the boot protocol end to end.

use super::Context;
use crate::acpi;
use crate::bootinfo::Identity;
use crate::cmdline::Tokens;
use crate::e820;
use crate::protocol::*;
use crate::serial::println;

/// Ok(number of enabled CPUs in the MADT).
pub fn run(ctx: &Context<'_>, _params: Tokens<'_>) -> Result<u64, u64> {
    println!("cmdline: {}", ctx.cmdline);
    for entry in ctx.e820.entries() {
        println!("e820: {entry}");
    }
    let image = crate::image_range();
    if !ctx.e820.is_usable(image.0, image.1) {
        println!(
            "boot: error: the guest image [{:#x}, {:#x}) is not in usable e820 RAM",
            image.0, image.1
        );
        return Err(FAIL_BOOT_PARAMS);
    }
    if !ctx
        .e820
        .entries()
        .iter()
        .any(|e| e.kind == e820::E820_USABLE && e.addr == 0)
    {
        println!("boot: error: no usable e820 entry at address 0");
        return Err(FAIL_BOOT_PARAMS);
    }
    let cpus = acpi_report(ctx).map_err(|e| {
        println!("acpi: error: {e}");
        FAIL_ACPI
    })?;
    if cpus == 0 {
        println!("boot: error: the MADT lists no enabled CPU");
        return Err(FAIL_ACPI);
    }
    println!("boot: ok");
    Ok(u64::from(cpus))
}

fn acpi_report(ctx: &Context<'_>) -> Result<u32, acpi::AcpiError> {
    let mem = &Identity;
    let rsdp = acpi::find_rsdp(mem, ctx.info.rsdp_hint())?;
    let mut tables = [[b' '; 4]; 16];
    let mut n = 0;
    acpi::for_each_table(mem, &rsdp, &mut |_, sig| {
        if let Some(slot) = tables.get_mut(n) {
            *slot = sig;
        }
        n += 1;
    })?;
    let root = if rsdp.revision >= 2 {
        ("XSDT", rsdp.xsdt)
    } else {
        ("RSDT", u64::from(rsdp.rsdt))
    };
    println!(
        "acpi: RSDP {:#x} rev {} {} {:#x}, {} tables:{}",
        rsdp.addr,
        rsdp.revision,
        root.0,
        root.1,
        n,
        Sigs(&tables[..n.min(16)])
    );
    let madt = acpi::find_table(mem, &rsdp, b"APIC")?;
    let cpus = acpi::madt_enabled_cpus(mem, madt)?;
    println!("acpi: {cpus} cpus in MADT");
    Ok(cpus)
}

/// " FACP APIC ..." for a list of signatures.
struct Sigs<'a>(&'a [[u8; 4]]);

impl core::fmt::Display for Sigs<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for sig in self.0 {
            f.write_str(" ")?;
            f.write_str(core::str::from_utf8(sig).unwrap_or("????"))?;
        }
        Ok(())
    }
}
