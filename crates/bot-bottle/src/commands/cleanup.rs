//! `bot-bottle cleanup`: remove what killed runs left: state rows whose process is gone,
//! their leases and machine rows, and Docker objects with our labels that no live bottle owns;
//! and the directories (logs) of ended runs beyond the newest few of each bottle.

use std::collections::BTreeSet;

use anyhow::Context as _;
use bot_bottle::docker;
use bot_bottle::retention;
use bot_bottle::state::StateDb;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
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

pub async fn run(ctx: &Context, args: CleanupArgs) -> anyhow::Result<i32> {
    let db_path = ctx.dirs.db_path();
    let db = if db_path.is_file() {
        Some(StateDb::open_existing(&db_path).context("opening the state database")?)
    } else {
        None
    };
    let rows = match &db {
        Some(db) => db.bottles()?,
        None => Vec::new(),
    };
    let live: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.live)
        .map(|r| r.id.clone())
        .collect();
    let mut dead: BTreeSet<String> = rows
        .iter()
        .filter(|r| !r.live)
        .map(|r| r.id.clone())
        .collect();

    let docker = docker::connect()
        .await
        .context("cleanup needs Docker to find leftovers")?;
    let tag = ctx.dirs.state_tag();
    let scope = docker::Scope::state(&tag);
    for c in docker::managed_containers(&docker, scope).await? {
        if !live.contains(&c.bottle_id) {
            dead.insert(c.bottle_id);
        }
    }
    for (_, id) in docker::managed_networks(&docker, scope).await? {
        if !live.contains(&id) {
            dead.insert(id);
        }
    }
    let mut failures = 0;
    for id in &dead {
        if args.dry_run {
            println!("would remove {id}");
            continue;
        }
        for err in docker::remove_bottle_objects(&docker, id).await {
            failures += 1;
            eprintln!("bot-bottle: {id}: {err}");
        }
        if let Some(db) = &db {
            db.delete_bottle(id)
                .with_context(|| format!("removing state of {id}"))?;
        }
        println!("removed {id}");
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
        for tag in bot_bottle::images::prune_sidecar_images(&docker).await? {
            println!("removed image {tag}");
        }
    }
    if dead.is_empty() && old_runs.is_empty() {
        println!("nothing to clean up");
    }
    Ok(i32::from(failures > 0))
}
