//! ACPI tables for a hardware-reduced x86_64 platform: RSDP, XSDT, FADT, MADT, MCFG and DSDT, written to
//! the BIOS area [RSDP_START, ACPI_AREA_END) (reserved in the e820 map).
//!
//! PCI: one segment whose ECAM window (`layout::PCI_ECAM_*`) the MCFG describes, and a PCI Express root
//! bridge `\_SB_.PCI0` in the DSDT whose _CRS gives bus 0, the 0xCF8 config ports and the 32-bit BAR
//! window `layout::PCI_MMIO32_*`.
//!
//! PCI hotplug (ACPI, driven by Linux's acpiphp): `\_SB_.PCI0` has one device `SLxx` per slot 1..=31 with
//! `_ADR`, `_SUN` and `_EJ0`, the hotplug controller's registers as the region `PHPR`
//! (`layout::PCI_HOTPLUG_START`, see `devices::pci::hotplug`), and `PSCN`, which reads the added and to-eject
//! slot bitmaps and notifies each slot Device Check (1) or Eject Request (3). `\_SB_.GED0`, a Generic Event
//! Device (ACPI0013) on GSI `layout::GED_IRQ`, runs `PSCN` from its `_EVT` whenever the VMM raises that
//! interrupt. `_OSC` grants the OS every PCIe feature it asks for but native (PCIe/SHPC) hotplug, which
//! stays with ACPI.
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
// The hotplug controller's registers, which the AML reads and writes.
use devices::pci::hotplug::{
    REGS_LEN as HOTPLUG_REGS_LEN, REG_EJECT, REG_SLOTS_ADDED, REG_SLOTS_TO_EJECT,
};
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
/// Hotplug slots: every device number of bus 0 but the host bridge's.
const PCI_HOTPLUG_SLOTS: std::ops::RangeInclusive<u8> = 1..=31;
/// Notify values for a slot (ACPI 6.5, table 5.166).
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;
/// The PCI Host Bridge _OSC UUID (PCI Firmware 3.3, 4.5.1).
const PCI_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// _OSC control bits the platform keeps: native PCIe hotplug and SHPC hotplug (ACPI hotplug is in charge).
const OSC_CONTROL_KEPT: u32 = 0b11;
/// _OSC status bits in the first dword.
const OSC_UNRECOGNIZED_UUID: u32 = 1 << 2;
const OSC_UNRECOGNIZED_REVISION: u32 = 1 << 3;
const OSC_CAPABILITIES_MASKED: u32 = 1 << 4;

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

/// AML already encoded, as a child of a `Device` or `Method`.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: \_S5_, and under \_SB_ one processor device per possible vCPU, COM1, the PCI root bridge
/// with its hotplug slots, the Generic Event Device and the VM generation ID.
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
    generic_event_device(&mut sb);
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
    let osc = Raw(pci_osc());
    let hotplug = Raw(pci_hotplug());
    aml::Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &seg, &uid, &bbn, &crs, &osc, &hotplug],
    )
    .to_aml_bytes(sink);
}

/// `_OSC` of the root bridge: grants what the OS asks for but native hotplug control, and says so
/// (capabilities masked) when it took bits away; other UUIDs and revisions are refused as the spec says.
fn pci_osc() -> Vec<u8> {
    let cdw1 = aml::Path::new("CDW1");
    let cdw3 = aml::Path::new("CDW3");
    let arg3 = aml::Arg(3);
    let create_cdw1 = aml::CreateDWordField::new(&cdw1, &arg3, &0u8);
    let create_cdw3 = aml::CreateDWordField::new(&cdw3, &arg3, &8u8);
    let requested = aml::Local(0);
    let save = aml::Store::new(&requested, &cdw3);
    let granted_mask = !OSC_CONTROL_KEPT;
    let grant = aml::And::new(&cdw3, &requested, &granted_mask);
    let changed = aml::NotEqual::new(&requested, &cdw3);
    let masked = aml::Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let if_masked = aml::If::new(&changed, vec![&masked]);
    let bad_revision = aml::NotEqual::new(&aml::Arg(1), &aml::ONE);
    let revision_flag = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let if_bad_revision = aml::If::new(&bad_revision, vec![&revision_flag]);
    let uuid = aml::Uuid::new(PCI_OSC_UUID);
    let is_pci = aml::Equal::new(&aml::Arg(0), &uuid);
    let if_pci = aml::If::new(
        &is_pci,
        vec![&create_cdw3, &save, &grant, &if_masked, &if_bad_revision],
    );
    let uuid_flag = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let else_other = aml::Else::new(vec![&uuid_flag]);
    let ret = aml::Return::new(&arg3);
    to_bytes(&aml::Method::new(
        "_OSC".into(),
        4,
        false,
        vec![&create_cdw1, &if_pci, &else_other, &ret],
    ))
}

/// The ACPI name of the device for PCI slot `slot`.
fn slot_name(slot: u8) -> String {
    format!("SL{slot:02X}")
}

/// The hotplug objects inside `\_SB_.PCI0`: the controller's registers, the eject helper, the scan method
/// and one device per hotplug slot.
fn pci_hotplug() -> Vec<u8> {
    let mut out = Vec::new();
    let base = layout::PCI_HOTPLUG_START;
    let len = HOTPLUG_REGS_LEN as u32;
    // The field list below assumes this register order.
    const _: () =
        assert!(REG_SLOTS_TO_EJECT == REG_SLOTS_ADDED + 4 && REG_EJECT == REG_SLOTS_ADDED + 8);
    aml::OpRegion::new("PHPR".into(), aml::OpRegionSpace::SystemMemory, &base, &len)
        .to_aml_bytes(&mut out);
    aml::Field::new(
        "PHPR".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![
            // Magic and version, which the AML does not need.
            aml::FieldEntry::Reserved(REG_SLOTS_ADDED as usize * 8),
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    )
    .to_aml_bytes(&mut out);
    // One scan or eject at a time: PCIU/PCID clear when read.
    aml::Mutex::new("BLCK".into(), 0).to_aml_bytes(&mut out);

    // PCEJ(slot): tell the controller the OS has let go of the slot's device.
    let lock = aml::Acquire::new("BLCK".into(), 0xffff);
    let unlock = aml::Release::new("BLCK".into());
    let bit = aml::ShiftLeft::new(&aml::ZERO, &aml::ONE, &aml::Arg(0));
    let eject_reg = aml::Path::new("B0EJ");
    let eject = aml::Store::new(&eject_reg, &bit);
    aml::Method::new("PCEJ".into(), 1, false, vec![&lock, &eject, &unlock]).to_aml_bytes(&mut out);

    // DVNT(slots, value): Notify(SLxx, value) for every slot whose bit is set.
    let mut notifies = Vec::new();
    for slot in PCI_HOTPLUG_SLOTS {
        let mask = 1u32 << slot;
        let set = aml::And::new(&aml::ZERO, &aml::Arg(0), &mask);
        let target = aml::Path::new(&slot_name(slot));
        let notify = aml::Notify::new(&target, &aml::Arg(1));
        aml::If::new(&set, vec![&notify]).to_aml_bytes(&mut notifies);
    }
    let body = Raw(notifies);
    aml::Method::new("DVNT".into(), 2, false, vec![&body]).to_aml_bytes(&mut out);

    // PSCN: read (and so clear) both bitmaps under the lock, then notify.
    let added = aml::Local(0);
    let to_eject = aml::Local(1);
    let (added_reg, to_eject_reg) = (aml::Path::new("PCIU"), aml::Path::new("PCID"));
    let read_added = aml::Store::new(&added, &added_reg);
    let read_to_eject = aml::Store::new(&to_eject, &to_eject_reg);
    let check = aml::MethodCall::new("DVNT".into(), vec![&added, &NOTIFY_DEVICE_CHECK]);
    let eject_request = aml::MethodCall::new("DVNT".into(), vec![&to_eject, &NOTIFY_EJECT_REQUEST]);
    aml::Method::new(
        "PSCN".into(),
        0,
        true,
        vec![
            &lock,
            &read_added,
            &read_to_eject,
            &unlock,
            &check,
            &eject_request,
        ],
    )
    .to_aml_bytes(&mut out);

    for slot in PCI_HOTPLUG_SLOTS {
        let adr = aml::Name::new("_ADR".into(), &(u32::from(slot) << 16));
        let sun = aml::Name::new("_SUN".into(), &slot);
        let call = aml::MethodCall::new("\\_SB_.PCI0.PCEJ".into(), vec![&slot]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&call]);
        aml::Device::new(slot_name(slot).as_str().into(), vec![&adr, &sun, &ej0])
            .to_aml_bytes(&mut out);
    }
    out
}

/// `\_SB_.GED0`: the Generic Event Device whose interrupt the VMM raises for PCI hotplug events; its
/// `_EVT` runs the PCI slot scan.
fn generic_event_device(sink: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    // Edge triggered, active high, exclusive: the VMM pulses the line once per event.
    let irq = aml::Interrupt::new(true, true, false, false, layout::GED_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let scan = aml::MethodCall::new("\\_SB_.PCI0.PSCN".into(), vec![]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&scan]);
    aml::Device::new("GED0".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(sink);
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
    fn dsdt_has_the_pci_hotplug_objects() {
        let dsdt = build_dsdt(&AcpiConfig {
            vcpu_count: 1,
            max_vcpus: 1,
        });
        for name in [
            "PHPR", "PCIU", "PCID", "B0EJ", "BLCK", "PCEJ", "DVNT", "PSCN", "_OSC",
        ] {
            assert!(contains(&dsdt, name.as_bytes()), "{name}");
        }
        for slot in 1..=31u8 {
            assert!(contains(&dsdt, slot_name(slot).as_bytes()), "slot {slot}");
        }
        assert!(!contains(&dsdt, b"SL00") && !contains(&dsdt, b"SL20"));
        // OperationRegion (PHPR, SystemMemory, 0xFE003000, 0x18).
        let region = [
            &[0x5b, 0x80][..],
            b"PHPR",
            &[0, 0x0c],
            &0xfe00_3000u32.to_le_bytes(),
            &[0x0a, 0x18],
        ]
        .concat();
        assert!(contains(&dsdt, &region));
        // The GED: ACPI0013 with an ExtendedIRQ descriptor for GSI 5 (consumer, edge, active high) and _EVT.
        assert!(
            contains(&dsdt, b"GED0") && contains(&dsdt, b"ACPI0013\0") && contains(&dsdt, b"_EVT")
        );
        assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 5, 0, 0, 0]));
        // Slot 0x1f: Name (_ADR, 0x001F0000), Name (_SUN, 0x1F).
        assert!(contains(
            &dsdt,
            &[&b"_ADR"[..], &[0x0c], &0x001f_0000u32.to_le_bytes()].concat()
        ));
        assert!(contains(&dsdt, &[&b"_SUN"[..], &[0x0a, 0x1f]].concat()));
        // The _OSC UUID as ToUUID lays it out.
        let uuid = [
            0x5b, 0x4d, 0xdb, 0x33, 0xf7, 0x1f, 0x1c, 0x40, 0x96, 0x57, 0x74, 0x41, 0xc0, 0x3d,
            0xd7, 0x66,
        ];
        assert!(contains(&dsdt, &uuid));
    }

    /// Runs `program` with `args` in `dir`; None when the program is not installed.
    fn run_tool(dir: &std::path::Path, program: &str, args: &[&str]) -> Option<(bool, String)> {
        let output = std::process::Command::new(program)
            .args(args)
            .current_dir(dir)
            .output()
            .ok()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Some((output.status.success(), text))
    }

    /// ACPICA's own tools (Debian's acpica-tools) judge the DSDT: `iasl -d` disassembles it and names the
    /// hotplug objects, the disassembly compiles back, and `acpiexec` runs the GED's event method (with
    /// the controller's registers filled so that slots are both added and to eject), a slot's _EJ0 and
    /// _OSC. Without the tools it says so loudly and passes.
    #[test]
    fn dsdt_passes_acpica_tools() {
        let dir = std::env::temp_dir().join(format!("trenv-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dsdt = build_dsdt(&AcpiConfig {
            vcpu_count: 1,
            max_vcpus: 2,
        });
        std::fs::write(dir.join("dsdt.aml"), &dsdt).unwrap();
        let Some((ok, out)) = run_tool(&dir, "iasl", &["-d", "dsdt.aml"]) else {
            eprintln!(
                "\n!!! SKIPPED dsdt_passes_acpica_tools: iasl is not installed \
                 (apt-get install acpica-tools) !!!\n"
            );
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        assert!(ok, "iasl -d failed:\n{out}");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for expected in [
            "Device (GED0)",
            "Name (_HID, \"ACPI0013\" /* Generic Event Device */)",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
            "0x00000005,",
            "Method (_EVT, 1, Serialized)",
            "\\_SB.PCI0.PSCN ()",
            "OperationRegion (PHPR, SystemMemory, 0xFE003000, 0x18)",
            "Field (PHPR, DWordAcc, NoLock, Preserve)",
            "PCIU,   32,",
            "B0EJ,   32",
            "Method (PSCN, 0, Serialized)",
            "DVNT (Local0, One)",
            "DVNT (Local1, 0x03)",
            "Notify (SL1F, Arg1)",
            "Device (SL1F)",
            "Name (_ADR, 0x001F0000)",
            "Name (_SUN, 0x1F)",
            "\\_SB.PCI0.PCEJ (0x1F)",
            "B0EJ = (One << Arg0)",
            "Method (_OSC, 4, NotSerialized)",
        ] {
            assert!(
                dsl.contains(expected),
                "no `{expected}` in the disassembly:\n{dsl}"
            );
        }
        // Compiling the disassembly back resolves every name the methods use. Error 6035 is iasl's view of
        // VMGenID's string _HID "VMGENCTR", which Linux's vmgenid driver matches on.
        let (ok, out) = run_tool(
            &dir,
            "iasl",
            &["-vs", "-vw", "6035", "-p", "back", "dsdt.dsl"],
        )
        .expect("iasl ran once");
        assert!(
            ok && out.contains("0 Errors, 0 Warnings"),
            "the disassembly does not compile back:\n{out}"
        );

        let Some((ok, out)) = run_tool(
            &dir,
            "acpiexec",
            &[
                "-r",
                "-fv",
                "0x06",
                "-b",
                "execute \\_SB.GED0._EVT 5",
                "dsdt.aml",
            ],
        ) else {
            eprintln!(
                "\n!!! dsdt_passes_acpica_tools: acpiexec is not installed: AML not executed !!!\n"
            );
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        assert!(
            ok && !out.contains("ACPI Error") && !out.contains("AE_"),
            "{out}"
        );
        // Every register reads 0x06060606: slots 1, 2, 9, 10, 17, 18, 25 and 26 get both notifications.
        for slot in [1u8, 2, 9, 10, 17, 18, 25, 26] {
            for value in ["0x01 (Device Check)", "0x03 (Eject Request)"] {
                let line = format!("Notify on [{}] ", slot_name(slot));
                assert!(
                    out.lines().any(|l| l.contains(&line) && l.ends_with(value)),
                    "no {value} for slot {slot}:\n{out}"
                );
            }
        }
        assert_eq!(out.matches("Received a System Notify").count(), 16, "{out}");

        let osc = |uuid: &str, revision: u8| {
            format!(
                "execute \\_SB.PCI0._OSC ({uuid}) {revision} 3 (01 00 00 00 1f 00 00 00 1f 00 00 00)"
            )
        };
        let pci_uuid = "5b 4d db 33 f7 1f 1c 40 96 57 74 41 c0 3d d7 66";
        let batch = [
            "execute \\_SB.PCI0.SL03._EJ0 0".to_string(),
            "evaluate \\_SB.PCI0.B0EJ".to_string(),
            osc(pci_uuid, 1),
            osc("00 11 22 33 44 55 66 77 88 99 aa bb cc dd ee ff", 1),
            osc(pci_uuid, 2),
        ]
        .join("; ");
        let (ok, out) = run_tool(&dir, "acpiexec", &["-r", "-b", &batch, "dsdt.aml"]).unwrap();
        assert!(
            ok && !out.contains("ACPI Error") && !out.contains("AE_"),
            "{out}"
        );
        // _EJ0 of slot 3 writes bit 3 to the eject register.
        assert!(out.contains("[Integer] = 0000000000000008"), "{out}");
        // _OSC: native PCIe and SHPC hotplug (bits 0, 1) withheld, the rest granted, "masked" reported;
        // an unknown UUID and an unknown revision are flagged.
        for reply in [
            "11 00 00 00 1F 00 00 00 1C 00 00 00",
            "05 00 00 00 1F 00 00 00 1F 00 00 00",
            "19 00 00 00 1F 00 00 00 1C 00 00 00",
        ] {
            assert!(out.contains(reply), "no _OSC reply {reply}:\n{out}");
        }
        let _ = std::fs::remove_dir_all(&dir);
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
