//! Root filesystem images made from the agent Docker image.
//!
//! The image's flattened file system (a `docker export` tar stream) becomes a read-only squashfs
//! (zstd, which the guest kernel reads) through `backhand`, with `bottle-init` added at
//! [`INIT_PATH`]. Owners, modes (setuid included), mtimes, symlinks, devices and FIFOs are kept.
//! Hard links become separate inodes with the same content: backhand cannot write hard links,
//! and its duplicate detection stores the data once. Extended attributes are dropped.
//! Images are cached by image id and bottle-init's content.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use backhand::compression::Compressor;
use backhand::{FilesystemCompressor, FilesystemWriter, NodeHeader};
use sha2::{Digest, Sha256};

/// Where bottle-init lives in the image; boot with `init=/.bottle/init`. bottle-init mounts its
/// staging tmpfs over `/.bottle` once running.
pub const INIT_PATH: &str = ".bottle/init";

/// Directories the guest mounts over; created when the image lacks them.
const MOUNT_POINTS: [&str; 6] = ["dev", "proc", "sys", "tmp", "run", ".bottle"];

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot read the image's tar stream")]
    Tar(#[source] io::Error),
    #[error("tar entry {path} escapes the root (absolute or `..`)")]
    UnsafePath { path: String },
    #[error("hard link {path} points at {target}, which is not an earlier regular file")]
    DanglingHardLink { path: String, target: String },
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
    #[error("cannot build the squashfs image for {path}")]
    Squashfs {
        path: String,
        #[source]
        source: backhand::BackhandError,
    },
}

/// Counts of what went into an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootfsStats {
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    pub hardlinks: usize,
    pub devices: usize,
    pub fifos: usize,
    pub bytes: u64,
}

enum Kind {
    Dir,
    /// Content spooled to this file.
    File(PathBuf),
    Symlink(PathBuf),
    CharDevice(u32),
    BlockDevice(u32),
    Fifo,
}

struct Item {
    header: NodeHeader,
    kind: Kind,
}

/// Linux's `new_encode_dev`, the device number squashfs stores.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// A tar path as a clean relative path, or `None` for the root itself.
fn clean(path: &Path) -> Result<Option<PathBuf>, RootfsError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(RootfsError::UnsafePath {
                    path: path.display().to_string(),
                })
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

fn header_of(h: &tar::Header) -> NodeHeader {
    NodeHeader {
        permissions: (h.mode().unwrap_or(0o644) & 0o7777) as u16,
        uid: h.uid().unwrap_or(0) as u32,
        gid: h.gid().unwrap_or(0) as u32,
        mtime: h.mtime().unwrap_or(0) as u32,
    }
}

/// The entries of a tar stream, file contents spooled under `spool`.
fn read_tar(
    tar: impl Read,
    spool: &Path,
) -> Result<(BTreeMap<PathBuf, Item>, RootfsStats), RootfsError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Io { path, source }
    };
    fs::create_dir_all(spool).map_err(io_err(spool))?;
    let mut items: BTreeMap<PathBuf, Item> = BTreeMap::new();
    let mut stats = RootfsStats::default();
    let mut archive = tar::Archive::new(tar);
    let mut spooled = 0usize;
    for entry in archive.entries().map_err(RootfsError::Tar)? {
        let mut entry = entry.map_err(RootfsError::Tar)?;
        let raw_path = entry.path().map_err(RootfsError::Tar)?.into_owned();
        let Some(path) = clean(&raw_path)? else {
            continue;
        };
        let header = header_of(entry.header());
        let kind = match entry.header().entry_type() {
            tar::EntryType::Directory => {
                stats.dirs += 1;
                Kind::Dir
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                spooled += 1;
                let file = spool.join(spooled.to_string());
                let mut f = fs::File::create(&file).map_err(io_err(&file))?;
                stats.bytes += io::copy(&mut entry, &mut f).map_err(RootfsError::Tar)?;
                stats.files += 1;
                Kind::File(file)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(RootfsError::Tar)?
                    .unwrap_or_default();
                stats.symlinks += 1;
                Kind::Symlink(target.into_owned())
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(RootfsError::Tar)?
                    .unwrap_or_default();
                let dangling = || RootfsError::DanglingHardLink {
                    path: path.display().to_string(),
                    target: target.display().to_string(),
                };
                let target_path = clean(&target)?.ok_or_else(dangling)?;
                match items.get(&target_path) {
                    Some(Item {
                        kind: Kind::File(content),
                        header,
                    }) => {
                        stats.hardlinks += 1;
                        let (content, header) = (content.clone(), *header);
                        items.insert(
                            path,
                            Item {
                                header,
                                kind: Kind::File(content),
                            },
                        );
                        continue;
                    }
                    _ => return Err(dangling()),
                }
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                stats.devices += 1;
                let dev = encode_dev(major, minor);
                if entry.header().entry_type() == tar::EntryType::Char {
                    Kind::CharDevice(dev)
                } else {
                    Kind::BlockDevice(dev)
                }
            }
            tar::EntryType::Fifo => {
                stats.fifos += 1;
                Kind::Fifo
            }
            // pax/GNU extension headers are consumed by `entries()`; anything else is skipped.
            _ => continue,
        };
        // A later entry for the same path replaces the earlier one, as tar extraction would.
        items.insert(path, Item { header, kind });
    }
    Ok((items, stats))
}

/// Writes the squashfs image of the tar stream `tar` as it is (no init, no mount points): a
/// workspace snapshot. `spool` is an empty scratch directory.
pub fn tar_to_plain_squashfs(
    tar: impl Read,
    spool: &Path,
    out: &Path,
) -> Result<RootfsStats, RootfsError> {
    let (items, stats) = read_tar(tar, spool)?;
    write_image(&items, out)?;
    Ok(stats)
}

/// Writes the squashfs image of the tar stream `tar`, plus `init` at [`INIT_PATH`], to `out`.
/// `spool` is an empty scratch directory for file contents (on the same disk as the cache).
pub fn tar_to_squashfs(
    tar: impl Read,
    init: &Path,
    spool: &Path,
    out: &Path,
) -> Result<RootfsStats, RootfsError> {
    let (mut items, stats) = read_tar(tar, spool)?;
    let init_copy = spool.join("bottle-init");
    fs::copy(init, &init_copy).map_err(|source| RootfsError::Init {
        path: init.to_path_buf(),
        source,
    })?;
    let root_dir = NodeHeader {
        permissions: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
    };
    for dir in MOUNT_POINTS {
        items.entry(PathBuf::from(dir)).or_insert(Item {
            header: root_dir,
            kind: Kind::Dir,
        });
    }
    // The kernel opens /dev/console for init before anything is mounted on /dev.
    items.entry(PathBuf::from("dev/console")).or_insert(Item {
        header: NodeHeader {
            permissions: 0o600,
            ..root_dir
        },
        kind: Kind::CharDevice(encode_dev(5, 1)),
    });
    items.insert(
        PathBuf::from(INIT_PATH),
        Item {
            header: NodeHeader {
                permissions: 0o755,
                ..root_dir
            },
            kind: Kind::File(init_copy),
        },
    );
    write_image(&items, out)?;
    Ok(stats)
}

fn write_image(items: &BTreeMap<PathBuf, Item>, out: &Path) -> Result<(), RootfsError> {
    let sq = |path: &Path| {
        let path = path.display().to_string();
        move |source| RootfsError::Squashfs { path, source }
    };
    let mut fs_writer = FilesystemWriter::default();
    fs_writer.set_root_mode(0o755);
    fs_writer.set_time(0);
    let compressor = FilesystemCompressor::new(Compressor::Zstd, None).map_err(sq(out))?;
    fs_writer.set_compressor(compressor);
    let implied = NodeHeader {
        permissions: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
    };
    // Sorted paths put every parent before its children; parents the tar never listed get
    // root-owned 0755 directories.
    let mut dirs: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    for (path, item) in items {
        let mut missing: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty() && !dirs.contains(*a))
            .collect();
        missing.reverse();
        for parent in missing {
            if items.contains_key(parent) {
                continue;
            }
            fs_writer.push_dir(parent, implied).map_err(sq(parent))?;
            dirs.insert(parent.to_path_buf());
        }
        let h = item.header;
        match &item.kind {
            Kind::Dir => {
                fs_writer.push_dir(path, h).map_err(sq(path))?;
                dirs.insert(path.clone());
            }
            Kind::File(content) => fs_writer
                .push_file_from_path(content, path, h)
                .map_err(sq(path))?,
            Kind::Symlink(target) => fs_writer.push_symlink(target, path, h).map_err(sq(path))?,
            Kind::CharDevice(d) => fs_writer.push_char_device(*d, path, h).map_err(sq(path))?,
            Kind::BlockDevice(d) => fs_writer.push_block_device(*d, path, h).map_err(sq(path))?,
            Kind::Fifo => fs_writer.push_fifo(path, h).map_err(sq(path))?,
        }
    }
    let tmp = out.with_extension("partial");
    let mut file = fs::File::create(&tmp).map_err(|source| RootfsError::Io {
        path: tmp.clone(),
        source,
    })?;
    fs_writer.write(&mut file).map_err(sq(out))?;
    fs::rename(&tmp, out).map_err(|source| RootfsError::Io {
        path: out.to_path_buf(),
        source,
    })
}

/// The cache key of a root image: the Docker image id and bottle-init's content.
pub fn rootfs_key(image_id: &str, init: &Path) -> Result<String, RootfsError> {
    let bytes = fs::read(init).map_err(|source| RootfsError::Init {
        path: init.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    h.update(image_id.as_bytes());
    h.update([0u8]);
    h.update(&bytes);
    Ok(hex::encode(&h.finalize()[..16]))
}

/// The root image for `image_id` under `<cache>/rootfs`, built from `export()` (a `docker
/// export` stream) only when missing.
pub fn cached_rootfs<R: Read>(
    cache_dir: &Path,
    image_id: &str,
    init: &Path,
    export: impl FnOnce() -> io::Result<R>,
) -> Result<PathBuf, RootfsError> {
    let key = rootfs_key(image_id, init)?;
    let dir = cache_dir.join("rootfs");
    let image = dir.join(format!("{key}.sqfs"));
    if image.is_file() {
        return Ok(image);
    }
    let spool = dir.join(format!(".{key}.spool"));
    let _ = fs::remove_dir_all(&spool);
    let result = export()
        .map_err(RootfsError::Tar)
        .and_then(|tar| tar_to_squashfs(tar, init, &spool, &image));
    let _ = fs::remove_dir_all(&spool);
    result.map(|_| image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use backhand::{FilesystemReader, InnerNode};
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
        let stats = tar_to_squashfs(tar, &init, &dir.path().join("spool"), &image).unwrap();
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

        assert_eq!(
            built.stats,
            RootfsStats {
                files: 2,
                dirs: 2,
                symlinks: 1,
                hardlinks: 1,
                devices: 1,
                fifos: 1,
                bytes: 8
            }
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
        )
        .unwrap_err();

        assert!(matches!(err, RootfsError::UnsafePath { .. }), "{err}");
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
