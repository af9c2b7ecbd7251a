//! Guest RAM: anonymous mappings laid out around the 32-bit MMIO gap.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

const BYTES_PER_MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: lower mem_mib or free host memory")]
    Map {
        mib: u32,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges for `mem_mib` of memory: below the gap, then from 4 GiB on.
pub fn ram_ranges(mem_mib: u32) -> Vec<(GuestAddress, usize)> {
    let size = u64::from(mem_mib) * BYTES_PER_MIB;
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps guest RAM (anonymous, private, not yet touched).
pub fn create_guest_memory(mem_mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(mem_mib)).map_err(|source| MemoryError::Map {
        mib: mem_mib,
        source,
    })
}

/// Hands every region of `mem` to the VM, one slot each.
///
/// # Safety
/// `mem` must stay mapped for as long as `vm` exists: KVM uses the mappings until the VM fd
/// is closed.
pub unsafe fn register_regions(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in mem.iter().enumerate() {
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`; the caller keeps `mem` alive
        // for as long as `vm` (this function's contract).
        unsafe { vm.set_user_memory_region(desc) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_small_memory_is_one_range_from_zero() {
        assert_eq!(ram_ranges(64), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn test_memory_above_3gib_skips_the_mmio_gap() {
        assert_eq!(
            ram_ranges(4096),
            vec![
                (GuestAddress(0), 3 << 30),
                (GuestAddress(MMIO_GAP_END), 1 << 30)
            ]
        );
    }
}
