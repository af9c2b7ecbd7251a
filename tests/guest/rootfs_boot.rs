//! A root image made by `bot_bottle::image::rootfs` from a tar stream boots under QEMU the way the
//! VMM boots a bottle: no initramfs, the kernel mounts the squashfs as `/` and runs
//! `/.bottle/init` (bottle-init), which puts the writable overlay on top.
//!
//! Needs `qemu-system-x86_64`, a static `busybox` and a kernel built from the current
//! `kernel/bottle.config` (`bot-bottle kernel build`, or `BOT_BOTTLE_KERNEL`). When one is
//! missing the test prints why and passes, except under `CI=true`, where it fails.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bot_bottle::image::{kernel, rootfs};
#[path = "qemu_vm.rs"]
mod qemu_vm;
use bottle_proto::config::{AgentUser, BlockFs, ControlChannel, GuestConfig, Upper};
use bottle_proto::{Client, ExecRequest, UserIds};
use qemu_vm::{which, Qemu, PORT_NAME};

const TOKEN: &str = "feedfacefeedfacefeedfacefeedface";
const APPLETS: &[&str] = &[
    "sh", "cat", "stat", "id", "ls", "readlink", "mount", "grep", "touch", "tr",
];

fn find_kernel() -> Result<PathBuf, String> {
    if let Some(k) = std::env::var_os("BOT_BOTTLE_KERNEL") {
        return Ok(PathBuf::from(k));
    }
    let dirs = bot_bottle::host::paths::Dirs::from_env().map_err(|e| e.to_string())?;
    let cache = kernel::kernel_cache_dir(&dirs);
    kernel::cached_kernel_in(&cache, kernel::FRAGMENT).ok_or_else(|| {
        format!(
            "no kernel for the current kernel/bottle.config in {}: run `bot-bottle kernel build`",
            cache.display()
        )
    })
}

struct Prereqs {
    kernel: PathBuf,
    qemu: PathBuf,
    busybox: PathBuf,
    init: PathBuf,
}

fn prereqs() -> Option<Prereqs> {
    let found = (|| -> Result<Prereqs, String> {
        Ok(Prereqs {
            qemu: which("qemu-system-x86_64")
                .ok_or("`qemu-system-x86_64` not found: apt-get install qemu-system-x86")?,
            busybox: which("busybox")
                .ok_or("`busybox` not found: apt-get install busybox-static")?,
            kernel: find_kernel()?,
            // Built static by the workspace (`.cargo/config.toml`), beside bot-bottle.
            init: Some(
                PathBuf::from(env!("CARGO_BIN_EXE_bot-bottle")).with_file_name("bottle-init"),
            )
            .filter(|p| p.is_file())
            .ok_or("bottle-init is not built: cargo build -p bottle-init")?,
        })
    })();
    match found {
        Ok(p) => Some(p),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("QEMU root image test cannot run under CI: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED: QEMU root image test: {reason}");
            None
        }
    }
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h
}

/// What `docker export` of a tiny image would give: busybox with applet symlinks, a setuid
/// file, a hard link, a user's home.
fn image_tar(busybox: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for dir in ["bin", "etc", "home", "var/tmp"] {
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0, 0),
            format!("{dir}/"),
            std::io::empty(),
        )
        .unwrap();
    }
    let bb = fs::read(busybox).unwrap();
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o755, 0, bb.len() as u64),
        "bin/busybox",
        bb.as_slice(),
    )
    .unwrap();
    for applet in APPLETS {
        b.append_link(
            &mut header(tar::EntryType::Symlink, 0o777, 0, 0),
            format!("bin/{applet}"),
            "busybox",
        )
        .unwrap();
    }
    let passwd = b"root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n";
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o644, 0, passwd.len() as u64),
        "etc/passwd",
        &passwd[..],
    )
    .unwrap();
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o4711, 0, 4),
        "bin/suid",
        &b"suid"[..],
    )
    .unwrap();
    b.append_link(
        &mut header(tar::EntryType::Link, 0o4711, 0, 0),
        "bin/suid-hardlink",
        "bin/suid",
    )
    .unwrap();
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o750, 1000, 0),
        "home/node/",
        std::io::empty(),
    )
    .unwrap();
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o600, 1000, 3),
        "home/node/.npmrc",
        &b"a=1"[..],
    )
    .unwrap();
    b.into_inner().unwrap()
}

/// A booted guest and the directory holding its images.
struct Vm {
    qemu: Qemu,
    _work: tempfile::TempDir,
}

fn boot(p: &Prereqs) -> (Vm, Duration) {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("root.sqfs");
    let tar = image_tar(&p.busybox);
    rootfs::tar_to_squashfs(
        tar.as_slice(),
        &p.init,
        &work.path().join("spool"),
        &image,
        &mut |_, _| {},
    )
    .unwrap();
    let cfg = GuestConfig {
        token: TOKEN.into(),
        hostname: "bottle-rootfs".into(),
        control: ControlChannel::VirtioPort {
            name: PORT_NAME.into(),
        },
        root: Some(BlockFs {
            device: "/dev/vda".into(),
            fstype: "squashfs".into(),
        }),
        upper: Upper::Tmpfs,
        mounts: vec![],
        user: AgentUser {
            ids: UserIds {
                uid: 1000,
                gid: 1000,
            },
            home: "/home/node".into(),
        },
        env: BTreeMap::new(),
        agent: None,
        egress: vec![],
        ca_cert: None,
    };
    let cmdline = format!(
        "quiet root=/dev/vda rootfstype=squashfs ro init=/{} {}",
        rootfs::INIT_PATH,
        cfg.to_cmdline_arg(256).unwrap()
    );
    let start = Instant::now();
    let mut qemu = Qemu::spawn(&p.qemu, &p.kernel, &cmdline, &[(image, true)], work.path());
    let (_, ready) = qemu.wait_for_agent(TOKEN, start);
    (Vm { qemu, _work: work }, ready)
}

#[test]
fn root_image_from_a_tar_stream_boots_with_its_owners_modes_and_links() {
    let Some(p) = prereqs() else { return };
    let (vm, ready) = boot(&p);
    eprintln!("root image boot to agent-ready: {ready:?}");
    let mut c = Client::new(UnixStream::connect(&vm.qemu.socket).unwrap(), TOKEN);
    let mut req = ExecRequest::new([
        "/bin/sh",
        "-c",
        "stat -c '%n %a %u %h' /bin/suid /bin/suid-hardlink /home/node /home/node/.npmrc; \
         cat /bin/suid-hardlink; echo; readlink /bin/sh; tr '\\0' '\\n' </proc/1/cmdline; \
         touch /etc/new && echo writable; mount | grep ' / '",
    ]);
    req.user = Some(UserIds { uid: 0, gid: 0 });

    let r = c.exec(&req, b"").unwrap();

    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        out.starts_with(
            "/bin/suid 4711 0 2\n/bin/suid-hardlink 4711 0 2\n/home/node 750 1000 2\n/home/node/.npmrc 600 1000 1\n\
             suid\nbusybox\n/.bottle/init\nwritable\noverlay on / type overlay"
        ),
        "{out}{}\nconsole:\n{}",
        String::from_utf8_lossy(&r.stderr),
        vm.qemu.console_text()
    );
}
