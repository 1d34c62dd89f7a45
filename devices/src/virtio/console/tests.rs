use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_util::{Desc, RecordingInterrupt, TestQueue, F_NEXT, F_WRITE};

/// A sink tests can read back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A handler whose queue `which` is `tq`'s (the other one is never ready).
fn handler(tq: &TestQueue, which: u16) -> (ConsoleHandler, Sink, Arc<RecordingInterrupt>) {
    let sink = Sink::default();
    let console = Console::new(Box::new(sink.clone())).unwrap();
    let irq = Arc::new(RecordingInterrupt::default());
    let real = Queue::try_from(tq.queue.state()).unwrap();
    let idle = Queue::new(16).unwrap();
    let (rx, tx) = if which == RX_QUEUE {
        (real, idle)
    } else {
        (idle, real)
    };
    (
        ConsoleHandler {
            mem: tq.mem.clone(),
            rx,
            tx,
            output: console.output.clone(),
            input: console.input(),
            interrupt: irq.clone(),
        },
        sink,
        irq,
    )
}

#[test]
fn transmit_buffers_reach_the_output_in_order() {
    let mut tq = TestQueue::new(16);
    let d = tq.data_addr();
    tq.mem.write_slice(b"hello, ", GuestAddress(d)).unwrap();
    tq.mem
        .write_slice(b"world\n", GuestAddress(d + 0x100))
        .unwrap();
    tq.publish(
        &[Desc::new(d, 7, F_NEXT, 1), Desc::new(d + 0x100, 6, 0, 0)],
        0,
    );
    tq.publish(&[Desc::new(d + 0x100, 6, 0, 0)], 2);
    let (mut h, sink, irq) = handler(&tq, TX_QUEUE);
    h.handle_queue(EVENT_TX).unwrap();
    assert_eq!(&*sink.0.lock().unwrap(), b"hello, world\nworld\n");
    assert_eq!(tq.used_idx(), 2);
    assert_eq!(tq.used(0), (0, 0));
    assert_eq!(
        *irq.triggered.lock().unwrap(),
        vec![VirtioInterruptType::Queue(TX_QUEUE)]
    );
}

#[test]
fn hostile_transmit_buffers_are_dropped_not_written() {
    let mut tq = TestQueue::new(16);
    let d = tq.data_addr();
    let end = tq.mem_size();
    tq.mem.write_slice(b"ok", GuestAddress(d)).unwrap();
    // Device-writable (wrong direction).
    tq.publish(&[Desc::new(d, 2, F_WRITE, 0)], 0);
    // Outside guest RAM, and overflowing.
    tq.publish(&[Desc::new(end - 1, 2, 0, 0)], 1);
    tq.publish(&[Desc::new(u64::MAX - 1, 16, 0, 0)], 2);
    // Larger than the bound (inside RAM).
    tq.publish(&[Desc::new(0, (MAX_TX_BYTES + 1) as u32, 0, 0)], 3);
    // A descriptor loop.
    tq.publish(&[Desc::new(d, 2, F_NEXT, 5), Desc::new(d, 2, F_NEXT, 4)], 4);
    // Head index past the table.
    tq.publish_head(300);
    // Finally a good one.
    tq.publish(&[Desc::new(d, 2, 0, 0)], 6);
    let (mut h, sink, irq) = handler(&tq, TX_QUEUE);
    h.handle_queue(EVENT_TX).unwrap();
    assert_eq!(&*sink.0.lock().unwrap(), b"ok");
    // Every chain but the out-of-range head came back.
    assert_eq!(tq.used_idx(), 6);
    assert!(!irq.needs_reset.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn input_waits_for_receive_buffers_and_is_split_across_them() {
    let mut tq = TestQueue::new(16);
    let d = tq.data_addr();
    let (mut h, _, irq) = handler(&tq, RX_QUEUE);
    assert_eq!(h.input.push(b"abcdefgh"), 8);
    // No buffer yet: nothing happens, the bytes wait.
    h.handle_queue(EVENT_INPUT).unwrap();
    assert_eq!(tq.used_idx(), 0);
    assert_eq!(h.input.pending(), 8);

    tq.publish(&[Desc::new(d, 5, F_WRITE, 0)], 0);
    tq.publish(&[Desc::new(d + 0x100, 64, F_WRITE, 0)], 1);
    tq.publish(&[Desc::new(d + 0x200, 64, F_WRITE, 0)], 2);
    h.handle_queue(EVENT_RX).unwrap();
    assert_eq!(tq.used(0), (0, 5));
    assert_eq!(tq.used(1), (1, 3));
    // The third buffer stays with the device until more input comes.
    assert_eq!(tq.used_idx(), 2);
    let mut got = [0u8; 8];
    tq.mem.read_slice(&mut got[..5], GuestAddress(d)).unwrap();
    tq.mem
        .read_slice(&mut got[5..], GuestAddress(d + 0x100))
        .unwrap();
    assert_eq!(&got, b"abcdefgh");
    assert_eq!(
        *irq.triggered.lock().unwrap(),
        vec![VirtioInterruptType::Queue(RX_QUEUE)]
    );

    h.input.push(b"z");
    h.handle_queue(EVENT_INPUT).unwrap();
    assert_eq!(tq.used(2), (2, 1));
}

#[test]
fn hostile_receive_buffers_get_nothing_and_keep_the_input() {
    let mut tq = TestQueue::new(16);
    let d = tq.data_addr();
    let end = tq.mem_size();
    let (mut h, _, _) = handler(&tq, RX_QUEUE);
    h.input.push(b"secret");
    // Device-readable receive buffer.
    tq.publish(&[Desc::new(d, 64, 0, 0)], 0);
    // Outside guest RAM.
    tq.publish(&[Desc::new(end - 2, 64, F_WRITE, 0)], 1);
    h.handle_queue(EVENT_RX).unwrap();
    assert_eq!(tq.used(0), (0, 0));
    assert_eq!(tq.used(1), (1, 0));
    assert_eq!(h.input.pending(), 6, "input kept for a usable buffer");
    tq.publish(&[Desc::new(d, 64, F_WRITE, 0)], 2);
    h.handle_queue(EVENT_RX).unwrap();
    assert_eq!(tq.used(2), (2, 6));
}

#[test]
fn input_is_bounded() {
    let console = Console::new(Box::new(std::io::sink())).unwrap();
    let input = console.input();
    let big = vec![1u8; INPUT_CAPACITY + 100];
    assert_eq!(input.push(&big), INPUT_CAPACITY);
    assert_eq!(input.push(b"x"), 0);
    assert!(!input.push_all(b"x", std::time::Duration::from_millis(10)));
}

#[test]
fn device_contract() {
    let console = Console::new(Box::new(std::io::sink())).unwrap();
    assert_eq!(console.device_type(), TYPE_CONSOLE);
    assert_eq!(console.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(console.features(), 1 << VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 16];
    console.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; 16]);
    assert_eq!(
        console.state().unwrap(),
        Default::default(),
        "inactive: no queues"
    );
}

#[test]
fn socket_client_gets_output_and_types_input() {
    use std::io::Read;
    let dir = crate::virtio::test_util::TempDir::new();
    let path = dir.0.join("console.sock");
    let socket = ConsoleSocket::bind(&path).unwrap();
    let mut writer = socket.writer();
    let console = Console::new(Box::new(std::io::sink())).unwrap();
    socket.attach("console-socket", console.input()).unwrap();
    // Output before anyone connects is dropped.
    writer.write_all(b"lost").unwrap();
    let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    client.write_all(b"typed").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while console.input().pending() < 5 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    writer.write_all(b"seen").unwrap();
    let mut got = [0u8; 4];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"seen");
}
