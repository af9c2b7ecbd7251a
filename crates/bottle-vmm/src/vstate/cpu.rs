//! Per-vCPU architectural state at boot: CPUID, MSRs, registers, segments, FPU, LAPIC.

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::boot::EntryPoint;
use crate::arch::x86_64::layout::*;

// CPUID bits.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
const LEAF1_EBX_CPU_COUNT_SHIFT: u32 = 16;
const LEAF4_EAX_CORES_SHIFT: u32 = 26;
const LEAF4_EAX_CORES_MASK: u32 = 0x3f << LEAF4_EAX_CORES_SHIFT;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;
const TOPOLOGY_LEVEL_TYPE_SHIFT: u32 = 8;
/// Leaf 0xa describes performance counters, which we do not offer.
const LEAF_PMU: u32 = 0xa;

// CPUID features the guest must not see (Firecracker's normalisation and templates do the
// same). KVM_GET_SUPPORTED_CPUID already leaves most of them out on a current in-tree KVM;
// they are cleared anyway, so that what the guest sees does not depend on the host's KVM
// (this project also runs on the out-of-tree kvm_pvm, and on nested KVM that offers nesting).
/// Leaf 1 ECX:
/// - DTES64 (2), DS-CPL (4): the debug store, part of the PMU we do not offer.
/// - MONITOR (3): KVM runs MWAIT as a NOP unless the VMM disables MWAIT exits; a guest idling
///   on it would spin a host core instead of halting.
/// - VMX (5): nested virtualisation. An agent must not run VMs of its own in the sandbox: that
///   is more host-kernel surface (KVM's nested code) and a way to hide work from the guest OS.
/// - SMX (6), EST (7), TM2 (8), xTPR (14), DCA (18): trusted execution, frequency control,
///   thermal monitoring, chipset hints: MSRs and hardware we do not emulate.
/// - PDCM (15): IA32_PERF_CAPABILITIES, part of the PMU (Firecracker clears it too).
const LEAF1_ECX_DENIED: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | LEAF1_ECX_VMX
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 14)
    | (1 << 15)
    | (1 << 18);
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 EDX: DS (21, debug store), ACPI (22, thermal MSRs), TM (29), PBE (31): hardware
/// monitoring and power control we do not emulate.
const LEAF1_EDX_DENIED: u32 = (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);
/// Leaf 0x8000_0000 EAX: the highest extended leaf.
const LEAF_EXT_MAX: u32 = 0x8000_0000;
/// Leaf 0x8000_0001 ECX:
/// - SVM (2): nested virtualisation, AMD's VMX (see above).
/// - IBS (10), PERFCTR_CORE (23), PERFCTR_NB (24), PERFCTR_LLC (28): AMD's sampling and
///   extended performance counters, the PMU we do not offer.
/// - WDT (13): the watchdog timer, not emulated.
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const EXT1_ECX_SVM: u32 = 1 << 2;
const EXT1_ECX_DENIED: u32 =
    EXT1_ECX_SVM | (1 << 10) | (1 << 13) | (1 << 23) | (1 << 24) | (1 << 28);
/// Leaf 0x8000_000a describes SVM's features (revision, ASIDs, nested paging...): empty when
/// there is no SVM.
const LEAF_SVM: u32 = 0x8000_000a;
/// Leaf 0x8000_0022 describes AMD's PerfMonV2 counters: the PMU we do not offer.
const LEAF_AMD_PMU: u32 = 0x8000_0022;
/// Leaves 0x8000_0002..=0x8000_0004: the 48-byte processor brand string, NUL-padded.
const LEAF_BRAND_FIRST: u32 = 0x8000_0002;
const LEAF_BRAND_LAST: u32 = 0x8000_0004;
pub const BRAND_STRING_BYTES: usize = 48;
/// The brand string when the host's own is blank. KVM (6.1 at least) blanks the brand leaves
/// in KVM_GET_SUPPORTED_CPUID, so without one of ours the guest sees none (Linux then names
/// the CPU from its family table: "Hammer" under QEMU's emulated AMD).
pub const FALLBACK_BRAND: &str = "bot-bottle vCPU";

// MSR indices and boot values.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

// Control registers.
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED_BIT: u64 = 2;
/// x87 control word after FNINIT.
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR reset value: all exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

// LAPIC local vector table.
const APIC_LVT0_OFFSET: usize = 0x350;
const APIC_LVT1_OFFSET: usize = 0x360;
const APIC_DELIVERY_MODE_EXTINT: u32 = 0x7;
const APIC_DELIVERY_MODE_NMI: u32 = 0x4;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM refused the CPUID table (KVM_SET_CPUID2)")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot build the boot MSR list")]
    BuildMsrs(#[source] vmm_sys_util::fam::Error),
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    SetMsrs { set: usize, wanted: usize },
    #[error("KVM refused a boot MSR")]
    Msrs(#[source] kvm_ioctls::Error),
    #[error("KVM refused the boot registers")]
    Regs(#[source] kvm_ioctls::Error),
    #[error("KVM refused the boot segment registers")]
    Sregs(#[source] kvm_ioctls::Error),
    #[error("KVM refused the FPU state")]
    Fpu(#[source] kvm_ioctls::Error),
    #[error("cannot program the local APIC (is the in-kernel irqchip created?)")]
    Lapic(#[source] kvm_ioctls::Error),
}

/// The brand string the guest sees: the host's, as the real `cpuid` instruction gives it to
/// this process (so `model name` in the guest names the CPU it runs on, as on the host, and
/// tools that tune for a CPU model see it), or [`FALLBACK_BRAND`] when the host's is blank.
pub fn guest_brand_string() -> [u8; BRAND_STRING_BYTES] {
    brand_or_fallback(host_brand_string())
}

/// The host's brand string from the `cpuid` instruction (zeroes when it has none).
fn host_brand_string() -> [u8; BRAND_STRING_BYTES] {
    let mut brand = [0u8; BRAND_STRING_BYTES];
    // SAFETY: CPUID exists on every x86_64 CPU and only reads identification registers.
    #[allow(unused_unsafe)]
    let max_ext = unsafe { core::arch::x86_64::__cpuid(LEAF_EXT_MAX) }.eax;
    if max_ext < LEAF_BRAND_LAST {
        return brand;
    }
    for (chunk, leaf) in brand
        .chunks_exact_mut(16)
        .zip(LEAF_BRAND_FIRST..=LEAF_BRAND_LAST)
    {
        // SAFETY: as above; the leaf exists (below the highest extended leaf).
        #[allow(unused_unsafe)]
        let r = unsafe { core::arch::x86_64::__cpuid(leaf) };
        for (bytes, word) in chunk.chunks_exact_mut(4).zip([r.eax, r.ebx, r.ecx, r.edx]) {
            bytes.copy_from_slice(&word.to_le_bytes());
        }
    }
    brand
}

/// `brand` unless it is blank (NULs and spaces only), else [`FALLBACK_BRAND`].
fn brand_or_fallback(brand: [u8; BRAND_STRING_BYTES]) -> [u8; BRAND_STRING_BYTES] {
    if brand.iter().any(|b| *b != 0 && *b != b' ') {
        return brand;
    }
    let mut fallback = [0u8; BRAND_STRING_BYTES];
    fallback[..FALLBACK_BRAND.len()].copy_from_slice(FALLBACK_BRAND.as_bytes());
    fallback
}

/// Rewrites the host-supported CPUID for one vCPU: its APIC id, the hypervisor bit, a topology of
/// `vcpus` single-threaded cores in one package, no PMU, no nested virtualisation or other
/// feature a sandboxed guest must not see (see the `*_DENIED` constants), and the brand string
/// of [`guest_brand_string`].
pub fn normalize_cpuid(cpuid: &mut CpuId, vcpu_index: u8, vcpus: u8) {
    normalize_cpuid_with_brand(cpuid, vcpu_index, vcpus, &guest_brand_string());
}

/// [`normalize_cpuid`] with the brand string given (so that tests do not depend on the host).
fn normalize_cpuid_with_brand(
    cpuid: &mut CpuId,
    vcpu_index: u8,
    vcpus: u8,
    brand: &[u8; BRAND_STRING_BYTES],
) {
    set_brand_string(cpuid, brand);
    let apic_id = u32::from(vcpu_index);
    let count = u32::from(vcpus);
    let core_shift = 32 - (count.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0xffff)
                    | (apic_id << LEAF1_EBX_APIC_ID_SHIFT)
                    | (count << LEAF1_EBX_CPU_COUNT_SHIFT);
                entry.ecx = (entry.ecx & !LEAF1_ECX_DENIED) | LEAF1_ECX_HYPERVISOR;
                entry.edx &= !LEAF1_EDX_DENIED;
                if vcpus > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                entry.eax =
                    (entry.eax & !LEAF4_EAX_CORES_MASK) | ((count - 1) << LEAF4_EAX_CORES_SHIFT);
            }
            0xb | 0x1f => {
                let (eax, ebx, level_type) = match entry.index {
                    0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                    1 => (core_shift, count, TOPOLOGY_LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = eax;
                entry.ebx = ebx;
                entry.ecx = (level_type << TOPOLOGY_LEVEL_TYPE_SHIFT) | (entry.index & 0xff);
                entry.edx = apic_id;
            }
            LEAF_EXT_FEATURES => entry.ecx &= !EXT1_ECX_DENIED,
            LEAF_PMU | LEAF_SVM | LEAF_AMD_PMU => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
}

/// Puts `brand` into the brand-string leaves, adding them (and raising the highest extended
/// leaf to them) when KVM's table lacks them.
fn set_brand_string(cpuid: &mut CpuId, brand: &[u8; BRAND_STRING_BYTES]) {
    for (chunk, leaf) in brand
        .chunks_exact(16)
        .zip(LEAF_BRAND_FIRST..=LEAF_BRAND_LAST)
    {
        let word =
            |i: usize| u32::from_le_bytes([chunk[i], chunk[i + 1], chunk[i + 2], chunk[i + 3]]);
        let value = kvm_cpuid_entry2 {
            function: leaf,
            eax: word(0),
            ebx: word(4),
            ecx: word(8),
            edx: word(12),
            ..Default::default()
        };
        match cpuid.as_mut_slice().iter_mut().find(|e| e.function == leaf) {
            Some(entry) => *entry = value,
            // Fails only when the table is full (KVM_MAX_CPUID_ENTRIES): the guest then keeps
            // the brand KVM gave it, which is cosmetic.
            None => {
                let _ = cpuid.push(value);
            }
        }
    }
    match cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == LEAF_EXT_MAX)
    {
        Some(entry) => entry.eax = entry.eax.max(LEAF_BRAND_LAST),
        None => {
            let _ = cpuid.push(kvm_cpuid_entry2 {
                function: LEAF_EXT_MAX,
                eax: LEAF_BRAND_LAST,
                ..Default::default()
            });
        }
    }
}

pub fn set_cpuid(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid).map_err(CpuError::SetCpuid)
}

pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(CpuError::BuildMsrs)?;
    let set = vcpu.set_msrs(&msrs).map_err(CpuError::Msrs)?;
    if set != entries.len() {
        return Err(CpuError::SetMsrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// GDT entry from flags, base and limit (the classic packing).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// 64-bit code segment (L bit), 32-bit code segment (D bit), flat data, 32-bit TSS.
const GDT_CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
const GDT_CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
const GDT_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
const GDT_TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// The boot GDT for an entry mode: null, code, data, TSS.
pub fn gdt_table(entry: EntryPoint) -> [u64; BOOT_GDT_ENTRIES] {
    let code = match entry {
        EntryPoint::Linux64(_) => GDT_CODE64,
        EntryPoint::Pvh(_) => GDT_CODE32,
    };
    [0, code, GDT_DATA, GDT_TSS]
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let granularity = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granularity == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Registers, segments, control registers and FPU for the boot vCPU.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(CpuError::Sregs)?;
    let gdt = gdt_table(entry);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED_BIT,
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64(rip) => {
            sregs.cr0 |= CR0_PE | CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryPoint::Pvh(rip) => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip.0;
            regs.rbx = PVH_INFO_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(CpuError::Sregs)?;
    vcpu.set_regs(&regs).map_err(CpuError::Regs)?;
    setup_fpu(vcpu)
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuError::Fpu)
}

fn set_lvt_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (byte, reg) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *byte = *reg as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (reg, byte) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *reg = byte as std::os::raw::c_char;
    }
}

/// LINT0 as ExtINT (the PIC), LINT1 as NMI, as a BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(CpuError::Lapic)?;
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT0_OFFSET, APIC_DELIVERY_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT1_OFFSET, APIC_DELIVERY_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(CpuError::Lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid_with(leaves: &[(u32, u32)]) -> CpuId {
        let entries: Vec<kvm_cpuid_entry2> = leaves
            .iter()
            .map(|(function, index)| kvm_cpuid_entry2 {
                function: *function,
                index: *index,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn test_cpuid_leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut cpuid = cpuid_with(&[(1, 0)]);
        normalize_cpuid(&mut cpuid, 3, 4);
        let leaf = cpuid.as_slice()[0];
        assert_eq!(
            (leaf.ebx >> 24, (leaf.ebx >> 16) & 0xff, leaf.ecx >> 31),
            (3, 4, 1)
        );
    }

    #[test]
    fn test_cpuid_topology_leaf_reports_cores_and_x2apic_id() {
        let mut cpuid = cpuid_with(&[(0xb, 0), (0xb, 1)]);
        normalize_cpuid(&mut cpuid, 2, 4);
        let core_level = cpuid.as_slice()[1];
        assert_eq!(
            (
                core_level.eax,
                core_level.ebx,
                core_level.ecx >> 8,
                core_level.edx
            ),
            (2, 4, 2, 2)
        );
    }

    fn entry(cpuid: &CpuId, function: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function)
            .unwrap()
    }

    fn brand(text: &str) -> [u8; BRAND_STRING_BYTES] {
        let mut brand = [0u8; BRAND_STRING_BYTES];
        brand[..text.len()].copy_from_slice(text.as_bytes());
        brand
    }

    fn all_ones_cpuid() -> CpuId {
        let mut cpuid = cpuid_with(&[
            (1, 0),
            (LEAF_EXT_MAX, 0),
            (LEAF_EXT_FEATURES, 0),
            (LEAF_SVM, 0),
            (LEAF_AMD_PMU, 0),
        ]);
        for e in cpuid.as_mut_slice() {
            (e.eax, e.ebx, e.ecx, e.edx) = (!0, !0, !0, !0);
        }
        cpuid
    }

    #[test]
    fn test_cpuid_hides_vmx_svm_and_the_svm_leaf_from_a_host_offering_everything() {
        let mut cpuid = all_ones_cpuid();
        normalize_cpuid_with_brand(&mut cpuid, 0, 1, &brand("x"));
        let svm = entry(&cpuid, LEAF_SVM);
        assert_eq!(
            (
                entry(&cpuid, 1).ecx & LEAF1_ECX_VMX,
                entry(&cpuid, LEAF_EXT_FEATURES).ecx & EXT1_ECX_SVM,
                (svm.eax, svm.ebx, svm.ecx, svm.edx),
            ),
            (0, 0, (0, 0, 0, 0))
        );
    }

    #[test]
    fn test_cpuid_clears_every_denied_feature_bit_and_the_amd_pmu_leaf() {
        let mut cpuid = all_ones_cpuid();
        normalize_cpuid_with_brand(&mut cpuid, 0, 1, &brand("x"));
        let pmu = entry(&cpuid, LEAF_AMD_PMU);
        assert_eq!(
            (
                entry(&cpuid, 1).ecx & LEAF1_ECX_DENIED,
                entry(&cpuid, 1).edx & LEAF1_EDX_DENIED,
                entry(&cpuid, LEAF_EXT_FEATURES).ecx & EXT1_ECX_DENIED,
                pmu.eax | pmu.ebx | pmu.ecx | pmu.edx,
            ),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn test_cpuid_keeps_what_linux_boots_on_tsc_deadline_x2apic_cx16_xsave() {
        // TSC_DEADLINE (24): our in-kernel LAPIC emulates it; X2APIC (21); CX16 (13) and
        // XSAVE (26): what checks::linux runs; SSE3 (0), SSSE3 (9): user space.
        let wanted: u32 = (1 << 24) | (1 << 21) | (1 << 13) | (1 << 26) | 1 | (1 << 9);
        let mut cpuid = all_ones_cpuid();
        normalize_cpuid_with_brand(&mut cpuid, 0, 1, &brand("x"));
        assert_eq!(entry(&cpuid, 1).ecx & wanted, wanted);
    }

    #[test]
    fn test_cpuid_brand_leaves_spell_the_given_brand() {
        let mut cpuid = cpuid_with(&[
            (LEAF_EXT_MAX, 0),
            (0x8000_0002, 0),
            (0x8000_0003, 0),
            (0x8000_0004, 0),
        ]);
        normalize_cpuid_with_brand(&mut cpuid, 0, 1, &brand("AMD EPYC 7R13 Processor"));
        let mut spelled = Vec::new();
        for leaf in LEAF_BRAND_FIRST..=LEAF_BRAND_LAST {
            let e = entry(&cpuid, leaf);
            for word in [e.eax, e.ebx, e.ecx, e.edx] {
                spelled.extend_from_slice(&word.to_le_bytes());
            }
        }
        assert_eq!(spelled, brand("AMD EPYC 7R13 Processor"));
    }

    #[test]
    fn test_cpuid_without_brand_leaves_gets_them_and_a_highest_leaf_that_reaches_them() {
        let mut cpuid = cpuid_with(&[(1, 0), (LEAF_EXT_MAX, 0)]);
        cpuid.as_mut_slice()[1].eax = LEAF_EXT_FEATURES;
        normalize_cpuid_with_brand(&mut cpuid, 0, 1, &brand("bot-bottle vCPU"));
        assert_eq!(
            (
                entry(&cpuid, LEAF_EXT_MAX).eax,
                entry(&cpuid, LEAF_BRAND_FIRST).eax.to_le_bytes(),
            ),
            (LEAF_BRAND_LAST, *b"bot-")
        );
    }

    #[test]
    fn test_blank_host_brand_falls_back_to_the_bot_bottle_name() {
        let mut blank = [0u8; BRAND_STRING_BYTES];
        blank[..4].fill(b' ');
        assert_eq!(brand_or_fallback(blank), brand(FALLBACK_BRAND));
    }

    #[test]
    fn test_host_brand_is_kept_as_it_is() {
        let host = brand("  Intel(R) Xeon(R) CPU @ 2.20GHz");
        assert_eq!(brand_or_fallback(host), host);
    }

    #[test]
    fn test_gdt_code64_segment_is_long_mode_and_present() {
        let segment = segment_from_gdt(GDT_CODE64, 1);
        assert_eq!(
            (segment.l, segment.present, segment.selector, segment.limit),
            (1, 1, 8, 0xffff_ffff)
        );
    }
}
