//! The guest under QEMU software emulation: our kernel (built by `bot-bottle kernel build`),
//! bottle-init as PID 1 from an initramfs, a squashfs root image and a squashfs workspace on
//! virtio-blk, and the control protocol over a virtio serial port (one test: over virtio-vsock,
//! served by rust-vmm's `vhost-device-vsock`, with egress forwarders).
//!
//! Needs `qemu-system-x86_64`, `mksquashfs`, a static `busybox` and a kernel built from the
//! current `kernel/bottle.config` (found in the kernel cache, or named by `BOT_BOTTLE_KERNEL`).
//! When one is missing the tests print why and pass, except under `CI=true`, where they fail.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use bottle_proto::config::{
    AgentCommand, AgentUser, BlockFs, ControlChannel, EgressForward, GuestConfig, Upper,
    WorkspaceMount,
};
use bottle_proto::{Client, ClientError, ExecRequest, PtyRequest, UserIds, WindowSize};

#[path = "../../../tests/guest/qemu_vm.rs"]
mod qemu_vm;
#[path = "../../../tests/guest/vhost_vsock.rs"]
mod vhost_vsock;
use qemu_vm::{which, Machine, PORT_NAME};
use vhost_vsock::VsockBackend;

const TOKEN: &str = "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e";
const AGENT: UserIds = UserIds {
    uid: 1000,
    gid: 1000,
};
/// Owner of the workspace files as they come from the host.
const HOST_UID: u32 = 4242;
/// Boot under TCG takes seconds; a loaded CI machine may take much longer.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "cat", "echo", "pwd", "env", "sleep", "head", "stat", "id", "ls", "stty", "mkdir", "wc",
    "touch", "tr", "yes", "true", "false", "uname", "hostname", "mount", "grep", "rm", "nc",
];

struct Prereqs {
    kernel: PathBuf,
    qemu: PathBuf,
    mksquashfs: PathBuf,
    busybox: PathBuf,
    init: PathBuf,
}

fn kernel_cache() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("BOT_BOTTLE_CACHE_DIR") {
        return Some(PathBuf::from(d).join("kernel"));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("bot-bottle/kernel"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/bot-bottle/kernel"))
}

/// The cached kernel built from exactly the fragment in this checkout.
fn find_kernel() -> Result<PathBuf, String> {
    if let Some(k) = std::env::var_os("BOT_BOTTLE_KERNEL") {
        return Ok(PathBuf::from(k));
    }
    let fragment_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernel/bottle.config");
    let fragment = fs::read_to_string(&fragment_path)
        .map_err(|e| format!("{}: {e}", fragment_path.display()))?;
    let cache = kernel_cache().ok_or("no HOME or XDG_CACHE_HOME")?;
    fs::read_dir(&cache)
        .map_err(|e| format!("{}: {e}", cache.display()))?
        .flatten()
        .filter(|e| fs::read_to_string(e.path().join("bottle.config")).ok().as_deref() == Some(fragment.as_str()))
        .map(|e| e.path().join("vmlinux"))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no kernel for the current kernel/bottle.config in {}: run `bot-bottle kernel build`", cache.display()))
}

fn prereqs_or_reason() -> Result<Prereqs, String> {
    let tool = |name: &str, package: &str| {
        which(name).ok_or(format!("`{name}` not found: apt-get install {package}"))
    };
    Ok(Prereqs {
        qemu: tool("qemu-system-x86_64", "qemu-system-x86")?,
        mksquashfs: tool("mksquashfs", "squashfs-tools")?,
        busybox: tool("busybox", "busybox-static")?,
        kernel: find_kernel()?,
        // This crate's binary, static by the workspace's `.cargo/config.toml`.
        init: PathBuf::from(env!("CARGO_BIN_EXE_bottle-init")),
    })
}

/// The prerequisites, or `None` (with the reason printed) where the tests should skip.
fn prereqs() -> Option<&'static Prereqs> {
    static P: OnceLock<Result<Prereqs, String>> = OnceLock::new();
    match P.get_or_init(prereqs_or_reason) {
        Ok(p) => Some(p),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("QEMU guest tests cannot run under CI: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED: QEMU guest test: {reason}");
            None
        }
    }
}

/// A minimal newc cpio writer: enough for an initramfs of a few entries.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let header =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, data.len(), 0, 0, rdev.0, rdev.1, name.len() + 1, 0
        );
        self.ino += 1;
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() & 3 != 0 {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

fn initramfs(init: &Path) -> Vec<u8> {
    let mut c = Cpio::new();
    for dir in ["dev", "proc", "sys"] {
        c.entry(dir, 0o040755, (0, 0), &[]);
    }
    c.entry("dev/console", 0o020600, (5, 1), &[]);
    c.entry("init", 0o100755, (0, 0), &fs::read(init).unwrap());
    c.finish()
}

fn squashfs(mksquashfs: &Path, dir: &Path, image: &Path, extra: &[&str]) {
    let status = Command::new(mksquashfs)
        .arg(dir)
        .arg(image)
        .args(["-comp", "zstd", "-noappend", "-quiet", "-no-progress"])
        .args(extra)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "mksquashfs {}", dir.display());
}

/// A root image: busybox, a passwd, a root-owned home and /var/tmp without the sticky bit
/// (both for bottle-init to repair), and the /.bottle staging directory.
fn root_image(p: &Prereqs, work: &Path) -> PathBuf {
    let root = work.join("root");
    for dir in [
        "bin",
        "etc",
        "home/agent/.config",
        "tmp",
        "var/tmp",
        "dev",
        "proc",
        "sys",
        "run",
        ".bottle",
        "workspace",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::copy(&p.busybox, root.join("bin/busybox")).unwrap();
    for applet in BUSYBOX_APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nagent:x:1000:1000::/home/agent:/bin/sh\n",
    )
    .unwrap();
    fs::write(root.join("home/agent/.config/settings"), "x\n").unwrap();
    let image = work.join("root.sqfs");
    squashfs(&p.mksquashfs, &root, &image, &["-all-root"]);
    image
}

/// A workspace image whose files belong to the host user.
fn workspace_image(p: &Prereqs, work: &Path) -> PathBuf {
    let ws = work.join("ws");
    fs::create_dir_all(ws.join("src")).unwrap();
    fs::write(ws.join("README"), "from the host\n").unwrap();
    fs::write(ws.join("src/main.rs"), "fn main() {}\n").unwrap();
    let image = work.join("ws.sqfs");
    let uid = HOST_UID.to_string();
    squashfs(
        &p.mksquashfs,
        &ws,
        &image,
        &["-force-uid", &uid, "-force-gid", &uid],
    );
    image
}

fn config() -> GuestConfig {
    GuestConfig {
        token: TOKEN.into(),
        hostname: "bottle-qemu".into(),
        control: ControlChannel::VirtioPort {
            name: PORT_NAME.into(),
        },
        root: Some(BlockFs {
            device: "/dev/vda".into(),
            fstype: "squashfs".into(),
        }),
        upper: Upper::Tmpfs,
        mounts: vec![WorkspaceMount {
            lower: BlockFs {
                device: "/dev/vdb".into(),
                fstype: "squashfs".into(),
            },
            guest_path: "/workspace".into(),
        }],
        user: AgentUser {
            ids: AGENT,
            home: "/home/agent".into(),
        },
        env: BTreeMap::from([("BOTTLE_ID".to_string(), "qemu-test".to_string())]),
        agent: None,
        egress: vec![],
        ca_cert: None,
    }
}

struct Vm {
    qemu: Child,
    socket: PathBuf,
    console: PathBuf,
    _work: tempfile::TempDir,
    /// From spawning QEMU to the first answered `health`.
    boot_time: Duration,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// How to start a guest beyond the defaults of [`config`].
struct Boot {
    cfg: GuestConfig,
    /// Pass the config on a raw disk (`bottle.config=dev:`) instead of the command line.
    config_on_disk: bool,
    /// A writable disk attached after the root and workspace images (`/dev/vdc`).
    rw_disk: Option<PathBuf>,
    /// A vhost-user vsock device served by the backend listening on this socket.
    vhost_vsock: Option<PathBuf>,
}

impl Default for Boot {
    fn default() -> Boot {
        Boot {
            cfg: config(),
            config_on_disk: false,
            rw_disk: None,
            vhost_vsock: None,
        }
    }
}

impl Vm {
    fn boot(p: &Prereqs) -> Vm {
        Vm::boot_with(p, Boot::default())
    }

    /// Starts a guest and waits until its agent answers.
    fn boot_with(p: &Prereqs, boot: Boot) -> Vm {
        let start = Instant::now();
        let mut vm = Vm::start(p, boot);
        vm.boot_time = vm.wait_ready(start);
        eprintln!(
            "guest ready {:?} after QEMU started; console: {}",
            vm.boot_time,
            vm.ready_line()
        );
        vm
    }

    /// Starts a guest without waiting for anything.
    fn start(p: &Prereqs, boot: Boot) -> Vm {
        static SERIAL: Mutex<()> = Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let work = tempfile::tempdir().unwrap();
        let initrd = work.path().join("initrd.cpio");
        fs::write(&initrd, initramfs(&p.init)).unwrap();
        let root = root_image(p, work.path());
        let ws = workspace_image(p, work.path());
        let mut disks = vec![(root, true), (ws, true)];
        disks.extend(boot.rw_disk.map(|d| (d, false)));
        let config_arg = if boot.config_on_disk {
            let disk = work.path().join("config.img");
            let mut bytes = boot.cfg.to_disk_bytes().unwrap();
            bytes.resize(bytes.len().div_ceil(4096) * 4096, 0);
            fs::write(&disk, bytes).unwrap();
            disks.push((disk, true));
            format!(
                "bottle.config=dev:/dev/vd{}",
                (b'a' + disks.len() as u8 - 1) as char
            )
        } else {
            boot.cfg.to_cmdline_arg(256).unwrap()
        };
        let append = format!("quiet {config_arg}");
        let (mut cmd, socket, console) = Machine {
            initrd: Some(&initrd),
            vhost_vsock: boot.vhost_vsock.as_deref(),
            ..Machine::new(&p.qemu, &p.kernel, &append, &disks, work.path())
        }
        .command();
        let qemu = cmd.spawn().unwrap();
        Vm {
            qemu,
            socket,
            console,
            _work: work,
            boot_time: Duration::ZERO,
            _serial: serial,
        }
    }

    fn wait_ready(&mut self, start: Instant) -> Duration {
        while start.elapsed() < BOOT_DEADLINE {
            if let Ok(Some(status)) = self.qemu.try_wait() {
                panic!(
                    "QEMU exited ({status}) before the agent answered; console:\n{}",
                    self.console_text()
                );
            }
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                let mut c = Client::new(stream, TOKEN);
                if c.health().is_ok() {
                    return start.elapsed();
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "agent not ready within {BOOT_DEADLINE:?}; console:\n{}",
            self.console_text()
        );
    }

    fn console_text(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn ready_line(&self) -> String {
        self.console_text()
            .lines()
            .find(|l| l.contains("ready after"))
            .unwrap_or("")
            .to_string()
    }

    fn client(&self) -> Client<UnixStream> {
        Client::new(UnixStream::connect(&self.socket).unwrap(), TOKEN)
    }

    fn sh(&self, script: &str) -> bottle_proto::ExecResult {
        let mut c = self.client();
        c.exec(&ExecRequest::new(["/bin/sh", "-c", script]), b"")
            .unwrap()
    }

    /// Waits for QEMU to exit by itself.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(s)) = self.qemu.try_wait() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

macro_rules! vm_or_skip {
    () => {{
        let Some(p) = prereqs() else { return };
        Vm::boot(p)
    }};
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn guest_boots_to_a_healthy_agent_and_reports_its_uptime() {
    let vm = vm_or_skip!();

    let health = vm.client().health().unwrap();

    eprintln!(
        "boot-to-agent-ready: {:?} (guest uptime at health: {} ms)",
        vm.boot_time, health.uptime_ms
    );
    assert!(health.uptime_ms > 0);
}

#[test]
fn exec_in_guest_passes_exit_code_env_cwd_user_and_hostname() {
    let vm = vm_or_skip!();
    let mut c = vm.client();
    let mut req = ExecRequest::new([
        "/bin/sh",
        "-c",
        "echo $BOTTLE_ID $EXTRA; pwd; id -u; hostname; exit 7",
    ]);
    req.env.insert("EXTRA".into(), "two words".into());
    req.cwd = Some("/workspace/src".into());

    let r = c.exec(&req, b"").unwrap();

    assert_eq!(
        (r.status.code, text(&r.stdout)),
        (
            Some(7),
            "qemu-test two words\n/workspace/src\n1000\nbottle-qemu\n".to_string()
        )
    );
}

#[test]
fn exec_in_guest_past_its_timeout_is_killed() {
    let vm = vm_or_skip!();
    let mut c = vm.client();
    let mut req = ExecRequest::new(["/bin/sleep", "60"]);
    req.timeout_ms = Some(500);

    let r = c.exec(&req, b"").unwrap();

    assert_eq!((r.status.timed_out, r.status.signal), (true, Some(9)));
}

#[test]
fn exec_in_guest_streams_large_output_and_stdin() {
    let vm = vm_or_skip!();
    let mut c = vm.client();
    let input = vec![b'q'; 1_000_000];

    // Timeouts bound the host's reads too (command timeout + grace): a stalled guest fails the
    // test instead of hanging it.
    let mut big_req = ExecRequest::new(["/bin/head", "-c", "4000000", "/dev/zero"]);
    big_req.timeout_ms = Some(60_000);
    let big = c.exec(&big_req, b"").unwrap();
    let mut wc_req = ExecRequest::new(["/bin/wc", "-c"]);
    wc_req.timeout_ms = Some(60_000);
    let echoed = c.exec(&wc_req, &input).unwrap();

    assert_eq!(
        (big.stdout.len(), text(&echoed.stdout).trim()),
        (4_000_000, "1000000")
    );
}

#[test]
fn cp_into_and_out_of_the_guest_round_trips() {
    let vm = vm_or_skip!();
    let mut c = vm.client();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o640);
    h.set_uid(AGENT.uid.into());
    h.set_gid(AGENT.gid.into());
    h.set_mtime(1_700_000_000);
    tar.append_data(&mut h, "notes/todo.txt", &b"ship!\n"[..])
        .unwrap();
    let archive = tar.into_inner().unwrap();

    c.copy_in("/home/agent", archive.as_slice()).unwrap();
    let listed = c
        .exec(
            &ExecRequest::new(["/bin/stat", "-c", "%a %u %s", "/home/agent/notes/todo.txt"]),
            b"",
        )
        .unwrap();
    let mut out = Vec::new();
    c.copy_out("/home/agent/notes/todo.txt", &mut out).unwrap();

    let mut entries = tar::Archive::new(out.as_slice());
    let mut entry = entries.entries().unwrap().next().unwrap().unwrap();
    let mut content = String::new();
    std::io::Read::read_to_string(&mut entry, &mut content).unwrap();
    assert_eq!(
        (text(&listed.stdout), content),
        ("640 1000 6\n".to_string(), "ship!\n".to_string())
    );
}

#[test]
fn pty_session_in_guest_is_a_terminal_that_resizes() {
    let vm = vm_or_skip!();
    let req = PtyRequest {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "stty size; read line; echo got:$line; stty size".into(),
        ],
        size: WindowSize { rows: 33, cols: 99 },
        ..PtyRequest::default()
    };
    let session = vm.client().pty(&req).unwrap();
    let input = session.input();
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(1));
        input
            .resize(WindowSize {
                rows: 50,
                cols: 132,
            })
            .unwrap();
        input.write(b"typed\n").unwrap();
    });

    let mut out = Vec::new();
    let (status, _) = session.run(&mut out).unwrap();

    let out = text(&out).replace('\r', "");
    assert_eq!(status.code, Some(0));
    assert!(
        out.contains("33 99\n") && out.contains("got:typed\n50 132\n"),
        "{out:?}"
    );
}

#[test]
fn workspace_is_a_writable_overlay_owned_by_the_agent() {
    let vm = vm_or_skip!();

    let r = vm.sh("stat -c '%u %U' /workspace/README /workspace/src/main.rs; \
         echo new >> /workspace/README && cat /workspace/README; \
         mount | grep ' /workspace '");

    let out = text(&r.stdout);
    assert_eq!(r.status.code, Some(0), "{out}{}", text(&r.stderr));
    assert!(
        out.starts_with("1000 agent\n1000 agent\nfrom the host\nnew\n"),
        "{out}"
    );
    assert!(out.contains("overlay on /workspace type overlay"), "{out}");
}

#[test]
fn root_is_an_overlay_with_repaired_home_and_sticky_tmp() {
    let vm = vm_or_skip!();
    let mut req = ExecRequest::new([
        "/bin/sh",
        "-c",
        "stat -c '%n %a %u' /tmp /var/tmp /home/agent /home/agent/.config/settings; touch /etc/written && echo rw",
    ]);
    req.user = Some(UserIds { uid: 0, gid: 0 });

    let r = vm.client().exec(&req, b"").unwrap();

    assert_eq!(
        text(&r.stdout),
        "/tmp 1777 0\n/var/tmp 1777 0\n/home/agent 755 1000\n/home/agent/.config/settings 644 1000\nrw\n"
    );
}

#[test]
fn malformed_frame_gets_an_error_and_the_agent_keeps_serving() {
    let vm = vm_or_skip!();
    let mut bad = vm.client();
    bad.send_raw(&[0x7f, 0xff, 0xff, 0xff, 1, 1, 0, 0]).unwrap();

    let err = bad.recv_raw(Some(Duration::from_secs(30))).unwrap_err();
    drop(bad);
    thread::sleep(Duration::from_millis(300));
    let health = vm.client().health();

    assert!(
        matches!(err, ClientError::Refused { ref message } if message.contains("exceeds")),
        "{err:?}"
    );
    assert!(health.is_ok(), "{health:?}");
}

#[test]
fn shutdown_request_powers_the_guest_off() {
    let mut vm = vm_or_skip!();

    vm.client().shutdown().unwrap();
    let exited = vm.wait_exit(Duration::from_secs(60));

    assert!(
        exited.is_some(),
        "QEMU still running; console:\n{}",
        vm.console_text()
    );
}

#[test]
fn wrong_token_is_refused_by_the_guest() {
    let vm = vm_or_skip!();
    let mut c = Client::new(UnixStream::connect(&vm.socket).unwrap(), "wrong");

    let err = c.health().unwrap_err();

    assert!(
        matches!(err, ClientError::Refused { ref message } if message.contains("token")),
        "{err:?}"
    );
    let _ = std::io::stderr().flush();
}

#[test]
fn config_from_a_disk_boots_like_the_command_line() {
    let Some(p) = prereqs() else { return };
    let mut boot = Boot {
        config_on_disk: true,
        ..Boot::default()
    };
    boot.cfg.hostname = "from-disk".into();
    let vm = Vm::boot_with(p, boot);

    let r = vm.sh("hostname");

    assert_eq!(text(&r.stdout), "from-disk\n");
}

#[test]
fn writable_layer_on_a_disk_survives_a_reboot() {
    let Some(p) = prereqs() else { return };
    let keep = tempfile::tempdir().unwrap();
    let disk = keep.path().join("upper.ext4");
    fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mkfs.success(), "mkfs.ext4 (e2fsprogs)");
    let boot = || {
        let mut b = Boot {
            rw_disk: Some(disk.clone()),
            ..Boot::default()
        };
        b.cfg.upper = Upper::Device(BlockFs {
            device: "/dev/vdc".into(),
            fstype: "ext4".into(),
        });
        b
    };
    let mut first = Vm::boot_with(p, boot());
    let mut req = ExecRequest::new(["/bin/sh", "-c", "echo kept > /etc/state"]);
    req.user = Some(UserIds { uid: 0, gid: 0 });
    first.client().exec(&req, b"").unwrap();
    first.client().shutdown().unwrap();
    let first_exit = first.wait_exit(Duration::from_secs(60));
    drop(first);

    let second = Vm::boot_with(p, boot());
    let r = second.sh("cat /etc/state");

    assert!(first_exit.is_some());
    assert_eq!(text(&r.stdout), "kept\n");
}

#[test]
fn agent_command_exit_powers_the_guest_off() {
    let Some(p) = prereqs() else { return };
    let mut boot = Boot::default();
    boot.cfg.agent = Some(AgentCommand {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo agent says hi; exit 3".into(),
        ],
        cwd: None,
    });
    let mut vm = Vm::start(p, boot);

    let exited = vm.wait_exit(BOOT_DEADLINE);

    let console = vm.console_text();
    assert!(exited.is_some(), "QEMU still running; console:\n{console}");
    assert!(
        console.contains("agent says hi") && console.contains("agent exited (3)"),
        "{console}"
    );
}

#[test]
fn attached_pty_session_with_power_off_ends_the_guest() {
    let mut vm = vm_or_skip!();
    let req = PtyRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), "exit 0".into()],
        power_off_on_exit: true,
        ..PtyRequest::default()
    };

    let (status, _) = vm.client().pty(&req).unwrap().run(&mut Vec::new()).unwrap();
    let exited = vm.wait_exit(Duration::from_secs(60));

    assert_eq!(status.code, Some(0));
    assert!(
        exited.is_some(),
        "QEMU still running; console:\n{}",
        vm.console_text()
    );
}

#[test]
fn control_channel_and_egress_forwarders_work_over_real_vsock() {
    const CONTROL_PORT: u32 = 1024;
    const EGRESS_PORT: u32 = 50_000;
    let Some(p) = prereqs() else { return };
    let Some(backend) = VsockBackend::start() else {
        return;
    };
    // Where the VMM would hand the guest's egress connection to the sidecar's proxy.
    let upstream = std::os::unix::net::UnixListener::bind(format!(
        "{}_{EGRESS_PORT}",
        backend.uds().display()
    ))
    .unwrap();
    let proxy = thread::spawn(move || {
        let (conn, _) = upstream.accept().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&conn), &mut line).unwrap();
        (&conn)
            .write_all(format!("pong: {line}").as_bytes())
            .unwrap();
        line
    });
    let mut cfg = config();
    cfg.control = ControlChannel::Vsock { port: CONTROL_PORT };
    cfg.egress = vec![EgressForward {
        listen: "127.0.0.90:3128".parse().unwrap(),
        vsock_port: EGRESS_PORT,
    }];
    let start = Instant::now();
    let mut vm = Vm::start(
        p,
        Boot {
            cfg,
            vhost_vsock: Some(backend.vhost()),
            ..Boot::default()
        },
    );

    // The control channel: the host dials the guest's port through the device.
    let mut client = loop {
        if let Ok(Some(status)) = vm.qemu.try_wait() {
            panic!("QEMU exited ({status}); console:\n{}", vm.console_text());
        }
        if let Ok(stream) = bottle_proto::connect_vsock(&backend.uds(), CONTROL_PORT) {
            let mut c = Client::new(stream, TOKEN);
            if c.health().is_ok() {
                break c;
            }
        }
        assert!(
            start.elapsed() < BOOT_DEADLINE,
            "no answer over vsock; console:\n{}",
            vm.console_text()
        );
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "guest ready over vsock {:?} after QEMU started",
        start.elapsed()
    );

    // Egress: a TCP connection inside the guest leaves through the forwarder over vsock.
    let r = client
        .exec(
            &ExecRequest::new(["/bin/sh", "-c", "echo ping | nc 127.0.0.90 3128"]),
            b"",
        )
        .unwrap();

    assert_eq!(
        (r.status.code, text(&r.stdout), proxy.join().unwrap()),
        (Some(0), "pong: ping\n".to_owned(), "ping\n".to_owned()),
        "stderr: {}\nconsole:\n{}",
        text(&r.stderr),
        vm.console_text()
    );
}
