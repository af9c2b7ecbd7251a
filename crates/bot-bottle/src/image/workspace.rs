//! Workspace mounts for the microVM: each host directory is snapshotted at start into a
//! read-only squashfs image that the guest mounts as the lower layer of an overlay. The agent
//! writes into the overlay; the host files are only ever read.
//!
//! The snapshot walks the host tree itself (no tar, no spooled copy): owners, modes, mtimes,
//! symlinks (kept as links, never followed) and hard links (one inode, as pnpm's
//! `node_modules` and `git clone --local` make them) are kept. Sockets and device nodes are
//! left out: they mean nothing in a snapshot, and a device node must not reach the guest
//! from the user's tree. Extended attributes are not copied (a host's SELinux labels mean
//! nothing in the guest).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::image::squashfs::{Builder, Content, Meta, SquashfsError, WriteStats};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("cannot read {path} in the workspace {host}; fix its permissions or move it out of the mount")]
    Read {
        host: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the snapshot of {host}")]
    Image {
        host: PathBuf,
        #[source]
        source: SquashfsError,
    },
}

/// What a snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    /// Names beyond the first of a hard-linked file.
    pub hardlinks: usize,
    pub fifos: usize,
    /// Sockets and device nodes left out.
    pub skipped: usize,
    pub bytes: u64,
    pub image: WriteStats,
}

/// Snapshot `host` (recursively) into the squashfs image `out`; `progress(done, total)` gets
/// content bytes as they are compressed.
pub fn snapshot(
    host: &Path,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SnapshotStats, WorkspaceError> {
    let mut walk = Walk {
        host,
        tree: Builder::new(),
        stats: SnapshotStats::default(),
        inodes: HashMap::new(),
    };
    let root = walk.meta(host)?;
    walk.tree.set_root(meta_of(&root));
    walk.dir(host, Path::new(""))?;
    let Walk {
        tree, mut stats, ..
    } = walk;
    stats.image = tree.write(out, progress).map_err(|source| match source {
        SquashfsError::Read {
            source_file,
            source,
            ..
        } => WorkspaceError::Read {
            host: host.to_path_buf(),
            path: source_file,
            source,
        },
        source => WorkspaceError::Image {
            host: host.to_path_buf(),
            source,
        },
    })?;
    Ok(stats)
}

fn meta_of(m: &std::fs::Metadata) -> Meta {
    Meta {
        mode: (m.mode() & 0o7777) as u16,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime().clamp(0, i64::from(u32::MAX)) as u32,
        xattrs: Vec::new(),
    }
}

struct Walk<'a> {
    host: &'a Path,
    tree: Builder,
    stats: SnapshotStats,
    /// (device, inode) of multiply-linked files → their first name in the image.
    inodes: HashMap<(u64, u64), PathBuf>,
}

impl Walk<'_> {
    fn read_err(&self, path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError {
        let (host, path) = (self.host.to_path_buf(), path.to_path_buf());
        move |source| WorkspaceError::Read { host, path, source }
    }

    fn meta(&self, path: &Path) -> Result<std::fs::Metadata, WorkspaceError> {
        std::fs::symlink_metadata(path).map_err(self.read_err(path))
    }

    fn image_err(&self) -> impl FnOnce(SquashfsError) -> WorkspaceError {
        let host = self.host.to_path_buf();
        move |source| WorkspaceError::Image { host, source }
    }

    fn insert(&mut self, name: &Path, meta: Meta, content: Content) -> Result<(), WorkspaceError> {
        let err = self.image_err();
        self.tree.insert(name, meta, content).map_err(err)
    }

    /// Adds the entries of the host directory `dir`, named `name` in the image.
    fn dir(&mut self, dir: &Path, name: &Path) -> Result<(), WorkspaceError> {
        use std::os::unix::fs::FileTypeExt;
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(self.read_err(dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let child = name.join(entry.file_name());
            let m = self.meta(&path)?;
            let kind = m.file_type();
            let meta = meta_of(&m);
            if kind.is_dir() {
                self.stats.dirs += 1;
                self.insert(&child, meta, Content::Dir)?;
                self.dir(&path, &child)?;
            } else if kind.is_file() {
                if m.nlink() > 1 {
                    if let Some(first) = self.inodes.get(&(m.dev(), m.ino())) {
                        let err = self.image_err();
                        self.tree.link(&child, first).map_err(err)?;
                        self.stats.hardlinks += 1;
                        continue;
                    }
                    self.inodes.insert((m.dev(), m.ino()), child.clone());
                }
                self.stats.files += 1;
                self.stats.bytes += m.len();
                self.insert(&child, meta, Content::File(path))?;
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(self.read_err(&path))?;
                self.stats.symlinks += 1;
                self.insert(
                    &child,
                    meta,
                    Content::Symlink(target.into_os_string().into_encoded_bytes()),
                )?;
            } else if kind.is_fifo() {
                self.stats.fifos += 1;
                self.insert(&child, meta, Content::Fifo)?;
            } else {
                tracing::debug!(path = %path.display(), "socket or device left out of the workspace snapshot");
                self.stats.skipped += 1;
            }
        }
        Ok(())
    }
}

/// The guest block device of the `index`-th workspace: the root image is `/dev/vda`.
pub fn guest_device(index: usize) -> String {
    let letter = (b'b' + u8::try_from(index).unwrap_or(24).min(24)) as char;
    format!("/dev/vd{letter}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// (path, mode, content or link target) of every entry under `dir`, sorted.
    fn tree(dir: &Path) -> Vec<(String, u32, String)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                let what = if meta.file_type().is_symlink() {
                    format!("-> {}", std::fs::read_link(&p).unwrap().display())
                } else if meta.is_dir() {
                    stack.push(p.clone());
                    "dir".to_owned()
                } else {
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
                };
                out.push((rel, meta.permissions().mode() & 0o7777, what));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn snapshot_keeps_files_modes_and_links_and_leaves_the_host_tree_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("app");
        std::fs::create_dir_all(host.join("src/deep")).unwrap();
        std::fs::write(host.join("README"), "hello").unwrap();
        std::fs::write(host.join("src/deep/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            host.join("src/deep/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("../README", host.join("src/link")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", host.join("escape")).unwrap();
        let before = tree(&host);

        let out = dir.path().join("ws.sqfs");
        let stats = snapshot(&host, &out, &mut |_, _| {}).unwrap();

        assert_eq!(tree(&host), before, "the host tree changed");
        assert_eq!(stats.files, 2);
        assert_eq!(stats.symlinks, 2);
        let image = std::fs::File::open(&out).unwrap();
        let fs = backhand::FilesystemReader::from_reader(std::io::BufReader::new(image)).unwrap();
        let mut seen = Vec::new();
        for node in fs.files() {
            let path = node.fullpath.display().to_string();
            let kind = match &node.inner {
                backhand::InnerNode::File(f) => {
                    let mut data = Vec::new();
                    std::io::Read::read_to_end(&mut fs.file(f).reader(), &mut data).unwrap();
                    String::from_utf8_lossy(&data).into_owned()
                }
                backhand::InnerNode::Symlink(l) => format!("-> {}", l.link.display()),
                backhand::InnerNode::Dir(_) => "dir".to_owned(),
                _ => "other".to_owned(),
            };
            seen.push((path, node.header.permissions, kind));
        }
        assert!(
            seen.contains(&("/README".into(), 0o644, "hello".into())),
            "{seen:?}"
        );
        assert!(seen.contains(&("/src/deep/run.sh".into(), 0o755, "#!/bin/sh\n".into())));
        assert!(seen.contains(&("/src/link".into(), 0o777, "-> ../README".into())));
        // A link out of the tree stays a link: its target's content is not copied in.
        assert!(seen.contains(&("/escape".into(), 0o777, "-> /etc/shadow".into())));
    }

    #[test]
    fn sockets_are_left_out_of_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("app");
        std::fs::create_dir(&host).unwrap();
        std::os::unix::net::UnixListener::bind(host.join("agent.sock")).unwrap();
        std::fs::write(host.join("ok"), "x").unwrap();
        let stats = snapshot(&host, &dir.path().join("ws.sqfs"), &mut |_, _| {}).unwrap();
        assert_eq!((stats.files, stats.skipped), (1, 1));
    }

    #[test]
    fn workspace_that_vanished_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("gone");
        let err = snapshot(&host, &dir.path().join("ws.sqfs"), &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, WorkspaceError::Read { .. }));
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn workspaces_get_devices_after_the_root_image() {
        assert_eq!(guest_device(0), "/dev/vdb");
        assert_eq!(guest_device(2), "/dev/vdd");
    }
}
