//! `pci`: lists the functions on PCI bus 0 found through ECAM, one line each, so host tests can check the
//! VMM's PCI root (slots, IDs, classes) as a guest sees it.

use super::Context;
use crate::cmdline::Tokens;
use crate::pci;
use crate::protocol::*;
use crate::serial::println;
use crate::virtio::mmio::Ecam;

/// Ok(number of functions found).
pub fn run(_ctx: &Context<'_>, _params: Tokens<'_>) -> Result<u64, u64> {
    let mut count = 0u64;
    for (device, function, h) in pci::scan(Ecam::new) {
        println!(
            "pci: 00:{device:02x}.{function} {:04x}:{:04x} class {:06x} {}",
            h.vendor,
            h.device,
            h.class,
            pci::describe(&h)
        );
        count += 1;
    }
    if count == 0 {
        println!(
            "pci: error: no PCI function on bus 0 (no ECAM at {:#x}?)",
            pci::ECAM_BASE
        );
        return Err(FAIL_NO_DEVICE);
    }
    println!("pci: ok");
    Ok(count)
}
