//! Loading an ELF vmlinux or a bzImage, and the initramfs, into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

fn is_elf(head: &[u8]) -> bool {
    head.len() >= 4 && head[..4] == ELF_MAGIC
}

/// Loads an ELF vmlinux or a bzImage at layout::HIGH_RAM_START.
///
/// An ELF kernel with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) is entered through PVH, otherwise through
/// its ELF entry with the 64-bit Linux boot protocol; a bzImage through its 64-bit entry at load
/// address + 0x200.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let size = kernel.metadata().map_err(BootError::ReadKernel)?.len();
    let mut head = [0u8; 64];
    kernel.rewind().map_err(BootError::ReadKernel)?;
    let head_len = read_up_to(kernel, &mut head).map_err(BootError::ReadKernel)?;
    if is_elf(&head[..head_len]) {
        if head_len < head.len() {
            return Err(BootError::KernelTooSmall(size));
        }
        load_elf(mem, kernel, &head)
    } else {
        load_bzimage(mem, kernel, size)
    }
}

/// Reads until `buf` is full or the file ends; returns the number of bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn check_kernel_end(mem: &GuestMemoryMmap, end: u64) -> Result<(), BootError> {
    let ram_end = low_ram_end(mem);
    if end > ram_end {
        return Err(BootError::KernelPastRamEnd { end, ram_end });
    }
    Ok(())
}

fn load_elf(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    ehdr: &[u8; 64],
) -> Result<LoadedKernel, BootError> {
    // The loader does not check the class or machine: refuse a 32-bit or foreign ELF here instead of
    // misreading its headers.
    let machine = u16::from_le_bytes([ehdr[18], ehdr[19]]);
    if ehdr[4] != ELFCLASS64 || machine != EM_X86_64 {
        return Err(BootError::ElfNotX86_64);
    }
    if let Some(end) = elf_load_end(kernel, ehdr) {
        check_kernel_end(mem, end)?;
    }
    let result = Elf::load(
        mem,
        None,
        kernel,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(BootError::Elf)?;
    check_kernel_end(mem, result.kernel_end)?;
    let (entry, protocol) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (addr, BootProtocol::Pvh),
        _ => (result.kernel_load, BootProtocol::Linux64),
    };
    Ok(LoadedKernel {
        entry,
        protocol,
        kernel_end: GuestAddress(result.kernel_end),
        setup_header: None,
    })
}

/// End of the highest PT_LOAD segment (p_paddr + p_memsz), so an ELF too big for guest RAM gets a
/// clear error before anything is copied. None when the program headers cannot be read; the loader
/// then reports the problem.
fn elf_load_end(kernel: &mut File, ehdr: &[u8; 64]) -> Option<u64> {
    const PT_LOAD: u32 = 1;
    const PHDR_SIZE: usize = 56;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().ok()?);
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as usize;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as usize;
    if phentsize != PHDR_SIZE {
        return None;
    }
    let mut phdrs = vec![0u8; phnum * PHDR_SIZE];
    kernel.seek(SeekFrom::Start(phoff)).ok()?;
    kernel.read_exact(&mut phdrs).ok()?;
    phdrs
        .chunks_exact(PHDR_SIZE)
        .filter(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_LOAD)
        .map(|ph| {
            let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap_or_default());
            let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap_or_default());
            paddr.saturating_add(memsz)
        })
        .max()
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    size: u64,
) -> Result<LoadedKernel, BootError> {
    let hdr_end = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>() as u64;
    if size < hdr_end {
        return Err(BootError::KernelTooSmall(size));
    }
    // The whole file minus the setup sectors lands at 1 MiB: refuse early with a clear message.
    let ram = low_ram_end(mem).saturating_sub(layout::HIGH_RAM_START);
    if size > ram {
        return Err(BootError::KernelTooLarge { size, ram });
    }
    let mut hdr = setup_header::default();
    kernel
        .seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(BootError::ReadKernel)?;
    kernel
        .read_exact(hdr.as_mut_slice())
        .map_err(BootError::ReadKernel)?;
    let magic = hdr.header;
    if magic != SETUP_HEADER_MAGIC {
        return Err(BootError::NotAKernel);
    }
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < BOOT_PROTOCOL_XLOADFLAGS
        || xloadflags & linux_loader::loader::bootparam::XLF_KERNEL_64 == 0
    {
        return Err(BootError::BzImageNot64Bit(version));
    }

    let load = GuestAddress(layout::HIGH_RAM_START);
    let result = BzImage::load(mem, Some(load), kernel, Some(load)).map_err(BootError::BzImage)?;
    check_kernel_end(mem, result.kernel_end)?;
    Ok(LoadedKernel {
        entry: load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        protocol: BootProtocol::Linux64,
        kernel_end: GuestAddress(result.kernel_end),
        setup_header: result.setup_header,
    })
}

/// Lowest address the initramfs may start at: past the kernel image and, for a bzImage, past the
/// area its decompressor works in (init_size bytes from its preferred or actual load address).
fn initramfs_floor(kernel: &LoadedKernel) -> u64 {
    let mut floor = kernel.kernel_end.raw_value().max(layout::HIGH_RAM_START);
    if let Some(hdr) = kernel.setup_header {
        if hdr.version >= BOOT_PROTOCOL_INIT_SIZE {
            let base = hdr.pref_address.max(layout::HIGH_RAM_START);
            floor = floor.max(base.saturating_add(u64::from(hdr.init_size)));
        }
    }
    floor
}

/// Places the initramfs at the top of low RAM (page aligned, below 3 GiB and below the kernel's
/// initrd_addr_max for a bzImage) and returns (address, size).
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    file: &mut File,
    kernel: &LoadedKernel,
) -> Result<(GuestAddress, u64), BootError> {
    let size = file.metadata().map_err(BootError::ReadInitramfs)?.len();
    if size == 0 {
        return Err(BootError::EmptyInitramfs);
    }
    let mut limit = low_ram_end(mem);
    if let Some(hdr) = kernel.setup_header {
        let max = if hdr.version >= BOOT_PROTOCOL_INITRD_ADDR_MAX {
            u64::from(hdr.initrd_addr_max)
        } else {
            DEFAULT_INITRD_ADDR_MAX
        };
        // initrd_addr_max is the last byte the initramfs may occupy.
        limit = limit.min(max.saturating_add(1));
    }
    let floor = initramfs_floor(kernel);
    let too_large = BootError::InitramfsTooLarge { size, floor, limit };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if addr < floor {
        return Err(BootError::InitramfsTooLarge { size, floor, limit });
    }
    let len =
        usize::try_from(size).map_err(|_| BootError::InitramfsTooLarge { size, floor, limit })?;
    file.rewind().map_err(BootError::ReadInitramfs)?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(BootError::InitramfsCopy)?;
    Ok((GuestAddress(addr), size))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn load_synthetic_elf() {
        let mem = guest_mem(64 * MIB);
        let code = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp .-3
        let mut f = TempFile::new(&synth_elf(&code, 0x1000, None));
        let k = load_kernel(&mem, &mut f.file).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.entry, GuestAddress(HIGH_LOAD));
        assert_eq!(k.kernel_end, GuestAddress(HIGH_LOAD + 3 + 0x1000));
        assert!(k.setup_header.is_none());
        let mut buf = [0u8; 3];
        mem.read_slice(&mut buf, GuestAddress(HIGH_LOAD)).unwrap();
        assert_eq!(buf, code);
    }

    #[test]
    fn load_elf_with_pvh_note() {
        let mem = guest_mem(64 * MIB);
        let mut f = TempFile::new(&synth_elf(&[0x90; 16], 0, Some(0x10_0008)));
        let k = load_kernel(&mem, &mut f.file).unwrap();
        assert_eq!(k.protocol, BootProtocol::Pvh);
        assert_eq!(k.entry, GuestAddress(0x10_0008));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = guest_mem(64 * MIB);
        let mut f = TempFile::new(&[0x5au8; 4096]);
        assert!(matches!(
            load_kernel(&mem, &mut f.file),
            Err(BootError::NotAKernel)
        ));
        let mut f = TempFile::new(b"tiny");
        assert!(matches!(
            load_kernel(&mem, &mut f.file),
            Err(BootError::KernelTooSmall(4))
        ));
        let mut f = TempFile::new(&[]);
        assert!(load_kernel(&mem, &mut f.file).is_err());
    }

    #[test]
    fn truncated_elf_fails() {
        let mem = guest_mem(64 * MIB);
        let elf = synth_elf(&[0x90; 4096], 0, None);
        let mut f = TempFile::new(&elf[..elf.len() - 100]);
        assert!(matches!(
            load_kernel(&mem, &mut f.file),
            Err(BootError::Elf(_))
        ));
        let mut f = TempFile::new(&elf[..40]);
        assert!(matches!(
            load_kernel(&mem, &mut f.file),
            Err(BootError::KernelTooSmall(40))
        ));
    }

    #[test]
    fn elf32_is_refused() {
        let mem = guest_mem(64 * MIB);
        let mut elf = synth_elf(&[0x90; 16], 0, None);
        elf[4] = 1; // ELFCLASS32
        let mut f = TempFile::new(&elf);
        assert!(matches!(
            load_kernel(&mem, &mut f.file),
            Err(BootError::ElfNotX86_64)
        ));
    }

    #[test]
    fn kernel_larger_than_memory() {
        let mem = guest_mem(2 * MIB);
        let mut f = TempFile::new(&synth_elf(&vec![0x90; (2 * MIB) as usize], 0, None));
        assert!(matches!(
            load_kernel(&mem, &mut f.file),
            Err(BootError::KernelPastRamEnd { .. })
        ));
        let mut f = TempFile::new(&synth_bzimage(
            linux_loader::loader::bootparam::XLF_KERNEL_64,
            0x7fff_ffff,
        ));
        let tiny = guest_mem(MIB + 4096);
        assert!(matches!(
            load_kernel(&tiny, &mut f.file),
            Err(BootError::KernelTooLarge { .. })
        ));
        // Small file whose bss runs past the end of RAM.
        let mut f = TempFile::new(&synth_elf(&[0x90; 16], 4 * MIB, None));
        assert!(matches!(
            load_kernel(&mem, &mut f.file),
            Err(BootError::KernelPastRamEnd { .. })
        ));
    }

    /// A bzImage-shaped file: setup sectors with a 64-bit capable header, then a payload.
    fn synth_bzimage(xloadflags: u16, initrd_addr_max: u32) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut f = vec![0u8; (setup_sects as usize + 1) * 512 + 4096];
        let mut hdr = setup_header {
            setup_sects,
            boot_flag: BOOT_FLAG_MAGIC,
            header: SETUP_HEADER_MAGIC,
            version: 0x020f,
            loadflags: 1,
            code32_start: HIGH_LOAD as u32,
            initrd_addr_max,
            xloadflags,
            cmdline_size: 2047,
            pref_address: 16 * MIB,
            init_size: 8 * MIB as u32,
            ..Default::default()
        };
        hdr.kernel_alignment = 0x20_0000;
        let off = SETUP_HEADER_OFFSET as usize;
        f[off..off + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        let payload = f.len() - 4096;
        f[payload] = 0xcc;
        f
    }

    #[test]
    fn load_bzimage_64bit() {
        let mem = guest_mem(64 * MIB);
        let mut f = TempFile::new(&synth_bzimage(
            linux_loader::loader::bootparam::XLF_KERNEL_64,
            0x7fff_ffff,
        ));
        let k = load_kernel(&mem, &mut f.file).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.entry, GuestAddress(HIGH_LOAD + 0x200));
        assert_eq!(k.kernel_end, GuestAddress(HIGH_LOAD + 4096));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(HIGH_LOAD)).unwrap(), 0xcc);
        assert!(k.setup_header.is_some());

        // The initramfs goes at the top of RAM, page aligned, clear of the decompression area.
        let mut initrd = TempFile::new(&[7u8; 5000]);
        let (addr, size) = load_initramfs(&mem, &mut initrd.file, &k).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert_eq!(addr.raw_value(), (64 * MIB - 5000) & !(PAGE_SIZE - 1));
        assert_eq!(mem.read_obj::<u8>(addr.unchecked_add(4999)).unwrap(), 7);
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let mem = guest_mem(64 * MIB);
        let mut f = TempFile::new(&synth_bzimage(0, 0x7fff_ffff));
        assert!(matches!(
            load_kernel(&mem, &mut f.file),
            Err(BootError::BzImageNot64Bit(0x020f))
        ));
    }

    #[test]
    fn initramfs_respects_initrd_addr_max() {
        let mem = guest_mem(64 * MIB);
        let mut f = TempFile::new(&synth_bzimage(
            linux_loader::loader::bootparam::XLF_KERNEL_64,
            (32 * MIB - 1) as u32,
        ));
        let k = load_kernel(&mem, &mut f.file).unwrap();
        let mut initrd = TempFile::new(&[1u8; 8192]);
        let (addr, _) = load_initramfs(&mem, &mut initrd.file, &k).unwrap();
        assert_eq!(addr.raw_value(), 32 * MIB - 8192);
    }

    #[test]
    fn initramfs_too_large_or_empty() {
        let mem = guest_mem(4 * MIB);
        let mut f = TempFile::new(&synth_elf(&[0x90; 16], 0, None));
        let k = load_kernel(&mem, &mut f.file).unwrap();
        let mut initrd = TempFile::new(&vec![0u8; (3 * MIB) as usize + 1]);
        assert!(matches!(
            load_initramfs(&mem, &mut initrd.file, &k),
            Err(BootError::InitramfsTooLarge { .. })
        ));
        let mut empty = TempFile::new(&[]);
        assert!(matches!(
            load_initramfs(&mem, &mut empty.file, &k),
            Err(BootError::EmptyInitramfs)
        ));
    }
}
