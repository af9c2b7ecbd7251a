//! A stand-in for `bot-bottle __vmm` that runs the guest under QEMU: for hosts whose KVM cannot
//! run our VMM (this project's CI machines run nested KVM that cannot boot Linux), so that
//! `start --backend microvm` can be tested end to end. `BOT_BOTTLE_VMM=<this binary>` makes
//! `start` launch it with the arguments it gives our VMM (`__vmm --config <launch.json>`).
//!
//! What it does as our VMM would: boots the launch file's kernel, command line and disks with
//! the serial console in the launch file's log; serves the guest's vsock on the launch file's
//! Unix socket (rust-vmm's `vhost-device-vsock`, the same `CONNECT <port>` convention); and
//! lets the guest reach only the destinations of the machine's verified allowlist, checked by
//! the same `microvm::verified_rules` our VMM uses. What it does not: our VMM's event log of
//! denied connections, and its seccomp and resource limits. Children die with it
//! (`setpriv --pdeathsig KILL`), and it dies with
//! `start` (`orphans::die_with_parent`). Software emulation (TCG): slow, for tests only.

use std::net::{SocketAddrV4, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bot_bottle::backend::microvm::launch::Launch;
use bottle_vmm::config::SerialOutput;

// The QEMU command line the guest tests use.
#[path = "../../../tests/guest/qemu_vm.rs"]
mod qemu_vm;
#[path = "support/relay.rs"]
mod relay;
use qemu_vm::{which, Machine};

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qemu_vmm: error: {e}");
            ExitCode::from(bottle_vmm::EXIT_CODE_VMM_ERROR as u8)
        }
    }
}

fn run() -> Result<u8, String> {
    // Ends with `start` as our VMM does (PRD 0007); QEMU and the vsock device die with it.
    bot_bottle::session::orphans::die_with_parent(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| e.to_string())?;
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
    // What our VMM enforces, read and checked the same way: only the verified DB row.
    let rules =
        bot_bottle::backend::microvm::launch::verified_rules(&launch).map_err(|e| e.to_string())?;
    let vsock = launch
        .vmm
        .vsock
        .as_ref()
        .ok_or("the launch file has no vsock device")?;
    let SerialOutput::File(console) = &launch.vmm.serial else {
        return Err("the stand-in writes the console to a file only".into());
    };
    let qemu = which("qemu-system-x86_64").ok_or("qemu-system-x86_64 not found")?;
    let backend = which("vhost-device-vsock")
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
    for rule in &rules {
        let target = SocketAddrV4::new(rule.addr, rule.port);
        let path = PathBuf::from(format!("{}_{}", uds.display(), rule.port));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        thread::spawn(move || relay::serve(listener.incoming(), || TcpStream::connect(target)));
    }

    let disks: Vec<(PathBuf, bool)> = launch
        .vmm
        .disks
        .iter()
        .map(|d| (d.path.clone(), d.read_only))
        .collect();
    let (qemu_cmd, _, _) = Machine {
        initrd: launch.vmm.initrd.as_deref(),
        vhost_vsock: Some(&vhost),
        mem_mib: launch.vmm.mem_mib,
        vcpus: launch.vmm.vcpus,
        console: Some(console),
        ..Machine::new(
            &qemu,
            &launch.vmm.kernel,
            &launch.vmm.cmdline,
            &disks,
            work.path(),
        )
    }
    .command();
    let status = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(qemu_cmd.get_program())
        .args(qemu_cmd.get_args())
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running {}: {e}", qemu.display()));
    let _ = device.kill();
    let _ = device.wait();
    cleanup(uds, &rules);
    let status = status?;
    // QEMU with -no-reboot exits 0 when the guest powers off or resets.
    Ok(if status.success() {
        bottle_vmm::EXIT_CODE_POWER_OFF as u8
    } else {
        bottle_vmm::EXIT_CODE_CRASH as u8
    })
}

fn cleanup(uds: &Path, rules: &[bottle_vmm::AllowRule]) {
    let _ = std::fs::remove_file(uds);
    for rule in rules {
        let _ = std::fs::remove_file(format!("{}_{}", uds.display(), rule.port));
    }
}
