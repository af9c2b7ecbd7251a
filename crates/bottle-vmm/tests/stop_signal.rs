//! SIGTERM to the VMM process stops the machine cleanly (its own test binary: the handlers it
//! installs are process-wide).

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use bottle_vmm::{AllowRule, Vmm, VmmError, VsockConfig};
use common::*;

#[test]
fn test_sigterm_stops_a_running_guest_and_removes_its_vsock_socket() {
    if !kvm_usable("SIGTERM stop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vsock = VsockConfig {
        guest_cid: 5,
        uds_path: dir.path().join("vsock.sock"),
        allowlist: vec![AllowRule {
            addr: Ipv4Addr::LOCALHOST,
            port: 9,
        }],
        event_log: None,
    };
    let config = probe_config(dir.path(), "spin", "", 1, Some(vsock.clone()));
    bottle_vmm::install_stop_signals().unwrap();
    let vmm = Vmm::build(&config).unwrap();
    let log = dir.path().join("serial.log");
    std::thread::spawn(move || {
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("SPINNING")
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill(2) on our own pid with a signal whose handler install_stop_signals set.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    let result = vmm.run();
    assert!(matches!(result, Err(VmmError::Stopped)), "{result:?}");
    assert!(
        !vsock.uds_path.exists(),
        "the vsock socket outlived the VMM"
    );
}
