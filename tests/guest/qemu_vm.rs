//! A microVM under QEMU software emulation for the guest tests: the machine flags verified in
//! shared/docs/FINDINGS.md, disks as virtio-blk (`/dev/vda`, `/dev/vdb`, ... in order), and the
//! control channel on a virtio serial port, or on virtio-vsock served by rust-vmm's
//! `vhost-device-vsock` (no `/dev/vhost-vsock` on these hosts).
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bottle_proto::Client;

/// `name` on `PATH`, else among the programs `cargo install` put in `$CARGO_HOME/bin`.
pub fn which(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        Some(home.join("bin").join(name)).filter(|p| p.is_file())
    })
}

/// Name of the virtio serial port bottle-init serves the control protocol on.
pub const PORT_NAME: &str = "bottle.control";
/// Longest a guest may take to answer `health` under emulation on a loaded 2-core machine.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// What to boot.
pub struct Machine<'a> {
    pub qemu: &'a Path,
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    /// Kernel arguments; the console, reboot and panic options are added before them.
    pub append: &'a str,
    /// (image, read-only), attached in order as `/dev/vda`, `/dev/vdb`, ...
    pub disks: &'a [(PathBuf, bool)],
    /// Where the control socket and the console log go.
    pub work: &'a Path,
    /// A virtio-vsock device served by the vhost-user backend listening here (the guest's
    /// memory is then shared with that process).
    pub vhost_vsock: Option<&'a Path>,
    pub mem_mib: u32,
    pub vcpus: u8,
    /// The serial console's log; default `work/console.log`.
    pub console: Option<&'a Path>,
}

impl<'a> Machine<'a> {
    /// One vCPU, 256 MiB, no initrd, no vsock, the console log in `work`.
    pub fn new(
        qemu: &'a Path,
        kernel: &'a Path,
        append: &'a str,
        disks: &'a [(PathBuf, bool)],
        work: &'a Path,
    ) -> Self {
        Machine {
            qemu,
            kernel,
            initrd: None,
            append,
            disks,
            work,
            vhost_vsock: None,
            mem_mib: 256,
            vcpus: 1,
            console: None,
        }
    }

    /// The QEMU command line, its control socket (a virtio serial port) and console log.
    pub fn command(&self) -> (Command, PathBuf, PathBuf) {
        let socket = self.work.join("control.sock");
        let console = self
            .console
            .map_or_else(|| self.work.join("console.log"), Path::to_path_buf);
        let _ = std::fs::remove_file(&socket);
        let mut machine =
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,pit=on,pic=on".to_owned();
        let mut cmd = Command::new(self.qemu);
        if let Some(vhost) = self.vhost_vsock {
            machine.push_str(",memory-backend=mem");
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.mem_mib
                ))
                .arg("-chardev")
                .arg(format!("socket,id=vsock,path={}", vhost.display()))
                .args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
        }
        cmd.args(["-M", &machine])
            .args(["-cpu", "max", "-m", &self.mem_mib.to_string()])
            .args(["-smp", &self.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(self.kernel);
        if let Some(initrd) = self.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.arg("-append")
            .arg(format!("console=ttyS0 reboot=t panic=-1 {}", self.append));
        for (i, (disk, read_only)) in self.disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "id=d{i},file={},format=raw,if=none,readonly={}",
                    disk.display(),
                    if *read_only { "on" } else { "off" }
                ))
                .args(["-device", &format!("virtio-blk-device,drive=d{i}")]);
        }
        cmd.args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ctl,path={},server=on,wait=off",
                socket.display()
            ))
            .args([
                "-device",
                &format!("virtserialport,chardev=ctl,name={PORT_NAME}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        (cmd, socket, console)
    }
}

/// A running QEMU; killed on drop.
pub struct Qemu {
    child: Child,
    pub socket: PathBuf,
    pub console: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// Boot `kernel` with `append` (the console, reboot and panic options are added) and
    /// `disks` as (image, read-only). Sockets and the console log go in `work`.
    pub fn spawn(
        qemu: &Path,
        kernel: &Path,
        append: &str,
        disks: &[(PathBuf, bool)],
        work: &Path,
    ) -> Qemu {
        let (mut cmd, socket, console) = Machine::new(qemu, kernel, append, disks, work).command();
        let child = cmd.spawn().expect("qemu-system-x86_64 starts");
        Qemu {
            child,
            socket,
            console,
        }
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// A client once the agent answers `health`, and how long that took from `started`.
    pub fn wait_for_agent(
        &mut self,
        token: &str,
        started: Instant,
    ) -> (Client<UnixStream>, Duration) {
        loop {
            assert!(
                started.elapsed() < BOOT_DEADLINE,
                "agent not ready within {BOOT_DEADLINE:?}; console:\n{}",
                self.console_text()
            );
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "QEMU exited ({status}) before the agent answered; console:\n{}",
                    self.console_text()
                );
            }
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                let mut c = Client::new(stream, token);
                if c.health().is_ok() {
                    return (c, started.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait (up to `limit`) for the guest to power itself off.
    pub fn wait_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
