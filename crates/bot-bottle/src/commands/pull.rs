//! `bot-bottle pull <bottle> [--into DIR]`: fetch what the agent pushed to the bottle's git
//! gate into the host repository as `refs/remotes/bottle/*`. Only remote-tracking refs
//! change: never the working tree, the index or the user's own branches. Works while the
//! bottle runs and after it stopped (the newest run of that name, or the run of that id).

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use bot_bottle::bundle::gate::repo::{self, GateInfo};

use super::Context;

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// Bottle id, or bottle name (its newest run).
    target: String,
    /// The repository to fetch into (default: the host repository the bottle's workspace
    /// came from).
    #[arg(long, value_name = "DIR")]
    into: Option<PathBuf>,
}

pub async fn run(ctx: &Context, args: PullArgs) -> anyhow::Result<i32> {
    let runs = ctx.dirs.runs_dir();
    let Some(id) = bot_bottle::state::retention::newest_run(&runs, &args.target) else {
        bail!(
            "no run of `{}` in {}: see `bot-bottle list`",
            args.target,
            runs.display()
        );
    };
    let run = ctx.dirs.run_dir(&id);
    let info = GateInfo::read(&run)?;
    let Some(into) = args.into.or(info.host_repo.clone()) else {
        bail!(
            "bottle {id}'s workspace was not a git repository: give the repository to fetch into with --into DIR"
        );
    };
    let gate = run.gate_repo();
    let refspecs: Vec<String> = info.push.iter().map(|p| repo::pull_refspec(p)).collect();
    let status = std::process::Command::new("git")
        .arg("-C")
        .arg(&into)
        .args([
            "-c",
            "transfer.fsckObjects=true",
            "-c",
            "fetch.fsckObjects=true",
        ])
        .args(["fetch", "--no-tags", "--no-write-fetch-head", "--prune"])
        .arg(&gate)
        .args(&refspecs)
        .status()
        .context("running git (is it installed?)")?;
    if !status.success() {
        bail!(
            "git fetch from {} into {} failed (see above)",
            gate.display(),
            into.display()
        );
    }
    let listed = std::process::Command::new("git")
        .arg("-C")
        .arg(&into)
        .args([
            "for-each-ref",
            "--format=%(refname:short) %(objectname:short) %(subject)",
            "refs/remotes/bottle/",
        ])
        .output()
        .context("running git for-each-ref")?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    if listed.trim().is_empty() {
        println!("{id}: nothing pushed to the gate yet");
    } else {
        print!("{listed}");
    }
    Ok(0)
}
