//! Root filesystem images made from the agent Docker image.
//!
//! The image's flattened file system (a `docker export` tar stream) becomes a read-only squashfs
//! (zstd, which the guest kernel reads) written by [`crate::image::squashfs`], with `bottle-init` added
//! at [`INIT_PATH`]. Owners, modes (setuid included), mtimes, symlinks, hard links (one inode,
//! several names), devices, FIFOs and the extended attributes that mean something in the guest
//! (`security.capability` and `user.*`, from `SCHILY.xattr.*` PAX records as Docker writes
//! them) are kept. Images are cached by image id and bottle-init's content.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::image::squashfs::{self, Builder, Content, Meta, SquashfsError, WriteStats};

/// Where bottle-init lives in the image; boot with `init=/.bottle/init`. bottle-init mounts its
/// staging tmpfs over `/.bottle` once running.
pub const INIT_PATH: &str = ".bottle/init";

/// Directories the guest mounts over; created when the image lacks them.
const MOUNT_POINTS: [&str; 5] = ["dev", "proc", "sys", "tmp", "run"];

/// Part of every cache key: bump it when the images written for the same input change (2:
/// hard links and xattrs kept; 3: small files in fragment blocks).
const IMAGE_FORMAT: &[u8] = b"bot-bottle root image 3\0";

/// The PAX record prefix under which Docker (and GNU tar) store extended attributes.
const PAX_XATTR: &str = "SCHILY.xattr.";

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot read the image's tar stream")]
    Tar(#[source] io::Error),
    #[error("the image's file tree cannot be stored")]
    Tree(#[source] SquashfsError),
    #[error("cannot read bottle-init at {path}: build it with `cargo build --release -p bottle-init` (static)")]
    Init {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot build the squashfs image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: SquashfsError,
    },
}

/// Counts of what went into an image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RootfsStats {
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    pub hardlinks: usize,
    pub devices: usize,
    pub fifos: usize,
    /// Entries carrying extended attributes the image keeps.
    pub xattrs: usize,
    /// Extended attributes left out (neither `security.capability` nor `user.*`).
    pub ignored_xattrs: usize,
    pub bytes: u64,
    /// What the image writer reported.
    pub image: WriteStats,
}

/// Linux's `new_encode_dev`, the device number squashfs stores.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Extended attributes a root image keeps: file capabilities and the user namespace. Anything
/// else is left out: `trusted.overlay.*` would speak to the guest's overlayfs, and SELinux
/// labels and ACLs from the build host mean nothing in the guest.
fn kept_xattr(name: &[u8]) -> bool {
    name == b"security.capability" || name.starts_with(b"user.")
}

fn meta_of<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    ignored: &mut usize,
) -> Result<Meta, RootfsError> {
    let h = entry.header();
    let mut meta = Meta {
        mode: (h.mode().unwrap_or(0o644) & 0o7777) as u16,
        uid: h.uid().unwrap_or(0) as u32,
        gid: h.gid().unwrap_or(0) as u32,
        mtime: h.mtime().unwrap_or(0) as u32,
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions().map_err(RootfsError::Tar)? {
        for ext in pax {
            let ext = ext.map_err(RootfsError::Tar)?;
            if let Some(name) = ext.key_bytes().strip_prefix(PAX_XATTR.as_bytes()) {
                if kept_xattr(name) {
                    meta.xattrs
                        .push((name.to_vec(), ext.value_bytes().to_vec()));
                } else {
                    *ignored += 1;
                    tracing::debug!(name = %String::from_utf8_lossy(name), "extended attribute left out of the root image");
                }
            }
        }
    }
    Ok(meta)
}

/// The entries of a tar stream, file contents spooled under `spool`.
fn read_tar(tar: impl Read, spool: &Path) -> Result<(Builder, RootfsStats), RootfsError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Io { path, source }
    };
    fs::create_dir_all(spool).map_err(io_err(spool))?;
    let mut tree = Builder::new();
    let mut stats = RootfsStats::default();
    let mut archive = tar::Archive::new(tar);
    let mut spooled = 0usize;
    for entry in archive.entries().map_err(RootfsError::Tar)? {
        let mut entry = entry.map_err(RootfsError::Tar)?;
        let path = entry.path().map_err(RootfsError::Tar)?.into_owned();
        let meta = meta_of(&mut entry, &mut stats.ignored_xattrs)?;
        let link_target = || -> Result<PathBuf, RootfsError> {
            Ok(entry
                .link_name()
                .map_err(RootfsError::Tar)?
                .unwrap_or_default()
                .into_owned())
        };
        let kind = entry.header().entry_type();
        let content = match kind {
            tar::EntryType::Directory => {
                stats.dirs += 1;
                Content::Dir
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                spooled += 1;
                let file = spool.join(spooled.to_string());
                let mut f = fs::File::create(&file).map_err(io_err(&file))?;
                stats.bytes += io::copy(&mut entry, &mut f).map_err(RootfsError::Tar)?;
                stats.files += 1;
                Content::File(file)
            }
            tar::EntryType::Symlink => {
                stats.symlinks += 1;
                Content::Symlink(link_target()?.into_os_string().into_encoded_bytes())
            }
            tar::EntryType::Link => {
                let target = link_target()?;
                tree.link(&path, &target).map_err(RootfsError::Tree)?;
                stats.hardlinks += 1;
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                stats.devices += 1;
                let dev = encode_dev(major, minor);
                if kind == tar::EntryType::Char {
                    Content::CharDevice(dev)
                } else {
                    Content::BlockDevice(dev)
                }
            }
            tar::EntryType::Fifo => {
                stats.fifos += 1;
                Content::Fifo
            }
            // pax/GNU extension headers are consumed by `entries()`; anything else is skipped.
            _ => continue,
        };
        if !meta.xattrs.is_empty() {
            stats.xattrs += 1;
        }
        // A later entry for the same path replaces the earlier one, as tar extraction would.
        tree.insert(&path, meta, content)
            .map_err(RootfsError::Tree)?;
    }
    Ok((tree, stats))
}

fn write_image(
    tree: Builder,
    out: &Path,
    stats: &mut RootfsStats,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), RootfsError> {
    stats.image = tree
        .write(out, progress)
        .map_err(|source| RootfsError::Image {
            path: out.to_path_buf(),
            source,
        })?;
    for (path, name) in &stats.image.dropped_xattrs {
        tracing::warn!(%path, %name, "squashfs cannot hold this extended attribute; dropped");
    }
    Ok(())
}

/// Writes the squashfs image of the tar stream `tar`, plus `init` at [`INIT_PATH`], to `out`.
/// `spool` is an empty scratch directory for file contents (on the same disk as the cache).
pub fn tar_to_squashfs(
    tar: impl Read,
    init: &Path,
    spool: &Path,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RootfsStats, RootfsError> {
    let (mut tree, mut stats) = read_tar(tar, spool)?;
    let add = |tree: &mut Builder, path: &str, mode: u16, content: Content| {
        tree.insert(Path::new(path), Meta::root(mode), content)
            .map_err(RootfsError::Tree)
    };
    for dir in MOUNT_POINTS {
        if tree.get(Path::new(dir)).is_none() {
            add(&mut tree, dir, 0o755, Content::Dir)?;
        }
    }
    // The kernel opens /dev/console for init before anything is mounted on /dev.
    if tree.get(Path::new("dev/console")).is_none() {
        add(
            &mut tree,
            "dev/console",
            0o600,
            Content::CharDevice(encode_dev(5, 1)),
        )?;
    }
    add(&mut tree, ".bottle", 0o755, Content::Dir)?;
    add(
        &mut tree,
        INIT_PATH,
        0o755,
        Content::File(init.to_path_buf()),
    )?;
    write_image(tree, out, &mut stats, progress)?;
    Ok(stats)
}

/// The cache key of a root image: the image format, the Docker image id and bottle-init's
/// content.
pub fn rootfs_key(image_id: &str, init: &Path) -> Result<String, RootfsError> {
    let bytes = fs::read(init).map_err(|source| RootfsError::Init {
        path: init.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    h.update(IMAGE_FORMAT);
    h.update(image_id.as_bytes());
    h.update([0u8]);
    h.update(&bytes);
    Ok(hex::encode(&h.finalize()[..16]))
}

/// Where the root image for `image_id` and `init` lives in `<cache>/rootfs`.
pub fn rootfs_path(cache_dir: &Path, image_id: &str, init: &Path) -> Result<PathBuf, RootfsError> {
    let key = rootfs_key(image_id, init)?;
    Ok(cache_dir.join("rootfs").join(format!("{key}.sqfs")))
}

/// The root image for `image_id` under `<cache>/rootfs`, built from `export()` (a `docker
/// export` stream) only when missing.
pub fn cached_rootfs<R: Read>(
    cache_dir: &Path,
    image_id: &str,
    init: &Path,
    export: impl FnOnce() -> io::Result<R>,
) -> Result<PathBuf, RootfsError> {
    cached_rootfs_at(&rootfs_path(cache_dir, image_id, init)?, init, export)
}

/// [`cached_rootfs`] at a path from [`rootfs_path`] (the key is read once).
pub fn cached_rootfs_at<R: Read>(
    image: &Path,
    init: &Path,
    export: impl FnOnce() -> io::Result<R>,
) -> Result<PathBuf, RootfsError> {
    let image = image.to_path_buf();
    if image.is_file() {
        return Ok(image);
    }
    let dir = image.parent().unwrap_or(Path::new("."));
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    let spool = dir.join(format!(".{stem}.spool"));
    let _ = fs::remove_dir_all(&spool);
    let result = export().map_err(RootfsError::Tar).and_then(|tar| {
        tar_to_squashfs(
            tar,
            init,
            &spool,
            &image,
            &mut squashfs::progress_on_stderr("compressing the root image"),
        )
    });
    let _ = fs::remove_dir_all(&spool);
    result.map(|_| image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use backhand::{FilesystemReader, InnerNode};
    use std::collections::BTreeMap;
    use std::io::BufReader;

    fn header(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }

    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut d = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut d, "usr/bin/", io::empty()).unwrap();
        let mut f = header(tar::EntryType::Regular, 0o4755, 0);
        f.set_size(5);
        b.append_data(&mut f, "usr/bin/su", &b"setid"[..]).unwrap();
        let mut home = header(tar::EntryType::Directory, 0o700, 1000);
        b.append_data(&mut home, "home/node/", io::empty()).unwrap();
        let mut own = header(tar::EntryType::Regular, 0o600, 1000);
        own.set_size(3);
        b.append_data(&mut own, "home/node/.npmrc", &b"x=1"[..])
            .unwrap();
        let mut link = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut link, "usr/bin/sudo", "su").unwrap();
        let mut hard = header(tar::EntryType::Link, 0o4755, 0);
        b.append_link(&mut hard, "usr/bin/su2", "usr/bin/su")
            .unwrap();
        let mut null = header(tar::EntryType::Char, 0o666, 0);
        null.set_device_major(1).unwrap();
        null.set_device_minor(3).unwrap();
        b.append_data(&mut null, "dev/null", io::empty()).unwrap();
        let mut fifo = header(tar::EntryType::Fifo, 0o644, 0);
        b.append_data(&mut fifo, "run/pipe", io::empty()).unwrap();
        b.into_inner().unwrap()
    }

    struct Built {
        _dir: tempfile::TempDir,
        image: PathBuf,
        stats: RootfsStats,
    }

    fn build(tar: &[u8]) -> Built {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        fs::write(&init, b"\x7fELF fake init").unwrap();
        let image = dir.path().join("root.sqfs");
        let stats = tar_to_squashfs(
            tar,
            &init,
            &dir.path().join("spool"),
            &image,
            &mut |_, _| {},
        )
        .unwrap();
        Built {
            _dir: dir,
            image,
            stats,
        }
    }

    /// path → (mode, uid, gid, what)
    fn listing(image: &Path) -> BTreeMap<String, (u16, u32, u32, String)> {
        let reader = BufReader::new(fs::File::open(image).unwrap());
        let fs = FilesystemReader::from_reader(reader).unwrap();
        fs.files()
            .map(|n| {
                let what = match &n.inner {
                    InnerNode::File(f) => {
                        let mut data = Vec::new();
                        fs.file(f).reader().read_to_end(&mut data).unwrap();
                        format!("file:{}", String::from_utf8_lossy(&data))
                    }
                    InnerNode::Symlink(s) => format!("symlink:{}", s.link.display()),
                    InnerNode::Dir(_) => "dir".into(),
                    InnerNode::CharacterDevice(d) => format!("char:{}", d.device_number),
                    InnerNode::BlockDevice(d) => format!("block:{}", d.device_number),
                    InnerNode::NamedPipe => "fifo".into(),
                    InnerNode::Socket => "socket".into(),
                };
                (
                    n.fullpath.display().to_string(),
                    (n.header.permissions, n.header.uid, n.header.gid, what),
                )
            })
            .collect()
    }

    #[test]
    fn image_keeps_owners_modes_links_devices_and_fifos() {
        let built = build(&sample_tar());

        let l = listing(&built.image);

        assert_eq!(l["/usr/bin/su"], (0o4755, 0, 0, "file:setid".to_string()));
        assert_eq!(l["/usr/bin/su2"], (0o4755, 0, 0, "file:setid".to_string()));
        assert_eq!(l["/usr/bin/sudo"].3, "symlink:su");
        assert_eq!(l["/home/node"], (0o700, 1000, 1000, "dir".to_string()));
        assert_eq!(
            l["/home/node/.npmrc"],
            (0o600, 1000, 1000, "file:x=1".to_string())
        );
        assert_eq!(
            l["/dev/null"],
            (0o666, 0, 0, format!("char:{}", encode_dev(1, 3)))
        );
        assert_eq!(l["/run/pipe"].3, "fifo");
    }

    #[test]
    fn image_carries_bottle_init_console_and_mount_points() {
        let built = build(&sample_tar());

        let l = listing(&built.image);

        assert_eq!(
            l["/.bottle/init"],
            (0o755, 0, 0, "file:\u{7f}ELF fake init".to_string())
        );
        assert_eq!(
            l["/dev/console"],
            (0o600, 0, 0, format!("char:{}", encode_dev(5, 1)))
        );
        assert_eq!(
            ["/proc", "/sys", "/tmp"].map(|p| l[p].3.clone()),
            ["dir", "dir", "dir"].map(String::from)
        );
    }

    #[test]
    fn stats_count_each_kind() {
        let built = build(&sample_tar());

        let s = &built.stats;
        assert_eq!(
            (
                s.files,
                s.dirs,
                s.symlinks,
                s.hardlinks,
                s.devices,
                s.fifos,
                s.bytes
            ),
            (2, 2, 1, 1, 1, 1, 8)
        );
    }

    #[test]
    fn path_escaping_the_root_is_refused() {
        let mut raw = tar::Header::new_gnu();
        raw.set_entry_type(tar::EntryType::Regular);
        raw.set_size(0);
        raw.set_mode(0o644);
        raw.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        raw.set_cksum();
        let mut tar = raw.as_bytes().to_vec();
        tar.extend_from_slice(&[0u8; 1024]);
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        fs::write(&init, b"init").unwrap();

        let err = tar_to_squashfs(
            tar.as_slice(),
            &init,
            &dir.path().join("s"),
            &dir.path().join("o"),
            &mut |_, _| {},
        )
        .unwrap_err();

        assert!(
            matches!(err, RootfsError::Tree(SquashfsError::UnsafePath { .. })),
            "{err}"
        );
    }

    #[test]
    fn device_numbers_encode_like_linux() {
        assert_eq!((encode_dev(1, 3), encode_dev(8, 0x123)), (0x103, 0x10_0823));
    }

    #[test]
    fn cached_image_is_built_once_per_image_id() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        fs::write(&init, b"init").unwrap();
        let tar = sample_tar();
        let mut exports = 0;

        let first = cached_rootfs(dir.path(), "sha256:abc", &init, || {
            exports += 1;
            Ok(tar.as_slice())
        })
        .unwrap();
        let second = cached_rootfs(dir.path(), "sha256:abc", &init, || {
            exports += 1;
            Ok(tar.as_slice())
        })
        .unwrap();

        assert_eq!((first == second, exports), (true, 1));
    }
}
