//! What the guest is told (bottle-init's `GuestConfig`), what the VMM child is given (its
//! launch file), and where the pieces come from (kernel, init). Pure builders, the launch
//! file's own read and write, and what the VMM child does with it first: take its allowlist
//! from the machine row that `start` verified ([`verified_rules`]), never from the file.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use bottle_proto::config::{
    AgentUser, BlockFs, ControlChannel, EgressForward, GuestConfig, Upper, WorkspaceMount,
    CONTROL_VSOCK_PORT,
};
use bottle_proto::message::UserIds;
use bottle_vmm::{DiskConfig, SerialOutput, VmmConfig, VsockConfig};
use serde::{Deserialize, Serialize};

use crate::backend::microvm::layer::WritableLayer;
use crate::host::run_dir::RunDir;
use crate::plan::BottlePlan;

/// Our part of the kernel command line before `bottle.config=`: the kernel mounts the root
/// image (`/dev/vda`, read-only squashfs) and runs bottle-init from it. The VMM itself adds the
/// serial console, `reboot=k`, `panic=-1` and the virtio-mmio devices.
pub const BASE_CMDLINE: &str = "quiet root=/dev/vda rootfstype=squashfs ro init=/.bottle/init";
/// Room left on the command line for what the VMM appends (virtio-mmio device entries).
const CMDLINE_ROOM: usize = 512;
/// Overrides the guest kernel (a vmlinux or bzImage), e.g. for a kernel built elsewhere.
pub const KERNEL_ENV: &str = "BOT_BOTTLE_KERNEL";
/// Overrides where `bottle-init` (the guest's PID 1) is found.
pub const INIT_ENV: &str = "BOT_BOTTLE_INIT";
/// A stand-in for the VMM child, given the same arguments (`__vmm --config <launch.json>`):
/// `examples/qemu_vmm.rs` runs the guest under QEMU where this host's KVM cannot run ours.
pub const VMM_ENV: &str = "BOT_BOTTLE_VMM";

#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    #[error(
        "no guest kernel: run `bot-bottle kernel build` (or set {KERNEL_ENV}=/path/to/vmlinux)"
    )]
    NoKernel,
    #[error(
        "bottle-init (the guest's PID 1) not found next to {exe}: build it with \
         `cargo build -p bottle-init` (or set {INIT_ENV}=/path/to/bottle-init)"
    )]
    NoInit { exe: PathBuf },
    #[error("agent user `{user}` is not in the image's /etc/passwd: use a user the image defines, or uid:gid")]
    UnknownUser { user: String },
    #[error("agent group `{group}` is not in the image's /etc/group: use a group the image defines, or a number")]
    UnknownGroup { group: String },
    #[error("the bottle configuration does not fit on the kernel command line")]
    Cmdline {
        #[source]
        source: bottle_proto::ConfigError,
    },
    #[error(
        "the launch file has no vsock device: the guest would have no way out, nothing to enforce"
    )]
    NoVsock,
    #[error("the launch file carries its own allowlist: refusing (the allowlist comes only from the verified state DB row)")]
    AllowlistInLaunchFile,
    #[error("reading the machine allowlist")]
    State {
        #[source]
        source: crate::state::StateError,
    },
    #[error("machine {machine} has an empty allowlist: it was never verified; refusing to boot (fail closed)")]
    NeverVerified { machine: String },
    #[error("allowlist entry `{cidr}` is not an IPv4 /32: refusing to boot (fail closed)")]
    NotSlash32 { cidr: String },
    #[error("machine {machine} has CID {db:?} in the state DB but {launch} in the launch file: refusing to boot")]
    CidMismatch {
        machine: String,
        db: Option<u32>,
        launch: u32,
    },
    #[error("cannot write {}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the launch file {} (was the bottle's directory removed?): stop the bottle and start it again", path.display())]
    ReadLaunch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the launch file {} is not one this bot-bottle reads: stop the bottle and start it again", path.display())]
    ParseLaunch {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the launch file {} says nothing about the guest's control channel (written by an older \
         bot-bottle): stop the bottle and start it again",
        path.display()
    )]
    NoControl { path: PathBuf },
}

/// The allowlist a VMM (ours, or a stand-in) enforces for `launch`: only from the machine's
/// verified state DB row, never from the launch file; every doubt refuses (fail closed).
pub fn verified_rules(launch: &Launch) -> Result<Vec<bottle_vmm::AllowRule>, MicrovmError> {
    let state = |source| MicrovmError::State { source };
    let vsock = launch.vmm.vsock.as_ref().ok_or(MicrovmError::NoVsock)?;
    if !vsock.allowlist.is_empty() {
        return Err(MicrovmError::AllowlistInLaunchFile);
    }
    let db = crate::state::StateDb::open_existing(&launch.state_db).map_err(state)?;
    let entries = db.read_allowlist(&launch.machine).map_err(state)?;
    if entries.is_empty() {
        return Err(MicrovmError::NeverVerified {
            machine: launch.machine.clone(),
        });
    }
    let rules = rules_from_entries(&entries)?;
    let cid = db.machine_cid(&launch.machine).map_err(state)?;
    if cid != Some(vsock.guest_cid) {
        return Err(MicrovmError::CidMismatch {
            machine: launch.machine.clone(),
            db: cid,
            launch: vsock.guest_cid,
        });
    }
    Ok(rules)
}

/// Verified DB entries as the VMM's rules. Only /32s are accepted.
pub fn rules_from_entries(
    entries: &[crate::plan::AllowEntry],
) -> Result<Vec<bottle_vmm::AllowRule>, MicrovmError> {
    entries
        .iter()
        .map(|e| {
            let addr = e
                .cidr
                .strip_suffix("/32")
                .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
                .ok_or_else(|| MicrovmError::NotSlash32 {
                    cidr: e.cidr.clone(),
                })?;
            Ok(bottle_vmm::AllowRule { addr, port: e.port })
        })
        .collect()
}

/// The VMM child's launch file (read by `bot-bottle __vmm`, and by `exec` and `cp` for
/// [`Launch::control`]). Written with [`Launch::write`] only: it holds the per-boot token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    /// The machine row holding the verified allowlist.
    pub machine: String,
    /// The state database holding that row.
    pub state_db: PathBuf,
    /// The machine; `vsock.allowlist` stays empty (the child fills it from the DB).
    pub vmm: VmmConfig,
    /// Where the host's clients (`exec`, `cp`) reach the guest's control agent. The VMM never
    /// reads it; `None` for a guest whose control channel is not vsock (QEMU tests), and in a
    /// launch file written without it (the VMM's own tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlEndpoint>,
    /// The guest configuration as a disk (the last one in `vmm.disks`) when it does not fit
    /// on the kernel command line: the caller writes these bytes to [`RunDir::config_disk`].
    #[serde(skip)]
    pub config_disk: Option<Vec<u8>>,
}

/// How the host reaches the guest's control agent: a `CONNECT <port>` on the VMM's vsock
/// Unix socket, then requests carrying the per-boot token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlEndpoint {
    /// The VMM's vsock Unix socket ([`RunDir::control_socket`]).
    pub socket: PathBuf,
    /// The control agent's vsock port.
    pub port: u32,
    /// The per-boot token the control agent requires (also in the guest configuration).
    pub token: String,
}

impl Launch {
    /// Write the launch file to `path`, readable by this user only (it holds the token).
    pub fn write(&self, path: &Path) -> Result<(), MicrovmError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| MicrovmError::WriteFile {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        write_private(path, &bytes)
    }

    /// Read the launch file at `path` (the config disk's bytes are not in it).
    pub fn read(path: &Path) -> Result<Launch, MicrovmError> {
        let bytes = std::fs::read(path).map_err(|source| MicrovmError::ReadLaunch {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| MicrovmError::ParseLaunch {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The control endpoint of the bottle whose directory is `run`, from its launch file.
    pub fn read_control(run: &RunDir) -> Result<ControlEndpoint, MicrovmError> {
        let path = run.launch_file();
        Launch::read(&path)?
            .control
            .ok_or(MicrovmError::NoControl { path })
    }
}

/// Write `bytes` to `path`, created (or truncated) readable and writable by this user only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), MicrovmError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let write = |source| MicrovmError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    use std::os::unix::fs::PermissionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(write)?;
    // `mode` applies to a new file only: one already there is made private before it is filled.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(write)?;
    f.write_all(bytes).map_err(write)
}

/// Resolve the manifest's `user` (`name`, `name:group`, `uid`, `uid:gid`) against the image's
/// passwd and group files. Returns the ids and the home directory.
pub fn resolve_user(
    user: &str,
    passwd: &str,
    group: &str,
) -> Result<(UserIds, String), MicrovmError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && (f[0] == u || f[2] == u)).then(|| {
            (
                f[2].parse::<u32>().ok(),
                f[3].parse::<u32>().ok(),
                f[5].to_owned(),
            )
        })
    });
    let (uid, primary_gid, home) = match (entry, u.parse::<u32>()) {
        (Some((Some(uid), gid, home)), _) => (uid, gid, home),
        (_, Ok(uid)) => (
            uid,
            None,
            if uid == 0 {
                "/root".into()
            } else {
                "/home/agent".into()
            },
        ),
        _ => {
            return Err(MicrovmError::UnknownUser {
                user: user.to_owned(),
            })
        }
    };
    let gid = match g {
        None => primary_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .find_map(|line| {
                    let f: Vec<&str> = line.split(':').collect();
                    (f.len() >= 3 && f[0] == g)
                        .then(|| f[2].parse::<u32>().ok())
                        .flatten()
                })
                .ok_or_else(|| MicrovmError::UnknownGroup {
                    group: g.to_owned(),
                })?,
        },
    };
    Ok((UserIds { uid, gid }, home))
}

/// What bottle-init is told: the root image, the agent user, env, and one egress forwarder per
/// published bundle port (alias:port in the guest → the same alias:port on the host).
/// The writable layer is a disk after the root image and the workspaces, or tmpfs.
pub fn guest_config(
    plan: &BottlePlan,
    token: &str,
    user: UserIds,
    home: &str,
    layer: &WritableLayer,
) -> GuestConfig {
    let egress = plan
        .bundle
        .ports
        .iter()
        .map(|p| EgressForward {
            listen: SocketAddrV4::new(plan.alias, p.host_port),
            vsock_port: u32::from(p.host_port),
        })
        .collect();
    let mut env: BTreeMap<String, String> = plan.agent.env.clone();
    env.insert("HOME".into(), home.to_owned());
    GuestConfig {
        token: token.to_owned(),
        hostname: plan.bottle.clone(),
        control: ControlChannel::Vsock {
            port: CONTROL_VSOCK_PORT,
        },
        root: Some(BlockFs {
            device: "/dev/vda".into(),
            fstype: "squashfs".into(),
        }),
        upper: match layer {
            WritableLayer::Tmpfs => Upper::Tmpfs,
            WritableLayer::Disk(_) => Upper::Device(BlockFs {
                device: crate::image::workspace::guest_device(plan.mounts.len()),
                fstype: "ext4".into(),
            }),
        },
        // Workspace i is the snapshot image attached as disk i + 1 (after the root image).
        mounts: plan
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| WorkspaceMount {
                lower: BlockFs {
                    device: crate::image::workspace::guest_device(i),
                    fstype: "squashfs".into(),
                },
                guest_path: m.guest.display().to_string(),
            })
            .collect(),
        user: AgentUser {
            ids: user,
            home: home.to_owned(),
        },
        env,
        agent: None,
        egress,
        ca_cert: None,
    }
}

/// The guest's disks, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
#[derive(Debug, Clone, Copy)]
pub struct Disks<'a> {
    /// The read-only root image.
    pub rootfs: &'a Path,
    /// The snapshot images of `plan.mounts`, in order.
    pub workspaces: &'a [PathBuf],
    /// The writable layer (a disk last, or none for tmpfs).
    pub layer: &'a WritableLayer,
}

/// The VMM launch file for a plan.
pub fn launch(
    plan: &BottlePlan,
    guest: &GuestConfig,
    kernel: &Path,
    disks: Disks<'_>,
    run: &RunDir,
    state_db: &Path,
) -> Result<Launch, MicrovmError> {
    let Disks {
        rootfs,
        workspaces,
        layer,
    } = disks;
    let mut disks: Vec<DiskConfig> = std::iter::once(rootfs)
        .chain(workspaces.iter().map(PathBuf::as_path))
        .map(|path| DiskConfig {
            path: path.to_path_buf(),
            read_only: true,
        })
        .collect();
    if let WritableLayer::Disk(path) = layer {
        disks.push(DiskConfig {
            path: path.clone(),
            read_only: false,
        });
    }
    // The configuration goes on the command line, or, when too long for it (a bottle CA, many
    // variables), on a small read-only disk of its own.
    let (arg, config_disk) = match guest.to_cmdline_arg(BASE_CMDLINE.len() + CMDLINE_ROOM) {
        Ok(arg) => (arg, None),
        Err(bottle_proto::ConfigError::TooLong { .. }) => {
            let mut bytes = guest
                .to_disk_bytes()
                .map_err(|source| MicrovmError::Cmdline { source })?;
            bytes.resize(bytes.len().div_ceil(4096).max(1) * 4096, 0);
            let device = crate::image::workspace::guest_device(disks.len() - 1);
            disks.push(DiskConfig {
                path: run.config_disk(),
                read_only: true,
            });
            (
                format!("{}=dev:{device}", bottle_proto::config::CMDLINE_KEY),
                Some(bytes),
            )
        }
        Err(source) => return Err(MicrovmError::Cmdline { source }),
    };
    let socket = run.control_socket();
    let control = match guest.control {
        ControlChannel::Vsock { port } => Some(ControlEndpoint {
            socket: socket.clone(),
            port,
            token: guest.token.clone(),
        }),
        ControlChannel::VirtioPort { .. } => None,
    };
    Ok(Launch {
        machine: plan.agent.name.clone(),
        state_db: state_db.to_path_buf(),
        vmm: VmmConfig {
            kernel: kernel.to_path_buf(),
            cmdline: format!("{BASE_CMDLINE} {arg}"),
            vcpus: plan.agent.vcpus,
            mem_mib: plan.agent.memory_mib,
            serial: SerialOutput::File(run.console_log()),
            vsock: Some(VsockConfig {
                guest_cid: plan.guest_cid,
                uds_path: socket,
                allowlist: Vec::new(),
                event_log: Some(run.vsock_egress_log()),
            }),
            initrd: None,
            disks,
        },
        control,
        config_disk,
    })
}

/// The guest kernel: `$BOT_BOTTLE_KERNEL`, else the cached build for this fragment.
pub fn find_kernel(dirs: &crate::host::paths::Dirs) -> Result<PathBuf, MicrovmError> {
    if let Some(p) = std::env::var_os(KERNEL_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    crate::image::kernel::cached_kernel_in(
        &crate::image::kernel::kernel_cache_dir(dirs),
        crate::image::kernel::FRAGMENT,
    )
    .ok_or(MicrovmError::NoKernel)
}

/// bottle-init: `$BOT_BOTTLE_INIT`, else the `bottle-init` built next to this executable.
pub fn find_init() -> Result<PathBuf, MicrovmError> {
    if let Some(p) = std::env::var_os(INIT_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let candidate = exe.with_file_name("bottle-init");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(MicrovmError::NoInit { exe })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::manifest::{Backend, ManifestSource};
    use crate::plan::{derive_cid, plan, HostFacts};

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nnode:x:1000:\nstaff:x:50:\n";

    fn test_plan() -> BottlePlan {
        let m = ManifestSource::new(PathBuf::from("/nonexistent"))
            .load("claude")
            .unwrap();
        plan(
            &m,
            &HostFacts {
                bottle_id: "claude-abcdef".into(),
                alias: std::net::Ipv4Addr::new(127, 0, 0, 18),
                guest_cid: derive_cid("claude-abcdef", 0),
                backend: Backend::Microvm,
                mounts: vec![],
                runsc: false,
                state_tag: "t".into(),
            },
        )
        .unwrap()
    }

    #[test]
    fn user_names_resolve_through_the_images_passwd_and_group() {
        let (ids, home) = resolve_user("node", PASSWD, GROUP).unwrap();
        assert_eq!(
            (ids.uid, ids.gid, home.as_str()),
            (1000, 1000, "/home/node")
        );
        let (ids, _) = resolve_user("node:staff", PASSWD, GROUP).unwrap();
        assert_eq!(ids.gid, 50);
        let (ids, _) = resolve_user("2000:3000", PASSWD, GROUP).unwrap();
        assert_eq!((ids.uid, ids.gid), (2000, 3000));
    }

    #[test]
    fn unknown_user_or_group_is_named() {
        assert!(matches!(
            resolve_user("ghost", PASSWD, GROUP),
            Err(MicrovmError::UnknownUser { .. })
        ));
        assert!(matches!(
            resolve_user("node:ghosts", PASSWD, GROUP),
            Err(MicrovmError::UnknownGroup { .. })
        ));
    }

    #[test]
    fn guest_forwards_every_published_port_on_the_alias_over_the_same_vsock_port() {
        let p = test_plan();
        let g = guest_config(
            &p,
            "tok",
            UserIds {
                uid: 1000,
                gid: 1000,
            },
            "/home/node",
            &WritableLayer::Tmpfs,
        );
        let listens: Vec<String> = g.egress.iter().map(|e| e.listen.to_string()).collect();
        assert_eq!(
            listens,
            ["127.0.0.18:3128", "127.0.0.18:9418", "127.0.0.18:7070"]
        );
        assert!(g
            .egress
            .iter()
            .all(|e| e.vsock_port == u32::from(e.listen.port())));
        assert_eq!(g.env["HTTPS_PROXY"], "http://127.0.0.18:3128");
    }

    #[test]
    fn workspaces_become_read_only_disks_after_the_root_and_overlay_mounts_in_the_guest() {
        let mut p = test_plan();
        // The disk order without a config disk: the git gate's variable would push this
        // configuration (two workspaces) onto one (that case has its own test below).
        p.agent.env.remove("GIT_CONFIG_PARAMETERS");
        p.mounts = vec![
            crate::plan::MountPlan {
                host: "/src/a".into(),
                guest: "/workspace".into(),
            },
            crate::plan::MountPlan {
                host: "/src/b".into(),
                guest: "/data".into(),
            },
        ];
        let layer = WritableLayer::Disk(PathBuf::from("/state/disks/claude/upper.ext4"));
        let g = guest_config(&p, "tok", UserIds { uid: 1, gid: 1 }, "/h", &layer);
        let devices: Vec<(&str, &str)> = g
            .mounts
            .iter()
            .map(|m| (m.lower.device.as_str(), m.guest_path.as_str()))
            .collect();
        assert_eq!(devices, [("/dev/vdb", "/workspace"), ("/dev/vdc", "/data")]);
        let images = [PathBuf::from("/b/ws-0.sqfs"), PathBuf::from("/b/ws-1.sqfs")];
        let l = launch_at(&p, &g, &images, &layer);
        let disks: Vec<(&Path, bool)> = l
            .vmm
            .disks
            .iter()
            .map(|d| (d.path.as_path(), d.read_only))
            .collect();
        // Root and workspaces read-only, then the writable layer read-write as /dev/vdd.
        assert_eq!(
            disks,
            [
                (Path::new("/r.sqfs"), true),
                (images[0].as_path(), true),
                (images[1].as_path(), true),
                (Path::new("/state/disks/claude/upper.ext4"), false)
            ]
        );
        assert_eq!(
            g.upper,
            Upper::Device(BlockFs {
                device: "/dev/vdd".into(),
                fstype: "ext4".into()
            })
        );
    }

    #[test]
    fn launch_carries_no_allowlist_and_the_config_fits_the_command_line() {
        let p = test_plan();
        let g = guest_config(
            &p,
            "tok",
            UserIds {
                uid: 1000,
                gid: 1000,
            },
            "/home/node",
            &WritableLayer::Tmpfs,
        );
        let l = launch_at(&p, &g, &[], &WritableLayer::Tmpfs);
        let vsock = l.vmm.vsock.unwrap();
        assert!(vsock.allowlist.is_empty());
        assert_eq!(vsock.guest_cid, p.guest_cid);
        assert!(l.vmm.cmdline.starts_with(BASE_CMDLINE));
        assert!(BASE_CMDLINE.ends_with(&format!("init=/{}", crate::image::rootfs::INIT_PATH)));
        assert!(l.vmm.cmdline.contains("bottle.config="));
        assert!(l.vmm.disks[0].read_only);
        assert_eq!(l.vmm.disks.len(), 1, "tmpfs layer: no writable disk");
        assert_eq!(g.upper, Upper::Tmpfs);
        assert_eq!(l.machine, "bot-bottle-claude-abcdef-vm");
    }

    #[test]
    fn a_config_too_long_for_the_command_line_goes_on_its_own_disk() {
        let p = test_plan();
        let layer = WritableLayer::Disk(PathBuf::from("/state/upper.ext4"));
        let mut g = guest_config(&p, "tok", UserIds { uid: 1, gid: 1 }, "/h", &layer);
        g.ca_cert = Some(format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            "A".repeat(1200)
        ));
        let images = [PathBuf::from("/b/ws-0.sqfs")];

        let l = launch_at(&p, &g, &images, &layer);

        // Root, workspace, writable layer, then the config disk as /dev/vdd.
        assert!(
            l.vmm.cmdline.ends_with(" bottle.config=dev:/dev/vdd"),
            "{}",
            l.vmm.cmdline
        );
        let last = l.vmm.disks.last().unwrap();
        assert_eq!(
            (last.path.as_path(), last.read_only),
            (Path::new("/b/config.img"), true)
        );
        let bytes = l.config_disk.unwrap();
        assert_eq!(bytes.len() % 4096, 0);
        assert_eq!(
            bottle_proto::GuestConfig::from_disk_bytes(&bytes).unwrap(),
            g
        );
    }

    #[test]
    fn a_config_disk_bottles_launch_file_gives_back_its_token_and_socket_and_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let p = test_plan();
        let dir = tempfile::tempdir().unwrap();
        let layer = WritableLayer::Tmpfs;
        let mut g = guest_config(
            &p,
            "per-boot-token",
            UserIds { uid: 1, gid: 1 },
            "/h",
            &layer,
        );
        g.ca_cert = Some(format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            "A".repeat(1200)
        ));
        let disks = Disks {
            rootfs: Path::new("/r.sqfs"),
            workspaces: &[],
            layer: &layer,
        };
        let l = launch(
            &p,
            &g,
            Path::new("/k"),
            disks,
            &RunDir::new(dir.path()),
            Path::new("/s.db"),
        )
        .unwrap();
        let path = RunDir::new(dir.path()).launch_file();
        // A stale, readable file in the way is made private too.
        std::fs::write(&path, "stale").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

        l.write(&path).unwrap();
        let control = Launch::read_control(&RunDir::new(dir.path())).unwrap();
        let back = Launch::read(&path).unwrap();

        assert!(
            l.config_disk.is_some(),
            "the configuration went to the config disk"
        );
        assert!(back.vmm.cmdline.ends_with(" bottle.config=dev:/dev/vdb"));
        assert_eq!(
            control,
            ControlEndpoint {
                socket: dir.path().join("vsock.sock"),
                port: CONTROL_VSOCK_PORT,
                token: "per-boot-token".into(),
            }
        );
        assert_eq!(
            back.vmm.vsock.unwrap().uds_path,
            control.socket,
            "clients dial the socket the VMM serves"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the launch file holds the token");
    }

    #[test]
    fn a_launch_file_without_a_control_section_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = test_plan();
        let g = guest_config(
            &p,
            "tok",
            UserIds { uid: 1, gid: 1 },
            "/h",
            &WritableLayer::Tmpfs,
        );
        let mut l = launch_at(&p, &g, &[], &WritableLayer::Tmpfs);
        l.control = None;
        l.write(&RunDir::new(dir.path()).launch_file()).unwrap();

        let err = Launch::read_control(&RunDir::new(dir.path())).unwrap_err();

        assert!(matches!(err, MicrovmError::NoControl { .. }), "{err}");
        assert!(err.to_string().contains("start it again"), "{err}");
    }

    /// `launch` with the root image at /r.sqfs, the bottle dir /b and the state DB /s.db.
    fn launch_at(
        p: &BottlePlan,
        g: &GuestConfig,
        workspaces: &[PathBuf],
        layer: &WritableLayer,
    ) -> Launch {
        let disks = Disks {
            rootfs: Path::new("/r.sqfs"),
            workspaces,
            layer,
        };
        launch(
            p,
            g,
            Path::new("/k"),
            disks,
            &RunDir::new("/b"),
            Path::new("/s.db"),
        )
        .unwrap()
    }

    #[test]
    fn only_ipv4_slash_32_entries_become_rules() {
        use crate::plan::AllowEntry;
        let ok = rules_from_entries(&[AllowEntry {
            cidr: "127.0.0.16/32".into(),
            port: 3128,
        }])
        .unwrap();
        assert_eq!(ok[0].addr, std::net::Ipv4Addr::new(127, 0, 0, 16));
        for bad in ["127.0.0.0/8", "0.0.0.0/0", "127.0.0.16", "localhost/32"] {
            let entry = AllowEntry {
                cidr: bad.into(),
                port: 1,
            };
            assert!(rules_from_entries(&[entry]).is_err(), "{bad}");
        }
    }
}
