//! Guest physical memory layout (x86_64). Every address the VMM writes a boot structure to is
//! named here, with why it sits where it does.

/// Global descriptor table, in the first page that nothing else claims (real-mode IVT ends at 0x500).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot GDT entries: null, code, data, TSS.
pub const BOOT_GDT_ENTRIES: usize = 4;
/// Interrupt descriptor table, right after the GDT (an empty IDT: the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, below the zero page.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map, right after the 56-byte `hvm_start_info` (room for 32 entries of 24 bytes).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// PVH module list (the initrd), after the memory map.
pub const PVH_MODLIST_START: u64 = 0x6400;
/// Linux boot protocol "zero page" (`struct boot_params`), handed over in `rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer: top of the page below the page tables, 16-byte aligned.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the identity map used by the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
/// The single page-directory-pointer table (4 entries used: 4 GiB).
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages identity-map the first 4 GiB, so the MMIO gap (devices)
/// is reachable by a guest that keeps our page tables (the probe guest does).
pub const PDE_START: u64 = 0xb000;
/// How many page directories follow `PDE_START`.
pub const PDE_COUNT: u64 = 4;
/// Kernel command line; Linux copies it early, 4 KiB is the x86 upper bound we accept.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we write, terminating NUL included.
pub const CMDLINE_MAX_BYTES: usize = 4096;
/// Extended BIOS data area: where Linux scans for the MP floating pointer without ACPI.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy video/BIOS hole, end of low RAM as announced in e820.
pub const LOW_RAM_END: u64 = 0xa0000;
/// Kernels (and the probe guest) load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO gap: no RAM between 3 GiB and 4 GiB (LAPIC, IOAPIC, TSS, virtio-mmio devices).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap, where RAM above 3 GiB continues.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window (registers + config space fit in 4 KiB).
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Three pages KVM needs for the real-mode TSS on Intel, high in the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// One page KVM needs for the EPT identity map, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// IOAPIC register window (fixed by the in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC register window.
pub const APIC_START: u64 = 0xfee0_0000;
/// Legacy IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ handed to virtio-mmio devices (0..=4 are timer, keyboard, cascade, COM2, COM1).
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// Last IRQ routed by the in-kernel IOAPIC (24 pins).
pub const LAST_IRQ: u32 = 23;
