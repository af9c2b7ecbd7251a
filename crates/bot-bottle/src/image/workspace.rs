//! Workspace mounts for the microVM: each host directory is snapshotted at start into a
//! read-only squashfs image that the guest mounts as the lower layer of an overlay. The agent
//! writes into the overlay; the host files are only ever read.
//!
//! The Docker backend copies the same trees into the agent's container instead
//! (`backend::transfer::pack_tree`): both follow the rules of [`walk_tree`] here.
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

/// Snapshot `host` (recursively) into the squashfs image `out`, owners kept; `progress(done,
/// total)` gets content bytes as they are compressed.
pub fn snapshot(
    host: &Path,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SnapshotStats, WorkspaceError> {
    snapshot_owned(host, out, None, progress)
}

/// [`snapshot`], with every entry owned by `owner` (uid, gid) when given: the agent's user, so
/// that the workspace is the agent's in the guest whatever its owner on the host.
pub fn snapshot_owned(
    host: &Path,
    out: &Path,
    owner: Option<(u32, u32)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SnapshotStats, WorkspaceError> {
    let meta_of = |m: &std::fs::Metadata| {
        let mut meta = meta_of(m);
        if let Some((uid, gid)) = owner {
            (meta.uid, meta.gid) = (uid, gid);
        }
        meta
    };
    let read_err = |e: ReadError| WorkspaceError::Read {
        host: host.to_path_buf(),
        path: e.path,
        source: e.source,
    };
    let image_err = |source| WorkspaceError::Image {
        host: host.to_path_buf(),
        source,
    };
    let mut tree = Builder::new();
    let root = std::fs::symlink_metadata(host).map_err(|source| {
        read_err(ReadError {
            path: host.to_path_buf(),
            source,
        })
    })?;
    tree.set_root(meta_of(&root));
    let counts = walk_tree(host, &mut |e: TreeEntry<'_>| {
        let content = match e.node {
            Node::Dir => Content::Dir,
            Node::File => Content::File(e.path.to_path_buf()),
            Node::HardLink(first) => return tree.link(e.name, first),
            Node::Symlink(target) => Content::Symlink(target.into_os_string().into_encoded_bytes()),
            Node::Fifo => Content::Fifo,
        };
        tree.insert(e.name, meta_of(e.meta), content)
    })
    .map_err(|e| match e {
        WalkError::Read(e) => read_err(e),
        WalkError::Visit(e) => image_err(e),
    })?;
    let image = tree.write(out, progress).map_err(|source| match source {
        SquashfsError::Read {
            source_file,
            source,
            ..
        } => WorkspaceError::Read {
            host: host.to_path_buf(),
            path: source_file,
            source,
        },
        source => image_err(source),
    })?;
    let TreeStats {
        files,
        dirs,
        symlinks,
        hardlinks,
        fifos,
        skipped,
        bytes,
    } = counts;
    Ok(SnapshotStats {
        files,
        dirs,
        symlinks,
        hardlinks,
        fifos,
        skipped,
        bytes,
        image,
    })
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

/// What an entry of a workspace tree becomes in a copy of it (the rules every backend's copy
/// follows: see the module doc).
#[derive(Debug)]
pub enum Node<'a> {
    Dir,
    /// A regular file (or the first name of a hard-linked one): its content is read from
    /// [`TreeEntry::path`].
    File,
    /// Another name of a hard-linked file whose first name (relative to the tree) was visited
    /// before.
    HardLink(&'a Path),
    /// A symbolic link, kept as a link (never followed), with its target as written.
    Symlink(PathBuf),
    Fifo,
}

/// One entry of a workspace tree, as [`walk_tree`] visits it.
pub struct TreeEntry<'a> {
    /// The name relative to the tree's root.
    pub name: &'a Path,
    /// The path on the host.
    pub path: &'a Path,
    /// Its own metadata (a link's, not its target's).
    pub meta: &'a std::fs::Metadata,
    pub node: Node<'a>,
}

/// What a walk of a workspace tree visited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    /// Names beyond the first of a hard-linked file.
    pub hardlinks: usize,
    pub fifos: usize,
    /// Sockets and device nodes left out.
    pub skipped: usize,
    /// Content bytes of the files (hard-linked ones counted once).
    pub bytes: u64,
}

/// A host path of the tree that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}")]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Why [`walk_tree`] stopped: the host tree, or the visitor.
#[derive(Debug)]
pub enum WalkError<E> {
    Read(ReadError),
    Visit(E),
}

/// Visit every entry below the host directory `host` (not the root itself), depth first in
/// name order, a directory before what it holds: directories, files, symlinks (kept, never
/// followed), further names of hard-linked files (as [`Node::HardLink`] to the first) and
/// FIFOs; sockets and device nodes are left out (counted as skipped).
pub fn walk_tree<E>(
    host: &Path,
    visit: &mut dyn FnMut(TreeEntry<'_>) -> Result<(), E>,
) -> Result<TreeStats, WalkError<E>> {
    let mut walk = Walk {
        visit,
        stats: TreeStats::default(),
        inodes: HashMap::new(),
    };
    walk.dir(host, Path::new(""))?;
    Ok(walk.stats)
}

fn read_err<E>(path: &Path) -> impl FnOnce(std::io::Error) -> WalkError<E> {
    let path = path.to_path_buf();
    move |source| WalkError::Read(ReadError { path, source })
}

struct Walk<'v, E> {
    visit: &'v mut dyn FnMut(TreeEntry<'_>) -> Result<(), E>,
    stats: TreeStats,
    /// (device, inode) of multiply-linked files → their first name in the tree.
    inodes: HashMap<(u64, u64), PathBuf>,
}

impl<E> Walk<'_, E> {
    fn emit(
        &mut self,
        name: &Path,
        path: &Path,
        meta: &std::fs::Metadata,
        node: Node<'_>,
    ) -> Result<(), WalkError<E>> {
        (self.visit)(TreeEntry {
            name,
            path,
            meta,
            node,
        })
        .map_err(WalkError::Visit)
    }

    /// Visits the entries of the host directory `dir`, named `name` in the tree.
    fn dir(&mut self, dir: &Path, name: &Path) -> Result<(), WalkError<E>> {
        use std::os::unix::fs::FileTypeExt;
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(read_err(dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let child = name.join(entry.file_name());
            let m = std::fs::symlink_metadata(&path).map_err(read_err(&path))?;
            let kind = m.file_type();
            if kind.is_dir() {
                self.stats.dirs += 1;
                self.emit(&child, &path, &m, Node::Dir)?;
                self.dir(&path, &child)?;
            } else if kind.is_file() {
                if m.nlink() > 1 {
                    if let Some(first) = self.inodes.get(&(m.dev(), m.ino())) {
                        let first = first.clone();
                        self.emit(&child, &path, &m, Node::HardLink(&first))?;
                        self.stats.hardlinks += 1;
                        continue;
                    }
                    self.inodes.insert((m.dev(), m.ino()), child.clone());
                }
                self.stats.files += 1;
                self.stats.bytes += m.len();
                self.emit(&child, &path, &m, Node::File)?;
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(read_err(&path))?;
                self.stats.symlinks += 1;
                self.emit(&child, &path, &m, Node::Symlink(target))?;
            } else if kind.is_fifo() {
                self.stats.fifos += 1;
                self.emit(&child, &path, &m, Node::Fifo)?;
            } else {
                tracing::debug!(path = %path.display(), "socket or device left out of the workspace copy");
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
