//! Workspace mounts for the microVM: each host directory is snapshotted at start into a
//! read-only squashfs image that the guest mounts as the lower layer of an overlay. The agent
//! writes into the overlay; the host files are only ever read.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::rootfs::{tar_to_plain_squashfs, RootfsError, RootfsStats};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("cannot read the workspace {host} (a file it holds could not be archived)")]
    Archive {
        host: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the snapshot of {host}")]
    Image {
        host: PathBuf,
        #[source]
        source: RootfsError,
    },
}

/// Snapshot `host` (recursively; symlinks kept as links, never followed) into the squashfs
/// image `out`. `spool` is an empty scratch directory, removed afterwards.
pub fn snapshot(host: &Path, out: &Path, spool: &Path) -> Result<RootfsStats, WorkspaceError> {
    let (reader, writer) = std::io::pipe().map_err(|source| WorkspaceError::Archive {
        host: host.to_path_buf(),
        source,
    })?;
    let root = host.to_path_buf();
    // The tar stream is produced on a thread and consumed here, so nothing is held whole.
    let producer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        append_tree(&mut builder, &root, Path::new("."))?;
        builder.into_inner()?.flush()
    });
    let image = tar_to_plain_squashfs(reader, spool, out);
    let archived = producer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the archiving thread panicked")));
    let _ = std::fs::remove_dir_all(spool);
    archived.map_err(|source| WorkspaceError::Archive {
        host: host.to_path_buf(),
        source,
    })?;
    image.map_err(|source| WorkspaceError::Image {
        host: host.to_path_buf(),
        source,
    })
}

/// Archive `dir` as `name`, recursively. Sockets are skipped: they mean nothing in a snapshot
/// (git's fsmonitor leaves one in `.git`).
fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    name: &Path,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    builder.append_path_with_name(dir, name)?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let child = name.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            append_tree(builder, &path, &child)?;
        } else if kind.is_socket() {
            tracing::debug!(path = %path.display(), "socket left out of the workspace snapshot");
        } else {
            builder.append_path_with_name(&path, &child)?;
        }
    }
    Ok(())
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
        let stats = snapshot(&host, &out, &dir.path().join("spool")).unwrap();

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
        assert!(!dir.path().join("spool").exists());
    }

    #[test]
    fn sockets_are_left_out_of_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("app");
        std::fs::create_dir(&host).unwrap();
        std::os::unix::net::UnixListener::bind(host.join("agent.sock")).unwrap();
        std::fs::write(host.join("ok"), "x").unwrap();
        let result = snapshot(
            &host,
            &dir.path().join("ws.sqfs"),
            &dir.path().join("spool"),
        );
        let stats = result.unwrap();
        assert_eq!(stats.files, 1);
    }

    #[test]
    fn workspace_that_vanished_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("gone");
        let err = snapshot(
            &host,
            &dir.path().join("ws.sqfs"),
            &dir.path().join("spool"),
        )
        .unwrap_err();
        assert!(matches!(err, WorkspaceError::Archive { .. }));
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn workspaces_get_devices_after_the_root_image() {
        assert_eq!(guest_device(0), "/dev/vdb");
        assert_eq!(guest_device(2), "/dev/vdd");
    }
}
