//! Snapshot state of every device: pause keeps the queues, the state loads into a fresh device, which
//! activates from the saved queue positions and reports the same state; bad states are refused untouched.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::block::{Block, BlockConfig};
use crate::virtio::console::Console;
use crate::virtio::net::{Net, NetParams, Tap};
use crate::virtio::rng::Rng;
use crate::virtio::test_util::{guest_memory, RecordingInterrupt, TempDir};
use crate::virtio::vsock::{Vsock, VsockConfig};
use crate::virtio::{
    ActivateContext, ActiveQueue, GuestMemory, QueueSnapshot, SnapshotError, VirtioDevice,
    VirtioDeviceState,
};

const QSIZE: u16 = 16;
/// Where the pretend driver has got to on every queue.
const POSITION: u16 = 5;

/// Queue `i`'s rings: descriptor table, available ring, used ring.
fn rings(i: usize) -> (u64, u64, u64) {
    let base = 0x2_0000 + 0x1000 * i as u64;
    (base, base + 0x400, base + 0x800)
}

/// Activates `dev` on all its queues (size 16, distinct rings in `mem`) from `progress` (one per queue, or
/// the pretend driver's position when empty). The available indices in RAM match, so nothing is served.
fn activate(dev: &mut dyn VirtioDevice, mem: &GuestMemory, progress: &[QueueSnapshot]) {
    let mut queues = Vec::new();
    for i in 0..dev.queue_max_sizes().len() {
        let (desc, avail, used) = rings(i);
        let mut q = Queue::new(dev.queue_max_sizes()[i]).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        let (next_avail, next_used) = progress
            .get(i)
            .map_or((POSITION, POSITION), |p| (p.next_avail, p.next_used));
        q.set_next_avail(next_avail);
        q.set_next_used(next_used);
        mem.write_obj(next_avail, GuestAddress(avail + 2)).unwrap();
        mem.write_obj(next_used, GuestAddress(used + 2)).unwrap();
        queues.push(ActiveQueue {
            index: i as u16,
            queue: q,
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        });
    }
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(RecordingInterrupt::default()),
        queues,
    })
    .unwrap();
}

/// The round trip every device must pass; `bad_device_bytes` is device-specific state it must refuse.
fn round_trip(make: impl Fn() -> Box<dyn VirtioDevice>, bad_device_bytes: &[Vec<u8>]) {
    let mem = guest_memory();
    let mut a = make();
    let name = a.name();
    let features = a.features();
    a.ack_features(features);
    activate(a.as_mut(), &mem, &[]);
    assert!(
        matches!(a.state(), Err(SnapshotError::NotPaused(_))),
        "{name}: a serving device has no stable state"
    );
    a.pause().unwrap();
    a.pause().unwrap();
    let state = a.state().unwrap();
    assert_eq!(state.acked_features, features, "{name}");
    assert_eq!(state.queues.len(), a.queue_max_sizes().len(), "{name}");
    for (i, q) in state.queues.iter().enumerate() {
        let (desc, avail, used) = rings(i);
        assert_eq!(
            (q.size, q.ready, q.desc_table, q.avail_ring, q.used_ring),
            (QSIZE, true, desc, avail, used),
            "{name} queue {i}"
        );
        assert_eq!((q.next_avail, q.next_used), (POSITION, POSITION), "{name}");
    }
    // It survives the template's JSON.
    let json = serde_json::to_vec(&state).unwrap();
    assert_eq!(
        serde_json::from_slice::<VirtioDeviceState>(&json).unwrap(),
        state
    );
    a.resume().unwrap();

    // A fresh device takes it, activates from the saved positions and reports the same state.
    let mut b = make();
    b.check_state(&state).unwrap();
    b.set_state(&state).unwrap();
    let loaded = b.state().unwrap();
    assert_eq!(loaded.acked_features, features, "{name}");
    assert_eq!(loaded.device, state.device, "{name}");
    let mut moved = state.queues.clone();
    for q in &mut moved {
        q.next_avail = 9;
        q.next_used = 9;
    }
    activate(b.as_mut(), &mem, &moved);
    assert!(
        matches!(b.set_state(&state), Err(SnapshotError::Active(_))),
        "{name}: state goes into a reset device only"
    );
    b.pause().unwrap();
    let after = b.state().unwrap();
    assert!(after.queues.iter().all(|q| q.next_avail == 9), "{name}");
    b.reset();
    assert_eq!(b.state().unwrap().acked_features, 0, "{name}: reset");

    // Refused: features never offered, foreign device bytes.
    let c = make();
    let mut bad = state.clone();
    bad.acked_features |= 1 << 60;
    assert!(c.check_state(&bad).is_err(), "{name}: features not offered");
    for bytes in bad_device_bytes {
        let mut bad = state.clone();
        bad.device = bytes.clone();
        assert!(
            c.check_state(&bad).is_err(),
            "{name}: device bytes {bytes:?}"
        );
    }
}

#[test]
fn block_state() {
    let dir = TempDir::new();
    let path = dir.file("disk.img", &vec![0u8; 8192]);
    let make = || -> Box<dyn VirtioDevice> {
        let cfg = BlockConfig {
            path: path.clone(),
            readonly: false,
            serial: None,
            queue_size: 128,
        };
        Box::new(Block::new("d".into(), &cfg).unwrap())
    };
    let state = make().state().unwrap();
    assert_eq!(state.device, 16u64.to_le_bytes(), "the capacity in sectors");
    // A disk that grew since the snapshot is refused.
    round_trip(make, &[vec![], 17u64.to_le_bytes().to_vec()]);
}

#[test]
fn rng_state() {
    round_trip(
        || Box::new(Rng::new(std::path::Path::new("/dev/urandom")).unwrap()),
        &[vec![0]],
    );
}

#[test]
fn console_state() {
    round_trip(
        || Box::new(Console::new(Box::new(std::io::sink())).unwrap()),
        &[vec![0]],
    );
}

#[test]
fn net_state() {
    round_trip(
        || {
            let (dev, wire) = UnixDatagram::pair().unwrap();
            dev.set_nonblocking(true).unwrap();
            // The "network" end stays open (a closed peer would make the tap readable forever).
            std::mem::forget(wire);
            let params = NetParams {
                mac: [0x52, 0x54, 0, 0, 0, 1],
                mtu: None,
                queue_size: 256,
            };
            Box::new(Net::new(Tap::from_socket(OwnedFd::from(dev), true), &params).unwrap())
        },
        &[vec![1, 2]],
    );
}

#[test]
fn vsock_state() {
    let dir = TempDir::new();
    let n = std::sync::atomic::AtomicU32::new(0);
    let make = || -> Box<dyn VirtioDevice> {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let cfg = VsockConfig {
            cid: 42,
            socket: dir.0.join(format!("v{i}.sock")),
        };
        Box::new(Vsock::new(&cfg).unwrap())
    };
    let mut state = make().state().unwrap();
    assert_eq!(
        state.device,
        [42, 0, 0, 0, 0, 0, 0, 0, 0],
        "CID, no reset pending"
    );
    let mut bad_cid = 2u64.to_le_bytes().to_vec();
    bad_cid.push(0);
    let mut bad_flag = 42u64.to_le_bytes().to_vec();
    bad_flag.push(7);
    round_trip(make, &[vec![], bad_cid, bad_flag, vec![42; 10]]);
    // Another CID than the saved one is accepted (the guest re-reads it at the transport reset).
    state.device[0] = 43;
    make().check_state(&state).unwrap();
}
