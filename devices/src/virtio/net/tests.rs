use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_util::{Desc, RecordingInterrupt, TestQueue, F_NEXT, F_WRITE};

const HDR: usize = VNET_HDR_LEN;

struct Fixture {
    tq: TestQueue,
    h: NetHandler,
    /// The "host network" end of the fake tap.
    wire: UnixDatagram,
    irq: Arc<RecordingInterrupt>,
}

/// A handler whose queue `which` is `tq`'s; the fake tap is a datagram socket pair.
fn fixture(which: u16) -> Fixture {
    let tq = TestQueue::new(16);
    let (dev, wire) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    wire.set_nonblocking(true).unwrap();
    let irq = Arc::new(RecordingInterrupt::default());
    let real = Queue::try_from(tq.queue.state()).unwrap();
    let idle = Queue::new(16).unwrap();
    let (rx, tx) = if which == RX_QUEUE {
        (real, idle)
    } else {
        (idle, real)
    };
    let h = NetHandler::new(
        tq.mem.clone(),
        rx,
        tx,
        Tap::from_socket(OwnedFd::from(dev), true),
        irq.clone(),
    );
    Fixture { tq, h, wire, irq }
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(tag)).collect()
}

/// What the host sends: a vnet header (with junk the device must not pass on) and the frame.
fn from_host(f: &Fixture, frame: &[u8]) {
    let mut pkt = vec![0xaau8; HDR];
    pkt.extend_from_slice(frame);
    f.wire.send(&pkt).unwrap();
}

fn wire_frames(f: &Fixture) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70000];
    while let Ok(n) = f.wire.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

#[test]
fn frames_from_the_tap_fill_receive_buffers() {
    let mut f = fixture(RX_QUEUE);
    let d = f.tq.data_addr();
    let a = frame(60, 3);
    let b = frame(1514, 5);
    from_host(&f, &a);
    from_host(&f, &b);
    // No buffers yet: the first frame is held, nothing is used.
    f.h.process_rx().unwrap();
    assert_eq!(f.tq.used_idx(), 0);
    assert!(f.h.pending.is_some());

    // The header in its own descriptor, the frame in another (any layout is allowed).
    f.tq.publish(
        &[
            Desc::new(d, HDR as u32, F_WRITE | F_NEXT, 1),
            Desc::new(d + 0x100, 2048, F_WRITE, 0),
        ],
        0,
    );
    f.tq.publish(&[Desc::new(d + 0x1000, 2048, F_WRITE, 0)], 2);
    f.h.process_rx().unwrap();
    assert_eq!(f.tq.used(0), (0, (HDR + 60) as u32));
    assert_eq!(f.tq.used(1), (2, (HDR + 1514) as u32));
    let mut hdr = [0xffu8; HDR];
    f.tq.mem.read_slice(&mut hdr, GuestAddress(d)).unwrap();
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    let mut got = vec![0u8; 60];
    f.tq.mem
        .read_slice(&mut got, GuestAddress(d + 0x100))
        .unwrap();
    assert_eq!(got, a);
    let mut got = vec![0u8; 1514];
    f.tq.mem
        .read_slice(&mut got, GuestAddress(d + 0x1000 + HDR as u64))
        .unwrap();
    assert_eq!(got, b);
    assert_eq!(
        *f.irq.triggered.lock().unwrap(),
        vec![VirtioInterruptType::Queue(RX_QUEUE)]
    );
    assert!(!f.h.tap_readable, "read to EAGAIN");
}

#[test]
fn hostile_receive_buffers_drop_the_frame_only() {
    let mut f = fixture(RX_QUEUE);
    let d = f.tq.data_addr();
    let end = f.tq.mem_size();
    for tag in 1..=5 {
        from_host(&f, &frame(100, tag));
    }
    // Device-readable (wrong direction).
    f.tq.publish(&[Desc::new(d, 2048, 0, 0)], 0);
    // Too small for the frame.
    f.tq.publish(&[Desc::new(d, 50, F_WRITE, 0)], 1);
    // Outside guest RAM.
    f.tq.publish(&[Desc::new(end - 64, 2048, F_WRITE, 0)], 2);
    // A loop.
    f.tq.publish(
        &[
            Desc::new(d, 64, F_WRITE | F_NEXT, 4),
            Desc::new(d, 64, F_WRITE | F_NEXT, 3),
        ],
        3,
    );
    // A good one gets the fifth frame.
    f.tq.publish(&[Desc::new(d + 0x1000, 2048, F_WRITE, 0)], 5);
    f.h.process_rx().unwrap();
    for i in 0..4 {
        assert_eq!(f.tq.used(i).1, 0, "chain {i}");
    }
    assert_eq!(f.tq.used(4), (5, (HDR + 100) as u32));
    let mut got = vec![0u8; 100];
    f.tq.mem
        .read_slice(&mut got, GuestAddress(d + 0x1000 + HDR as u64))
        .unwrap();
    assert_eq!(got, frame(100, 5));
    assert!(!f.irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn transmitted_frames_reach_the_tap_with_a_clean_header() {
    let mut f = fixture(TX_QUEUE);
    let d = f.tq.data_addr();
    let a = frame(60, 7);
    // The guest's header is junk (it negotiated no offloads): it must not reach the host.
    f.tq.mem.write_slice(&[0xee; HDR], GuestAddress(d)).unwrap();
    f.tq.mem.write_slice(&a, GuestAddress(d + 0x100)).unwrap();
    f.tq.publish(
        &[
            Desc::new(d, HDR as u32, F_NEXT, 1),
            Desc::new(d + 0x100, 60, 0, 0),
        ],
        0,
    );
    f.h.process_tx().unwrap();
    let frames = wire_frames(&f);
    assert_eq!(frames.len(), 1);
    assert_eq!(&frames[0][..HDR], &[0u8; HDR]);
    assert_eq!(&frames[0][HDR..], &a[..]);
    assert_eq!(f.tq.used(0), (0, 0));
    assert_eq!(
        *f.irq.triggered.lock().unwrap(),
        vec![VirtioInterruptType::Queue(TX_QUEUE)]
    );
}

#[test]
fn hostile_transmit_buffers_are_dropped() {
    let mut f = fixture(TX_QUEUE);
    let d = f.tq.data_addr();
    let end = f.tq.mem_size();
    // Shorter than a header.
    f.tq.publish(&[Desc::new(d, 4, 0, 0)], 0);
    // Oversized frame (inside guest RAM).
    f.tq.publish(&[Desc::new(0, (HDR + MAX_FRAME + 1) as u32, 0, 0)], 1);
    // Device-writable part (wrong direction).
    f.tq.publish(
        &[
            Desc::new(d, 64, F_NEXT, 3),
            Desc::new(d + 0x100, 64, F_WRITE, 0),
        ],
        2,
    );
    // Readable after writable.
    f.tq.publish(
        &[
            Desc::new(d, 64, F_WRITE | F_NEXT, 5),
            Desc::new(d + 0x100, 64, 0, 0),
        ],
        4,
    );
    // Outside guest RAM, and an address that wraps.
    f.tq.publish(&[Desc::new(end - 8, 64, 0, 0)], 6);
    f.tq.publish(&[Desc::new(u64::MAX - 8, 64, 0, 0)], 7);
    // A head past the table.
    f.tq.publish_head(1000);
    // Then a good one.
    f.tq.mem
        .write_slice(&frame(64, 9), GuestAddress(d + 0x200))
        .unwrap();
    f.tq.publish(
        &[Desc::new(d + 0x200 - HDR as u64, (HDR + 64) as u32, 0, 0)],
        8,
    );
    f.h.process_tx().unwrap();
    let frames = wire_frames(&f);
    assert_eq!(frames.len(), 1, "only the good frame goes out");
    assert_eq!(&frames[0][HDR..], &frame(64, 9)[..]);
    // Every chain but the bogus head is returned.
    assert_eq!(f.tq.used_idx(), 7);
    assert!(!f.irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn a_garbage_available_index_needs_reset() {
    let mut f = fixture(TX_QUEUE);
    // More chains announced than the queue holds.
    f.tq.set_avail_idx(100);
    assert!(f.h.process_tx().is_err());
}

#[test]
fn device_contract() {
    let (dev, _wire) = UnixDatagram::pair().unwrap();
    let params = NetParams {
        mac: [0x52, 0x54, 0, 1, 2, 3],
        mtu: Some(1400),
        queue_size: 256,
    };
    let net = Net::new(Tap::from_socket(OwnedFd::from(dev), true), &params).unwrap();
    assert_eq!(net.device_type(), TYPE_NET);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    assert_eq!(
        net.features(),
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MTU
    );
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg, [0x52, 0x54, 0, 1, 2, 3, 0, 0, 1, 0, 0x78, 0x05]);
    assert_eq!(
        net.state().unwrap(),
        Default::default(),
        "inactive: no queues"
    );
    let (dev, _wire) = UnixDatagram::pair().unwrap();
    let bad = NetParams {
        queue_size: 100,
        ..params
    };
    assert!(Net::new(Tap::from_socket(OwnedFd::from(dev), true), &bad).is_err());
    let m = generated_mac(1);
    assert_eq!(m[0] & 3, 2, "locally administered unicast");
    assert_ne!(generated_mac(1), generated_mac(2));
}
