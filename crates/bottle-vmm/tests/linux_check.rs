//! The "can this KVM run Linux at all" check, under this machine's real KVM: plain code runs
//! and halts, a faulting instruction is named, and the verdict on Linux's boot instructions
//! matches what is known of this KVM (shared/docs/FINDINGS.md: the nested `kvm_pvm` stops on
//! `lock cmpxchg16b`; hardware KVM runs it).

mod common;

use std::path::Path;

use bottle_vmm::checks::linux::{self, Instruction, LinuxCheckError};
use common::kvm_usable;

const KVM: &str = "/dev/kvm";

#[test]
fn plain_code_runs_to_its_halt() {
    if !kvm_usable("plain_code_runs_to_its_halt") {
        return;
    }
    // mov [rdi], rbx: a store to ordinary memory, which every KVM runs.
    let store = Instruction {
        name: "mov [rdi], rbx",
        code: &[0x48, 0x89, 0x1f],
        needs_leaf1_ecx: 0,
    };
    let report = linux::run(Path::new(KVM), &[store]).unwrap();
    assert_eq!(report.ran, vec!["mov [rdi], rbx"]);
}

#[test]
fn a_faulting_instruction_is_named_with_what_happened() {
    if !kvm_usable("a_faulting_instruction_is_named_with_what_happened") {
        return;
    }
    let nop = Instruction {
        name: "nop",
        code: &[0x90],
        needs_leaf1_ecx: 0,
    };
    // ud2 raises #UD; with no IDT the CPU shuts down (or the emulator gives up on it).
    let ud2 = Instruction {
        name: "ud2",
        code: &[0x0f, 0x0b],
        needs_leaf1_ecx: 0,
    };
    let err = linux::run(Path::new(KVM), &[nop, ud2]).unwrap_err();
    match &err {
        LinuxCheckError::Unsupported { instruction, .. } => assert_eq!(*instruction, "ud2"),
        other => panic!("expected the fault on ud2, got {other}"),
    }
    assert!(err.to_string().contains("`ud2`"), "{err}");
    assert!(err.fix().contains("--backend docker"), "{}", err.fix());
}

#[test]
fn the_verdict_on_linux_matches_this_kvm() {
    if !kvm_usable("the_verdict_on_linux_matches_this_kvm") {
        return;
    }
    let verdict = linux::check_linux_guest(Path::new(KVM));
    if Path::new("/sys/module/kvm_pvm").exists() {
        // FINDINGS.md: this nested KVM's emulator stops on SLUB's lock cmpxchg16b.
        let err = verdict.unwrap_err();
        match &err {
            LinuxCheckError::Unsupported {
                instruction, how, ..
            } => {
                assert_eq!(*instruction, "lock cmpxchg16b", "{err}");
                assert!(!how.is_empty());
            }
            other => panic!("expected lock cmpxchg16b to be refused, got {other}"),
        }
        assert!(
            err.to_string().contains("cannot run a Linux guest"),
            "{err}"
        );
    } else {
        let report = verdict.unwrap();
        eprintln!("this KVM ran {:?}", report.ran);
    }
}
