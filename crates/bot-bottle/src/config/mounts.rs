//! Workspace mounts from `--mount HOST[:GUEST]` and `[[mount]]`: host-side checks.
//! Guest-side rules (absolute, no duplicates, not over system dirs) are in [`crate::plan`].

use std::path::{Path, PathBuf};

use crate::config::manifest::{expand_home, Mount};
use crate::plan::HostMount;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount `{arg}`: the host path is empty: write --mount HOST[:GUEST]")]
    Empty { arg: String },
    #[error("mount host path {host} does not exist: create it or fix the path")]
    Missing { host: PathBuf },
    #[error("mount host path {host} is not a directory: mount the directory that contains it")]
    NotDirectory { host: PathBuf },
    #[error("mount host path {host} cannot be read")]
    Unreadable {
        host: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Parse one `--mount` argument. `HOST` alone or `HOST:GUEST`.
pub fn parse_arg(arg: &str) -> Result<Mount, MountError> {
    let (host, guest) = match arg.split_once(':') {
        Some((h, g)) => (h, Some(PathBuf::from(g))),
        None => (arg, None),
    };
    if host.is_empty() {
        return Err(MountError::Empty {
            arg: arg.to_owned(),
        });
    }
    Ok(Mount {
        host: PathBuf::from(host),
        guest,
    })
}

/// Resolve a mount's host path (`~`, relative to `cwd`) and check it is a readable directory.
pub fn check_host(mount: &Mount, home: &Path, cwd: &Path) -> Result<HostMount, MountError> {
    let expanded = expand_home(&mount.host, home);
    let absolute = if expanded.is_absolute() {
        expanded
    } else {
        cwd.join(expanded)
    };
    let meta = std::fs::metadata(&absolute).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => MountError::Missing {
            host: absolute.clone(),
        },
        _ => MountError::Unreadable {
            host: absolute.clone(),
            source,
        },
    })?;
    if !meta.is_dir() {
        return Err(MountError::NotDirectory { host: absolute });
    }
    let host = absolute
        .canonicalize()
        .map_err(|source| MountError::Unreadable {
            host: absolute.clone(),
            source,
        })?;
    Ok(HostMount {
        host,
        guest: mount.guest.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_arg_splits_host_and_guest() {
        let m = parse_arg("~/src/app:/work").unwrap();
        assert_eq!(m.host, PathBuf::from("~/src/app"));
        assert_eq!(m.guest, Some(PathBuf::from("/work")));
        assert_eq!(parse_arg("/x").unwrap().guest, None);
        assert!(parse_arg(":/x").is_err());
    }

    #[test]
    fn missing_host_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let m = parse_arg("nope").unwrap();
        let err = check_host(&m, dir.path(), dir.path()).unwrap_err();
        assert!(matches!(err, MountError::Missing { .. }));
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn file_instead_of_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let err = check_host(&parse_arg("f").unwrap(), dir.path(), dir.path()).unwrap_err();
        assert!(matches!(err, MountError::NotDirectory { .. }));
    }

    #[test]
    fn tilde_and_relative_paths_resolve() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        let via_home =
            check_host(&parse_arg("~/app").unwrap(), dir.path(), Path::new("/")).unwrap();
        let via_cwd = check_host(&parse_arg("app").unwrap(), Path::new("/"), dir.path()).unwrap();
        assert_eq!(via_home.host, via_cwd.host);
        assert!(via_home.host.is_absolute());
    }
}
