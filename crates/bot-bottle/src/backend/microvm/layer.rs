//! The microVM's writable layer kept between runs: one ext4 disk per bottle name, the upper
//! layer of the guest's root overlay. `start` makes a fresh one, `resume` continues the kept
//! one; the agent's work in it is never thrown away without being asked (`start --fresh`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use fs2::FileExt;

use crate::host::paths::Dirs;

/// Size of a new writable layer (sparse: it takes only what the agent writes).
pub const DEFAULT_SIZE_GIB: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum UpperError {
    #[error(
        "bottle `{bottle}` has a writable layer kept from an earlier run ({path}): \
         `bot-bottle resume {bottle}` continues it, `bot-bottle start {bottle} --fresh` discards it, \
         `--tmpfs` runs without it"
    )]
    Kept { bottle: String, path: PathBuf },
    #[error(
        "bottle `{bottle}` has no kept writable layer to resume: use `bot-bottle start {bottle}`"
    )]
    NothingToResume { bottle: String },
    #[error("the writable layer {path} is in use by another run of this bottle: stop it first")]
    InUse { path: PathBuf },
    #[error("cannot create the writable layer {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot format the writable layer {path} with mkfs.ext4: install e2fsprogs, or use --tmpfs ({detail})"
    )]
    Format { path: PathBuf, detail: String },
}

/// How the guest's writable layer is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritableLayer {
    /// In guest memory; gone at power-off.
    Tmpfs,
    /// This ext4 disk image, attached read-write.
    Disk(PathBuf),
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRequest {
    /// A new layer; refuse if a kept one would be lost.
    Start,
    /// A new layer, discarding a kept one.
    Fresh,
    /// The kept layer.
    Resume,
    /// No disk at all.
    Tmpfs,
}

/// Where a bottle's kept writable layer lives.
pub fn disk_path(dirs: &Dirs, bottle: &str) -> PathBuf {
    dirs.state.join("disks").join(bottle).join("upper.ext4")
}

/// A writable layer held by this run; the exclusive lock is released on drop.
#[derive(Debug)]
pub struct HeldLayer {
    pub layer: WritableLayer,
    _lock: Option<File>,
}

/// Decide, create and lock the writable layer for `bottle`.
pub fn acquire(
    path: &Path,
    bottle: &str,
    request: LayerRequest,
    size_gib: u64,
) -> Result<HeldLayer, UpperError> {
    let exists = path.is_file();
    match (request, exists) {
        (LayerRequest::Tmpfs, _) => {
            return Ok(HeldLayer {
                layer: WritableLayer::Tmpfs,
                _lock: None,
            })
        }
        (LayerRequest::Start, true) => {
            return Err(UpperError::Kept {
                bottle: bottle.to_owned(),
                path: path.to_path_buf(),
            })
        }
        (LayerRequest::Resume, false) => {
            return Err(UpperError::NothingToResume {
                bottle: bottle.to_owned(),
            })
        }
        _ => {}
    }
    if exists {
        // Lock before discarding, so a running bottle's layer is never replaced under it.
        let held = lock(path)?;
        if request == LayerRequest::Resume {
            return Ok(held);
        }
        drop(held);
        std::fs::remove_file(path).map_err(|source| UpperError::Create {
            path: path.to_path_buf(),
            source,
        })?;
    }
    create(path, size_gib)?;
    lock(path)
}

fn lock(path: &Path) -> Result<HeldLayer, UpperError> {
    let file = File::open(path).map_err(|source| UpperError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    file.try_lock_exclusive().map_err(|_| UpperError::InUse {
        path: path.to_path_buf(),
    })?;
    Ok(HeldLayer {
        layer: WritableLayer::Disk(path.to_path_buf()),
        _lock: Some(file),
    })
}

/// A sparse file of `size_gib` formatted as ext4 (by `mkfs.ext4`, from e2fsprogs).
pub fn create(path: &Path, size_gib: u64) -> Result<(), UpperError> {
    let io = |source| UpperError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = File::create(path).map_err(io)?;
    file.set_len(size_gib * 1024 * 1024 * 1024).map_err(io)?;
    drop(file);
    let formatted = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg(path)
        .output();
    let failure = match formatted {
        Ok(out) if out.status.success() => return Ok(()),
        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        Err(e) => e.to_string(),
    };
    let _ = std::fs::remove_file(path);
    Err(UpperError::Format {
        path: path.to_path_buf(),
        detail: failure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_ext4(path: &Path) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(path).unwrap();
        let mut magic = [0u8; 2];
        f.seek(SeekFrom::Start(1024 + 0x38)).unwrap();
        f.read_exact(&mut magic).unwrap();
        magic == [0x53, 0xef]
    }

    #[test]
    fn start_creates_a_sparse_ext4_layer_and_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claude/upper.ext4");
        let held = acquire(&path, "claude", LayerRequest::Start, 1).unwrap();
        assert_eq!(held.layer, WritableLayer::Disk(path.clone()));
        assert!(is_ext4(&path));
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1024 * 1024 * 1024);
        assert!(meta.blocks() * 512 < 64 * 1024 * 1024, "not sparse");
        // Another run of the same bottle cannot take it while held.
        let err = acquire(&path, "claude", LayerRequest::Resume, 1).unwrap_err();
        assert!(matches!(err, UpperError::InUse { .. }), "{err}");
    }

    #[test]
    fn start_refuses_to_lose_a_kept_layer_and_resume_continues_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upper.ext4");
        drop(acquire(&path, "claude", LayerRequest::Start, 1).unwrap());
        let err = acquire(&path, "claude", LayerRequest::Start, 1).unwrap_err();
        assert!(
            err.to_string().contains("bot-bottle resume claude"),
            "{err}"
        );
        // The agent's work stands as bytes in the last block, which mkfs leaves unused.
        use std::os::unix::fs::FileExt;
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"work", len - 4096).unwrap();
        let kept = || {
            let mut buf = [0u8; 4];
            File::open(&path)
                .unwrap()
                .read_exact_at(&mut buf, len - 4096)
                .unwrap();
            &buf == b"work"
        };
        drop(acquire(&path, "claude", LayerRequest::Resume, 1).unwrap());
        assert!(kept(), "resume replaced the layer");
        drop(acquire(&path, "claude", LayerRequest::Fresh, 1).unwrap());
        assert!(!kept(), "--fresh kept the old layer");
        assert!(is_ext4(&path));
    }

    #[test]
    fn resume_without_a_kept_layer_says_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            acquire(&dir.path().join("u.ext4"), "codex", LayerRequest::Resume, 1).unwrap_err();
        assert!(matches!(err, UpperError::NothingToResume { .. }));
    }

    #[test]
    fn tmpfs_needs_no_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.ext4");
        let held = acquire(&path, "x", LayerRequest::Tmpfs, 1).unwrap();
        assert_eq!(held.layer, WritableLayer::Tmpfs);
        assert!(!path.exists());
    }
}
