//! `bot-bottle approvals [<bottle>]`: the requests waiting for approval across the running
//! bottles (those whose manifest says `[egress] unknown = "ask"`), in a terminal UI that
//! answers them, or as JSON (`--json`) for scripts.

use anyhow::Context as _;
use bot_bottle::host::supervise;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct ApprovalsArgs {
    /// Only this bottle (its id, or its name).
    target: Option<String>,
    /// Print the waiting requests once, as JSON, instead of the terminal UI.
    #[arg(long)]
    json: bool,
}

pub async fn run(ctx: &Context, args: ApprovalsArgs) -> anyhow::Result<i32> {
    if !args.json {
        let target = args.target.as_deref();
        return Ok(bot_bottle::ui::approvals::run(&ctx.dirs, &ctx.manifests, target).await?);
    }
    let bottles = supervise::running(&ctx.dirs, args.target.as_deref())?;
    let (waiting, failed) = supervise::waiting(&bottles).await;
    for (id, e) in &failed {
        eprintln!("warning: {id}: {e}");
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&waiting).context("printing the waiting requests")?
    );
    Ok(0)
}
