//! `bot-bottle allow <bottle> <rule>...`: let a running bottle reach more hosts, until it
//! stops, through its bundle's supervisor (the manifest's deny rules still win).

use anyhow::Context as _;
use bot_bottle::state::StateDb;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct AllowArgs {
    /// Bottle id, or bottle name when only one bottle of that name runs.
    target: String,
    /// Egress rules, as in a manifest's `[egress] allow` (`host`, `host:port`, `*.domain`).
    #[arg(required_unless_present = "list", value_name = "RULE")]
    rules: Vec<String>,
    /// Print the bottle's rules in force (the manifest's and those added), as JSON.
    #[arg(long, conflicts_with = "rules")]
    list: bool,
}

pub async fn run(ctx: &Context, args: AllowArgs) -> anyhow::Result<i32> {
    let db = StateDb::open_existing(&ctx.dirs.db_path()).context("no bottles are running")?;
    let row = bot_bottle::backend::handle::find_live(&db, &args.target)?;
    let alias: std::net::Ipv4Addr = row
        .alias
        .as_deref()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("bottle {} has no loopback alias", row.id))?;
    let token = bot_bottle::bundle::supervisor::read_token(&ctx.dirs.run_dir(&row.id))?;
    let addr = std::net::SocketAddr::from((alias, bot_bottle::plan::SUPERVISOR_PORT));
    if args.list {
        let rules = bot_bottle::bundle::supervisor::request_rules(addr, &token)
            .await
            .with_context(|| format!("reading the rules of {}", row.id))?;
        println!("{rules}");
        return Ok(0);
    }
    for rule in &args.rules {
        bot_bottle::bundle::supervisor::request_allow(addr, &token, rule)
            .await
            .with_context(|| format!("allowing {rule} in {}", row.id))?;
        println!("{}: now allows {rule} (until it stops)", row.id);
    }
    Ok(0)
}
