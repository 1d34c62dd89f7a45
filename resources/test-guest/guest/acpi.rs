//! ACPI table walking (pure logic over a `PhysMem`, `core` only; also compiled host-side for unit tests):
//! RSDP -> XSDT (or RSDT) -> a table by signature, the MADT's enabled CPUs and the FADT's sleep control
//! register.

/// Where the BIOS-area scan for the RSDP looks (ACPI 6.5 section 5.2.5.1).
pub const RSDP_SCAN_START: u64 = 0xe_0000;
pub const RSDP_SCAN_END: u64 = 0x10_0000;
/// Tables longer than this are treated as corrupt (ours are a few hundred bytes).
pub const MAX_TABLE_LEN: u32 = 1 << 20;
const HEADER_LEN: u32 = 36;

/// Read access to guest-physical memory.
pub trait PhysMem {
    /// Fills `buf` from `addr`; `false` if any of it is not readable memory.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    NoRsdp,
    /// boot_params.acpi_rsdp_addr points at something that is not a valid RSDP.
    BadRsdpPointer(u64),
    Unreadable(u64),
    BadSignature {
        addr: u64,
        expected: [u8; 4],
    },
    BadLength {
        addr: u64,
        len: u32,
    },
    BadChecksum {
        addr: u64,
        sig: [u8; 4],
    },
    NotFound([u8; 4]),
}

fn sig_str(sig: &[u8; 4]) -> &str {
    core::str::from_utf8(sig).unwrap_or("????")
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiError::NoRsdp => f.write_str("no RSDP in boot_params or 0xe0000-0xfffff"),
            AcpiError::BadRsdpPointer(a) => {
                write!(f, "boot_params.acpi_rsdp_addr {a:#x} is not a valid RSDP")
            }
            AcpiError::Unreadable(a) => {
                write!(f, "table address {a:#x} is outside readable memory")
            }
            AcpiError::BadSignature { addr, expected } => {
                write!(f, "table at {addr:#x} is not {}", sig_str(expected))
            }
            AcpiError::BadLength { addr, len } => {
                write!(f, "table at {addr:#x} has bad length {len}")
            }
            AcpiError::BadChecksum { addr, sig } => {
                write!(f, "{} at {addr:#x}: bad checksum", sig_str(sig))
            }
            AcpiError::NotFound(sig) => write!(f, "no {} table", sig_str(sig)),
        }
    }
}

fn read_u8(mem: &dyn PhysMem, addr: u64) -> Result<u8, AcpiError> {
    let mut b = [0u8; 1];
    mem.read(addr, &mut b)
        .then_some(b[0])
        .ok_or(AcpiError::Unreadable(addr))
}

fn read_u32(mem: &dyn PhysMem, addr: u64) -> Result<u32, AcpiError> {
    let mut b = [0u8; 4];
    mem.read(addr, &mut b)
        .then(|| u32::from_le_bytes(b))
        .ok_or(AcpiError::Unreadable(addr))
}

fn read_u64(mem: &dyn PhysMem, addr: u64) -> Result<u64, AcpiError> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b)
        .then(|| u64::from_le_bytes(b))
        .ok_or(AcpiError::Unreadable(addr))
}

/// Byte sum of [addr, addr + len), read in chunks.
fn byte_sum(mem: &dyn PhysMem, addr: u64, len: u32) -> Result<u8, AcpiError> {
    let mut sum = 0u8;
    let mut buf = [0u8; 64];
    let mut done = 0u32;
    while done < len {
        let n = (len - done).min(buf.len() as u32);
        let chunk = &mut buf[..n as usize];
        let at = addr + u64::from(done);
        if !mem.read(at, chunk) {
            return Err(AcpiError::Unreadable(at));
        }
        sum = chunk.iter().fold(sum, |s, b| s.wrapping_add(*b));
        done += n;
    }
    Ok(sum)
}

/// A validated RSDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rsdp {
    pub addr: u64,
    pub revision: u8,
    pub rsdt: u32,
    /// 0 for ACPI 1.0 (revision 0).
    pub xsdt: u64,
}

/// Validates an RSDP at `addr`: signature, the ACPI 1.0 checksum and, for revision >= 2, the extended one.
pub fn read_rsdp(mem: &dyn PhysMem, addr: u64) -> Option<Rsdp> {
    let mut b = [0u8; 36];
    if !mem.read(addr, &mut b[..20]) || &b[..8] != b"RSD PTR " {
        return None;
    }
    if b[..20].iter().fold(0u8, |s, x| s.wrapping_add(*x)) != 0 {
        return None;
    }
    let revision = b[15];
    let rsdt = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    let mut xsdt = 0;
    if revision >= 2 {
        if !mem.read(addr, &mut b) {
            return None;
        }
        let len = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        if !(36..=4096).contains(&len) || byte_sum(mem, addr, len).ok()? != 0 {
            return None;
        }
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[24..32]);
        xsdt = u64::from_le_bytes(x);
    }
    Some(Rsdp {
        addr,
        revision,
        rsdt,
        xsdt,
    })
}

/// The RSDP: at `hint` (boot_params.acpi_rsdp_addr) when non-zero, else by scanning the BIOS area.
pub fn find_rsdp(mem: &dyn PhysMem, hint: u64) -> Result<Rsdp, AcpiError> {
    if hint != 0 {
        return read_rsdp(mem, hint).ok_or(AcpiError::BadRsdpPointer(hint));
    }
    (RSDP_SCAN_START..RSDP_SCAN_END)
        .step_by(16)
        .find_map(|addr| read_rsdp(mem, addr))
        .ok_or(AcpiError::NoRsdp)
}

/// Validates the header (signature if given, length, checksum) of the table at `addr`; returns its length.
pub fn check_table(
    mem: &dyn PhysMem,
    addr: u64,
    expected: Option<&[u8; 4]>,
) -> Result<u32, AcpiError> {
    let mut sig = [0u8; 4];
    if !mem.read(addr, &mut sig) {
        return Err(AcpiError::Unreadable(addr));
    }
    if let Some(expected) = expected {
        if &sig != expected {
            return Err(AcpiError::BadSignature {
                addr,
                expected: *expected,
            });
        }
    }
    let len = read_u32(mem, addr + 4)?;
    if !(HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
        return Err(AcpiError::BadLength { addr, len });
    }
    if byte_sum(mem, addr, len)? != 0 {
        return Err(AcpiError::BadChecksum { addr, sig });
    }
    Ok(len)
}

/// The root table (XSDT if the RSDP has one, else RSDT): its address, length and entry size.
fn root(mem: &dyn PhysMem, rsdp: &Rsdp) -> Result<(u64, u32, u64), AcpiError> {
    if rsdp.revision >= 2 && rsdp.xsdt != 0 {
        Ok((rsdp.xsdt, check_table(mem, rsdp.xsdt, Some(b"XSDT"))?, 8))
    } else {
        let addr = u64::from(rsdp.rsdt);
        Ok((addr, check_table(mem, addr, Some(b"RSDT"))?, 4))
    }
}

/// Calls `f(address, signature)` for every table the root table lists, in order.
pub fn for_each_table(
    mem: &dyn PhysMem,
    rsdp: &Rsdp,
    f: &mut dyn FnMut(u64, [u8; 4]),
) -> Result<(), AcpiError> {
    let (addr, len, entry) = root(mem, rsdp)?;
    let count = u64::from(len - HEADER_LEN) / entry;
    for i in 0..count {
        let at = addr + u64::from(HEADER_LEN) + i * entry;
        let table = if entry == 8 {
            read_u64(mem, at)?
        } else {
            u64::from(read_u32(mem, at)?)
        };
        let mut sig = [0u8; 4];
        if !mem.read(table, &mut sig) {
            return Err(AcpiError::Unreadable(table));
        }
        f(table, sig);
    }
    Ok(())
}

/// Address of the first table with signature `sig`, validated.
pub fn find_table(mem: &dyn PhysMem, rsdp: &Rsdp, sig: &[u8; 4]) -> Result<u64, AcpiError> {
    let mut found = None;
    for_each_table(mem, rsdp, &mut |addr, s| {
        if found.is_none() && &s == sig {
            found = Some(addr);
        }
    })?;
    let addr = found.ok_or(AcpiError::NotFound(*sig))?;
    check_table(mem, addr, Some(sig))?;
    Ok(addr)
}

/// Number of enabled processors in the MADT at `madt`: Processor Local APIC (type 0) and Processor Local
/// x2APIC (type 9) entries with the Enabled flag.
pub fn madt_enabled_cpus(mem: &dyn PhysMem, madt: u64) -> Result<u32, AcpiError> {
    let len = check_table(mem, madt, Some(b"APIC"))?;
    // Header, then Local Interrupt Controller Address (4) and Flags (4).
    let mut off = HEADER_LEN + 8;
    let mut cpus = 0;
    while off + 2 <= len {
        let kind = read_u8(mem, madt + u64::from(off))?;
        let entry_len = u32::from(read_u8(mem, madt + u64::from(off) + 1)?);
        if entry_len < 2 || off + entry_len > len {
            return Err(AcpiError::BadLength {
                addr: madt + u64::from(off),
                len: entry_len,
            });
        }
        let flags_off = match (kind, entry_len) {
            (0, 8..) => Some(4),
            (9, 16..) => Some(8),
            _ => None,
        };
        if let Some(flags_off) = flags_off {
            if read_u32(mem, madt + u64::from(off + flags_off))? & 1 != 0 {
                cpus += 1;
            }
        }
        off += entry_len;
    }
    Ok(cpus)
}

/// ACPI Generic Address Structure address spaces we can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    SystemMemory,
    SystemIo,
}

/// A register the FADT describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Register {
    pub space: AddressSpace,
    pub address: u64,
    /// Access width in bytes (1, 2, 4 or 8), from the access size or else the bit width.
    pub width: u8,
}

/// FADT offsets (ACPI 6.5 table 5.9).
const FADT_MAJOR_REVISION: u64 = 8;
const FADT_SLEEP_CONTROL_REG: u32 = 244;
const GAS_LEN: u32 = 12;

/// The FADT's SLEEP_CONTROL_REG, when the FADT is ACPI 5+ and the register is set and usable.
pub fn fadt_sleep_control(mem: &dyn PhysMem, fadt: u64) -> Result<Option<Register>, AcpiError> {
    let len = check_table(mem, fadt, Some(b"FACP"))?;
    if read_u8(mem, fadt + FADT_MAJOR_REVISION)? < 5 || len < FADT_SLEEP_CONTROL_REG + GAS_LEN {
        return Ok(None);
    }
    let mut gas = [0u8; GAS_LEN as usize];
    let at = fadt + u64::from(FADT_SLEEP_CONTROL_REG);
    if !mem.read(at, &mut gas) {
        return Err(AcpiError::Unreadable(at));
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&gas[4..12]);
    let address = u64::from_le_bytes(a);
    let space = match gas[0] {
        0 => AddressSpace::SystemMemory,
        1 => AddressSpace::SystemIo,
        _ => return Ok(None),
    };
    let width = match (gas[3], gas[1]) {
        (1..=4, _) => 1u8 << (gas[3] - 1),
        (_, 16) => 2,
        (_, 32) => 4,
        (_, 64) => 8,
        _ => 1,
    };
    Ok((address != 0).then_some(Register {
        space,
        address,
        width,
    }))
}
