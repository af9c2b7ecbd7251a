//! Boots a real Linux kernel under our VMM. Needs hardware KVM: the nested KVM of the
//! development machines cannot run Linux (FINDINGS.md), so there the test says why it skips.
//!
//! `BOTTLE_VMM_TEST_KERNEL=/path/to/vmlinux-or-bzImage` selects the kernel (built by
//! `bot-bottle kernel build`). Without a root filesystem the kernel ends in a panic
//! ("VFS: Unable to mount root fs"), which also exercises the panic path. No initrd is passed,
//! on purpose: the outcome must not depend on what an initrd would do.

mod common;

use std::time::Duration;

use bottle_vmm::{GuestExit, SerialOutput, Vmm, VmmConfig};
use common::*;

/// What the console must show: the kernel's banner, printed first thing by `start_kernel`.
const BOOT_MARKER: &str = "Linux version";
/// Time a minimal kernel needs to reach its root mount on hardware KVM, with margin.
const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn skip(reason: &str) {
    eprintln!(
        "SKIPPED test_linux_kernel_boots_to_its_banner_and_ends_in_a_root_fs_panic: {reason}"
    );
}

#[test]
fn test_linux_kernel_boots_to_its_banner_and_ends_in_a_root_fs_panic() {
    let Ok(kernel) = std::env::var("BOTTLE_VMM_TEST_KERNEL") else {
        return skip("BOTTLE_VMM_TEST_KERNEL is not set (path to a vmlinux or bzImage from `bot-bottle kernel build`)");
    };
    if !kvm_usable("linux boot") {
        return;
    }
    // Only a KVM that cannot run Linux is a reason to skip; any other failure of the check
    // is a failure here.
    match bottle_vmm::linux_check::check_linux_guest(std::path::Path::new("/dev/kvm")) {
        Ok(_) => {}
        Err(why @ bottle_vmm::linux_check::LinuxCheckError::Unsupported { .. }) => {
            return skip(&format!("{why}; run on hardware KVM"));
        }
        Err(other) => panic!("the Linux check failed: {other}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let config = VmmConfig {
        kernel: kernel.into(),
        cmdline: "earlyprintk=serial,ttyS0 loglevel=8".into(),
        initrd: None,
        vcpus: 2,
        mem_mib: 256,
        serial: SerialOutput::File(dir.path().join("serial.log")),
        vsock: None,
        disks: vec![],
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let vmm = Vmm::build(&config).unwrap();
    std::thread::spawn(move || {
        let _ = tx.send(vmm.run());
    });
    let exit = rx.recv_timeout(LINUX_BOOT_TIMEOUT).map(|r| r.unwrap());
    let log = serial_log(dir.path());
    assert!(
        log.contains(BOOT_MARKER),
        "no {BOOT_MARKER:?} on the console ({exit:?}):\n{log}"
    );
    assert_eq!(exit, Ok(GuestExit::Panic), "console:\n{log}");
}
