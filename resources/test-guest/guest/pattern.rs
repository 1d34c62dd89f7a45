//! The `touch` workload's memory pattern (pure logic, `core` only; also compiled host-side so VMM tests can
//! check guest memory, e.g. after a template restore).
//!
//! Every 8-byte word at guest-physical address `addr` holds `word(seed, addr)`: a cheap 64-bit mix of the
//! seed and the address, so a page that lands at the wrong address or a stale page is detected. The
//! checksum is the wrapping sum of all words, so it does not depend on the order pages are visited in.

/// The value of the word at `addr` (8-byte aligned) for `seed`.
#[inline(always)]
pub fn word(seed: u64, addr: u64) -> u64 {
    // splitmix64's finaliser over the address mixed with the seed; the added constant keeps (0, 0) from
    // mapping to 0, so a zero page never matches by accident at the start.
    let mut x =
        (addr ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_add(0x6a09_e667_f3bc_c909);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Checksum of `len` bytes of pattern starting at `base` (both 8-byte aligned).
pub fn checksum(seed: u64, base: u64, len: u64) -> u64 {
    (0..len / 8).fold(0u64, |acc, i| acc.wrapping_add(word(seed, base + i * 8)))
}

/// Checks a host-side copy of guest memory that starts at guest-physical `base`: the offset of the first
/// word that differs from the pattern, if any.
pub fn first_mismatch(seed: u64, base: u64, bytes: &[u8]) -> Option<usize> {
    bytes.chunks_exact(8).enumerate().find_map(|(i, chunk)| {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let offset = i * 8;
        (u64::from_le_bytes(b) != word(seed, base + offset as u64)).then_some(offset)
    })
}
