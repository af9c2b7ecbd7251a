//! `bot-bottle cleanup`: remove what killed runs left: state rows whose process is gone,
//! their leases and machine rows, and Docker objects with our labels that no live bottle owns;
//! and the directories (logs) of ended runs beyond the newest few of each bottle.

use std::collections::BTreeSet;

use anyhow::{bail, Context as _};
use bot_bottle::host::docker;
use bot_bottle::state::retention;
use bot_bottle::state::StateDb;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// Only this bottle (id, or name when only one orphaned bottle has it); it must be
    /// orphaned (its `start` gone): a running one is stopped with `bot-bottle stop`.
    bottle: Option<String>,
    /// Only print what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// Also remove sidecar images of other bot-bottle builds (each build makes its own).
    #[arg(long)]
    images: bool,
    /// Remove the logs of every ended run (by default the newest 10 of each bottle are kept).
    #[arg(long)]
    logs: bool,
}

/// The one orphaned bottle `target` names (an id, or a name only one orphan has); `None`
/// when none does. Refuses a bottle whose `start` still runs.
pub async fn find_orphan(
    ctx: &Context,
    target: &str,
) -> anyhow::Result<Option<bot_bottle::session::orphans::Listed>> {
    let listed = super::list::listed(ctx).await?;
    let named: Vec<_> = listed
        .into_iter()
        .filter(|l| l.id == target || l.bottle == target)
        .collect();
    if let Some(live) = named.iter().find(|l| l.live && l.id == target) {
        bail!(
            "bottle {} is running (its start is pid {}): stop it with `bot-bottle stop {}`",
            live.id,
            live.pid,
            live.id
        );
    }
    let orphans: Vec<_> = named.into_iter().filter(|l| !l.live).collect();
    match orphans.len() {
        0 | 1 => Ok(orphans.into_iter().next()),
        n => bail!(
            "`{target}` matches {n} orphaned bottles ({}): give the id",
            orphans
                .iter()
                .map(|l| l.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Remove an orphaned bottle's containers, networks and state row (what its reaper does).
pub async fn remove_orphan(
    ctx: &Context,
    orphan: &bot_bottle::session::orphans::Listed,
) -> anyhow::Result<i32> {
    let docker = docker::connect()
        .await
        .context("removing an orphaned bottle needs Docker")?;
    let db = StateDb::open_if_exists(&ctx.dirs.db_path()).context("opening the state database")?;
    let errors =
        bot_bottle::session::orphans::remove_bottle(&docker, db.as_ref(), &ctx.dirs, &orphan.id)
            .await;
    let failed = !errors.is_empty();
    for err in errors {
        eprintln!("bot-bottle: {:#}", anyhow::Error::new(err));
    }
    if !failed {
        println!(
            "removed {} (orphaned: its start was gone){}",
            orphan.id,
            if orphan.containers.is_empty() {
                String::new()
            } else {
                format!(" with {}", orphan.containers.join(", "))
            }
        );
    }
    Ok(i32::from(failed))
}

pub async fn run(ctx: &Context, args: CleanupArgs) -> anyhow::Result<i32> {
    if let Some(target) = &args.bottle {
        return match find_orphan(ctx, target).await? {
            Some(orphan) if args.dry_run => {
                println!("would remove {}", orphan.id);
                Ok(0)
            }
            Some(orphan) => remove_orphan(ctx, &orphan).await,
            None => bail!(
                "no orphaned bottle `{target}` in this state directory: see `bot-bottle list`"
            ),
        };
    }
    let db = StateDb::open_if_exists(&ctx.dirs.db_path()).context("opening the state database")?;
    let rows = match &db {
        Some(db) => db.bottles()?,
        None => Vec::new(),
    };
    let docker = docker::connect()
        .await
        .context("cleanup needs Docker to find leftovers")?;
    // What `list` shows as orphaned: rows whose `start` is gone, and objects without a row.
    let (containers, networks, names) =
        bot_bottle::session::orphans::docker_objects(&docker, &ctx.dirs.state_tag()).await?;
    let dead: BTreeSet<String> =
        bot_bottle::session::orphans::classify(rows, &containers, &networks, &names)
            .into_iter()
            .filter(|l| !l.live)
            .map(|l| l.id)
            .collect();
    let mut failures = 0;
    for id in &dead {
        if args.dry_run {
            println!("would remove {id}");
            continue;
        }
        // The same removal as the reaper's: the row stays while objects remain.
        let errors =
            bot_bottle::session::orphans::remove_bottle(&docker, db.as_ref(), &ctx.dirs, id).await;
        if errors.is_empty() {
            println!("removed {id}");
        }
        for err in errors {
            failures += 1;
            eprintln!("bot-bottle: {:#}", anyhow::Error::new(err));
        }
    }
    if let Some(db) = &db {
        if !args.dry_run {
            db.prune_dead_leases()?;
        }
    }
    // Run directories (logs) of ended runs: rows removed above no longer protect theirs.
    // Listed before the rows are read (see `retention`).
    let runs = ctx.dirs.runs_dir();
    let listed = retention::list_runs(&runs)?;
    let known: BTreeSet<String> = match &db {
        Some(db) => db.bottles()?.into_iter().map(|r| r.id).collect(),
        None => BTreeSet::new(),
    };
    let keep = if args.logs {
        0
    } else {
        retention::KEEP_RUNS_PER_BOTTLE
    };
    let old_runs = if args.dry_run {
        retention::plan_pruning(&listed, &known, keep)
    } else {
        retention::prune(&runs, &listed, &known, keep)?
    };
    for id in &old_runs {
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        println!("{verb} the logs of {id}");
    }
    if args.images && !args.dry_run {
        for tag in bot_bottle::image::build::prune_sidecar_images(&docker).await? {
            println!("removed image {tag}");
        }
    }
    if dead.is_empty() && old_runs.is_empty() {
        println!("nothing to clean up");
    }
    Ok(i32::from(failures > 0))
}
