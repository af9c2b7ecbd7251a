//! The vsock channel under real KVM with the probe guest: a host-initiated connection, egress to
//! the allowlisted destination, and the guest's attacks on the allowlist.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use bottle_vmm::{AllowRule, GuestExit, Vmm, VsockConfig};
use common::*;

/// Accepts `connections` connections one after the other; on each reads `expect` bytes and
/// answers `echo:<bytes>`. Returns what it read.
fn echo_listener(
    listener: TcpListener,
    connections: usize,
    expect: usize,
) -> JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        (0..connections)
            .map(|_| {
                let (mut stream, _) = listener.accept().unwrap();
                let mut got = vec![0u8; expect];
                stream.read_exact(&mut got).unwrap();
                stream.write_all(b"echo:").unwrap();
                stream.write_all(&got).unwrap();
                got
            })
            .collect()
    })
}

/// Connects to the guest's port 7000 through the Unix socket and exchanges a greeting.
fn host_client(path: std::path::PathBuf) -> JoinHandle<(String, Vec<u8>)> {
    std::thread::spawn(move || {
        let mut stream = UnixStream::connect(path).unwrap();
        stream.write_all(b"CONNECT 7000\n").unwrap();
        let mut ok = [0u8; 8];
        stream.read_exact(&mut ok).unwrap();
        stream.write_all(b"hello guest").unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        (String::from_utf8_lossy(&ok).into_owned(), rest)
    })
}

#[test]
fn test_guest_reaches_only_its_allowlisted_destination_and_attacks_are_reset_and_logged() {
    if !kvm_usable("vsock allowlist") {
        return;
    }
    // Arrange: the allowed destination, and two live listeners the guest must not reach: the
    // allowed address on an unpublished port, and another loopback address.
    let dir = tempfile::tempdir().unwrap();
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    let unpublished = TcpListener::bind("127.0.0.1:0").unwrap();
    let unpublished_port = unpublished.local_addr().unwrap().port();
    let other_host = TcpListener::bind("127.0.0.2:0").unwrap();
    let other_host_addr = other_host.local_addr().unwrap();
    let vsock = VsockConfig {
        guest_cid: 42,
        uds_path: dir.path().join("vsock.sock"),
        allowlist: vec![AllowRule {
            addr: Ipv4Addr::LOCALHOST,
            port: allowed_port,
        }],
        event_log: Some(dir.path().join("events.jsonl")),
    };
    let extra = format!(
        "probe.allowed=127.0.0.1:{allowed_port} probe.denied_port=127.0.0.1:{unpublished_port} probe.denied_addr={other_host_addr}"
    );
    let config = probe_config(dir.path(), "vsock", &extra, 1, Some(vsock.clone()));
    let vmm = Vmm::build(&config).unwrap();
    let stats = vmm.vsock_stats().unwrap();
    let echo = echo_listener(allowed, 2, b"ping from probe".len());
    let host = host_client(vsock.uds_path.clone());

    // Act
    let exit = run_with_watchdog(vmm, dir.path());

    // Assert
    let log = serial_log(dir.path());
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
    for marker in [
        "HOST CONNECT OK",
        "ALLOWED OK",
        "DIRECT OK",
        "DENIED_ADDR RST",
        "DENIED_PORT RST",
        "DENIED_NAME RST",
        "DENIED_VSOCK_PORT RST",
        "GARBAGE DROPPED",
        "PROBE DONE",
    ] {
        assert!(
            log.contains(marker),
            "missing {marker} in serial log:\n{log}"
        );
    }
    assert_eq!(echo.join().unwrap(), vec![b"ping from probe".to_vec(); 2]);
    assert_eq!(
        host.join().unwrap(),
        ("OK 7000\n".to_string(), b"hello host".to_vec())
    );
    unpublished.set_nonblocking(true).unwrap();
    other_host.set_nonblocking(true).unwrap();
    assert!(
        unpublished.accept().is_err(),
        "the unpublished port was reached"
    );
    assert!(
        other_host.accept().is_err(),
        "the other address was reached"
    );

    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let reasons: Vec<String> = events
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "not_allowlisted",
            "not_allowlisted",
            "malformed_request",
            "unknown_vsock_port",
            "not_allowlisted"
        ]
    );
    assert!(
        events.contains(&other_host_addr.to_string())
            && events.contains(&format!("127.0.0.1:{unpublished_port}"))
    );
    let stats = stats.lock().unwrap();
    assert_eq!(
        (stats.malformed_descriptors, stats.muxer.denied.len()),
        (3, 5)
    );
    assert!(
        !vsock.uds_path.exists(),
        "the Unix socket is removed when the VM ends"
    );
}
