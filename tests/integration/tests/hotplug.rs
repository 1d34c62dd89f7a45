//! ACPI PCI hotplug end to end: devices added to and removed from a running test guest through the API,
//! with the guest's `hotplug` workload in the part of ACPI + acpiphp (it polls the hotplug controller,
//! reads hot-added disks, ejects what the VMM asks back).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::client::ApiClient;
use integration::{require_kvm, test_guest_path, VmmProcess, GUEST_CONSOLE};
use test_guest::virtio::blk::checksum;

const TRENV: &str = env!("CARGO_BIN_EXE_trenv");
const TIMEOUT: Duration = Duration::from_secs(60);
const SECTORS: usize = 128;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("trenv-hotplug-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A 2 MiB image (pmem wants whole 2 MiB pages) of bytes seeded by `seed`.
fn image(path: &Path, seed: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..(2u64 << 20) / 8)
        .flat_map(|i| test_guest::pattern::word(seed, i * 8).to_le_bytes())
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// Boots the `hotplug` workload with an API socket; returns once the guest polls the controller.
fn boot(scratch: &Scratch, extra: &[&str]) -> (VmmProcess, ApiClient) {
    require_kvm();
    let socket = scratch.path("api.sock");
    let cmdline = format!("{GUEST_CONSOLE} hotplug sectors={SECTORS}");
    let mut args = vec![
        "--api-socket",
        socket.to_str().unwrap(),
        "--kernel",
        test_guest_path(),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=128M",
        "--serial",
        "tty",
    ];
    args.extend_from_slice(extra);
    let vmm = VmmProcess::spawn(TRENV, &args);
    let ready = vmm.wait_for_line(TIMEOUT, |l| l.starts_with("hotplug: controller"));
    assert!(ready.is_some(), "{}\n{}", vmm.stdout(), vmm.stderr());
    (vmm, ApiClient::new(&socket))
}

fn put(client: &ApiClient, endpoint: &str, body: serde_json::Value) -> (u16, String) {
    client
        .request("PUT", endpoint, Some(&body.to_string()), &[])
        .unwrap()
}

fn info(client: &ApiClient) -> serde_json::Value {
    let (status, body) = client.request("GET", "vm.info", None, &[]).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Ids in vm.info's configuration (disks, pmem, vsock) and in its device tree.
fn listed(info: &serde_json::Value, id: &str) -> (bool, bool) {
    let config = &info["config"];
    let in_config = ["disks", "pmem", "net"].iter().any(|list| {
        config[list]
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d["id"] == id))
    }) || config["vsock"]["id"] == id;
    let in_tree = info["device_tree"].get(id).is_some();
    (in_config, in_tree)
}

/// Waits until `count` console lines satisfy `pred`; returns the last of them.
fn wait_lines(vmm: &VmmProcess, count: usize, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let out = vmm.stdout();
        let matching: Vec<&str> = out.lines().filter(|l| pred(l)).collect();
        if matching.len() >= count {
            return matching[count - 1].to_string();
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {count} matching lines:\n{out}\n{}",
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until vm.info no longer lists `id` anywhere.
fn wait_gone(client: &ApiClient, id: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while listed(&info(client), id) != (false, false) {
        assert!(
            Instant::now() < deadline,
            "{id} is still listed: {}",
            info(client)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn checksum_line(slot: u8, data: &[u8]) -> String {
    format!(
        "hotplug: slot={slot} read sectors={SECTORS} checksum={:#018x}",
        checksum(&data[..SECTORS * 512])
    )
}

#[test]
fn disks_are_hot_added_read_ejected_and_their_slot_reused() {
    let scratch = Scratch::new("disk");
    let (first, second) = (scratch.path("first.img"), scratch.path("second.img"));
    let (first_data, second_data) = (image(&first, 5), image(&second, 6));
    let (vmm, client) = boot(&scratch, &[]);
    // The host bridge and the rng (slot 1) are there from boot.
    assert!(
        vmm.stdout().contains("slots present 0x3"),
        "{}",
        vmm.stdout()
    );

    let (status, body) = put(
        &client,
        "vm.add-disk",
        serde_json::json!({"path": first, "readonly": true, "id": "hot0"}),
    );
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"id": "hot0", "bdf": "0000:00:02.0"})
    );
    let line = wait_lines(&vmm, 1, |l| l.starts_with("hotplug: slot=2 read"));
    assert_eq!(line, checksum_line(2, &first_data), "{}", vmm.stdout());
    assert_eq!(listed(&info(&client), "hot0"), (true, true));
    assert_eq!(
        info(&client)["device_tree"]["hot0"]["pci_bdf"],
        "0000:00:02.0"
    );

    // Bad requests are refused and change nothing.
    let (status, body) = put(
        &client,
        "vm.add-disk",
        serde_json::json!({"path": second, "id": "hot0"}),
    );
    assert_eq!(status, 400, "duplicate id: {body}");
    assert!(body.contains("hot0"), "{body}");
    let missing = scratch.path("missing.img");
    let (status, body) = put(&client, "vm.add-disk", serde_json::json!({"path": missing}));
    assert_eq!(status, 400, "missing file: {body}");
    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "nope"}),
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "_rng"}),
    );
    assert_eq!(status, 400, "{body}");
    let disks = info(&client)["config"]["disks"].as_array().unwrap().len();
    assert_eq!(disks, 1, "{}", info(&client));

    // Removal: the guest is asked, ejects, and the VMM lets go of the disk.
    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "hot0"}),
    );
    assert_eq!(status, 204, "{body}");
    wait_lines(&vmm, 1, |l| l == "hotplug: ejected slot=2");
    wait_gone(&client, "hot0");
    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "hot0"}),
    );
    assert_eq!(status, 404, "removed twice: {body}");

    // The same slot again, with the other disk and a default id.
    let (status, body) = put(&client, "vm.add-disk", serde_json::json!({"path": second}));
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["bdf"], "0000:00:02.0", "{body}");
    assert_eq!(reply["id"], "_disk0", "{body}");
    let line = wait_lines(&vmm, 2, |l| l.starts_with("hotplug: slot=2 read"));
    assert_eq!(line, checksum_line(2, &second_data), "{}", vmm.stdout());

    assert_eq!(info(&client)["state"], "Running");
    assert!(
        !vmm.stdout().contains("FAULT") && !vmm.stdout().contains("error"),
        "{}",
        vmm.stdout()
    );
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
}

#[test]
fn pmem_and_vsock_come_and_go_and_a_paused_vm_takes_devices_too() {
    let scratch = Scratch::new("pmem-vsock");
    let pmem = scratch.path("pmem.img");
    image(&pmem, 9);
    let (vmm, client) = boot(&scratch, &[]);

    let (status, body) = put(
        &client,
        "vm.add-pmem",
        serde_json::json!({"file": pmem, "id": "pm0", "discard_writes": true}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("0000:00:02.0"), "{body}");
    wait_lines(&vmm, 1, |l| {
        l.starts_with("hotplug: added slot=2 1af4:105b")
    });

    // Added while paused: the guest hears of it once it runs again.
    let (status, body) = client.request("PUT", "vm.pause", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    let socket = scratch.path("vsock.sock");
    let (status, body) = put(
        &client,
        "vm.add-vsock",
        serde_json::json!({"cid": 3, "socket": socket}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"id": "_vsock", "bdf": "0000:00:03.0"})
    );
    let (status, body) = put(
        &client,
        "vm.add-vsock",
        serde_json::json!({"cid": 4, "socket": scratch.path("other.sock")}),
    );
    assert_eq!(status, 400, "a second vsock: {body}");
    let (status, body) = client.request("PUT", "vm.resume", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    wait_lines(&vmm, 1, |l| {
        l == "hotplug: added slot=3 1af4:1053 virtio-vsock"
    });

    // Both go; the pmem range's memslot with it (a later pmem takes its place).
    for (id, slot) in [("pm0", 2), ("_vsock", 3)] {
        let (status, body) = put(&client, "vm.remove-device", serde_json::json!({ "id": id }));
        assert_eq!(status, 204, "{body}");
        wait_lines(&vmm, 1, |l| l == format!("hotplug: ejected slot={slot}"));
        wait_gone(&client, id);
    }
    let (status, body) = put(&client, "vm.add-pmem", serde_json::json!({"file": pmem}));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"_pmem0\"") && body.contains("0000:00:02.0"),
        "{body}"
    );
    wait_lines(&vmm, 2, |l| {
        l.starts_with("hotplug: added slot=2 1af4:105b")
    });
    let (status, counters) = client.request("GET", "vm.counters", None, &[]).unwrap();
    assert_eq!(status, 200, "{counters}");
    assert!(
        counters.contains("pmem _pmem0") && !counters.contains("pm0\""),
        "{counters}"
    );
    assert_eq!(info(&client)["state"], "Running");
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
}

#[test]
fn a_disk_from_boot_can_be_removed_and_the_others_keep_their_ids() {
    let scratch = Scratch::new("cold");
    let (a, b) = (scratch.path("a.img"), scratch.path("b.img"));
    image(&a, 1);
    image(&b, 2);
    let disk_a = format!("path={}", a.display());
    let disk_b = format!("path={}", b.display());
    let (vmm, client) = boot(&scratch, &["--disk", &disk_a, "--disk", &disk_b]);
    // _disk0 in slot 1, _disk1 in slot 2, the rng in slot 3.
    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "_disk0"}),
    );
    assert_eq!(status, 204, "{body}");
    wait_lines(&vmm, 1, |l| l == "hotplug: ejected slot=1");
    wait_gone(&client, "_disk0");
    // The second disk keeps its name although it is the first in the list now.
    let info = info(&client);
    let disks = info["config"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{info}");
    assert_eq!(disks[0]["id"], "_disk1", "{info}");
    assert_eq!(info["device_tree"]["_disk1"]["pci_bdf"], "0000:00:02.0");

    // A snapshot taken now restores with every device where the guest left it: the configuration lists
    // _disk1 first, but it must come back in slot 2, not slot 1.
    let template = scratch.path("template");
    let (status, body) = client.request("PUT", "vm.pause", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    let (status, body) = put(
        &client,
        "vm.snapshot",
        serde_json::json!({"destination_url": format!("file://{}", template.display())}),
    );
    assert_eq!(status, 204, "{body}");
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
    drop(vmm);

    let socket = scratch.path("restored.sock");
    let restore = format!("source_url=file://{},resume=on", template.display());
    let restored = VmmProcess::spawn(
        TRENV,
        &[
            "--api-socket",
            socket.to_str().unwrap(),
            "--restore",
            &restore,
        ],
    );
    let client = ApiClient::new(&socket);
    client.wait_until_ready(TIMEOUT).unwrap();
    let restored_info = self::info(&client);
    assert_eq!(
        restored_info["device_tree"]["_disk1"]["pci_bdf"],
        "0000:00:02.0",
        "{restored_info}\n{}",
        restored.stderr()
    );
    // The restored guest still drives the controller: it ejects the disk when asked.
    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "_disk1"}),
    );
    assert_eq!(status, 204, "{body}");
    wait_lines(&restored, 1, |l| l == "hotplug: ejected slot=2");
    wait_gone(&client, "_disk1");
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
}

#[test]
fn before_boot_devices_join_and_leave_the_configuration() {
    require_kvm();
    let scratch = Scratch::new("created");
    let disk = scratch.path("disk.img");
    image(&disk, 3);
    let socket = scratch.path("api.sock");
    let vmm = VmmProcess::spawn(TRENV, &["--api-socket", socket.to_str().unwrap()]);
    let client = ApiClient::new(&socket);
    client.wait_until_ready(TIMEOUT).unwrap();
    let config = serde_json::json!({
        "payload": {"kernel": test_guest_path(), "cmdline": format!("{GUEST_CONSOLE} pci")},
        "memory": {"size": 134217728u64},
        "serial": {"mode": "Tty"},
    });
    let (status, body) = put(&client, "vm.create", config);
    assert_eq!(status, 204, "{body}");
    for id in ["keep", "drop"] {
        let (status, body) = put(
            &client,
            "vm.add-disk",
            serde_json::json!({"path": disk, "readonly": true, "id": id}),
        );
        assert_eq!(status, 204, "{body}");
    }
    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "drop"}),
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "drop"}),
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(listed(&info(&client), "keep"), (true, false));
    assert_eq!(listed(&info(&client), "drop"), (false, false));
    let (status, body) = client.request("PUT", "vm.boot", None, &[]).unwrap();
    assert_eq!(status, 204, "{body}");
    assert!(
        vmm.wait_for_line(TIMEOUT, |l| l == "pci: ok").is_some(),
        "{}",
        vmm.stdout()
    );
    assert_eq!(
        vmm.stdout().matches("virtio-blk").count(),
        1,
        "{}",
        vmm.stdout()
    );
}

#[test]
fn a_hot_added_nic_and_its_tap_go_when_the_guest_ejects_it() {
    let scratch = Scratch::new("net");
    let (vmm, client) = boot(&scratch, &[]);
    let tap = format!("trhp{}", std::process::id() % 1_000_000);
    let exists = || Path::new("/sys/class/net").join(&tap).exists();
    let (status, body) = put(
        &client,
        "vm.add-net",
        serde_json::json!({"tap": tap, "id": "nic0"}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("0000:00:02.0"), "{body}");
    wait_lines(&vmm, 1, |l| {
        l == "hotplug: added slot=2 1af4:1041 virtio-net"
    });
    assert!(exists(), "the VMM made no tap {tap}");

    let (status, body) = put(
        &client,
        "vm.remove-device",
        serde_json::json!({"id": "nic0"}),
    );
    assert_eq!(status, 204, "{body}");
    wait_lines(&vmm, 1, |l| l == "hotplug: ejected slot=2");
    wait_gone(&client, "nic0");
    // The device is dropped with its tap descriptor, and the kernel deletes a tap nobody holds.
    let deadline = Instant::now() + TIMEOUT;
    while exists() {
        assert!(Instant::now() < deadline, "tap {tap} outlived its device");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = client.request("PUT", "vmm.shutdown", None, &[]);
}
