//! virtio-net frames for the `net` workload (virtio 1.2 §5.1; pure logic, `core` only; also compiled
//! host-side so a test can parse the guest's frames and build its replies the same way).
//!
//! The workload talks a tiny protocol over a local-experimental EtherType (0x88b5, IEEE 802 "local
//! experimental 1"): the guest broadcasts `trenv-net ping <seq>` and expects `trenv-net pong <seq>` back
//! to its own MAC.

/// Features (§5.1.3).
pub const F_MAC: u64 = 1 << 5;
/// struct virtio_net_config: mac at offset 0.
pub const CONFIG_MAC: u64 = 0;
/// struct virtio_net_hdr with VIRTIO_F_VERSION_1 (num_buffers included): 12 bytes, before every frame.
pub const HDR_LEN: usize = 12;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// Receive buffers must hold a header and a full 1514-byte frame without mergeable buffers (§5.1.6.3.1).
pub const RX_BUFFER: usize = 2048;
pub const ETHERTYPE: u16 = 0x88b5;
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Ethernet's minimum frame without the FCS.
pub const MIN_FRAME: usize = 60;
pub const ETH_HLEN: usize = 14;
pub const PING: &[u8] = b"trenv-net ping ";
pub const PONG: &[u8] = b"trenv-net pong ";

/// Writes an Ethernet frame (zero-padded to MIN_FRAME) into `out`; returns its length, or None if
/// `out` is too small.
pub fn build_frame(
    out: &mut [u8],
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: u16,
    payload: &[u8],
) -> Option<usize> {
    let len = (ETH_HLEN + payload.len()).max(MIN_FRAME);
    let frame = out.get_mut(..len)?;
    frame.fill(0);
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
    frame[ETH_HLEN..ETH_HLEN + payload.len()].copy_from_slice(payload);
    Some(len)
}

/// An Ethernet frame's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse_frame(frame: &[u8]) -> Option<Frame<'_>> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let mac = |at: usize| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&frame[at..at + 6]);
        m
    };
    Some(Frame {
        dst: mac(0),
        src: mac(6),
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        payload: &frame[ETH_HLEN..],
    })
}

/// Writes `prefix` then `seq` in decimal into `out`; returns the length used.
pub fn tagged(out: &mut [u8], prefix: &[u8], seq: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut n = seq;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = prefix.len() + digits.len() - i;
    out[..prefix.len()].copy_from_slice(prefix);
    out[prefix.len()..len].copy_from_slice(&digits[i..]);
    len
}

/// The sequence number of a `prefix<seq>` payload (trailing zero padding allowed).
pub fn parse_tagged(payload: &[u8], prefix: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(prefix)?;
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let digits = &rest[..end];
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')),
    )
}

/// `aa:bb:cc:dd:ee:ff` formatting.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_are_padded() {
        let mut out = [0u8; 128];
        let mut payload = [0u8; 40];
        let plen = tagged(&mut payload, PING, 1234);
        assert_eq!(&payload[..plen], b"trenv-net ping 1234");
        let src = [0x52, 0x54, 0, 1, 2, 3];
        let len = build_frame(&mut out, BROADCAST, src, ETHERTYPE, &payload[..plen]).unwrap();
        assert_eq!(len, MIN_FRAME);
        let f = parse_frame(&out[..len]).unwrap();
        assert_eq!((f.dst, f.src, f.ethertype), (BROADCAST, src, ETHERTYPE));
        assert_eq!(parse_tagged(f.payload, PING), Some(1234));
        assert_eq!(parse_tagged(f.payload, PONG), None);
        assert!(build_frame(&mut out[..20], BROADCAST, src, ETHERTYPE, b"x").is_none());
        assert!(parse_frame(&out[..13]).is_none());
    }

    #[test]
    fn tags_reject_garbage() {
        assert_eq!(parse_tagged(b"trenv-net ping ", PING), None);
        assert_eq!(parse_tagged(b"trenv-net ping 12x", PING), None);
        assert_eq!(
            parse_tagged(b"trenv-net ping 99999999999999999999", PING),
            None
        );
        assert_eq!(parse_tagged(b"trenv-net ping 0\0\0", PING), Some(0));
        let mut out = [0u8; 40];
        let n = tagged(&mut out, PONG, u64::MAX);
        assert_eq!(&out[..n], b"trenv-net pong 18446744073709551615");
        assert_eq!(
            Mac([0xaa, 0, 1, 2, 0xff, 0x10]).to_string(),
            "aa:00:01:02:ff:10"
        );
    }
}
