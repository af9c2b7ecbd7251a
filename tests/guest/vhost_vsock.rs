//! rust-vmm's `vhost-device-vsock` for the QEMU guest tests (shared by bottle-init's and
//! bot-bottle's): a virtio-vsock device with no `/dev/vhost-vsock` on the host. Needs
//! `qemu_vm.rs` included beside it as `crate::qemu_vm`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// rust-vmm's `vhost-device-vsock`: a virtio-vsock device served from a host process, with the
/// Unix-socket convention our VMM uses (the host sends `CONNECT <port>` on the main socket; a
/// guest connection to the host's port P arrives on `<socket>_P`). It stands in for our VMM,
/// which cannot boot Linux under this machine's nested KVM.
pub struct VsockBackend {
    child: Child,
    dir: tempfile::TempDir,
}

impl VsockBackend {
    /// The backend, or `None` (with the reason printed) where the test should skip; under
    /// `CI=true` a missing backend fails.
    pub fn start() -> Option<VsockBackend> {
        let binary = crate::qemu_vm::which("vhost-device-vsock");
        let Some(binary) = binary else {
            let why = "`vhost-device-vsock` not found: cargo install --locked vhost-device-vsock";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {why}"
            );
            eprintln!("SKIPPED: vsock guest test: {why}");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let backend = VsockBackend {
            child: Command::new(binary)
                .args(["--guest-cid", "3", "--socket"])
                .arg(dir.path().join("vhost.sock"))
                .arg("--uds-path")
                .arg(dir.path().join("vm.vsock"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            dir,
        };
        let start = Instant::now();
        while !backend.vhost().exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "vhost-device-vsock did not create its socket"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Some(backend)
    }

    pub fn vhost(&self) -> PathBuf {
        self.dir.path().join("vhost.sock")
    }

    /// The host side of the guest's vsock.
    pub fn uds(&self) -> PathBuf {
        self.dir.path().join("vm.vsock")
    }
}

impl Drop for VsockBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
