//! Measures what restores pay on this host: `cargo run --release -p memory-template --example costs
//! [DIR]` (DIR: where the 256 MiB template is written; default the system temp dir). Prints JSON.

use std::fs::File;
use std::time::Instant;

use memory_template::format::{self, ManifestDraft};
use memory_template::uffd::{OnDemandOptions, OnDemandServer, OnDemandSource};
use memory_template::{map_copy, map_cow, TemplateWriter};

const MIB: usize = 1 << 20;
const LEN: usize = 256 * MIB;
const DATA: usize = 64 * MIB;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn anon(len: usize) -> *mut u8 {
    // SAFETY: fresh anonymous mapping, checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as *mut u8
}

fn unmap(p: *mut u8, len: usize) {
    // SAFETY: every pointer passed here is a mapping this program created and no longer uses.
    unsafe { libc::munmap(p as *mut libc::c_void, len) };
}

fn touch_ms(p: *mut u8, pages: usize) -> f64 {
    let t = Instant::now();
    let mut sum = 0u64;
    for i in 0..pages {
        // SAFETY: inside a live mapping of at least `pages` pages.
        sum += unsafe { std::ptr::read_volatile(p.add(i * 4096)) } as u64;
    }
    std::hint::black_box(sum);
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let parent = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("trenv-costs-{}", std::process::id()));

    // A 256 MiB guest with its first 64 MiB dirtied (non-zero), the rest untouched.
    let guest = anon(LEN);
    for i in 0..DATA / 8 {
        // SAFETY: inside the mapping.
        unsafe { (guest as *mut u64).add(i).write(i as u64 | 1) };
    }
    let mut w = TemplateWriter::create(&parent, "t").unwrap();
    w.set_durable(false);
    let t = Instant::now();
    // SAFETY: our mapping, not written during the call.
    let region = unsafe { w.write_region(0, guest, LEN) }.unwrap();
    let write_region_ms = t.elapsed().as_secs_f64() * 1e3;
    w.write_state(b"{}").unwrap();
    let dir = w.finish(ManifestDraft::default()).unwrap();
    unmap(guest, LEN);
    let manifest = format::read_manifest(&dir).unwrap();
    let t = Instant::now();
    format::verify_images_full(&dir, &manifest).unwrap();
    let verify_full_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for _ in 0..100 {
        format::read_manifest(&dir).unwrap();
        format::verify_images_quick(&dir, &manifest).unwrap();
        format::verify_state(&dir, &manifest).unwrap();
    }
    let manifest_and_quick_verify_us = t.elapsed().as_secs_f64() * 1e6 / 100.0;
    let image = File::open(dir.join(&region.file)).unwrap();

    // Warm the page cache once (a template in use by other instances is cached).
    // SAFETY: fresh mapping, unmapped right after.
    let p = unsafe { map_cow(&image, LEN, None) }.unwrap();
    touch_ms(p, DATA / 4096);
    unmap(p, LEN);

    let mut cow = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        // SAFETY: fresh mapping, unmapped right after.
        let p = unsafe { map_cow(&image, LEN, None) }.unwrap();
        cow.push(t.elapsed().as_secs_f64() * 1e6);
        unmap(p, LEN);
    }
    // SAFETY: fresh mapping.
    let p = unsafe { map_cow(&image, LEN, None) }.unwrap();
    let cow_read_us = touch_ms(p, DATA / 4096) * 1e3 / (DATA / 4096) as f64;
    unmap(p, LEN);

    let mut copy = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        // SAFETY: fresh mapping, unmapped right after.
        let p = unsafe { map_copy(&image, LEN, None) }.unwrap();
        copy.push(t.elapsed().as_secs_f64() * 1e3);
        unmap(p, LEN);
    }

    // On demand, one page per fault: every touched page is a UFFDIO_COPY (data) or ZEROPAGE (holes).
    let serve = |mem: *mut u8, window: usize| {
        OnDemandServer::start_sources(
            vec![OnDemandSource {
                file: std::sync::Arc::new(image.try_clone().unwrap()),
                host: mem,
                len: LEN,
                file_offset: 0,
                guest_addr: 0,
            }],
            OnDemandOptions {
                fault_around_pages: window,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let mem = anon(LEN);
    let server = serve(mem, 1);
    let pages = 4096;
    let uffd_copy_us = touch_ms(mem, pages) * 1e3 / pages as f64;
    // SAFETY: pages past the data are holes; stays inside the mapping.
    let hole_start = unsafe { mem.add(DATA) };
    let uffd_zero_us = touch_ms(hole_start, pages) * 1e3 / pages as f64;
    drop(server);
    unmap(mem, LEN);
    // With the default fault-around, sequential reads.
    let mem = anon(LEN);
    let server = serve(mem, memory_template::uffd::DEFAULT_FAULT_AROUND_PAGES);
    let uffd_seq_around_us = touch_ms(mem, pages) * 1e3 / pages as f64;
    drop(server);
    unmap(mem, LEN);

    // Handler-side rate without a faulting thread: prefetch of 16384 pages.
    let mem = anon(LEN);
    let list: Vec<u64> = (0..16384u64).map(|i| i * 4096).collect();
    let t = Instant::now();
    let server = OnDemandServer::start_sources(
        vec![OnDemandSource {
            file: std::sync::Arc::new(image.try_clone().unwrap()),
            host: mem,
            len: LEN,
            file_offset: 0,
            guest_addr: 0,
        }],
        OnDemandOptions {
            prefetch: Some(list),
            ..Default::default()
        },
    )
    .unwrap();
    while server.stats().pages_prefetched < 16384 {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let prefetch_us = t.elapsed().as_secs_f64() * 1e6 / 16384.0;
    drop(server);
    unmap(mem, LEN);

    let _ = std::fs::remove_dir_all(&parent);
    println!(
        "{}",
        serde_json::json!({
            "dir": parent.parent().map(|p| p.display().to_string()),
            "region_mib": LEN / MIB,
            "data_mib": DATA / MIB,
            "write_region_ms": write_region_ms,
            "verify_full_ms": verify_full_ms,
            "read_manifest_and_quick_verify_us": manifest_and_quick_verify_us,
            "map_cow_us_p50": median(cow),
            "cow_first_read_fault_us_per_page": cow_read_us,
            "map_copy_ms_p50": median(copy),
            "uffd_fault_copy_us_per_page": uffd_copy_us,
            "uffd_fault_zeropage_us_per_page": uffd_zero_us,
            "uffd_fault_around_sequential_us_per_page": uffd_seq_around_us,
            "uffd_prefetch_us_per_page": prefetch_us,
        })
    );
}
