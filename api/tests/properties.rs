//! Property tests over the router and the JSON models: arbitrary input never panics and gets a 4xx, and
//! valid configurations survive a JSON round trip unchanged.

use api::models::*;
use api::router::{route, routes, ApiResponse};
use proptest::prelude::*;
use serde_json::Value;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z_/]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop_oneof![
            // Real field names, so the strategy reaches type checks, not just "unknown field".
            Just("payload".to_string()),
            Just("kernel".to_string()),
            Just("cpus".to_string()),
            Just("boot_vcpus".to_string()),
            Just("memory".to_string()),
            Just("size".to_string()),
            Just("disks".to_string()),
            Just("path".to_string()),
            Just("net".to_string()),
            Just("mac".to_string()),
            Just("mode".to_string()),
            Just("id".to_string()),
            "[a-z_]{1,8}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(MacAddr)
}

fn id() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[a-z][a-z0-9_]{0,10}")
}

fn console() -> impl Strategy<Value = ConsoleConfig> {
    (
        prop_oneof![
            Just(ConsoleMode::Off),
            Just(ConsoleMode::Pty),
            Just(ConsoleMode::Tty),
            Just(ConsoleMode::File),
            Just(ConsoleMode::Socket),
            Just(ConsoleMode::Null),
        ],
        prop::option::of("/[a-z]{1,8}"),
        prop::option::of("/[a-z]{1,8}"),
    )
        .prop_map(|(mode, file, socket)| ConsoleConfig {
            file: file.map(Into::into),
            socket: socket.map(Into::into),
            ..ConsoleConfig::with_mode(mode)
        })
}

fn disk() -> impl Strategy<Value = DiskConfig> {
    (
        prop::option::of("/[a-z]{1,8}"),
        any::<bool>(),
        any::<bool>(),
        1usize..8,
        any::<u16>(),
        id(),
        prop::option::of("[A-Z0-9]{1,20}"),
    )
        .prop_map(
            |(path, readonly, direct, num_queues, queue_size, id, serial)| DiskConfig {
                path: path.map(Into::into),
                readonly,
                direct,
                num_queues,
                queue_size,
                id,
                serial,
                ..Default::default()
            },
        )
}

fn net() -> impl Strategy<Value = NetConfig> {
    (
        prop::option::of("tap[0-9]{1,2}"),
        prop::option::of(any::<[u8; 4]>()),
        prop::option::of(mac()),
        prop::option::of(any::<u16>()),
        id(),
        any::<bool>(),
    )
        .prop_map(|(tap, ip, mac, mtu, id, tso)| NetConfig {
            tap,
            ip: ip.map(std::net::IpAddr::from),
            mac,
            mtu,
            id,
            offload_tso: tso,
            ..Default::default()
        })
}

prop_compose! {
    fn vm_config()(
        kernel in prop::option::of("/[a-z]{1,12}"),
        cmdline in prop::option::of("[ -~]{0,40}"),
        boot in 1u8..=8,
        extra in 0u8..8,
        size in any::<u64>(),
        shared in any::<bool>(),
        thp in any::<bool>(),
        hotplug_size in prop::option::of(any::<u64>()),
        disks in prop::option::of(prop::collection::vec(disk(), 0..3)),
        net in prop::option::of(prop::collection::vec(net(), 0..3)),
        pmem in prop::option::of(prop::collection::vec(("/[a-z]{1,8}", any::<bool>()), 0..2)),
        vsock in prop::option::of((any::<u64>(), "/[a-z]{1,8}")),
        fs in prop::option::of(prop::collection::vec(("[a-z]{1,36}", "/[a-z]{1,8}"), 0..2)),
        serial in console(),
        console in console(),
        balloon in prop::option::of(any::<u64>()),
        num_pci_segments in prop::option::of(any::<u16>()),
        watchdog in any::<bool>(),
    ) -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: kernel.map(Into::into),
                cmdline,
                ..Default::default()
            },
            cpus: CpusConfig {
                boot_vcpus: boot,
                max_vcpus: boot.saturating_add(extra),
                ..Default::default()
            },
            memory: MemoryConfig { size, shared, thp, hotplug_size, ..Default::default() },
            disks,
            net,
            pmem: pmem.map(|v| {
                v.into_iter()
                    .map(|(file, discard_writes)| PmemConfig {
                        file: file.into(),
                        discard_writes,
                        ..Default::default()
                    })
                    .collect()
            }),
            vsock: vsock.map(|(cid, socket)| VsockConfig::new(cid, socket)),
            fs: fs.map(|v| {
                v.into_iter()
                    .map(|(tag, socket)| FsConfig { tag, socket: socket.into(), ..Default::default() })
                    .collect()
            }),
            serial,
            console,
            balloon: balloon.map(BalloonConfig::new),
            platform: num_pci_segments.map(|n| PlatformConfig {
                num_pci_segments: n,
                ..Default::default()
            }),
            watchdog,
            ..Default::default()
        }
    }
}

fn is_client_error(r: &Result<api::router::ApiRequest, ApiResponse>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => matches!(e.status(), 400 | 404 | 405),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn valid_configs_round_trip(config in vm_config()) {
        let json = serde_json::to_string(&config).unwrap();
        let parsed: Parsed<VmConfig> = from_json(json.as_bytes()).unwrap();
        prop_assert!(parsed.ignored_fields.is_empty(), "{:?}", parsed.ignored_fields);
        prop_assert_eq!(&parsed.value, &config);
        // Validation is a pure check: it never panics, whatever the values.
        let _ = config.validate();
    }

    #[test]
    fn arbitrary_bodies_never_panic(
        idx in 0..routes().len(),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let r = routes()[idx];
        let result = route(r.method, &format!("/api/v1{}", r.path), &body, vec![]);
        prop_assert!(is_client_error(&result));
    }

    #[test]
    fn arbitrary_json_never_panics(idx in 0..routes().len(), value in json_value()) {
        let r = routes()[idx];
        let body = value.to_string();
        let result = route(r.method, &format!("/api/v1{}", r.path), body.as_bytes(), vec![]);
        prop_assert!(is_client_error(&result));
    }

    #[test]
    fn mutated_configs_never_panic(
        config in vm_config(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = serde_json::to_vec(&config).unwrap();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let result = route("PUT", "/api/v1/vm.create", &bytes, vec![]);
        prop_assert!(is_client_error(&result));
    }

    #[test]
    fn arbitrary_methods_and_paths_never_panic(method in "[A-Z]{0,8}", path in "[ -~]{0,40}") {
        let result = route(&method, &path, b"", vec![]);
        prop_assert!(is_client_error(&result));
    }
}
