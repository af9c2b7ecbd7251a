//! Intel MultiProcessor Specification 1.4 table, so a kernel without ACPI finds every vCPU, the
//! IOAPIC and the ISA interrupt routing (Linux `CONFIG_X86_MPPARSE`).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{APIC_START, EBDA_START, IOAPIC_START, LAST_IRQ, LOW_RAM_END};

const MPC_SPEC_REVISION_1_4: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
/// Family 6 in the CPU signature field (any value works: Linux reads CPUID instead).
const CPU_SIGNATURE_FAMILY_6: u32 = 0x600;
const CPU_FEATURE_FPU_APIC: u32 = 0x001 | 0x200;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const FLOATING_POINTER_BYTES: usize = 16;
const HEADER_BYTES: usize = 44;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in the MP table's EBDA window: use fewer vCPUs")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory (is the guest memory at least 1 MiB?)")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

/// The table's bytes: floating pointer at `EBDA_START`, configuration table right after it.
pub fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    let ioapic_id = vcpus
        .checked_add(1)
        .ok_or(MptableError::TooManyCpus(vcpus))?;
    let mut body = Vec::new();
    let mut entries: u16 = 0;
    for cpu in 0..vcpus {
        body.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION]);
        let flags = CPU_FLAG_ENABLED | if cpu == 0 { CPU_FLAG_BSP } else { 0 };
        body.push(flags);
        body.extend_from_slice(&CPU_SIGNATURE_FAMILY_6.to_le_bytes());
        body.extend_from_slice(&CPU_FEATURE_FPU_APIC.to_le_bytes());
        body.extend_from_slice(&[0u8; 8]);
        entries += 1;
    }
    body.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    body.extend_from_slice(b"ISA   ");
    entries += 1;
    body.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_FLAG_ENABLED]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries += 1;
    for irq in 0..=LAST_IRQ as u8 {
        body.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            IRQ_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        entries += 1;
    }
    body.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        IRQ_TYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        0,
    ]);
    body.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        IRQ_TYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        1,
    ]);
    entries += 2;

    let table_len = HEADER_BYTES + body.len();
    if EBDA_START as usize + FLOATING_POINTER_BYTES + table_len > LOW_RAM_END as usize {
        return Err(MptableError::TooManyCpus(vcpus));
    }
    let table_addr = (EBDA_START as usize + FLOATING_POINTER_BYTES) as u32;

    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.extend_from_slice(&[MPC_SPEC_REVISION_1_4, 0]);
    header.extend_from_slice(b"BOTTLE  ");
    header.extend_from_slice(b"BOTTLE-VMM  ");
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entries.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    let mut table = header;
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_BYTES);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, MPC_SPEC_REVISION_1_4, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table into the EBDA.
pub fn setup(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_floating_pointer_and_table_checksums_are_zero() {
        let bytes = build(4).unwrap();
        let table_len = u16::from_le_bytes([bytes[20], bytes[21]]) as usize;
        assert_eq!(
            (
                checksum(&bytes[..16]),
                checksum(&bytes[16..16 + table_len]),
                &bytes[0..4],
                &bytes[16..20]
            ),
            (0, 0, &b"_MP_"[..], &b"PCMP"[..])
        );
    }

    #[test]
    fn test_table_lists_one_processor_entry_per_vcpu() {
        let bytes = build(3).unwrap();
        let processors: Vec<u8> = (0..3).map(|i| bytes[16 + HEADER_BYTES + 20 * i]).collect();
        assert_eq!(processors, vec![ENTRY_PROCESSOR; 3]);
    }

    #[test]
    fn test_max_vcpus_fit_in_the_ebda() {
        assert!(build(crate::config::MAX_VCPUS).is_ok());
    }
}
