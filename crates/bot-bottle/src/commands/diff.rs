//! `bot-bottle diff <bottle>`: what the agent changed in each workspace of a running bottle,
//! against the host directory it came from (a unified diff; `.git` left out: `pull` takes
//! the agent's commits). The workspace is copied out (unpacked safely, bounded as `cp` is)
//! into the run directory for the comparison and removed after.

use anyhow::{bail, Context as _};
use bot_bottle::backend::handle::BottleHandle;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Bottle id, or bottle name when only one bottle of that name runs.
    target: String,
}

pub async fn run(ctx: &Context, args: DiffArgs) -> anyhow::Result<i32> {
    let bottle = BottleHandle::find(&ctx.dirs, &args.target)?;
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
        let name = mount
            .guest
            .file_name()
            .map(|n| n.to_owned())
            .unwrap_or_else(|| "workspace".into());
        let status = std::process::Command::new("diff")
            .args(["-ruN", "--no-dereference", "--exclude=.git"])
            .arg(&mount.host)
            .arg(scratch.join(name))
            .status()
            .context("running diff (diffutils)");
        let _ = std::fs::remove_dir_all(&scratch);
        match status?.code() {
            Some(0) => eprintln!("{}: no changes in {guest}", bottle.row.id),
            Some(1) => {}
            _ => bail!("diff of {} and {guest} failed", mount.host.display()),
        }
    }
    Ok(0)
}
