//! TrEnv's test guest, built from `guest/` by build.rs (see PROTOCOL.md), and the host side of its
//! protocol: the built image, the signal/failure codes, and the guest's pure-logic modules (command line,
//! e820, ACPI walking, the `touch` pattern, PCI enumeration and the virtio driver's pure parts) so tests can
//! predict and check what the guest does.

#[path = "../guest/acpi.rs"]
pub mod acpi;
#[path = "../guest/cmdline.rs"]
pub mod cmdline;
#[path = "../guest/e820.rs"]
pub mod e820;
#[path = "../guest/pattern.rs"]
pub mod pattern;
#[path = "../guest/pci.rs"]
pub mod pci;
#[path = "../guest/protocol.rs"]
mod protocol;

pub use protocol::*;

/// The pure parts of the guest's virtio-pci driver (guest/virtio/): capability parsing, split virtqueues,
/// its DMA bump allocator and virtio-blk requests (`blk::checksum` is what the `blk` workload prints).
#[path = "../guest/virtio/host.rs"]
pub mod virtio;

#[cfg(test)]
mod pci_tests;

/// The test guest ELF (static, linked at 1 MiB, Linux 64-bit boot protocol, no PVH note).
pub const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));
/// Absolute path of the same ELF, for command lines (`--kernel`).
pub const IMAGE_PATH: &str = concat!(env!("OUT_DIR"), "/test-guest.elf");

#[cfg(test)]
mod tests {
    use super::*;

    mod cmdline_tests {
        use crate::cmdline::*;

        #[test]
        fn tokens_split_on_whitespace_and_respect_quotes() {
            let got: Vec<Token> = tokens("  a=1\tword  k=\"x y\" \"quoted word\" e=\n").collect();
            assert_eq!(
                got,
                vec![
                    Token::KeyValue("a", "1"),
                    Token::Word("word"),
                    Token::KeyValue("k", "x y"),
                    Token::Word("quoted word"),
                    Token::KeyValue("e", ""),
                ]
            );
            assert_eq!(tokens("").count(), 0);
            assert_eq!(tokens(" \t ").count(), 0);
        }

        #[test]
        fn kernel_params_stop_at_the_workload() {
            let line = "console=ttyS0 earlycon=uart8250,mmio,0xfe001000 touch earlycon=nope mib=4";
            assert_eq!(
                kernel_param(line, "earlycon"),
                Some("uart8250,mmio,0xfe001000")
            );
            assert_eq!(kernel_param(line, "console"), Some("ttyS0"));
            assert_eq!(kernel_param(line, "mib"), None);
            assert_eq!(kernel_param("a=1 a=2", "a"), Some("1"));
        }

        #[test]
        fn workload_is_the_first_bare_word() {
            let w = workload("earlycon=x touch mib=64 seed=7").unwrap();
            assert_eq!(w.name, "touch");
            assert_eq!(
                w.params.collect::<Vec<_>>(),
                vec![Token::KeyValue("mib", "64"), Token::KeyValue("seed", "7")]
            );
            assert_eq!(workload("earlycon=x boot").unwrap().params.count(), 0);
            assert!(workload("earlycon=x console=ttyS0").is_none());
            assert!(workload("").is_none());
        }

        #[test]
        fn params_are_checked_and_parsed() {
            let p = workload("touch mib=64 seed=0x10 mib=8").unwrap().params;
            assert_eq!(check_params(p.clone(), &["mib", "seed"]), Ok(()));
            assert_eq!(
                check_params(p.clone(), &["mib"]),
                Err(ParamError::Unknown("seed"))
            );
            assert_eq!(param_u64(p.clone(), "mib", 1), Ok(8), "the last value wins");
            assert_eq!(param_u64(p.clone(), "seed", 1), Ok(16));
            assert_eq!(param_u64(p, "other", 42), Ok(42));
            let stray = workload("touch mib=1 extra").unwrap().params;
            assert_eq!(
                check_params(stray, &["mib"]),
                Err(ParamError::Stray("extra"))
            );
            let bad = workload("touch mib=lots").unwrap().params;
            assert_eq!(
                param_u64(bad, "mib", 1),
                Err(ParamError::NotANumber("mib", "lots"))
            );
            assert_eq!(
                ParamError::Unknown("x").to_string(),
                "unknown parameter 'x'"
            );
        }

        #[test]
        fn numbers() {
            assert_eq!(parse_u64("0"), Some(0));
            assert_eq!(parse_u64("1_000"), Some(1000));
            assert_eq!(parse_u64("0xfe001000"), Some(0xfe00_1000));
            assert_eq!(parse_u64("0XFF"), Some(255));
            assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
            assert_eq!(parse_u64("18446744073709551616"), None);
            assert_eq!(parse_u64("0x1_0000_0000_0000_0000"), None);
            for bad in ["", "0x", "_", "-1", "12a", "0xg", "1 2"] {
                assert_eq!(parse_u64(bad), None, "{bad:?}");
            }
        }

        #[test]
        fn earlycon_values() {
            assert_eq!(
                parse_earlycon("uart8250,mmio,0xfe001000"),
                Some(Earlycon::Mmio {
                    addr: 0xfe00_1000,
                    stride: 1
                })
            );
            assert_eq!(
                parse_earlycon("uart,mmio,0xfe001000,115200n8"),
                Some(Earlycon::Mmio {
                    addr: 0xfe00_1000,
                    stride: 1
                })
            );
            assert_eq!(
                parse_earlycon("uart8250,mmio32,0x1000"),
                Some(Earlycon::Mmio {
                    addr: 0x1000,
                    stride: 4
                })
            );
            assert_eq!(
                parse_earlycon("uart8250,io,0x3f8"),
                Some(Earlycon::Io { port: 0x3f8 })
            );
            for bad in [
                "",
                "pl011,mmio,0x1000",
                "uart8250,mmio",
                "uart8250,pio,0x3f8",
                "uart,io,0x10000",
            ] {
                assert_eq!(parse_earlycon(bad), None, "{bad:?}");
            }
        }
    }

    mod e820_tests {
        use crate::e820::*;

        fn zero_page(entries: &[(u64, u64, u32)]) -> Vec<u8> {
            let mut zp = vec![0u8; 4096];
            zp[BP_E820_ENTRIES] = entries.len() as u8;
            for (i, (addr, size, kind)) in entries.iter().enumerate() {
                let off = BP_E820_TABLE + i * E820_ENTRY_SIZE;
                zp[off..off + 8].copy_from_slice(&addr.to_le_bytes());
                zp[off + 8..off + 16].copy_from_slice(&size.to_le_bytes());
                zp[off + 16..off + 20].copy_from_slice(&kind.to_le_bytes());
            }
            zp
        }

        /// The map our VMM gives a 256 MiB guest.
        fn typical() -> Map {
            parse(&zero_page(&[
                (0, 0x9fc00, E820_USABLE),
                (0x9fc00, 0x400, E820_RESERVED),
                (0xe0000, 0x20000, E820_RESERVED),
                (0x10_0000, 0x0ff0_0000, E820_USABLE),
            ]))
            .unwrap()
        }

        #[test]
        fn parses_entries_in_order() {
            let map = typical();
            assert_eq!(map.entries().len(), 4);
            assert_eq!(
                map.entries()[1],
                Entry {
                    addr: 0x9fc00,
                    size: 0x400,
                    kind: E820_RESERVED
                }
            );
            assert_eq!(map.entries()[3].end(), 0x1000_0000);
            assert!(parse(&zero_page(&[])).unwrap().entries().is_empty());
        }

        #[test]
        fn prints_like_linux() {
            let map = typical();
            let lines: Vec<String> = map.entries().iter().map(|e| e.to_string()).collect();
            assert_eq!(
                lines[0],
                "[mem 0x0000000000000000-0x000000000009fbff] usable"
            );
            assert_eq!(
                lines[1],
                "[mem 0x000000000009fc00-0x000000000009ffff] reserved"
            );
            assert_eq!(
                lines[3],
                "[mem 0x0000000000100000-0x000000000fffffff] usable"
            );
            let kinds = [
                (3, "ACPI data"),
                (4, "ACPI NVS"),
                (5, "unusable"),
                (20, "type 20"),
            ];
            for (kind, name) in kinds {
                let e = Entry {
                    addr: 0x1000,
                    size: 0x1000,
                    kind,
                };
                assert_eq!(
                    e.to_string(),
                    format!("[mem 0x0000000000001000-0x0000000000001fff] {name}")
                );
            }
        }

        #[test]
        fn refuses_bad_tables() {
            let mut zp = zero_page(&[]);
            zp[BP_E820_ENTRIES] = 129;
            assert_eq!(parse(&zp).unwrap_err(), E820Error::TooManyEntries(129));
            assert_eq!(parse(&zp[..0x100]).unwrap_err(), E820Error::Truncated);
            let mut short = zero_page(&[(0, 0x1000, E820_USABLE)]);
            short.truncate(BP_E820_TABLE + 10);
            assert_eq!(parse(&short).unwrap_err(), E820Error::Truncated);
            // A full table of 128 entries fits the zero page exactly.
            let full = zero_page(&[(0, 0x1000, E820_USABLE); 128]);
            assert_eq!(parse(&full).unwrap().entries().len(), 128);
        }

        #[test]
        fn finds_usable_regions() {
            let map = typical();
            assert_eq!(
                map.find_usable(0x13_8000, 64 << 20, 1 << 32),
                Some(0x13_8000)
            );
            assert_eq!(
                map.find_usable(0x13_8001, 4096, 1 << 32),
                Some(0x13_9000),
                "page aligned"
            );
            assert_eq!(map.find_usable(0, 0x9f000, 1 << 32), Some(0));
            assert_eq!(
                map.find_usable(0x8_0000, 0x20000, 1 << 32),
                Some(0x10_0000),
                "skips the hole"
            );
            assert_eq!(
                map.find_usable(0x10_0000, 0x0ff0_0000, 1 << 32),
                Some(0x10_0000)
            );
            assert_eq!(
                map.find_usable(0x10_1000, 0x0ff0_0000, 1 << 32),
                None,
                "too little RAM"
            );
            assert_eq!(map.find_usable(0x10_0000, 0x1000, 0x10_0800), None, "limit");
            assert_eq!(
                map.find_usable(u64::MAX - 10, 4096, u64::MAX),
                None,
                "no overflow"
            );
            // A reserved entry overlapping a usable one wins.
            let overlap = parse(&zero_page(&[
                (0, 0x10_0000, E820_USABLE),
                (0x8000, 0x1000, E820_RESERVED),
            ]))
            .unwrap();
            assert_eq!(overlap.find_usable(0, 0x9000, u64::MAX), None);
            assert_eq!(overlap.find_usable(0, 0x8000, u64::MAX), Some(0));
            assert_eq!(overlap.find_usable(0x8800, 0x1000, u64::MAX), Some(0x9000));
        }

        #[test]
        fn usable_ranges_may_span_adjacent_entries() {
            let map = parse(&zero_page(&[
                (0x10_0000, 0x10_0000, E820_USABLE),
                (0x20_0000, 0x10_0000, E820_USABLE),
            ]))
            .unwrap();
            assert!(map.is_usable(0x10_0000, 0x30_0000));
            assert!(map.is_usable(0x1f_0000, 0x21_0000));
            assert!(!map.is_usable(0xf_f000, 0x10_1000));
            assert!(!map.is_usable(0x2f_0000, 0x30_1000));
            assert!(!typical().is_usable(0x9f000, 0xa0000));
        }
    }

    mod pattern_tests {
        use crate::pattern::*;

        #[test]
        fn words_depend_on_seed_and_address() {
            assert_eq!(word(7, 0x13_8000), word(7, 0x13_8000));
            assert_ne!(word(7, 0x13_8000), word(8, 0x13_8000));
            assert_ne!(word(7, 0x13_8000), word(7, 0x13_8008));
            let distinct: std::collections::HashSet<u64> =
                (0..4096u64).map(|i| word(1, i * 8)).collect();
            assert_eq!(distinct.len(), 4096);
        }

        #[test]
        fn pinned_values() {
            // Host-side checks of guest memory (and PROTOCOL.md) rely on this exact function.
            assert_eq!(word(0, 0), 0x3564_b439_cd1e_1f16);
            assert_eq!(word(7, 0x13_8000), 0x3729_17a7_89a1_3642);
            assert_eq!(word(1, 0x10_0000), 0x45ad_307f_08d6_3509);
            assert_eq!(checksum(7, 0x13_8000, 1 << 20), 0xe8ae_62e2_0bf4_199f);
        }

        #[test]
        fn checksum_and_mismatch() {
            let base = 0x20_0000u64;
            let mut bytes: Vec<u8> = (0..512u64)
                .flat_map(|i| word(3, base + i * 8).to_le_bytes())
                .collect();
            let sum = (0..512u64).fold(0u64, |a, i| a.wrapping_add(word(3, base + i * 8)));
            assert_eq!(checksum(3, base, 4096), sum);
            assert_eq!(checksum(3, base, 0), 0);
            assert_eq!(first_mismatch(3, base, &bytes), None);
            assert_eq!(first_mismatch(4, base, &bytes), Some(0));
            bytes[1234] ^= 1;
            assert_eq!(first_mismatch(3, base, &bytes), Some(1232));
        }
    }

    mod acpi_tests {
        use crate::acpi::*;

        /// Guest memory: a sparse byte map with everything below 1 MiB readable (zeros by default).
        struct Mem(std::collections::HashMap<u64, u8>);

        impl PhysMem for Mem {
            fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
                if addr
                    .checked_add(buf.len() as u64)
                    .is_none_or(|end| end > 0x10_0000)
                {
                    return false;
                }
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = self.0.get(&(addr + i as u64)).copied().unwrap_or(0);
                }
                true
            }
        }

        impl Mem {
            fn put(&mut self, addr: u64, bytes: &[u8]) {
                for (i, b) in bytes.iter().enumerate() {
                    self.0.insert(addr + i as u64, *b);
                }
            }
        }

        fn fix_checksum(bytes: &mut [u8], at: usize) {
            bytes[at] = 0;
            let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
            bytes[at] = 0u8.wrapping_sub(sum);
        }

        fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
            let mut t = Vec::new();
            t.extend_from_slice(sig);
            t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
            t.push(revision);
            t.push(0);
            t.extend_from_slice(b"TRENV TRENVTST");
            t.extend_from_slice(&[0; 12]);
            t.extend_from_slice(body);
            fix_checksum(&mut t, 9);
            t
        }

        fn rsdp(xsdt: u64) -> Vec<u8> {
            let mut r = Vec::new();
            r.extend_from_slice(b"RSD PTR ");
            r.push(0);
            r.extend_from_slice(b"TRENV ");
            r.push(2);
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&36u32.to_le_bytes());
            r.extend_from_slice(&xsdt.to_le_bytes());
            r.extend_from_slice(&[0; 4]);
            let mut first = r[..20].to_vec();
            fix_checksum(&mut first, 8);
            r[8] = first[8];
            fix_checksum(&mut r, 32);
            r
        }

        fn madt() -> Vec<u8> {
            let mut body = vec![0, 0, 0xe0, 0xfe, 0, 0, 0, 0];
            body.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]); // LAPIC 0 enabled
            body.extend_from_slice(&[0, 8, 1, 1, 0, 0, 0, 0]); // LAPIC 1 disabled
            body.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]); // IOAPIC
            body.extend_from_slice(&[0, 8, 2, 2, 3, 0, 0, 0]); // LAPIC 2 enabled | online capable
            let mut x2 = vec![9, 16, 0, 0];
            x2.extend_from_slice(&300u32.to_le_bytes());
            x2.extend_from_slice(&1u32.to_le_bytes());
            x2.extend_from_slice(&300u32.to_le_bytes());
            body.extend_from_slice(&x2); // x2APIC 300 enabled
            table(b"APIC", 5, &body)
        }

        fn fadt(major: u8, space: u8, addr: u64) -> Vec<u8> {
            let mut body = vec![0u8; 276 - 36];
            let gas = 244 - 36;
            body[gas] = space;
            body[gas + 1] = 8;
            body[gas + 3] = 1;
            body[gas + 4..gas + 12].copy_from_slice(&addr.to_le_bytes());
            table(b"FACP", major, &body)
        }

        /// RSDP at 0xe0000 -> XSDT at 0xe0040 -> FACP at 0xe0100, APIC at 0xe0300.
        fn firmware() -> Mem {
            let mut m = Mem(Default::default());
            m.put(0xe_0000, &rsdp(0xe_0040));
            let mut entries = Vec::new();
            entries.extend_from_slice(&0xe_0100u64.to_le_bytes());
            entries.extend_from_slice(&0xe_0300u64.to_le_bytes());
            m.put(0xe_0040, &table(b"XSDT", 1, &entries));
            m.put(0xe_0100, &fadt(6, 1, 0x3c0));
            m.put(0xe_0300, &madt());
            m
        }

        #[test]
        fn finds_the_rsdp_by_scan_and_by_hint() {
            let m = firmware();
            let r = find_rsdp(&m, 0).unwrap();
            assert_eq!(
                r,
                Rsdp {
                    addr: 0xe_0000,
                    revision: 2,
                    rsdt: 0,
                    xsdt: 0xe_0040
                }
            );
            assert_eq!(find_rsdp(&m, 0xe_0000).unwrap(), r);
            assert_eq!(
                find_rsdp(&m, 0xe_0010).unwrap_err(),
                AcpiError::BadRsdpPointer(0xe_0010)
            );
            assert_eq!(
                find_rsdp(&Mem(Default::default()), 0).unwrap_err(),
                AcpiError::NoRsdp
            );
            // A corrupted checksum makes the scan skip it.
            let mut bad = firmware();
            bad.put(0xe_0000 + 9, b"X");
            assert_eq!(find_rsdp(&bad, 0).unwrap_err(), AcpiError::NoRsdp);
        }

        #[test]
        fn walks_the_xsdt_and_counts_enabled_cpus() {
            let m = firmware();
            let r = find_rsdp(&m, 0).unwrap();
            let mut seen = Vec::new();
            for_each_table(&m, &r, &mut |addr, sig| seen.push((addr, sig))).unwrap();
            assert_eq!(seen, vec![(0xe_0100, *b"FACP"), (0xe_0300, *b"APIC")]);
            let madt = find_table(&m, &r, b"APIC").unwrap();
            assert_eq!(madt_enabled_cpus(&m, madt), Ok(3));
            assert_eq!(
                find_table(&m, &r, b"MCFG").unwrap_err(),
                AcpiError::NotFound(*b"MCFG")
            );
        }

        #[test]
        fn follows_an_acpi1_rsdt() {
            let mut m = Mem(Default::default());
            let mut r = rsdp(0)[..20].to_vec();
            r[15] = 0;
            r[16..20].copy_from_slice(&0xe_1000u32.to_le_bytes());
            fix_checksum(&mut r, 8);
            m.put(0xf_0000, &r);
            m.put(0xe_1000, &table(b"RSDT", 1, &0xe_2000u32.to_le_bytes()));
            m.put(0xe_2000, &madt());
            let r = find_rsdp(&m, 0).unwrap();
            assert_eq!(r.revision, 0);
            assert_eq!(
                madt_enabled_cpus(&m, find_table(&m, &r, b"APIC").unwrap()),
                Ok(3)
            );
        }

        #[test]
        fn detects_corrupt_tables() {
            let mut m = firmware();
            m.put(0xe_0300 + 50, &[0xff]);
            let r = find_rsdp(&m, 0).unwrap();
            assert_eq!(
                find_table(&m, &r, b"APIC").unwrap_err(),
                AcpiError::BadChecksum {
                    addr: 0xe_0300,
                    sig: *b"APIC"
                }
            );
            assert_eq!(
                check_table(&m, 0xe_0100, Some(b"APIC")).unwrap_err(),
                AcpiError::BadSignature {
                    addr: 0xe_0100,
                    expected: *b"APIC"
                }
            );
            // A zero-length MADT entry must end the walk with an error, not loop.
            let mut body = vec![0u8; 8];
            body.extend_from_slice(&[0, 0, 0, 0]);
            let mut m = Mem(Default::default());
            m.put(0x1000, &table(b"APIC", 5, &body));
            assert!(matches!(
                madt_enabled_cpus(&m, 0x1000),
                Err(AcpiError::BadLength { .. })
            ));
            // An XSDT entry pointing outside memory.
            let mut m = firmware();
            m.put(0xe_0040, &table(b"XSDT", 1, &(1u64 << 40).to_le_bytes()));
            let r = find_rsdp(&m, 0).unwrap();
            assert_eq!(
                find_table(&m, &r, b"APIC").unwrap_err(),
                AcpiError::Unreadable(1 << 40)
            );
            let mut m = Mem(Default::default());
            m.put(0x2000, &table(b"APIC", 5, &[]));
            m.put(0x2004, &(1u32 << 30).to_le_bytes());
            assert!(matches!(
                check_table(&m, 0x2000, None),
                Err(AcpiError::BadLength { .. })
            ));
        }

        #[test]
        fn reads_the_sleep_control_register() {
            let m = firmware();
            assert_eq!(
                fadt_sleep_control(&m, 0xe_0100),
                Ok(Some(Register {
                    space: AddressSpace::SystemIo,
                    address: 0x3c0,
                    width: 1
                }))
            );
            let mut m = Mem(Default::default());
            m.put(0x1000, &fadt(6, 0, 0xfe00_2000));
            assert_eq!(
                fadt_sleep_control(&m, 0x1000).unwrap().unwrap().space,
                AddressSpace::SystemMemory
            );
            m.put(0x1000, &fadt(4, 1, 0x3c0));
            assert_eq!(
                fadt_sleep_control(&m, 0x1000),
                Ok(None),
                "ACPI 4 has no sleep registers"
            );
            m.put(0x1000, &fadt(6, 1, 0));
            assert_eq!(fadt_sleep_control(&m, 0x1000), Ok(None), "register not set");
            m.put(0x1000, &fadt(6, 2, 0x3c0));
            assert_eq!(
                fadt_sleep_control(&m, 0x1000),
                Ok(None),
                "PCI config space is not supported"
            );
        }
    }

    #[test]
    fn image_is_a_static_x86_64_elf_at_one_mib_without_pvh_note() {
        let u16_at = |o: usize| u16::from_le_bytes([IMAGE[o], IMAGE[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(IMAGE[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(IMAGE[o..o + 8].try_into().unwrap());
        assert_eq!(&IMAGE[..4], b"\x7fELF");
        assert_eq!(IMAGE[4], 2, "ELFCLASS64");
        assert_eq!(IMAGE[5], 1, "little endian");
        assert_eq!(u16_at(16), 2, "ET_EXEC");
        assert_eq!(u16_at(18), 62, "EM_X86_64");
        let entry = u64_at(24);
        assert!((0x10_0000..0x20_0000).contains(&entry), "entry {entry:#x}");
        let (phoff, phentsize, phnum) = (
            u64_at(32) as usize,
            u16_at(54) as usize,
            u16_at(56) as usize,
        );
        let mut loads = 0;
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            let (kind, vaddr) = (u32_at(ph), u64_at(ph + 16));
            assert_ne!(kind, 4, "PT_NOTE: the VMM would look for a PVH entry note");
            assert_ne!(kind, 3, "PT_INTERP: not a static executable");
            if kind == 1 {
                loads += 1;
                assert!(
                    vaddr >= 0x10_0000 && vaddr + u64_at(ph + 40) < 0x40_0000,
                    "PT_LOAD at {vaddr:#x}"
                );
            }
        }
        assert!(loads > 0);
        assert_eq!(std::fs::read(IMAGE_PATH).unwrap(), IMAGE);
    }

    #[test]
    fn protocol_constants() {
        assert_eq!(&SIGNAL_MAGIC.to_le_bytes(), b"TRSG");
        assert_eq!(SLEEP_CONTROL_S5, 0x34);
        let codes = [
            SIGNAL_BOOT_COMPLETE,
            SIGNAL_READY,
            SIGNAL_WORKLOAD_START,
            SIGNAL_WORKLOAD_DONE,
            SIGNAL_FAILURE,
        ];
        assert_eq!(codes, [1, 2, 3, 4, 5]);
        const { assert!(SIGNAL_TOUCH_REGION >= SIGNAL_CUSTOM_BASE) };
    }
}
