//! `bot-bottle deny <bottle> <id>`: refuse a request that waits for approval; later requests to
//! the same host:port are refused at once until the bottle stops.

use anyhow::Context as _;
use bot_bottle::bundle::egress::approvals::Answer;
use bot_bottle::host::supervise;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct DenyArgs {
    /// Bottle id, or bottle name when only one bottle of that name runs.
    target: String,
    /// The request's id (`bot-bottle approvals` lists them).
    id: u64,
}

pub async fn run(ctx: &Context, args: DenyArgs) -> anyhow::Result<i32> {
    let bottle = supervise::one(&ctx.dirs, &args.target)?;
    let answered = bottle
        .answer(args.id, Answer::Deny)
        .await
        .with_context(|| format!("denying request {} of {}", args.id, bottle.id))?;
    println!(
        "{}: denied {}:{} until it stops ({} held request(s) refused)",
        bottle.id, answered.host, answered.port, answered.waiting
    );
    Ok(0)
}
