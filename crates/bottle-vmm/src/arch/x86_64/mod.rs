//! x86_64 guest setup: the guest physical memory layout ([`layout`]), loading the kernel and
//! initrd and writing the boot structures (zero page, PVH start info, e820, page tables, GDT:
//! [`boot`]), and the MP table that describes the vCPUs and the IOAPIC ([`mptable`]).

pub mod boot;
pub mod layout;
pub mod mptable;
