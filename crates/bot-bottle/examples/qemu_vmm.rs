//! A stand-in for `bot-bottle __vmm` that runs the guest under QEMU: for hosts whose KVM cannot
//! run our VMM (this project's CI machines run nested KVM that cannot boot Linux), so that
//! `start --backend microvm` can be tested end to end. `BOT_BOTTLE_VMM=<this binary>` makes
//! `start` launch it with the arguments it gives our VMM (`__vmm --config <launch.json>`).
//!
//! What it does as our VMM would: boots the launch file's kernel, command line and disks with
//! the serial console in the launch file's log; serves the guest's vsock on the launch file's
//! Unix socket (rust-vmm's `vhost-device-vsock`, the same `CONNECT <port>` convention); and
//! lets the guest reach only the destinations of the machine's verified allowlist, read from
//! the state DB row as our VMM reads it. What it does not: our VMM's event log of denied
//! connections, and its seccomp and resource limits. Children die with it
//! (`setpriv --pdeathsig KILL`). Software emulation (TCG): slow, for tests only.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bot_bottle::microvm::Launch;
use bot_bottle::state::StateDb;
use bottle_vmm::config::SerialOutput;

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qemu_vmm: error: {e}");
            ExitCode::from(bottle_vmm::EXIT_CODE_VMM_ERROR as u8)
        }
    }
}

fn find(name: &str) -> Option<PathBuf> {
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

fn run() -> Result<u8, String> {
    let args: Vec<String> = std::env::args().collect();
    let config = match args.iter().position(|a| a == "--config") {
        Some(i) if args.get(1).map(String::as_str) == Some("__vmm") => args.get(i + 1),
        _ => None,
    }
    .ok_or("usage: qemu_vmm __vmm --config <launch.json>")?;
    let launch: Launch = serde_json::from_slice(
        &std::fs::read(config).map_err(|e| format!("reading {config}: {e}"))?,
    )
    .map_err(|e| format!("parsing {config}: {e}"))?;
    let vsock = launch
        .vmm
        .vsock
        .as_ref()
        .ok_or("the launch file has no vsock device")?;
    // The allowlist comes from the verified DB row, as for our VMM; an empty one refuses.
    let db = StateDb::open_existing(&launch.state_db).map_err(|e| e.to_string())?;
    let allow = db
        .read_allowlist(&launch.machine)
        .map_err(|e| e.to_string())?;
    if allow.is_empty() {
        return Err(format!(
            "machine {} has no verified allowlist",
            launch.machine
        ));
    }
    let qemu = find("qemu-system-x86_64").ok_or("qemu-system-x86_64 not found")?;
    let backend = find("vhost-device-vsock")
        .ok_or("vhost-device-vsock not found: cargo install --locked vhost-device-vsock")?;

    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let vhost = work.path().join("vhost.sock");
    let uds = &vsock.uds_path;
    let _ = std::fs::remove_file(uds);
    let mut device = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(&backend)
        .args(["--guest-cid", &vsock.guest_cid.to_string(), "--socket"])
        .arg(&vhost)
        .arg("--uds-path")
        .arg(uds)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", backend.display()))?;
    let started = Instant::now();
    while !vhost.exists() {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = device.kill();
            return Err("vhost-device-vsock did not start".into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    // Guest connections to host port P arrive on `<uds>_P`: joined to the allowed
    // destination with that port, the only ones there are.
    for entry in &allow {
        let addr: Ipv4Addr = entry
            .cidr
            .strip_suffix("/32")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("allowlist entry {} is not a /32", entry.cidr))?;
        let target = SocketAddrV4::new(addr, entry.port);
        let path = PathBuf::from(format!("{}_{}", uds.display(), entry.port));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        thread::spawn(move || bridge(listener, target));
    }

    let mem = launch.vmm.mem_mib;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"])
        .arg(&qemu)
        .args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,pit=on,pic=on,memory-backend=mem",
        ])
        .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")])
        .args(["-cpu", "max", "-m", &mem.to_string()])
        .args(["-smp", &launch.vmm.vcpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(match &launch.vmm.serial {
            SerialOutput::File(p) => format!("file:{}", p.display()),
            SerialOutput::Stdout => "stdio".to_owned(),
            SerialOutput::Sink => "null".to_owned(),
        })
        .arg("-kernel")
        .arg(&launch.vmm.kernel)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=t panic=-1 {}",
            launch.vmm.cmdline
        ))
        .arg("-chardev")
        .arg(format!("socket,id=vsock,path={}", vhost.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
    if let Some(initrd) = &launch.vmm.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    for (i, disk) in launch.vmm.disks.iter().enumerate() {
        cmd.arg("-drive")
            .arg(format!(
                "id=d{i},file={},format=raw,if=none,readonly={}",
                disk.path.display(),
                if disk.read_only { "on" } else { "off" }
            ))
            .args(["-device", &format!("virtio-blk-device,drive=d{i}")]);
    }
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running {}: {e}", qemu.display()));
    let _ = device.kill();
    let _ = device.wait();
    cleanup(uds, &allow);
    let status = status?;
    // QEMU with -no-reboot exits 0 when the guest powers off or resets.
    Ok(if status.success() {
        bottle_vmm::EXIT_CODE_POWER_OFF as u8
    } else {
        bottle_vmm::EXIT_CODE_CRASH as u8
    })
}

fn cleanup(uds: &Path, allow: &[bot_bottle::plan::AllowEntry]) {
    let _ = std::fs::remove_file(uds);
    for entry in allow {
        let _ = std::fs::remove_file(format!("{}_{}", uds.display(), entry.port));
    }
}

/// Joins each guest connection to `target`, both ways, half-closes passed on.
fn bridge(listener: UnixListener, target: SocketAddrV4) {
    for guest in listener.incoming() {
        let Ok(guest) = guest else { continue };
        thread::spawn(move || {
            let Ok(up) = TcpStream::connect(target) else {
                return;
            };
            let (Ok(guest_r), Ok(up_w)) = (guest.try_clone(), up.try_clone()) else {
                return;
            };
            let to_up = thread::spawn(move || pipe(guest_r, up_w));
            pipe_back(up, guest);
            let _ = to_up.join();
        });
    }
}

fn pipe(mut from: UnixStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn pipe_back(mut from: TcpStream, mut to: UnixStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}
