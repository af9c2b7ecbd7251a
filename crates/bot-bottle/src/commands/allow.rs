//! `bot-bottle allow <bottle> <rule>...`: let a running bottle reach more hosts, until it
//! stops, through its bundle's supervisor (the manifest's deny rules still win).

use anyhow::Context as _;
use bot_bottle::host::supervise;

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
    let bottle = supervise::one(&ctx.dirs, &args.target)?;
    if args.list {
        let rules = bottle
            .rules()
            .await
            .with_context(|| format!("reading the rules of {}", bottle.id))?;
        println!("{rules}");
        return Ok(0);
    }
    for rule in &args.rules {
        bottle
            .allow(rule)
            .await
            .with_context(|| format!("allowing {rule} in {}", bottle.id))?;
        println!("{}: now allows {rule} (until it stops)", bottle.id);
    }
    Ok(0)
}
