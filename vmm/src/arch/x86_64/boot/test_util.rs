//! Helpers shared by the boot tests: guest memory, temporary files, synthetic kernels.

use std::fs::File;
use std::io::{Seek, Write};

use vm_memory::GuestMemoryMmap;

use super::*;

pub const MIB: u64 = 1 << 20;
pub const HIGH_LOAD: u64 = layout::HIGH_RAM_START;

pub fn guest_mem(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&crate::arch::x86_64::ram_regions(size)).unwrap()
}

/// A temporary file with `bytes`, removed on drop.
pub struct TempFile {
    path: std::path::PathBuf,
    pub file: File,
}

impl TempFile {
    pub fn new(bytes: &[u8]) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("trenv-boot-test-{}-{}", std::process::id(), n));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(bytes).unwrap();
        file.rewind().unwrap();
        TempFile { path, file }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A minimal 64-bit x86_64 ELF: one PT_LOAD of `code` at 1 MiB (with `bss` extra bytes of
/// memory), entry at its start, optionally a PT_NOTE with a PVH entry.
pub fn synth_elf(code: &[u8], bss: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let phoff = 64u64;
    let note_off = phoff + 56 * u64::from(phnum);
    let note: Vec<u8> = match pvh_entry {
        Some(entry) => {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes()); // namesz
            n.extend_from_slice(&4u32.to_le_bytes()); // descsz
            n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&entry.to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let code_off = (note_off + note.len() as u64 + 15) & !15;
    let mut f = vec![0u8; code_off as usize];
    f[..4].copy_from_slice(&ELF_MAGIC);
    f[4] = ELFCLASS64;
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&HIGH_LOAD.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&phoff.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let mut ph = Vec::new();
    ph.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph.extend_from_slice(&5u32.to_le_bytes()); // R+X
    ph.extend_from_slice(&code_off.to_le_bytes());
    ph.extend_from_slice(&HIGH_LOAD.to_le_bytes()); // vaddr
    ph.extend_from_slice(&HIGH_LOAD.to_le_bytes()); // paddr
    ph.extend_from_slice(&(code.len() as u64).to_le_bytes());
    ph.extend_from_slice(&(code.len() as u64 + bss).to_le_bytes());
    ph.extend_from_slice(&0x1000u64.to_le_bytes());
    if pvh_entry.is_some() {
        ph.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        ph.extend_from_slice(&4u32.to_le_bytes());
        ph.extend_from_slice(&note_off.to_le_bytes());
        ph.extend_from_slice(&0u64.to_le_bytes());
        ph.extend_from_slice(&0u64.to_le_bytes());
        ph.extend_from_slice(&(note.len() as u64).to_le_bytes());
        ph.extend_from_slice(&(note.len() as u64).to_le_bytes());
        ph.extend_from_slice(&4u64.to_le_bytes());
    }
    f[phoff as usize..phoff as usize + ph.len()].copy_from_slice(&ph);
    f[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
    f.extend_from_slice(code);
    f
}
