//! `bot-bottle approve <bottle> <id> [--session | --save]`: let a request that waits for
//! approval through — once (the default), for the rest of the session, or for good (saved into
//! the user's own manifest of the bottle).

use anyhow::Context as _;
use bot_bottle::bundle::egress::approvals::Answer;
use bot_bottle::host::supervise;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    /// Bottle id, or bottle name when only one bottle of that name runs.
    target: String,
    /// The request's id (`bot-bottle approvals` lists them).
    id: u64,
    /// Allow the host:port until the bottle stops, not only this request.
    #[arg(long, conflicts_with = "save")]
    session: bool,
    /// Allow it for the session and save the rule into your manifest of the bottle.
    #[arg(long)]
    save: bool,
}

pub async fn run(ctx: &Context, args: ApproveArgs) -> anyhow::Result<i32> {
    let bottle = supervise::one(&ctx.dirs, &args.target)?;
    if args.save {
        let pending = bottle
            .pending()
            .await
            .with_context(|| format!("listing the requests of {}", bottle.id))?;
        if let Some(secret) = pending
            .iter()
            .find(|p| p.id == args.id)
            .and_then(|p| p.secret.as_ref())
        {
            anyhow::bail!(
                "request {} of {} is held because it carries a secret ({secret}): that cannot be \
                 saved into a manifest; approve it once, or with --session for the rest of this \
                 session",
                args.id,
                bottle.id
            );
        }
    }
    let answer = match args.session || args.save {
        true => Answer::Session,
        false => Answer::Once,
    };
    let answered = bottle
        .answer(args.id, answer)
        .await
        .with_context(|| format!("approving request {} of {}", args.id, bottle.id))?;
    let rule = format!("{}:{}", answered.host, answered.port);
    let how = match answer {
        Answer::Once => "once",
        _ => "until it stops",
    };
    println!(
        "{}: allowed {rule} {how} ({} held request(s) released)",
        bottle.id, answered.waiting
    );
    if args.save {
        let path =
            bot_bottle::config::save::save_allow_rule(&ctx.manifests, &bottle.bottle, &rule)?;
        println!("saved {rule} into {}", path.display());
    }
    Ok(0)
}
