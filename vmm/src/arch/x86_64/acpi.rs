//! ACPI tables for a hardware-reduced x86_64 platform: RSDP, XSDT, FADT, MADT, MCFG and DSDT, written to
//! the BIOS area [RSDP_START, ACPI_AREA_END) (reserved in the e820 map).
//!
//! PCI: one segment whose ECAM window (`layout::PCI_ECAM_*`) the MCFG describes, and a PCI Express root
//! bridge `\_SB_.PCI0` in the DSDT whose _CRS gives bus 0, the 0xCF8 config ports and the 32-bit BAR
//! window `layout::PCI_MMIO32_*`.
//!
//! The platform has no PIC, PIT, RTC or VGA; the IOAPIC is emulated by the VMM (split irqchip).
//! Power off goes through the FADT sleep control register (a SystemIO port) with \_S5_'s SLP_TYP,
//! reset through the FADT reset register (i8042 port 0x64, value 0xFE).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

pub const OEM_ID: [u8; 6] = *b"TRENV ";
pub const OEM_TABLE_ID: [u8; 8] = *b"TRENVVMM";
pub const OEM_REVISION: u32 = 1;

/// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11).
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// Value written to the reset register: the i8042 "pulse reset line" command.
const RESET_VALUE: u8 = 0xfe;
const RESET_PORT: u64 = layout::I8042_PORT + 4;
/// MADT interrupt controller structure types.
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// Processor UID meaning "all processors" in a LAPIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;
const MADT_HEADER_LEN: u32 = 44;
const MADT_REVISION: u8 = 5;
const DSDT_REVISION: u8 = 6;
const TABLE_ALIGN: u64 = 16;
/// Configuration mechanism #1 ports, claimed by the root bridge.
const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
const PCI_CONFIG_IO_LEN: u8 = 8;
/// Buses behind the root bridge: only bus 0 exists, so the guest scans no more.
const PCI_LAST_BUS: u16 = 0;

/// What the ACPI tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig {
    /// vCPUs enabled at boot (the first `vcpu_count` ids).
    pub vcpu_count: u8,
    /// vCPUs the MADT and DSDT describe, for later hotplug.
    pub max_vcpus: u8,
}

/// Errors from building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error(
        "invalid vCPU counts: {vcpu_count} boot vCPUs, {max_vcpus} max (need 1 <= boot <= max)"
    )]
    InvalidVcpuCount { vcpu_count: u8, max_vcpus: u8 },
    #[error("the ACPI tables end at {end:#x}, past the ACPI area end {limit:#x}")]
    TooLarge { end: u64, limit: u64 },
    #[error("cannot write the {0} table to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: \_S5_, and under \_SB_ one processor device per possible vCPU plus COM1.
pub fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();

    // \_S5_: SLP_TYPa, SLP_TYPb, reserved, reserved.
    let s5_typ = layout::S5_SLP_TYP;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_typ, &s5_typ, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let mut sb = Vec::new();
    for cpu in 0..cfg.max_vcpus {
        let uid = u32::from(cpu);
        let present: u8 = if cpu < cfg.vcpu_count { 0xf } else { 0 };
        let hid = aml::Name::new("_HID".into(), &"ACPI0007");
        let uid = aml::Name::new("_UID".into(), &uid);
        let ret = aml::Return::new(&present);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&ret]);
        let name = format!("C{cpu:03X}");
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &sta]).to_aml_bytes(&mut sb);
    }

    let port = layout::SERIAL_PORT as u16;
    let io = aml::IO::new(port, port, 1, layout::SERIAL_PORT_SIZE as u8);
    // Edge triggered, active high, exclusive: an ISA IRQ.
    let irq = aml::Interrupt::new(true, true, false, false, layout::SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &0u8);
    let crs = aml::Name::new("_CRS".into(), &com1_crs);
    aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut sb);

    pci_root_bridge(&mut sb);
    vm_generation_id(&mut sb);

    body.extend(aml::Scope::raw("_SB_".into(), sb));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// `\_SB_.VGEN`: the VM generation ID device (Microsoft's VMGenID, which Linux's vmgenid driver binds to
/// by its `VMGENCTR` id): `ADDR` names the guest-physical address of the 16-byte ID, which the VMM changes
/// whenever the VM is restored from a template, so that a clone reseeds its RNG.
fn vm_generation_id(sink: &mut Vec<u8>) {
    let addr_lo = (layout::VMGENID_START & 0xffff_ffff) as u32;
    let addr_hi = (layout::VMGENID_START >> 32) as u32;
    let hid = aml::Name::new("_HID".into(), &"VMGENCTR");
    let cid = aml::Name::new("_CID".into(), &"VM_Gen_Counter");
    let ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
    let addr = aml::Name::new("ADDR".into(), &aml::Package::new(vec![&addr_lo, &addr_hi]));
    aml::Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]).to_aml_bytes(sink);
}

/// `\_SB_.PCI0`: a PCI Express root bridge (PNP0A08, compatible with PNP0A03) for segment 0, bus 0.
fn pci_root_bridge(sink: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let buses = aml::AddressSpace::new_bus_number(0u16, PCI_LAST_BUS);
    let config_io = aml::IO::new(PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT, 1, PCI_CONFIG_IO_LEN);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let resources = aml::ResourceTemplate::new(vec![&buses, &config_io, &mmio32]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    aml::Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    )
    .to_aml_bytes(sink);
}

/// The MCFG: the ECAM window of segment 0, one MiB per bus.
pub fn build_mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let last_bus = ((layout::PCI_ECAM_SIZE >> 20) - 1) as u8;
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, last_bus);
    to_bytes(&mcfg)
}

fn system_io_byte(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// The FADT of a hardware-reduced platform pointing at the DSDT.
pub fn build_fadt(dsdt: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt.0);
    fadt.sci_int = (layout::SCI_IRQ as u16).into();
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.reset_reg = system_io_byte(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = system_io_byte(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = system_io_byte(layout::ACPI_SLEEP_STATUS_PORT);
    to_bytes(&fadt.finalize())
}

/// The MADT: LAPIC address, one Local APIC per possible vCPU (APIC id = UID = index, the first
/// `vcpu_count` enabled, the rest online-capable), the IOAPIC, and LINT1 as NMI on every CPU.
/// No PCAT_COMPAT flag: there is no 8259 PIC.
pub fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, layout::APIC_START as u32);
    madt.write_u32(40, 0);
    for cpu in 0..cfg.max_vcpus {
        let status = if cpu < cfg.vcpu_count {
            EnabledStatus::Enabled
        } else {
            EnabledStatus::DisabledOnlineCapable
        };
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(cpu, cpu, status)));
    }
    madt.append_slice(&to_bytes(&IoApic::new(0, layout::IOAPIC_START as u32, 0)));
    // Local APIC NMI: type, length, processor UID, flags (conforms to bus), LINT#.
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    madt.as_slice().to_vec()
}

fn align_up(addr: u64) -> u64 {
    (addr + TABLE_ALIGN - 1) & !(TABLE_ALIGN - 1)
}

/// Builds all tables and writes them from RSDP_START: RSDP, DSDT, FADT, MADT, XSDT. Returns the
/// RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if cfg.vcpu_count == 0 || cfg.vcpu_count > cfg.max_vcpus {
        return Err(AcpiError::InvalidVcpuCount {
            vcpu_count: cfg.vcpu_count,
            max_vcpus: cfg.max_vcpus,
        });
    }
    let rsdp_addr = GuestAddress(layout::RSDP_START);
    let dsdt_addr = align_up(layout::RSDP_START + Rsdp::len() as u64);
    let dsdt = build_dsdt(cfg);
    let fadt_addr = align_up(dsdt_addr + dsdt.len() as u64);
    let fadt = build_fadt(GuestAddress(dsdt_addr));
    let madt_addr = align_up(fadt_addr + fadt.len() as u64);
    let madt = build_madt(cfg);
    let mcfg_addr = align_up(madt_addr + madt.len() as u64);
    let mcfg = build_mcfg();
    let xsdt_addr = align_up(mcfg_addr + mcfg.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = to_bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::ACPI_AREA_END {
        return Err(AcpiError::TooLarge {
            end,
            limit: layout::ACPI_AREA_END,
        });
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (name, addr, bytes) in [
        ("RSDP", rsdp_addr.0, &rsdp),
        ("DSDT", dsdt_addr, &dsdt),
        ("FADT", fadt_addr, &fadt),
        ("MADT", madt_addr, &madt),
        ("MCFG", mcfg_addr, &mcfg),
        ("XSDT", xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::Write(name, e))?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a table at `addr`, checks its signature, bounds and checksum, and returns it.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let head = read(mem, addr, 36);
        assert_eq!(&head[..4], sig);
        let len = u32_at(&head, 4) as usize;
        assert!(len >= 36);
        assert!(addr + len as u64 <= layout::ACPI_AREA_END);
        assert!(addr >= layout::RSDP_START);
        let t = read(mem, addr, len);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    /// MADT structures as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2 && off + len <= madt.len());
            out.push((ty, madt[off..off + len].to_vec()));
            off += len;
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn tables_read_back() {
        let mem = guest_mem();
        let cfg = AcpiConfig {
            vcpu_count: 2,
            max_vcpus: 4,
        };
        let rsdp_addr = create_acpi_tables(&mem, &cfg).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(layout::RSDP_START));

        let rsdp = read(&mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(u32_at(&rsdp, 20), 36);

        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 24);
        let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");
        let mcfg = table(&mem, u64_at(&xsdt, 52), b"MCFG");

        // MCFG: one allocation, ECAM base, segment 0, buses 0..=255.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(&mcfg, 44), layout::PCI_ECAM_START);
        assert_eq!(u16::from_le_bytes([mcfg[52], mcfg[53]]), 0);
        assert_eq!((mcfg[54], mcfg[55]), (0, 255));

        // FADT: flags, reset and sleep registers, X_DSDT.
        assert_eq!(fadt.len(), 276);
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1], "reset reg: SystemIO, 8 bit");
        assert_eq!(u64_at(&fadt, 120), 0x64);
        assert_eq!(fadt[128], 0xfe);
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 248), 0x3c0, "sleep control");
        assert_eq!(u64_at(&fadt, 260), 0x3c1, "sleep status");
        assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT unused");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc, IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC);
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");

        // MADT: LAPIC address, no PCAT_COMPAT, 4 LAPICs (2 enabled), IOAPIC, LINT1 NMI.
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(&madt, 40), 0);
        let entries = madt_entries(&madt);
        let lapics: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(t, _)| *t == 0)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(lapics.len(), 4);
        for (i, l) in lapics.iter().enumerate() {
            assert_eq!((l[2], l[3]), (i as u8, i as u8), "UID and APIC id");
            let enabled = u32_at(l, 4) & 1;
            assert_eq!(enabled == 1, i < 2);
        }
        let ioapic = &entries.iter().find(|(t, _)| *t == 1).unwrap().1;
        assert_eq!(ioapic[2], 0);
        assert_eq!(u32_at(ioapic, 4), 0xfec0_0000);
        assert_eq!(u32_at(ioapic, 8), 0);
        let nmi = &entries.iter().find(|(t, _)| *t == 4).unwrap().1;
        assert_eq!((nmi[2], nmi[5]), (0xff, 1));

        // DSDT: \_S5_, processor devices, COM1.
        assert!(contains(&dsdt, b"_S5_"));
        assert!(contains(&dsdt, b"ACPI0007\0"));
        assert!(contains(&dsdt, b"C003"));
        assert!(!contains(&dsdt, b"C004"));
        assert!(contains(&dsdt, b"COM1"));
        // EISA id PNP0501 compressed: 0x0105d041 (AML DWord).
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        // ExtendedIRQ descriptor with IRQ 4.
        assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
        // IO descriptor 0x3f8..0x3f8, align 1, length 8.
        assert!(contains(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));

        // PCI root bridge: PNP0A08 (0x080ad041) compatible with PNP0A03 (0x030ad041), its _CRS with
        // bus 0..0, the 0xCF8 ports and the 32-bit window.
        assert!(contains(&dsdt, b"PCI0"));
        assert!(
            contains(&dsdt, b"VGEN") && contains(&dsdt, b"VMGENCTR") && contains(&dsdt, b"ADDR")
        );
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        assert!(contains(&dsdt, b"_SEG"));
        assert!(contains(&dsdt, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        // WordBusNumber: min 0, max 0, length 1.
        assert!(contains(&dsdt, &[0x88, 0x0d, 0, 2]));
        // DWordMemory: 0xc0000000..0xdfffffff.
        let window = [0xc000_0000u32.to_le_bytes(), 0xdfff_ffffu32.to_le_bytes()].concat();
        assert!(contains(&dsdt, &window));
    }

    #[test]
    fn many_vcpus_fit() {
        let mem = guest_mem();
        let cfg = AcpiConfig {
            vcpu_count: 255,
            max_vcpus: 255,
        };
        create_acpi_tables(&mem, &cfg).unwrap();
        let madt = build_madt(&cfg);
        assert_eq!(
            madt_entries(&madt).iter().filter(|(t, _)| *t == 0).count(),
            255
        );
    }

    #[test]
    fn bad_vcpu_counts() {
        let mem = guest_mem();
        for (vcpu_count, max_vcpus) in [(0, 1), (3, 2)] {
            assert!(matches!(
                create_acpi_tables(
                    &mem,
                    &AcpiConfig {
                        vcpu_count,
                        max_vcpus
                    }
                ),
                Err(AcpiError::InvalidVcpuCount { .. })
            ));
        }
    }
}
