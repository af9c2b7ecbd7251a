//! `bot-bottle list`: bottles, state, backend, alias, age. A bottle whose `start` is gone but
//! whose row or Docker objects remain is listed as `orphaned`, with the hint to clean it up:
//! a running agent is never left unlisted (PRD 0007).

use anyhow::Context as _;
use bot_bottle::session::orphans::{self, Listed};
use bot_bottle::state::StateDb;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print JSON (an array of bottles).
    #[arg(long)]
    json: bool,
    /// Kept for scripts: orphaned bottles (what `cleanup` would remove) are always shown.
    #[arg(long, hide = true)]
    all: bool,
}

/// Every bottle of this state directory, orphans included. Without Docker only the rows can
/// be read: said on stderr, the rows still listed.
pub async fn listed(ctx: &Context) -> anyhow::Result<Vec<Listed>> {
    let rows = match StateDb::open_if_exists(&ctx.dirs.db_path()).context("reading bottles")? {
        Some(db) => db.bottles()?,
        None => Vec::new(),
    };
    let objects = match bot_bottle::host::docker::connect().await {
        Ok(docker) => orphans::docker_objects(&docker, &ctx.dirs.state_tag())
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    let (containers, networks, names) = match objects {
        Ok(objects) => objects,
        Err(e) => {
            eprintln!(
                "bot-bottle: warning: cannot list Docker objects ({e:#}): bottles without a state row are not shown"
            );
            Default::default()
        }
    };
    Ok(orphans::classify(rows, &containers, &networks, &names))
}

pub async fn run(ctx: &Context, args: ListArgs) -> anyhow::Result<i32> {
    let _ = args.all;
    let rows = listed(ctx).await?;
    // Refs the agent pushed to each bottle's git gate (its `logs --git` says which).
    let pushes =
        |id: &str| bot_bottle::bundle::gate::policy::pushed_count(&ctx.dirs.run_dir(id).gate_log());
    if args.json {
        let mut values = serde_json::to_value(&rows)?;
        if let Some(array) = values.as_array_mut() {
            for (value, row) in array.iter_mut().zip(&rows) {
                value["pushes"] = pushes(&row.id).into();
            }
        }
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no bottles running");
        return Ok(0);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    println!(
        "{:<24} {:<10} {:<8} {:<10} {:<12} {:<7} AGE",
        "ID", "BOTTLE", "BACKEND", "STATUS", "ALIAS", "PUSHES"
    );
    for r in &rows {
        let age = if r.created_at > 0 {
            format!("{}s", (now - r.created_at).max(0))
        } else {
            "-".to_owned()
        };
        println!(
            "{:<24} {:<10} {:<8} {:<10} {:<12} {:<7} {age}",
            r.id,
            r.bottle,
            r.backend,
            r.status.as_str(),
            r.alias.as_deref().unwrap_or("-"),
            pushes(&r.id),
        );
    }
    let orphaned: Vec<&Listed> = rows.iter().filter(|r| !r.live).collect();
    if !orphaned.is_empty() {
        println!(
            "{} orphaned bottle(s): their `start` is gone; `bot-bottle cleanup` removes them \
             (or `bot-bottle cleanup <id>` one)",
            orphaned.len()
        );
        for r in orphaned.iter().filter(|r| !r.containers.is_empty()) {
            println!("  {}: still has {}", r.id, r.containers.join(", "));
        }
    }
    Ok(0)
}
