//! Constants shared by the test guest and the host side (VMM tests): device addresses, signal event codes,
//! failure codes and the int3 service ABI. Pure data, compiled into both the guest and the `test-guest` crate.
//! PROTOCOL.md explains each one.

/// Guest-signal device (MMIO) base address.
pub const SIGNAL_BASE: u64 = 0xfe00_0000;
/// Register offsets of the guest-signal device.
pub const SIGNAL_REG_MAGIC: u64 = 0x00;
pub const SIGNAL_REG_VERSION: u64 = 0x04;
pub const SIGNAL_REG_ARG: u64 = 0x08;
pub const SIGNAL_REG_EVENT: u64 = 0x10;
pub const SIGNAL_REG_CLOCK_NS: u64 = 0x18;
/// VM generation ID (128 bits, low half first): changes on every restore from a template, 0 on a cold boot.
pub const SIGNAL_REG_GENERATION_LO: u64 = 0x20;
pub const SIGNAL_REG_GENERATION_HI: u64 = 0x28;
/// "TRSG" read as a little-endian u32.
/// The guest-idle device: a read of offset 0 blocks (at most ~10 ms) until the VMM has news for the guest.
pub const IDLE_BASE: u64 = 0xfe00_2000;
/// Offset of the idle device's long-wait register (up to ~1 s instead of ~10 ms).
pub const IDLE_LONG_WAIT: u64 = 8;
/// Where a TrEnv VMM keeps the ACPI VMGenID buffer (the DSDT's `\_SB_.VGEN.ADDR` names it; the test guest
/// does not evaluate AML, so it uses the documented address).
pub const VMGENID_ADDR: u64 = 0xf_f000;
pub const SIGNAL_MAGIC: u32 = 0x4753_5254;
pub const SIGNAL_VERSION: u32 = 1;

/// First event at CPL3, argument 0.
pub const SIGNAL_BOOT_COMPLETE: u32 = 1;
/// Console up, command line parsed, workload chosen; argument = workload id.
pub const SIGNAL_READY: u32 = 2;
/// The workload starts; argument = workload id.
pub const SIGNAL_WORKLOAD_START: u32 = 3;
/// The workload succeeded; argument = its result (see PROTOCOL.md: boot -> cpus, touch -> checksum).
pub const SIGNAL_WORKLOAD_DONE: u32 = 4;
/// Something failed; argument = one of the `FAIL_*` codes.
pub const SIGNAL_FAILURE: u32 = 5;
/// First custom event code; workloads number theirs from here.
pub const SIGNAL_CUSTOM_BASE: u32 = 0x100;
/// `touch`: guest-physical base address of the region it is about to write.
pub const SIGNAL_TOUCH_REGION: u32 = 0x100;
/// `serve`: the heap's base address (arg), sent before READY.
pub const SIGNAL_SERVE_HEAP: u32 = 0x101;
/// `serve`: a new generation ID was seen, i.e. the guest runs as a restored instance (arg = low 64 bits of it).
pub const SIGNAL_SERVE_RESTORED: u32 = 0x102;
/// `serve`: the restored instance verified its heap and wrote its private data (arg = heap checksum).
pub const SIGNAL_SERVE_VERIFIED: u32 = 0x103;
/// `pmem`: the first read of the range is done (arg = its checksum).
pub const SIGNAL_PMEM_READ: u32 = 0x110;
/// `pmem`: reads, writes and flush are done, before `hold` (arg = checksum).
pub const SIGNAL_PMEM_DONE: u32 = 0x111;
/// `blkread`: the image is in guest RAM, before `hold` (arg = checksum).
pub const SIGNAL_BLKREAD_DONE: u32 = 0x112;
/// `devstate`: every device is initialised and used; snapshot now (arg = workload id).
pub const SIGNAL_DEVSTATE_READY: u32 = 0x120;
/// `devstate`: a restored copy used its devices without re-initialising them (arg = low 64 bits of the
/// generation ID).
pub const SIGNAL_DEVSTATE_RESTORED: u32 = 0x121;
/// `devstate`: a device check after a closed connection passed (arg = checks so far).
pub const SIGNAL_DEVSTATE_CHECKED: u32 = 0x122;

/// Workload ids (the argument of READY / WORKLOAD_START).
pub const WORKLOAD_ID_BOOT: u64 = 1;
pub const WORKLOAD_ID_TOUCH: u64 = 2;
pub const WORKLOAD_ID_FAULT: u64 = 3;
pub const WORKLOAD_ID_IDLE: u64 = 4;
pub const WORKLOAD_ID_SERVE: u64 = 5;
pub const WORKLOAD_ID_PCI: u64 = 6;
pub const WORKLOAD_ID_BLK: u64 = 7;
pub const WORKLOAD_ID_RNG: u64 = 8;
/// Device workloads take ids from 9 (vsock took 24).
pub const WORKLOAD_ID_CONSOLE: u64 = 12;
pub const WORKLOAD_ID_NET: u64 = 13;
/// 16 and up: clear of ids other device workloads take from 9.
pub const WORKLOAD_ID_PMEM: u64 = 16;
pub const WORKLOAD_ID_BLKREAD: u64 = 17;
/// `vsock` (24: clear of the ids other device workloads take).
pub const WORKLOAD_ID_VSOCK: u64 = 24;
/// `function` (the warm pool's guest).
pub const WORKLOAD_ID_FUNCTION: u64 = 25;
/// `devstate` (virtio device state across snapshots; 31: clear of the ids other workloads take).
pub const WORKLOAD_ID_DEVSTATE: u64 = 31;

/// FAILURE arguments.
pub const FAIL_UNKNOWN_WORKLOAD: u64 = 1;
pub const FAIL_BAD_PARAMETER: u64 = 2;
pub const FAIL_BOOT_PARAMS: u64 = 3;
pub const FAIL_ACPI: u64 = 4;
pub const FAIL_NO_MEMORY: u64 = 5;
pub const FAIL_MISMATCH: u64 = 6;
pub const FAIL_PANIC: u64 = 7;
/// The device a workload needs is not on PCI bus 0.
pub const FAIL_NO_DEVICE: u64 = 8;
/// A device misbehaved: initialisation refused, an error status, a timeout, bad data.
pub const FAIL_DEVICE: u64 = 9;
/// A CPU exception: FAIL_EXCEPTION_BASE + vector.
pub const FAIL_EXCEPTION_BASE: u64 = 0x100;

/// 16550 MMIO alias the VMM provides (1-byte registers).
pub const SERIAL_MMIO_BASE: u64 = 0xfe00_1000;
/// Legacy COM1, reached through the int3 service.
pub const SERIAL_PORT: u16 = 0x3f8;
/// i8042 command port: 0xfe there resets the machine (the power-off fallback).
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_CMD_RESET: u8 = 0xfe;
/// Written to the FADT sleep control register: SLP_TYP = 5 (S5) in bits 2-4, SLP_EN in bit 5.
pub const S5_SLP_TYP: u8 = 5;
pub const SLEEP_CONTROL_S5: u8 = (S5_SLP_TYP << 2) | (1 << 5);

/// Guest load address and the identity map the guest installs.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;
pub const GUEST_IDENTITY_MAP_END: u64 = 0x1_0000_0000;

/// int3 service calls (function number in rax).
pub const SERVICE_OUTB: u64 = 1;
pub const SERVICE_INB: u64 = 2;
pub const SERVICE_OUTW: u64 = 3;
pub const SERVICE_INW: u64 = 4;
pub const SERVICE_OUTL: u64 = 5;
pub const SERVICE_INL: u64 = 6;

/// The VMM's PCI hotplug controller (MMIO, 32-bit registers; the DSDT's `\_SB_.PCI0.PHPR`; the test guest
/// does not evaluate AML, so it uses the documented address).
pub const HOTPLUG_BASE: u64 = 0xfe00_3000;
/// "TRHP" read as a little-endian u32.
pub const HOTPLUG_MAGIC: u32 = 0x5048_5254;
pub const HOTPLUG_REG_MAGIC: u64 = 0x00;
pub const HOTPLUG_REG_VERSION: u64 = 0x04;
/// Slots with a device added since the last read (read clears).
pub const HOTPLUG_REG_SLOTS_ADDED: u64 = 0x08;
/// Slots whose device the VMM asks the guest to eject (read clears).
pub const HOTPLUG_REG_SLOTS_TO_EJECT: u64 = 0x0c;
/// Write a slot bitmap: the guest is done with those devices; they leave the bus at once.
pub const HOTPLUG_REG_EJECT: u64 = 0x10;
/// Slots that hold a device now.
pub const HOTPLUG_REG_SLOTS_PRESENT: u64 = 0x14;
/// `hotplug` (30: clear of the ids other workloads take).
pub const WORKLOAD_ID_HOTPLUG: u64 = 30;
/// `hotplug`: a device appeared (arg = slot).
pub const SIGNAL_HOTPLUG_ADDED: u32 = 0x130;
/// `hotplug`: a hot-added disk was read (arg = checksum of the sectors read).
pub const SIGNAL_HOTPLUG_BLK_READ: u32 = 0x131;
/// `hotplug`: a device was reset and ejected (arg = slot).
pub const SIGNAL_HOTPLUG_EJECTED: u32 = 0x132;
/// `barmove` (34: clear of the ids other workloads take).
pub const WORKLOAD_ID_BARMOVE: u64 = 34;
/// `barmove`: the BAR moved and the device works there; snapshot now (arg = the new BAR address).
pub const SIGNAL_BARMOVE_READY: u32 = 0x140;
