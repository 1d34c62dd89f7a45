//! virtio-blk requests and configuration (virtio 1.2 §5.2; pure logic, `core` only; also compiled
//! host-side so tests can compute what the `blk` workload prints from the disk image).

/// Sector size of request addresses, whatever the device's blk_size (§5.2.6).
pub const SECTOR_SIZE: u64 = 512;

// Feature bits (§5.2.3).
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;

// struct virtio_blk_config offsets (§5.2.4).
pub const CONFIG_CAPACITY: u64 = 0;
pub const CONFIG_SIZE_MAX: u64 = 8;
pub const CONFIG_SEG_MAX: u64 = 12;
pub const CONFIG_BLK_SIZE: u64 = 20;

// Request types and statuses (§5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// GET_ID answers with a serial of up to 20 bytes, NUL-padded (§5.2.6).
pub const ID_BYTES: usize = 20;
pub const HEADER_LEN: usize = 16;

/// The device-readable request header: type (le32), reserved (le32), sector (le64).
pub fn header(kind: u32, sector: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

pub fn status_name(status: u8) -> &'static str {
    match status {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        _ => "unknown",
    }
}

/// The `blk` workload's checksum: the wrapping sum of the data's little-endian u64 words (a trailing
/// partial word, which sector-sized data never has, is ignored). Order-independent, like the `touch` one.
pub fn checksum(data: &[u8]) -> u64 {
    data.chunks_exact(8).fold(0u64, |acc, w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        acc.wrapping_add(u64::from_le_bytes(b))
    })
}

/// The serial from a GET_ID answer: bytes up to the first NUL, up to the first byte that is not printable
/// ASCII (a device must not be able to send control characters to the console).
pub fn id_str(raw: &[u8]) -> &str {
    let end = raw
        .iter()
        .position(|&b| !(0x20..0x7f).contains(&b))
        .unwrap_or(raw.len());
    core::str::from_utf8(&raw[..end]).unwrap_or("")
}

/// Splits `count` sectors from `first` into requests of at most `max` sectors: (sector, sectors).
pub fn chunks(first: u64, count: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let max = max.max(1);
    (0..count.div_ceil(max)).map(move |i| {
        let start = i * max;
        (first + start, (count - start).min(max))
    })
}

/// Largest request in sectors the driver sends: at most `limit_bytes`, and no more than one segment of
/// size_max when the device bounds segment sizes (the driver sends one data descriptor per request).
pub fn max_request_sectors(size_max: Option<u32>, limit_bytes: u64) -> u64 {
    let bytes = match size_max {
        Some(s) if s > 0 => limit_bytes.min(u64::from(s)),
        _ => limit_bytes,
    };
    (bytes / SECTOR_SIZE).max(1)
}

/// Fills `buf` with the write pattern: the u64 word at disk byte offset `o` is `pattern::word(seed, o)`,
/// so a host test can check the image file with `pattern::first_mismatch(seed, first_byte, bytes)`.
pub fn fill_pattern(seed: u64, disk_offset: u64, buf: &mut [u8]) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let word = crate::pattern::word(seed, disk_offset + 8 * i as u64);
        w.copy_from_slice(&word.to_le_bytes());
    }
}

/// The first byte offset in `buf` (holding disk bytes from `disk_offset`) that differs from the pattern.
pub fn pattern_mismatch(seed: u64, disk_offset: u64, buf: &[u8]) -> Option<usize> {
    crate::pattern::first_mismatch(seed, disk_offset, buf)
}
