//! `bot-bottle list`: bottles, state, backend, alias, age.

use anyhow::Context as _;
use bot_bottle::state::StateDb;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print JSON (an array of bottles).
    #[arg(long)]
    json: bool,
    /// Also show rows whose process is gone (what `cleanup` would remove).
    #[arg(long)]
    all: bool,
}

pub async fn run(ctx: &Context, args: ListArgs) -> anyhow::Result<i32> {
    let db_path = ctx.dirs.db_path();
    let rows = if db_path.is_file() {
        StateDb::open_existing(&db_path)
            .context("reading bottles")?
            .bottles()?
    } else {
        Vec::new()
    };
    let rows: Vec<_> = rows.into_iter().filter(|r| args.all || r.live).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
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
        "{:<24} {:<10} {:<8} {:<10} {:<12} AGE",
        "ID", "BOTTLE", "BACKEND", "STATUS", "ALIAS"
    );
    for r in rows {
        let status = if r.live { r.status.as_str() } else { "dead" };
        println!(
            "{:<24} {:<10} {:<8} {:<10} {:<12} {}s",
            r.id,
            r.bottle,
            r.backend,
            status,
            r.alias.as_deref().unwrap_or("-"),
            (now - r.created_at).max(0)
        );
    }
    Ok(0)
}
