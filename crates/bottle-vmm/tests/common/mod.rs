//! Shared by the KVM tests and the benchmark: KVM availability, the probe guest build, and
//! running a machine with a watchdog.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use bottle_vmm::{GuestExit, SerialOutput, VmmConfig, VsockConfig};

/// Longest a probe guest may run before the test gives up on it.
pub const PROBE_RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Guest memory for probe guests: its image sits at 2 MiB, its queues and buffers up to 10 MiB.
pub const PROBE_MEM_MIB: u32 = 32;

/// Whether /dev/kvm can be used. Without it: under CI (`CI=true`) the test fails, elsewhere it
/// prints why it skips and returns false.
pub fn kvm_usable(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: /dev/kvm is not usable and CI=true: KVM tests must run in CI"
        );
        eprintln!("SKIPPED {test}: /dev/kvm is missing or not readable and writable by this user");
    }
    usable
}

/// Builds the probe guest once per test binary (see `bottle_vmm::probe`).
pub fn probe_guest() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bottle-vmm-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        bottle_vmm::probe::build(&dir).unwrap()
    })
}

/// A probe machine: `mode` and extra `probe.*` arguments on its command line.
pub fn probe_config(
    dir: &Path,
    mode: &str,
    extra: &str,
    vcpus: u8,
    vsock: Option<VsockConfig>,
) -> VmmConfig {
    let cid = vsock.as_ref().map_or(0, |v| v.guest_cid);
    VmmConfig {
        kernel: probe_guest().to_path_buf(),
        cmdline: format!("probe.mode={mode} probe.mem_mib={PROBE_MEM_MIB} probe.cid={cid} {extra}"),
        initrd: None,
        vcpus,
        mem_mib: PROBE_MEM_MIB,
        serial: SerialOutput::File(dir.join("serial.log")),
        vsock,
        disks: vec![],
    }
}

/// Runs `vmm` on a thread and waits for it, failing the test after `PROBE_RUN_TIMEOUT`.
pub fn run_with_watchdog(vmm: bottle_vmm::Vmm, dir: &Path) -> GuestExit {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vmm.run());
    });
    let Ok(result) = rx.recv_timeout(PROBE_RUN_TIMEOUT) else {
        panic!(
            "the probe guest did not end in time; serial log:\n{}",
            serial_log(dir)
        );
    };
    result.expect("the VMM failed")
}

pub fn serial_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default()
}
