//! Kernel and initramfs loading, and the boot information a kernel reads at entry: the Linux
//! x86 boot protocol's zero page (`boot_params`) or the PVH `hvm_start_info`.
//!
//! References: Documentation/arch/x86/boot.rst (Linux boot protocol) and
//! <https://xenbits.xen.org/docs/unstable/misc/pvh.html> (PVH).

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::load_cmdline;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout;

mod loader;
#[cfg(test)]
mod test_util;

pub use loader::{load_initramfs, load_kernel};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The 64-bit entry point of a bzImage's protected-mode kernel is 0x200 past its load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// "HdrS", the setup header magic.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Boot protocol version that introduced `xloadflags` (and with it XLF_KERNEL_64).
const BOOT_PROTOCOL_XLOADFLAGS: u16 = 0x020c;
const BOOT_PROTOCOL_INITRD_ADDR_MAX: u16 = 0x0203;
const BOOT_PROTOCOL_CMDLINE_SIZE: u16 = 0x0206;
const BOOT_PROTOCOL_INIT_SIZE: u16 = 0x020a;
/// initrd_addr_max assumed by kernels older than protocol 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// type_of_loader "undefined": we are not one of the registered boot loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Default kernel_alignment for an ELF kernel, which has no setup header of its own.
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// hvm_start_info version 1 has the memory map fields.
const HVM_START_INFO_VERSION: u32 = 1;
const PAGE_SIZE: u64 = 0x1000;
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;

/// Errors from loading a kernel or initramfs or writing the boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    #[error("the kernel image is only {0} bytes, too small for an ELF vmlinux or a bzImage")]
    KernelTooSmall(u64),
    #[error("the kernel image is neither an ELF vmlinux nor a bzImage")]
    NotAKernel,
    #[error("the ELF kernel is not a 64-bit x86_64 executable")]
    ElfNotX86_64,
    #[error("the ELF kernel is invalid or truncated, or a segment lies outside guest RAM")]
    Elf(#[source] linux_loader::loader::Error),
    #[error("the bzImage is invalid or truncated, or does not fit in guest RAM")]
    BzImage(#[source] linux_loader::loader::Error),
    #[error("the bzImage does not support the 64-bit boot protocol (boot protocol {0:#06x})")]
    BzImageNot64Bit(u16),
    #[error(
        "the kernel image ({size:#x} bytes) does not fit in guest RAM ({ram:#x} bytes below 3 GiB)"
    )]
    KernelTooLarge { size: u64, ram: u64 },
    #[error("the kernel ends at {end:#x}, past the end of low guest RAM at {ram_end:#x}")]
    KernelPastRamEnd { end: u64, ram_end: u64 },
    #[error("cannot read the initramfs")]
    ReadInitramfs(#[source] std::io::Error),
    #[error("the initramfs is empty")]
    EmptyInitramfs,
    #[error("the initramfs ({size:#x} bytes) does not fit between the kernel end {floor:#x} and {limit:#x}")]
    InitramfsTooLarge { size: u64, floor: u64, limit: u64 },
    #[error("cannot copy the initramfs into guest memory")]
    InitramfsCopy(#[source] vm_memory::GuestMemoryError),
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("the kernel command line is {len} bytes, the kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot write the kernel command line to guest memory")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    #[error("the e820 map has {0} entries, more than the boot information can hold")]
    TooManyE820Entries(usize),
    #[error("cannot write the boot parameters to guest memory")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// Entry protocol of a loaded kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit Linux boot protocol: long mode, rsi = boot_params.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, ebx = hvm_start_info.
    Pvh,
}

/// Where and how a kernel was loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
    /// First byte past the loaded image (including an ELF's bss).
    pub kernel_end: GuestAddress,
    /// The bzImage's setup header (None for an ELF kernel).
    pub setup_header: Option<setup_header>,
}

/// Input to [`configure_boot`].
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    pub cmdline: &'a str,
    pub initramfs: Option<(GuestAddress, u64)>,
    pub rsdp: GuestAddress,
    pub mem_size: u64,
}

/// One e820 (and PVH memory map) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub mem_type: u32,
}

/// End of RAM below the 32-bit MMIO hole (guest RAM always starts at 0).
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    let end = mem.last_addr().raw_value().saturating_add(1);
    end.min(layout::MEM_32BIT_GAP_START)
}
/// The e820 map given to the guest: usable [0, EBDA_START), reserved [EBDA_START, 1 MiB) (ACPI
/// tables), usable RAM from 1 MiB per ram_regions(), reserved PCI ECAM window. Sorted by address.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = Vec::new();
    let mut push = |addr: u64, end: u64, mem_type: u32| {
        if end > addr {
            map.push(E820Entry {
                addr,
                size: end - addr,
                mem_type,
            });
        }
    };
    for (start, len) in super::ram_regions(mem_size) {
        let start = start.raw_value();
        let end = start + len as u64;
        if start == 0 {
            push(0, end.min(layout::EBDA_START), E820_RAM);
            push(
                layout::EBDA_START,
                end.min(layout::HIGH_RAM_START),
                E820_RESERVED,
            );
            push(layout::HIGH_RAM_START, end, E820_RAM);
        } else {
            push(start, end, E820_RAM);
        }
    }
    push(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE,
        E820_RESERVED,
    );
    map.sort_by_key(|e| e.addr);
    map
}

/// Builds the command line, checked against the kernel's limit, and writes it at CMDLINE_START.
fn write_cmdline(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<u32, BootError> {
    let mut max = layout::CMDLINE_MAX_SIZE - 1;
    if let Some(hdr) = kernel.setup_header {
        if hdr.version >= BOOT_PROTOCOL_CMDLINE_SIZE && hdr.cmdline_size > 0 {
            max = max.min(hdr.cmdline_size as usize);
        }
    }
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let cmdline =
        Cmdline::try_from(cmdline, layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let bytes = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let len = bytes.as_bytes_with_nul().len();
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(BootError::CmdlineWrite)?;
    Ok(len as u32)
}

/// Writes the command line and the boot information for the kernel's protocol: `boot_params` at
/// ZERO_PAGE_START for Linux64, `hvm_start_info` + memory map (+ initramfs module) for PVH.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cfg: &BootConfig,
) -> Result<(), BootError> {
    let cmdline_len = write_cmdline(mem, kernel, cfg.cmdline)?;
    let map = e820_map(cfg.mem_size);
    match kernel.protocol {
        BootProtocol::Linux64 => write_boot_params(mem, kernel, cfg, &map, cmdline_len),
        BootProtocol::Pvh => write_pvh_start_info(mem, cfg, &map),
    }
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cfg: &BootConfig,
    map: &[E820Entry],
    cmdline_len: u32,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    match kernel.setup_header {
        // A bzImage's own header tells the kernel about itself; we fill in the loader's fields.
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = SETUP_HEADER_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            params.hdr.cmdline_size = cmdline_len;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (layout::CMDLINE_START >> 32) as u32;
    if let Some((addr, size)) = cfg.initramfs {
        let addr = addr.raw_value();
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = cfg.rsdp.raw_value();

    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.mem_type,
        };
    }
    params.e820_entries = map.len() as u8;

    let bp = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::BootParams)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    cfg: &BootConfig,
    map: &[E820Entry],
) -> Result<(), BootError> {
    let max_entries = ((layout::PVH_MODLIST_START - layout::PVH_MEMMAP_START) as usize)
        / std::mem::size_of::<hvm_memmap_table_entry>();
    if map.len() > max_entries {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.mem_type,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: HVM_START_INFO_VERSION,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: cfg.rsdp.raw_value(),
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((addr, size)) = cfg.initramfs {
        modules.push(hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        });
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
    }
    let mut bp = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    bp.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if !modules.is_empty() {
        bp.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use vm_memory::Bytes;

    const GIB: u64 = 1 << 30;

    #[test]
    fn e820_small_guest() {
        let map = e820_map(256 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: layout::EBDA_START,
                    mem_type: E820_RAM
                },
                E820Entry {
                    addr: layout::EBDA_START,
                    size: MIB - layout::EBDA_START,
                    mem_type: E820_RESERVED
                },
                E820Entry {
                    addr: MIB,
                    size: 255 * MIB,
                    mem_type: E820_RAM
                },
                E820Entry {
                    addr: layout::PCI_ECAM_START,
                    size: layout::PCI_ECAM_SIZE,
                    mem_type: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn e820_large_guest() {
        let map = e820_map(6 * GIB);
        assert_eq!(map.len(), 5);
        assert_eq!(
            map[2],
            E820Entry {
                addr: MIB,
                size: 3 * GIB - MIB,
                mem_type: E820_RAM
            }
        );
        assert_eq!(map[3].addr, layout::PCI_ECAM_START);
        assert_eq!(
            map[4],
            E820Entry {
                addr: 4 * GIB,
                size: 3 * GIB,
                mem_type: E820_RAM
            }
        );
        // Sorted and non-overlapping.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
        let ram: u64 = map
            .iter()
            .filter(|e| e.mem_type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 6 * GIB - (MIB - layout::EBDA_START));
    }

    #[test]
    fn boot_params_read_back() {
        let mem = guest_mem(128 * MIB);
        let mut f = TempFile::new(&synth_elf(&[0x90; 16], 0, None));
        let k = load_kernel(&mem, &mut f.file).unwrap();
        let mut initrd = TempFile::new(&[3u8; 10000]);
        let initramfs = load_initramfs(&mem, &mut initrd.file, &k).unwrap();
        let cmdline = "console=ttyS0 reboot=k panic=1";
        let cfg = BootConfig {
            cmdline,
            initramfs: Some(initramfs),
            rsdp: GuestAddress(layout::RSDP_START),
            mem_size: 128 * MIB,
        };
        configure_boot(&mem, &k, &cfg).unwrap();

        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let map = e820_map(128 * MIB);
        assert_eq!(params.e820_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let got = params.e820_table[i];
            let (addr, size, ty) = (got.addr, got.size, got.r#type);
            assert_eq!((addr, size, ty), (e.addr, e.size, e.mem_type));
        }
        let hdr = params.hdr;
        let (ptr, loader, magic, flag) = (
            hdr.cmd_line_ptr,
            hdr.type_of_loader,
            hdr.header,
            hdr.boot_flag,
        );
        assert_eq!(ptr as u64, layout::CMDLINE_START);
        assert_eq!(loader, 0xff);
        assert_eq!(magic, SETUP_HEADER_MAGIC);
        assert_eq!(flag, BOOT_FLAG_MAGIC);
        let rsdp = params.acpi_rsdp_addr;
        assert_eq!(rsdp, layout::RSDP_START);
        let (rd, rs) = (hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!(u64::from(rd), initramfs.0.raw_value());
        assert_eq!(u64::from(rs), 10000);

        let mut buf = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(buf[cmdline.len()], 0);
    }

    #[test]
    fn pvh_start_info_read_back() {
        let mem = guest_mem(128 * MIB);
        let mut f = TempFile::new(&synth_elf(&[0x90; 16], 0, Some(HIGH_LOAD as u32)));
        let k = load_kernel(&mem, &mut f.file).unwrap();
        let cfg = BootConfig {
            cmdline: "console=ttyS0",
            initramfs: Some((GuestAddress(64 * MIB), 4096)),
            rsdp: GuestAddress(layout::RSDP_START),
            mem_size: 128 * MIB,
        };
        configure_boot(&mem, &k, &cfg).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE_START);
        assert_eq!(info.rsdp_paddr, layout::RSDP_START);
        assert_eq!(info.nr_modules, 1);
        let map = e820_map(128 * MIB);
        assert_eq!(info.memmap_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let got: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!(
                (got.addr, got.size, got.type_),
                (e.addr, e.size, e.mem_type)
            );
        }
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (64 * MIB, 4096));
    }

    #[test]
    fn cmdline_too_long() {
        let mem = guest_mem(16 * MIB);
        let mut f = TempFile::new(&synth_elf(&[0x90; 16], 0, None));
        let k = load_kernel(&mem, &mut f.file).unwrap();
        let long = "a".repeat(layout::CMDLINE_MAX_SIZE);
        let cfg = BootConfig {
            cmdline: &long,
            initramfs: None,
            rsdp: GuestAddress(layout::RSDP_START),
            mem_size: 16 * MIB,
        };
        assert!(matches!(
            configure_boot(&mem, &k, &cfg),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }
}
