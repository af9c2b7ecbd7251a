//! The VMM as a child process (`bot-bottle __vmm`), under real KVM with the probe guest from
//! crates/bottle-vmm/tests/probe: the allowlist it enforces comes from the verified state DB row,
//! and every doubt about that row refuses to boot.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bot_bottle::plan::AllowEntry;
use bot_bottle::state::StateDb;
use bottle_vmm::{SerialOutput, VmmConfig, VsockConfig};

const PROBE_MEM_MIB: u32 = 32;
const ALIAS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 77);

fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: CI=true but /dev/kvm is not usable"
        );
        eprintln!("SKIPPED {test}: /dev/kvm is not usable");
    }
    ok
}

/// The probe guest (see `bottle_vmm::probe`).
fn probe_guest(dir: &Path) -> PathBuf {
    bottle_vmm::probe::build(dir).unwrap()
}

struct Machine {
    dir: tempfile::TempDir,
    db: PathBuf,
    launch: PathBuf,
}

/// A machine row verified with `allow`, and a launch file for the probe guest.
fn machine(
    allow: &[AllowEntry],
    probe_args: &str,
    file_allowlist: Vec<bottle_vmm::AllowRule>,
) -> Machine {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("state.db");
    let db = StateDb::open(&db_path).unwrap();
    let cid = db.create_machine("m", "b").unwrap();
    if !allow.is_empty() {
        db.verify_allowlist("m", allow).unwrap();
    }
    let vmm = VmmConfig {
        kernel: probe_guest(dir.path()),
        cmdline: format!(
            "probe.mode=vsock probe.mem_mib={PROBE_MEM_MIB} probe.cid={cid} {probe_args}"
        ),
        vcpus: 1,
        mem_mib: PROBE_MEM_MIB,
        serial: SerialOutput::File(dir.path().join("serial.log")),
        vsock: Some(VsockConfig {
            guest_cid: cid,
            uds_path: dir.path().join("vsock.sock"),
            allowlist: file_allowlist,
            event_log: Some(dir.path().join("events.jsonl")),
        }),
        initrd: None,
        disks: vec![],
    };
    let launch = dir.path().join("launch.json");
    let json = serde_json::json!({ "machine": "m", "state_db": db_path, "vmm": vmm });
    std::fs::write(&launch, json.to_string()).unwrap();
    Machine {
        dir,
        db: db_path,
        launch,
    }
}

fn run_vmm(m: &Machine) -> std::process::Output {
    let uds = m.dir.path().join("vsock.sock");
    // The probe expects the host to open a connection to its port 7000.
    std::thread::spawn(move || {
        for _ in 0..200 {
            if let Ok(mut s) = UnixStream::connect(&uds) {
                let _ = s.write_all(b"CONNECT 7000\n");
                let mut ok = [0u8; 8];
                let _ = s.read_exact(&mut ok);
                let _ = s.write_all(b"hello guest");
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    Command::new(common::bin())
        .arg("__vmm")
        .arg("--config")
        .arg(&m.launch)
        .output()
        .unwrap()
}

fn serial(m: &Machine) -> String {
    std::fs::read_to_string(m.dir.path().join("serial.log")).unwrap_or_default()
}

fn echo(listener: TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut got = vec![0u8; b"ping from probe".len()];
            if s.read_exact(&mut got).is_ok() {
                let _ = s.write_all(b"echo:");
                let _ = s.write_all(&got);
            }
        }
    });
}

#[test]
fn vmm_child_enforces_the_allowlist_from_the_state_db_row() {
    if !kvm_usable("vmm_child_enforces_the_allowlist_from_the_state_db_row") {
        return;
    }
    let allowed = TcpListener::bind((ALIAS, 0)).unwrap();
    let port = allowed.local_addr().unwrap().port();
    let unpublished = TcpListener::bind((ALIAS, 0)).unwrap();
    let unpublished_port = unpublished.local_addr().unwrap().port();
    let other = TcpListener::bind("127.0.0.78:0").unwrap();
    echo(allowed);
    let m = machine(
        &[AllowEntry {
            cidr: format!("{ALIAS}/32"),
            port,
        }],
        &format!(
            "probe.allowed={ALIAS}:{port} probe.denied_port={ALIAS}:{unpublished_port} probe.denied_addr={}",
            other.local_addr().unwrap()
        ),
        vec![],
    );
    let out = run_vmm(&m);
    let log = serial(&m);
    assert_eq!(
        out.status.code(),
        Some(bottle_vmm::EXIT_CODE_POWER_OFF),
        "stderr: {}\nserial:\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    for marker in [
        "ALLOWED OK",
        "DENIED_ADDR RST",
        "DENIED_PORT RST",
        "PROBE DONE",
    ] {
        assert!(log.contains(marker), "missing {marker}:\n{log}");
    }
    unpublished.set_nonblocking(true).unwrap();
    other.set_nonblocking(true).unwrap();
    assert!(
        unpublished.accept().is_err(),
        "the unpublished port was reached"
    );
    assert!(other.accept().is_err(), "the other address was reached");
    let events = std::fs::read_to_string(m.dir.path().join("events.jsonl")).unwrap();
    assert!(events.contains("not_allowlisted"), "{events}");
}

#[test]
fn vmm_child_refuses_to_boot_without_a_verified_allowlist() {
    if !kvm_usable("vmm_child_refuses_to_boot_without_a_verified_allowlist") {
        return;
    }
    let m = machine(&[], "", vec![]);
    let out = run_vmm(&m);
    assert_eq!(out.status.code(), Some(bottle_vmm::EXIT_CODE_VMM_ERROR));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never verified"));
    assert_eq!(serial(&m), "", "the guest ran");
}

#[test]
fn vmm_child_refuses_an_allowlist_smuggled_in_the_launch_file() {
    if !kvm_usable("vmm_child_refuses_an_allowlist_smuggled_in_the_launch_file") {
        return;
    }
    let wide = vec![bottle_vmm::AllowRule {
        addr: Ipv4Addr::new(127, 0, 0, 1),
        port: 22,
    }];
    let m = machine(
        &[AllowEntry {
            cidr: format!("{ALIAS}/32"),
            port: 3128,
        }],
        "",
        wide,
    );
    let out = run_vmm(&m);
    assert_eq!(out.status.code(), Some(bottle_vmm::EXIT_CODE_VMM_ERROR));
    assert!(String::from_utf8_lossy(&out.stderr).contains("carries its own allowlist"));
    assert_eq!(serial(&m), "");
}

#[test]
fn vmm_child_refuses_when_the_state_db_is_gone() {
    if !kvm_usable("vmm_child_refuses_when_the_state_db_is_gone") {
        return;
    }
    let m = machine(
        &[AllowEntry {
            cidr: format!("{ALIAS}/32"),
            port: 3128,
        }],
        "",
        vec![],
    );
    std::fs::remove_file(&m.db).unwrap();
    let _ = std::fs::remove_file(m.db.with_extension("db-wal"));
    let out = run_vmm(&m);
    assert_eq!(out.status.code(), Some(bottle_vmm::EXIT_CODE_VMM_ERROR));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fail closed"));
    assert_eq!(serial(&m), "");
}

#[test]
fn microvm_start_whose_guest_ends_early_reports_its_console_and_leaves_nothing() {
    if !kvm_and_docker("microvm_start_whose_guest_ends_early") {
        return;
    }
    let sb = common::Sandbox::new("84-84");
    let out = start_on_probe(&sb, &["start", "test"]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("before its control agent answered"), "{err}");
    assert!(err.contains("PROBE START"), "console not shown:\n{err}");
    // The guest was told its configuration on the command line, and the VMM was given the
    // root image and the vsock device.
    assert!(err.contains("bottle.config="), "{err}");
    assert!(err.matches("virtio_mmio.device=").count() >= 2, "{err}");
    assert_left_nothing(&sb);
}

#[test]
fn microvm_start_without_a_kernel_builds_one_and_names_a_missing_source() {
    if !kvm_and_docker("microvm_start_without_a_kernel") {
        return;
    }
    let sb = common::Sandbox::new("85-85");
    let out = sb
        .cmd()
        .env_remove("BOT_BOTTLE_KERNEL")
        .env(bot_bottle::host::preflight::SKIP_LINUX_CHECK_ENV, "1")
        .env(
            bot_bottle::image::kernel::SOURCE_ENV,
            "/nonexistent/linux-source",
        )
        .args(["start", "test", "--backend", "microvm", "--", "true"])
        .output()
        .unwrap();
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // `start` went to build the kernel itself, from the configured source, and says what
    // to install when that source is missing; it allocated and built nothing else.
    assert!(err.contains("building it now"), "{err}");
    assert!(err.contains("/nonexistent/linux-source"), "{err}");
    assert!(err.contains("apt-get install linux-source-6.1"), "{err}");
    assert!(!err.contains("root image"), "{err}");
    assert_left_nothing(&sb);
}

#[test]
fn microvm_start_with_a_mount_attaches_its_snapshot_and_never_touches_the_host_tree() {
    if !kvm_and_docker("microvm_start_with_a_mount") {
        return;
    }
    let sb = common::Sandbox::new("86-86");
    let host = sb.dir.path().join("project");
    std::fs::create_dir_all(host.join("src")).unwrap();
    std::fs::write(host.join("src/main.rs"), "fn main() {}\n").unwrap();
    let checksum = || {
        let out = Command::new("sh")
            .arg("-c")
            .arg("find . -printf '%p %m %s %T@\\n' | sort; find . -type f -exec sha256sum {} + | sort")
            .current_dir(&host)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = checksum();
    let out = start_on_probe(&sb, &["start", "test", "--mount", host.to_str().unwrap()]);
    let err = common::stderr(&out);
    assert!(err.contains("snapshotting"), "{err}");
    // Root image, workspace snapshot, writable layer and vsock on the guest's command line.
    assert_eq!(err.matches("virtio_mmio.device=").count(), 4, "{err}");
    assert_eq!(checksum(), before, "the host tree changed");
    let leftovers: Vec<_> = common::files_under(&sb.state())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sqfs"))
        .collect();
    assert!(leftovers.is_empty(), "snapshots left behind: {leftovers:?}");
    assert_left_nothing(&sb);
}

/// KVM for the VMM child and Docker for the bundle.
fn kvm_and_docker(test: &str) -> bool {
    kvm_usable(test) && common::docker_available(test)
}

/// `bot-bottle <args> --backend microvm -- true` with the probe guest standing in for the
/// kernel: it boots under this machine's KVM, prints its command line and powers off without
/// a control agent, as a broken guest would.
fn start_on_probe(sb: &common::Sandbox, args: &[&str]) -> std::process::Output {
    let probe = sb.dir.path().join("guest.elf");
    if !probe.is_file() {
        probe_guest(sb.dir.path());
    }
    sb.cmd()
        .env("BOT_BOTTLE_KERNEL", &probe)
        // The probe guest runs where Linux cannot (this machine's nested KVM).
        .env(bot_bottle::host::preflight::SKIP_LINUX_CHECK_ENV, "1")
        .args(args)
        .args(["--backend", "microvm", "--", "true"])
        .output()
        .unwrap()
}

/// No state rows and no Docker objects of this sandbox remain.
fn assert_left_nothing(sb: &common::Sandbox) {
    assert!(sb.rows().is_empty(), "{:?}", sb.rows());
    assert!(
        sb.docker_leftovers().is_empty(),
        "{:?}",
        sb.docker_leftovers()
    );
}

#[test]
fn microvm_writable_layer_is_kept_resumed_and_only_discarded_when_asked() {
    if !kvm_and_docker("microvm_writable_layer_is_kept") {
        return;
    }
    let sb = common::Sandbox::new("88-88");
    let start = |args: &[&str]| start_on_probe(&sb, args);
    let disk = sb.state().join("disks/test/upper.ext4");
    // Stands for the agent's work: bytes in the layer's last block, which mkfs leaves unused.
    let mark = || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(b"agent-work", f.metadata().unwrap().len() - 4096)
            .unwrap();
    };
    let marked = || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&disk).unwrap();
        let mut buf = [0u8; 10];
        f.read_exact_at(&mut buf, f.metadata().unwrap().len() - 4096)
            .unwrap();
        &buf == b"agent-work"
    };

    // The probe guest ends at once (as a broken guest would); what matters is the layer.
    let first = start(&["start", "test"]);
    assert!(
        common::stderr(&first).contains("booting"),
        "{}",
        common::stderr(&first)
    );
    mark();
    let again = start(&["start", "test"]);
    let resumed = start(&["resume", "test"]);
    let kept_after_resume = marked();
    let fresh = start(&["start", "test", "--fresh"]);
    let kept_after_fresh = marked();
    let ephemeral = start(&["start", "test", "--tmpfs"]);

    let again_err = common::stderr(&again);
    assert_eq!(again.status.code(), Some(1), "{again_err}");
    assert!(again_err.contains("bot-bottle resume test"), "{again_err}");
    assert!(
        !again_err.contains("booting"),
        "booted over a kept layer: {again_err}"
    );
    assert!(
        common::stderr(&resumed).contains("booting"),
        "{}",
        common::stderr(&resumed)
    );
    assert!(kept_after_resume, "resume lost the kept layer");
    assert!(common::stderr(&fresh).contains("booting"));
    assert!(!kept_after_fresh, "--fresh kept the old layer");
    // tmpfs: root image and vsock only.
    let eph = common::stderr(&ephemeral);
    assert_eq!(eph.matches("virtio_mmio.device=").count(), 2, "{eph}");
    assert_left_nothing(&sb);
}
