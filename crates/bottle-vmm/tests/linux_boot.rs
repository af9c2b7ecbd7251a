//! Boots a real Linux kernel under our VMM. Needs a KVM that runs Linux: where this one cannot
//! (the nested `kvm_pvm` of the project's machines, FINDINGS.md), the test runs itself inside
//! the nested-KVM harness's emulated machine (crates/nested-kvm), whose KVM can; it skips only
//! when neither is possible, and fails instead under CI=true.
//!
//! `BOTTLE_VMM_TEST_KERNEL=/path/to/vmlinux-or-bzImage` selects the kernel (default: the newest
//! one `bot-bottle kernel build` cached). Without a root filesystem the kernel ends in a panic
//! ("VFS: Unable to mount root fs"), which also exercises the panic path. No initrd is passed,
//! on purpose: the outcome must not depend on what an initrd would do.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bottle_vmm::{GuestExit, SerialOutput, Vmm, VmmConfig};
use common::*;

/// What the console must show: the kernel's banner, printed first thing by `start_kernel`.
const BOOT_MARKER: &str = "Linux version";
/// Time a minimal kernel needs to reach its root mount on hardware KVM, with margin.
const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

const TEST_NAME: &str = "test_linux_kernel_boots_to_its_banner_and_ends_in_a_root_fs_panic";

fn skip(reason: &str) {
    assert!(
        !nested_kvm::in_ci(),
        "{TEST_NAME}: CI=true but it cannot run: {reason}"
    );
    eprintln!("SKIPPED {TEST_NAME}: {reason}");
}

/// `$BOTTLE_VMM_TEST_KERNEL`, else the newest kernel `bot-bottle kernel build` cached.
fn test_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("BOTTLE_VMM_TEST_KERNEL").filter(|v| !v.is_empty()) {
        return Some(k.into());
    }
    let env = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cache = env("BOT_BOTTLE_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("bot-bottle")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/bot-bottle")))?;
    std::fs::read_dir(cache.join("kernel"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("vmlinux"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

#[test]
fn test_linux_kernel_boots_to_its_banner_and_ends_in_a_root_fs_panic() {
    let Some(kernel) = test_kernel() else {
        return skip("no guest kernel: set BOTTLE_VMM_TEST_KERNEL to a vmlinux or bzImage, or run `bot-bottle kernel build`");
    };
    if !kvm_usable("linux boot") {
        return;
    }
    // A KVM that cannot run Linux (this project's nested kvm_pvm) hands the test to the
    // nested-KVM harness: the same test binary, inside an emulated machine whose KVM can.
    // Any other failure of the check is a failure here.
    match bottle_vmm::checks::linux::check_linux_guest(std::path::Path::new("/dev/kvm")) {
        Ok(_) => {}
        Err(why @ bottle_vmm::checks::linux::LinuxCheckError::Unsupported { .. })
            if !nested_kvm::in_l1() =>
        {
            eprintln!("{why}: running {TEST_NAME} under KVM in the nested-KVM harness");
            let Some(assets) = nested_kvm::assets_or_skip(TEST_NAME) else {
                return;
            };
            let dir = kernel.parent().unwrap().to_path_buf();
            let console = nested_kvm::run_this_test_in_l1(
                &assets,
                TEST_NAME,
                &[("BOTTLE_VMM_TEST_KERNEL", kernel.display().to_string())],
                &[(dir, true)],
            );
            assert!(
                console.contains("test result: ok. 1 passed"),
                "the test did not pass in L1:\n{console}"
            );
            return;
        }
        Err(other) => panic!("the Linux check failed: {other}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let config = VmmConfig {
        kernel,
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
