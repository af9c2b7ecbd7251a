//! Workspace mounts on the Docker backend: each host directory is copied into the created (not
//! yet started) agent container at its guest path, so the agent can edit, build and commit in
//! it while the host files are only ever read, as in the microVM's snapshot. The copy is a
//! tar streamed from a packing thread through the engine's archive API (never spooled), with
//! the snapshot's rules for what goes in ([`crate::image::workspace::walk_tree`]), and every
//! entry owned by the agent's user, so that tools checking ownership (git's
//! `safe.directory`) accept it. The copy lives in the container's writable layer: it goes with
//! the container (copy results out with `bot-bottle cp`).

use std::path::Path;
use std::time::Instant;

use bollard::Docker;

use super::BackendError;
use crate::backend::microvm::launch::resolve_user;
use crate::backend::transfer::{self, Owner};
use crate::plan::BottlePlan;

/// How many archive chunks may wait between the packing thread and the upload.
const CHUNKS_IN_FLIGHT: usize = 16;
/// Bytes per chunk handed to the upload.
const CHUNK_BYTES: usize = 256 * 1024;
/// Trees from this size on show their progress in percent.
const PROGRESS_FROM_BYTES: u64 = 64 << 20;

/// Copy every mount of `plan` into the created agent container.
pub async fn copy_workspaces(
    docker: &Docker,
    plan: &BottlePlan,
    sources: &[std::path::PathBuf],
) -> Result<(), BackendError> {
    if plan.mounts.is_empty() {
        return Ok(());
    }
    let owner = agent_owner(docker, &plan.agent.name, &plan.agent.user).await?;
    for (mount, source) in plan.mounts.iter().zip(sources) {
        copy_tree(docker, &plan.agent.name, source, &mount.guest, owner).await?;
    }
    Ok(())
}

/// Where each workspace's copy comes from: the host directories, or for `resume` the copies
/// the newest earlier run of this bottle kept (see [`keep_workspaces`]).
pub fn workspace_sources(
    dirs: &crate::host::paths::Dirs,
    plan: &BottlePlan,
    resume: bool,
) -> Result<Vec<std::path::PathBuf>, BackendError> {
    if !resume {
        return Ok(plan.mounts.iter().map(|m| m.host.clone()).collect());
    }
    let kept = |id: &str| -> Option<Vec<std::path::PathBuf>> {
        let run = dirs.run_dir(id);
        plan.mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let name = m.guest.file_name()?;
                let copy = run.kept_workspace(i).join(name);
                copy.is_dir().then_some(copy)
            })
            .collect()
    };
    crate::state::retention::runs_of(&dirs.runs_dir(), &plan.bottle)
        .iter()
        .filter(|id| **id != plan.id)
        .find_map(|id| kept(id))
        .ok_or_else(|| BackendError::NothingToResume {
            bottle: plan.bottle.clone(),
        })
}

/// After the agent exits: each workspace as it left it, copied out into the run directory
/// (bounded as `cp` is), for `resume`. The host files stay untouched; a failure is reported,
/// the session's result is not changed by it.
pub async fn keep_workspaces(
    docker: &Docker,
    plan: &BottlePlan,
    run: &crate::host::run_dir::RunDir,
) -> Result<(), BackendError> {
    let limit = crate::backend::transfer::max_copy_bytes()?;
    let record = serde_json::to_vec_pretty(&plan.mounts).unwrap_or_default();
    if let Err(e) = std::fs::write(run.kept_workspaces_record(), record) {
        tracing::warn!(error = %e, "cannot record where the kept workspaces came from");
    }
    for (i, mount) in plan.mounts.iter().enumerate() {
        let dst = run.kept_workspace(i);
        let _ = std::fs::remove_dir_all(&dst);
        let guest = mount.guest.display().to_string();
        let n = super::copy::copy_out(docker, &plan.agent.name, &guest, &dst, limit).await?;
        tracing::info!(entries = n, guest = %guest, "workspace kept for resume");
    }
    Ok(())
}

/// The numeric ids the agent runs as: `uid:gid` as written, else resolved against the image's
/// `/etc/passwd` and `/etc/group`, read from the created container.
async fn agent_owner(docker: &Docker, container: &str, user: &str) -> Result<Owner, BackendError> {
    if let Some(owner) = numeric_owner(user) {
        return Ok(owner);
    }
    let passwd = super::copy::read_text(docker, container, "/etc/passwd").await?;
    let group = super::copy::read_text(docker, container, "/etc/group").await?;
    owner_of(user, &passwd, &group)
}

fn numeric_owner(user: &str) -> Option<Owner> {
    let (uid, gid) = user.split_once(':')?;
    Some(Owner {
        uid: uid.parse().ok()?,
        gid: gid.parse().ok()?,
    })
}

/// `user` (`name`, `uid`, `name:group`, …) as Docker resolves it against the image's accounts:
/// the microVM's rules, except that a user given without a group and absent from `passwd`
/// runs with group 0 under Docker.
fn owner_of(user: &str, passwd: &str, group: &str) -> Result<Owner, BackendError> {
    let (ids, _home) = resolve_user(user, passwd, group).map_err(BackendError::AgentUser)?;
    let listed = passwd.lines().any(|line| {
        let f: Vec<&str> = line.split(':').collect();
        f.len() >= 7 && (f[0] == user || f[2] == user)
    });
    let gid = if user.contains(':') || listed {
        ids.gid
    } else {
        0
    };
    Ok(Owner { uid: ids.uid, gid })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Copy the host directory `host` into container `container` at `guest` (created with its
/// missing parents, those owned by root), every entry owned by `owner`.
async fn copy_tree(
    docker: &Docker,
    container: &str,
    host: &Path,
    guest: &Path,
    owner: Owner,
) -> Result<(), BackendError> {
    let began = Instant::now();
    // The size first (a walk without reading any file), for the message and the progress.
    let sized = host.to_path_buf();
    let total = tokio::task::spawn_blocking(move || {
        crate::image::workspace::walk_tree(&sized, &mut |_| Ok::<(), std::convert::Infallible>(()))
    })
    .await
    .map_err(|_| BackendError::Thread("the workspace walk"))?
    .map_err(|e| match e {
        crate::image::workspace::WalkError::Read(e) => transfer::TransferError::Pack {
            path: e.path,
            source: e.source,
        },
        crate::image::workspace::WalkError::Visit(never) => match never {},
    })?
    .bytes;
    eprintln!(
        "bot-bottle: copying {} into {} ({:.1} MiB)",
        host.display(),
        guest.display(),
        mib(total)
    );
    // Unpacked at the container's `/`, the entries named from the guest path down: the
    // engine makes missing parents (root-owned) and takes symlinks as they are.
    let prefix = guest.strip_prefix("/").unwrap_or(guest).to_path_buf();
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(CHUNKS_IN_FLIGHT);
    let source = host.to_path_buf();
    let packer = tokio::task::spawn_blocking(move || {
        let mut shown = crate::image::squashfs::progress_on_stderr("copying the workspace");
        let mut progress = |done: u64| {
            if total >= PROGRESS_FROM_BYTES {
                shown(done.min(total), total);
            }
        };
        let out = transfer::ChunkWriter::new(tx, CHUNK_BYTES);
        let stats = transfer::pack_tree(&source, &prefix, owner, out, &mut progress)?;
        progress(total);
        Ok::<_, transfer::TransferError>(stats)
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let uploaded = docker
        .upload_to_container_streaming(
            container,
            Some(bollard::container::UploadToContainerOptions {
                path: "/".to_owned(),
                ..Default::default()
            }),
            body,
        )
        .await;
    let packed = packer
        .await
        .map_err(|_| BackendError::Thread("the workspace packing thread"))?;
    let upload_err = |source| BackendError::Workspace {
        host: host.to_path_buf(),
        guest: guest.to_path_buf(),
        source,
    };
    let stats = match (packed, uploaded) {
        // The packer stopped because the upload did: the engine's error says why.
        (Err(transfer::TransferError::Stream { .. }), Err(e)) => return Err(upload_err(e)),
        (Err(e), _) => return Err(e.into()),
        (Ok(_), Err(e)) => return Err(upload_err(e)),
        (Ok(stats), Ok(())) => stats,
    };
    let secs = began.elapsed().as_secs_f64();
    tracing::info!(
        host = %host.display(),
        guest = %guest.display(),
        files = stats.files,
        dirs = stats.dirs,
        symlinks = stats.symlinks,
        hardlinks = stats.hardlinks,
        skipped = stats.skipped,
        bytes = stats.bytes,
        secs,
        mib_per_s = mib(stats.bytes) / secs.max(1e-9),
        "workspace copied"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\n";

    #[test]
    fn numeric_ids_need_no_accounts() {
        assert_eq!(
            numeric_owner("1000:1000"),
            Some(Owner {
                uid: 1000,
                gid: 1000
            })
        );
        assert_eq!(numeric_owner("node"), None);
        assert_eq!(numeric_owner("node:50"), None);
    }

    #[test]
    fn names_resolve_as_docker_resolves_them() {
        let owner = |u| owner_of(u, PASSWD, GROUP).unwrap();
        assert_eq!(
            owner("node"),
            Owner {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(owner("node:staff"), Owner { uid: 1000, gid: 50 });
        assert_eq!(owner("1000"), owner("node"));
        // Not in passwd, no group: Docker runs it with group 0.
        assert_eq!(owner("2000"), Owner { uid: 2000, gid: 0 });
        assert!(matches!(
            owner_of("ghost", PASSWD, GROUP),
            Err(BackendError::AgentUser(_))
        ));
    }
}
