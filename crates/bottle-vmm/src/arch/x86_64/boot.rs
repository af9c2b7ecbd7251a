//! Loading the kernel and writing what the Linux boot protocols expect to find: the command
//! line, the zero page with its e820 map (64-bit entry), or `hvm_start_info` (PVH entry), the
//! MP table, and the identity page tables and GDT the 64-bit entry starts with.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::x86_64::layout::*;

/// e820 entry types (ACPI spec).
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// `setup_header.type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Alignment the kernel may relocate itself to (bzImage).
const KERNEL_ALIGNMENT_16MIB: u32 = 0x0100_0000;
/// A bzImage's 64-bit entry is 0x200 bytes after its protected-mode code start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `hvm_start_info.magic` ("xEn3" with the high bit set).
const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;
const PVH_START_INFO_VERSION: u32 = 1;
/// 2 MiB page, present, writable.
const PDE_PRESENT_RW_2MIB: u64 = 0x83;
/// Page table entry, present, writable.
const PTE_PRESENT_RW: u64 = 0x03;
const BYTES_PER_2MIB: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open the guest kernel {path}: build it with `bot-bottle kernel build`")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is neither a loadable vmlinux ELF nor a bzImage (ELF: {elf}; bzImage: {bzimage})"
    )]
    LoadKernel {
        path: String,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("the kernel command line is too long or not printable: shorten the extra arguments")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the boot structures into guest memory: give the guest more memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    #[error("cannot read the initrd {path}")]
    ReadInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the initrd {path} ({size} bytes) does not fit between the kernel and {limit:#x}: give the guest more memory or shrink the initrd")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit long mode, paging on, `rsi` = zero page.
    Linux64(GuestAddress),
    /// 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh(GuestAddress),
}

/// What was loaded.
#[derive(Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// First byte after the kernel image in guest memory.
    pub end: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Where an initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// Loads a vmlinux ELF (preferring its PVH entry) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::OpenKernel {
            path: path.display().to_string(),
            source,
        })
    };
    let elf_error = match Elf::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr),
                _ => EntryPoint::Linux64(result.kernel_load),
            };
            return Ok(LoadedKernel {
                entry,
                end: result.kernel_end,
                setup_header: None,
            });
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => Ok(LoadedKernel {
            entry: EntryPoint::Linux64(
                result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            ),
            end: result.kernel_end,
            setup_header: result.setup_header,
        }),
        Err(bzimage) => Err(BootError::LoadKernel {
            path: path.display().to_string(),
            elf: elf_error,
            bzimage,
        }),
    }
}

/// Highest address (exclusive) an initrd may reach: the boot protocol's default
/// `initrd_addr_max` (0x37ffffff), which every kernel accepts.
const INITRD_ADDR_LIMIT: u64 = 0x3800_0000;
const PAGE_BYTES: u64 = 0x1000;

/// Copies an initrd to the top of low memory (below the MMIO gap and `INITRD_ADDR_LIMIT`),
/// page-aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<LoadedInitrd, BootError> {
    let display = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: display.clone(),
        source,
    })?;
    let size = bytes.len() as u64;
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0);
    let limit = low_end.min(INITRD_ADDR_LIMIT);
    let too_large = || BootError::InitrdTooLarge {
        path: display.clone(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_BYTES - 1);
    if addr < kernel.end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(BootError::Write)?;
    Ok(LoadedInitrd { addr, size })
}

/// The e820 map: low RAM, the reserved EBDA/BIOS hole, RAM from 1 MiB on (around the gap).
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Builds the command line: the caller's arguments plus what the VMM needs.
pub fn build_cmdline(extra: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_BYTES).map_err(BootError::Cmdline)?;
    // reboot=k: a guest reboot is an i8042 reset, which ends the VM; panic=-1: reboot on panic.
    // (Nothing the kernel does not know: unknown words are handed to init as arguments.)
    cmdline
        .insert_str("console=ttyS0 reboot=k panic=-1")
        .map_err(BootError::Cmdline)?;
    if !extra.trim().is_empty() {
        cmdline
            .insert_str(extra.trim())
            .map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line, the protocol structures and the MP table.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    initrd: Option<LoadedInitrd>,
    cmdline: &Cmdline,
) -> Result<(), BootError> {
    let cstring = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = cstring.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::Write)?;
    let e820 = e820_map(mem);
    match kernel.entry {
        EntryPoint::Linux64(_) => write_zero_page(mem, kernel, initrd, bytes.len() - 1, &e820),
        EntryPoint::Pvh(_) => write_pvh_start_info(mem, initrd, &e820),
    }?;
    write_long_mode_tables(mem, kernel.entry)
}

/// The identity page tables and the boot GDT (and empty IDT) for `entry`.
pub fn write_long_mode_tables(mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<(), BootError> {
    write_page_tables(mem)?;
    write_gdt(mem, &crate::vstate::cpu::gdt_table(entry))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    initrd: Option<LoadedInitrd>,
    cmdline_len: usize,
    e820: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT_16MIB;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        // Below INITRD_ADDR_LIMIT, so both fit in 32 bits.
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = *kind;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::Write)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<LoadedInitrd>,
    e820: &[(u64, u64, u32)],
) -> Result<(), BootError> {
    let mut memmap = Vec::new();
    for (addr, size, kind) in e820 {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&memmap, GuestAddress(PVH_MEMMAP_START))
        .map_err(BootError::Write)?;
    // struct hvm_start_info, 56 bytes, little endian.
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_START_INFO_MAGIC.to_le_bytes());
    info.extend_from_slice(&PVH_START_INFO_VERSION.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
                                                 // The initrd is PVH module 0: struct hvm_modlist_entry { paddr, size, cmdline_paddr, reserved }.
    let (modules, modlist) = match initrd {
        Some(initrd) => {
            let mut entry = Vec::with_capacity(32);
            entry.extend_from_slice(&initrd.addr.to_le_bytes());
            entry.extend_from_slice(&initrd.size.to_le_bytes());
            entry.extend_from_slice(&[0u8; 16]);
            mem.write_slice(&entry, GuestAddress(PVH_MODLIST_START))
                .map_err(BootError::Write)?;
            (1u32, PVH_MODLIST_START)
        }
        None => (0, 0),
    };
    info.extend_from_slice(&modules.to_le_bytes()); // nr_modules
    info.extend_from_slice(&modlist.to_le_bytes()); // modlist_paddr
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::Write)
}

/// Identity map of the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(BootError::Write)
    };
    write(PDPTE_START | PTE_PRESENT_RW, PML4_START)?;
    for directory in 0..PDE_COUNT {
        let pd = PDE_START + directory * 0x1000;
        write(pd | PTE_PRESENT_RW, PDPTE_START + directory * 8)?;
        for entry in 0..512u64 {
            let phys = (directory * 512 + entry) * BYTES_PER_2MIB;
            write(phys | PDE_PRESENT_RW_2MIB, pd + entry * 8)?;
        }
    }
    Ok(())
}

fn write_gdt(mem: &GuestMemoryMmap, table: &[u64]) -> Result<(), BootError> {
    for (index, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + index as u64 * 8))
            .map_err(BootError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(BootError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn test_e820_announces_all_ram_above_1mib_and_reserves_the_ebda() {
        let mem = create_guest_memory(64).unwrap();
        assert_eq!(
            e820_map(&mem),
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn test_cmdline_keeps_extra_arguments_after_the_vmm_ones() {
        let cmdline = build_cmdline("quiet init=/sbin/bottle-init").unwrap();
        let text = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert!(
            text.starts_with("console=ttyS0 reboot=k")
                && text.ends_with("quiet init=/sbin/bottle-init")
        );
    }

    /// A minimal bzImage: one setup sector after the boot sector, the `HdrS` header, then the
    /// protected-mode payload.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 2 * 512];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes()); // code32_start
        image.extend_from_slice(payload);
        image
    }

    #[test]
    fn test_bzimage_is_loaded_at_1mib_and_entered_0x200_later_with_its_setup_header() {
        let mem = create_guest_memory(16).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), fake_bzimage(b"PAYLOAD")).unwrap();
        let kernel = load_kernel(&mem, file.path()).unwrap();
        write_boot_structures(&mem, &kernel, None, &build_cmdline("").unwrap()).unwrap();
        let mut payload = [0u8; 7];
        mem.read_slice(&mut payload, GuestAddress(HIMEM_START))
            .unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (version, loader, cmdline_ptr) = (
            params.hdr.version,
            params.hdr.type_of_loader,
            params.hdr.cmd_line_ptr,
        );
        assert_eq!(
            kernel.entry,
            EntryPoint::Linux64(GuestAddress(HIMEM_START + BZIMAGE_64BIT_ENTRY_OFFSET))
        );
        assert_eq!(
            (&payload, version, loader, cmdline_ptr),
            (
                b"PAYLOAD",
                0x020f,
                LOADER_TYPE_UNDEFINED,
                CMDLINE_START as u32
            )
        );
    }

    #[test]
    fn test_pvh_start_info_points_at_the_command_line_and_the_e820_memory_map() {
        let mem = create_guest_memory(64).unwrap();
        let kernel = LoadedKernel {
            entry: EntryPoint::Pvh(GuestAddress(HIMEM_START)),
            end: HIMEM_START,
            setup_header: None,
        };
        write_boot_structures(&mem, &kernel, None, &build_cmdline("").unwrap()).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        let cmdline: u64 = mem.read_obj(GuestAddress(PVH_INFO_START + 24)).unwrap();
        let memmap: u64 = mem.read_obj(GuestAddress(PVH_INFO_START + 40)).unwrap();
        let entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_START + 48)).unwrap();
        let last_ram_size: u64 = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24 + 8))
            .unwrap();
        assert_eq!(
            (magic, cmdline, memmap, entries, last_ram_size),
            (
                PVH_START_INFO_MAGIC,
                CMDLINE_START,
                PVH_MEMMAP_START,
                3,
                (64 << 20) - HIMEM_START
            )
        );
    }

    #[test]
    fn test_initrd_goes_page_aligned_to_the_top_of_low_memory() {
        let mem = create_guest_memory(64).unwrap();
        let kernel = LoadedKernel {
            entry: EntryPoint::Linux64(GuestAddress(HIMEM_START)),
            end: 2 * HIMEM_START,
            setup_header: None,
        };
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), vec![9u8; 5000]).unwrap();
        let initrd = load_initrd(&mem, &kernel, file.path()).unwrap();
        assert_eq!(
            initrd,
            LoadedInitrd {
                addr: ((64 << 20) - 5000) & !0xfff,
                size: 5000
            }
        );
    }

    #[test]
    fn test_initrd_that_would_overlap_the_kernel_is_refused() {
        let mem = create_guest_memory(16).unwrap();
        let kernel = LoadedKernel {
            entry: EntryPoint::Linux64(GuestAddress(HIMEM_START)),
            end: 15 << 20,
            setup_header: None,
        };
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), vec![9u8; 2 << 20]).unwrap();
        let error = load_initrd(&mem, &kernel, file.path()).unwrap_err();
        assert!(matches!(error, BootError::InitrdTooLarge { .. }));
    }

    #[test]
    fn test_loading_a_file_that_is_no_kernel_names_both_formats() {
        let mem = create_guest_memory(16).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"not a kernel").unwrap();
        let error = load_kernel(&mem, file.path()).unwrap_err();
        assert!(matches!(error, BootError::LoadKernel { .. }));
    }
}
