//! The boot sequence of PID 1: kernel filesystems, the configuration, the root filesystem
//! (read-only image + writable overlay), the workspaces, ownership and modes.

use std::fs;
use std::io;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::unistd::chroot;

use bottle_proto::config::{
    BlockFs, ConfigSource, GuestConfig, Upper, WorkspaceMount, CA_CERT_PATH,
};
use bottle_proto::{ConfigError, UserIds};

/// Staging area for the new root; on the initramfs it is created, on a read-only root image the
/// rootfs builder must have made the directory.
const STAGE: &str = "/.bottle";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bottle configuration is unusable")]
    Config(#[source] ConfigError),
    #[error("cannot switch to the new root {path}")]
    SwitchRoot {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot set the owner or mode of {path}")]
    Owner {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the hostname to {name}")]
    Hostname {
        name: String,
        #[source]
        source: nix::Error,
    },
}

fn mkdir(path: &Path) -> Result<(), BootError> {
    fs::create_dir_all(path).map_err(|source| BootError::Mkdir {
        path: path.into(),
        source,
    })
}

fn do_mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    mkdir(target)?;
    mount(source, target, fstype, flags, data).map_err(|e| BootError::Mount {
        what: format!("{} ({})", source.unwrap_or("-"), fstype.unwrap_or("move")),
        target: target.into(),
        source: e,
    })
}

/// Mounts a kernel filesystem unless something is already mounted there.
fn mount_kernel_fs(
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    match do_mount(Some(fstype), Path::new(target), Some(fstype), flags, data) {
        Err(BootError::Mount {
            source: nix::Error::EBUSY,
            ..
        }) => Ok(()),
        other => other,
    }
}

/// /dev, /proc and /sys: needed before anything else (the config is in /proc/cmdline, the
/// disks are in /dev).
pub fn mount_early() -> Result<(), BootError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_kernel_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_kernel_fs("proc", "/proc", nosuid, None)?;
    mount_kernel_fs("sysfs", "/sys", nosuid, None)
}

/// Reads the configuration named on the kernel command line.
pub fn read_config() -> Result<GuestConfig, BootError> {
    let path = Path::new("/proc/cmdline");
    let cmdline = fs::read_to_string(path).map_err(|source| BootError::Read {
        path: path.into(),
        source,
    })?;
    match bottle_proto::config::parse_cmdline(&cmdline).map_err(BootError::Config)? {
        ConfigSource::Inline(cfg) => Ok(*cfg),
        ConfigSource::Device(dev) => {
            let bytes = read_head(Path::new(&dev), 1 << 20)?;
            GuestConfig::from_disk_bytes(&bytes).map_err(BootError::Config)
        }
    }
}

fn read_head(path: &Path, limit: u64) -> Result<Vec<u8>, BootError> {
    use std::io::Read;
    let mut out = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(limit).read_to_end(&mut out))
        .map_err(|source| BootError::Read {
            path: path.into(),
            source,
        })?;
    Ok(out)
}

fn mount_block_ro(fs: &BlockFs, target: &Path) -> Result<(), BootError> {
    do_mount(
        Some(&fs.device),
        target,
        Some(&fs.fstype),
        MsFlags::MS_RDONLY,
        None,
    )
}

fn overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
    metacopy: bool,
) -> Result<(), BootError> {
    mkdir(upper)?;
    mkdir(work)?;
    let mut opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    if metacopy {
        opts.push_str(",metacopy=on,redirect_dir=on");
    }
    do_mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(&opts),
    )
}

/// Builds the new root under [`STAGE`] (image + overlay, workspaces), moves the kernel
/// filesystems into it and makes it `/`. Without a root image the current root stays and only
/// the workspaces are mounted.
pub fn assemble_root(cfg: &GuestConfig) -> Result<(), BootError> {
    let stage = Path::new(STAGE);
    do_mount(
        Some("tmpfs"),
        stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0700"),
    )?;
    let Some(root) = &cfg.root else {
        return mount_workspaces(&cfg.mounts, stage, Path::new("/"), cfg.user.ids);
    };
    let lower = stage.join("lower");
    mount_block_ro(root, &lower)?;
    let upper_base = match &cfg.upper {
        Upper::Tmpfs => stage.join("rw"),
        Upper::Device(dev) => {
            let p = stage.join("rw");
            do_mount(
                Some(&dev.device),
                &p,
                Some(&dev.fstype),
                MsFlags::MS_NOATIME,
                None,
            )?;
            p
        }
    };
    let new_root = stage.join("root");
    overlay(
        &lower,
        &upper_base.join("upper"),
        &upper_base.join("work"),
        &new_root,
        true,
    )?;
    mount_workspaces(&cfg.mounts, stage, &new_root, cfg.user.ids)?;
    for dir in ["dev", "proc", "sys"] {
        let from = Path::new("/").join(dir);
        do_mount(
            Some(from.to_str().unwrap_or("/")),
            &new_root.join(dir),
            None,
            MsFlags::MS_MOVE,
            None,
        )?;
    }
    std::env::set_current_dir(&new_root).map_err(|source| BootError::Mkdir {
        path: new_root.clone(),
        source,
    })?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
        BootError::SwitchRoot {
            path: new_root.clone(),
            source,
        }
    })?;
    chroot(".").map_err(|source| BootError::SwitchRoot {
        path: new_root.clone(),
        source,
    })?;
    std::env::set_current_dir("/").map_err(|source| BootError::Mkdir {
        path: "/".into(),
        source,
    })
}

fn mount_workspaces(
    mounts: &[WorkspaceMount],
    stage: &Path,
    root: &Path,
    user: UserIds,
) -> Result<(), BootError> {
    for (i, m) in mounts.iter().enumerate() {
        let base = stage.join(format!("ws{i}"));
        let lower = base.join("lower");
        mount_block_ro(&m.lower, &lower)?;
        let target = root.join(m.guest_path.trim_start_matches('/'));
        overlay(
            &lower,
            &base.join("upper"),
            &base.join("work"),
            &target,
            true,
        )?;
        // The host's files carry the host's ids; the agent must own its workspace. With
        // metacopy the overlay copies up only the metadata, never the data.
        chown_tree(&target, user)?;
    }
    Ok(())
}

/// Gives everything under `path` that is not already owned by `user` to `user`.
pub fn chown_tree(path: &Path, user: UserIds) -> Result<(), BootError> {
    let meta = fs::symlink_metadata(path).map_err(|source| BootError::Owner {
        path: path.into(),
        source,
    })?;
    if meta.uid() != user.uid || meta.gid() != user.gid {
        lchown(path, Some(user.uid), Some(user.gid)).map_err(|source| BootError::Owner {
            path: path.into(),
            source,
        })?;
    }
    if meta.is_dir() {
        let entries = fs::read_dir(path).map_err(|source| BootError::Read {
            path: path.into(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| BootError::Read {
                path: path.into(),
                source,
            })?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

/// Mounts that live inside the final root: devpts, shm, /tmp, /run; sticky /tmp and /var/tmp;
/// the agent's home.
pub fn finish_root(cfg: &GuestConfig) -> Result<(), BootError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount_kernel_fs(
        "devpts",
        "/dev/pts",
        nosuid,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    // With newinstance, /dev/ptmx must point at this instance's ptmx.
    let _ = fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    for (dir, mode) in [
        ("/dev/shm", "mode=1777"),
        ("/tmp", "mode=1777"),
        ("/run", "mode=0755"),
    ] {
        do_mount(
            Some("tmpfs"),
            Path::new(dir),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(mode),
        )?;
    }
    for dir in ["/tmp", "/var/tmp"] {
        mkdir(Path::new(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o1777)).map_err(|source| {
            BootError::Owner {
                path: dir.into(),
                source,
            }
        })?;
    }
    if let Some(pem) = &cfg.ca_cert {
        install_ca(pem)?;
    }
    let home = Path::new(&cfg.user.home);
    mkdir(home)?;
    chown_tree(home, cfg.user.ids)
}

/// The bottle CA's certificate at [`CA_CERT_PATH`], root-owned and world-readable (in the
/// writable layer: the image is never changed).
fn install_ca(pem: &str) -> Result<(), BootError> {
    let path = Path::new(CA_CERT_PATH);
    if let Some(dir) = path.parent() {
        mkdir(dir)?;
    }
    let write = |source| BootError::Write {
        path: path.to_path_buf(),
        source,
    };
    fs::write(path, pem).map_err(write)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(write)
}

pub fn set_hostname(name: &str) -> Result<(), BootError> {
    nix::unistd::sethostname(name).map_err(|source| BootError::Hostname {
        name: name.into(),
        source,
    })?;
    let _ = fs::write("/etc/hostname", format!("{name}\n"));
    Ok(())
}
