//! The e820 memory map from boot_params (pure logic, `core` only; also compiled host-side).

/// boot_params offsets (Linux arch/x86/include/uapi/asm/bootparam.h).
pub const BP_E820_ENTRIES: usize = 0x1e8;
pub const BP_E820_TABLE: usize = 0x2d0;
/// E820_MAX_ENTRIES_ZEROPAGE.
pub const E820_MAX: usize = 128;
pub const E820_ENTRY_SIZE: usize = 20;

pub const E820_USABLE: u32 = 1;
pub const E820_RESERVED: u32 = 2;
pub const E820_ACPI: u32 = 3;
pub const E820_NVS: u32 = 4;
pub const E820_UNUSABLE: u32 = 5;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl Entry {
    /// One past the last byte (saturating: a bogus entry must not wrap).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Linux's name for an e820 type.
pub fn type_name(kind: u32) -> Option<&'static str> {
    match kind {
        E820_USABLE => Some("usable"),
        E820_RESERVED => Some("reserved"),
        E820_ACPI => Some("ACPI data"),
        E820_NVS => Some("ACPI NVS"),
        E820_UNUSABLE => Some("unusable"),
        _ => None,
    }
}

/// Formats like Linux's e820 table print: `[mem 0x0000000000000000-0x000000000009fbff] usable`.
impl core::fmt::Display for Entry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let last = self.addr.wrapping_add(self.size).wrapping_sub(1);
        write!(f, "[mem {:#018x}-{:#018x}] ", self.addr, last)?;
        match type_name(self.kind) {
            Some(name) => f.write_str(name),
            None => write!(f, "type {}", self.kind),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Error {
    /// boot_params is shorter than the table it claims.
    Truncated,
    /// More entries than the zero page holds.
    TooManyEntries(u8),
}

impl core::fmt::Display for E820Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            E820Error::Truncated => f.write_str("boot_params too short for its e820 table"),
            E820Error::TooManyEntries(n) => write!(f, "e820_entries = {n} exceeds {E820_MAX}"),
        }
    }
}

/// The map as the boot loader gave it (order preserved).
#[derive(Clone, Copy, Debug)]
pub struct Map {
    entries: [Entry; E820_MAX],
    len: usize,
}

impl Map {
    pub fn entries(&self) -> &[Entry] {
        &self.entries[..self.len]
    }

    /// Lowest page-aligned address `>= min` where `len` bytes fit inside one usable entry that ends at or
    /// below `limit`. Overlapping non-usable entries are respected.
    pub fn find_usable(&self, min: u64, len: u64, limit: u64) -> Option<u64> {
        const PAGE: u64 = 4096;
        let mut best: Option<u64> = None;
        for e in self.entries().iter().filter(|e| e.kind == E820_USABLE) {
            let end = e.end().min(limit);
            let Some(start) = e.addr.max(min).checked_next_multiple_of(PAGE) else {
                continue;
            };
            let Some(region_end) = start.checked_add(len) else {
                continue;
            };
            if region_end > end || self.overlaps_unusable(start, region_end) {
                continue;
            }
            if best.is_none_or(|b| start < b) {
                best = Some(start);
            }
        }
        best
    }

    fn overlaps_unusable(&self, start: u64, end: u64) -> bool {
        self.entries()
            .iter()
            .any(|e| e.kind != E820_USABLE && e.size != 0 && e.addr < end && start < e.end())
    }

    /// Whether [start, end) lies inside usable entries (possibly several adjacent ones) and in no other.
    pub fn is_usable(&self, start: u64, end: u64) -> bool {
        if self.overlaps_unusable(start, end) {
            return false;
        }
        let mut cursor = start;
        // Each pass advances the cursor through one covering entry; at most `len` passes.
        for _ in 0..=self.len {
            if cursor >= end {
                return true;
            }
            match self
                .entries()
                .iter()
                .find(|e| e.kind == E820_USABLE && e.addr <= cursor && cursor < e.end())
            {
                Some(e) => cursor = e.end(),
                None => return false,
            }
        }
        cursor >= end
    }
}

/// Reads the e820 table from a boot_params (zero page) image.
pub fn parse(zero_page: &[u8]) -> Result<Map, E820Error> {
    let count = *zero_page.get(BP_E820_ENTRIES).ok_or(E820Error::Truncated)?;
    if usize::from(count) > E820_MAX {
        return Err(E820Error::TooManyEntries(count));
    }
    let mut map = Map {
        entries: [Entry::default(); E820_MAX],
        len: usize::from(count),
    };
    for (i, slot) in map.entries[..map.len].iter_mut().enumerate() {
        let off = BP_E820_TABLE + i * E820_ENTRY_SIZE;
        let raw = zero_page
            .get(off..off + E820_ENTRY_SIZE)
            .ok_or(E820Error::Truncated)?;
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[o..o + 8]);
            u64::from_le_bytes(b)
        };
        *slot = Entry {
            addr: u64_at(0),
            size: u64_at(8),
            kind: u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]),
        };
    }
    Ok(map)
}
