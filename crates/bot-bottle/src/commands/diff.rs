//! `bot-bottle diff <bottle>`: what the agent changed in each workspace, against the host
//! directory it came from (a unified diff; `.git` left out: `pull` takes the agent's commits).
//! A running bottle's workspaces are copied out (unpacked safely, bounded as `cp` is) into
//! its run directory for the comparison and removed after; for a bottle that ended, the
//! Docker backend's kept copy (what `resume` continues) is compared.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use bot_bottle::backend::handle::{BottleHandle, HandleError};
use bot_bottle::plan::MountPlan;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Bottle id, or bottle name (a running one, else its newest kept workspace).
    target: String,
}

pub async fn run(ctx: &Context, args: DiffArgs) -> anyhow::Result<i32> {
    match BottleHandle::find(&ctx.dirs, &args.target) {
        Ok(bottle) => diff_running(ctx, &bottle).await,
        Err(HandleError::NotFound { .. } | HandleError::NoState(_)) => diff_kept(ctx, &args.target),
        Err(e) => Err(e.into()),
    }
}

async fn diff_running(ctx: &Context, bottle: &BottleHandle) -> anyhow::Result<i32> {
    if bottle.plan.mounts.is_empty() {
        bail!(
            "bottle {} has no workspace mount: nothing to compare",
            bottle.row.id
        );
    }
    let run = ctx.dirs.run_dir(&bottle.row.id);
    for (i, mount) in bottle.plan.mounts.iter().enumerate() {
        let scratch = run.path().join(format!("diff-{i}"));
        let _ = std::fs::remove_dir_all(&scratch);
        let guest = mount.guest.display().to_string();
        bottle.copy_out(&guest, &scratch).await?;
        let shown = show(&bottle.row.id, mount, &scratch.join(base_name(mount)));
        let _ = std::fs::remove_dir_all(&scratch);
        shown?;
    }
    Ok(0)
}

/// The newest ended run of `target` that kept its workspaces (the Docker backend does).
fn diff_kept(ctx: &Context, target: &str) -> anyhow::Result<i32> {
    let runs = ctx.dirs.runs_dir();
    let candidates = match bot_bottle::state::retention::newest_run(&runs, target) {
        Some(id) if id == target => vec![id],
        _ => bot_bottle::state::retention::runs_of(&runs, target),
    };
    for id in candidates {
        let run = ctx.dirs.run_dir(&id);
        let Ok(bytes) = std::fs::read(run.kept_workspaces_record()) else {
            continue;
        };
        let mounts: Vec<MountPlan> = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", run.kept_workspaces_record().display()))?;
        eprintln!("bot-bottle: {id} has ended: comparing the workspace it kept");
        for (i, mount) in mounts.iter().enumerate() {
            show(&id, mount, &run.kept_workspace(i).join(base_name(mount)))?;
        }
        return Ok(0);
    }
    bail!(
        "no running bottle `{target}` and no kept workspace of it to compare (a microVM's \
         kept layer is not readable from the host: `bot-bottle resume {target}` and run \
         `bot-bottle diff` while it runs)"
    )
}

fn base_name(mount: &MountPlan) -> PathBuf {
    mount
        .guest
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| "workspace".into())
}

/// `diff -ruN` of the host directory and the agent's copy.
fn show(id: &str, mount: &MountPlan, copy: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("diff")
        .args(["-ruN", "--no-dereference", "--exclude=.git"])
        .arg(&mount.host)
        .arg(copy)
        .status()
        .context("running diff (diffutils)")?;
    match status.code() {
        Some(0) => eprintln!("{id}: no changes in {}", mount.guest.display()),
        Some(1) => {}
        _ => bail!(
            "diff of {} and the agent's {} failed",
            mount.host.display(),
            mount.guest.display()
        ),
    }
    Ok(())
}
