//! `bot-bottle cp BOTTLE:/path LOCAL_DIR` and `bot-bottle cp LOCAL BOTTLE:/dir`.

use bot_bottle::backend::handle::BottleHandle;
use bot_bottle::backend::transfer::{self, Direction};

use super::Context;

#[derive(Debug, clap::Args)]
pub struct CpArgs {
    /// BOTTLE:/path in the bottle, or a local path.
    src: String,
    /// A local directory (copying out), or BOTTLE:/directory (copying in).
    dst: String,
}

pub async fn run(ctx: &Context, args: CpArgs) -> anyhow::Result<i32> {
    match transfer::parse(&args.src, &args.dst)? {
        Direction::Out {
            bottle,
            guest,
            local,
        } => {
            let n = BottleHandle::find(&ctx.dirs, &bottle)?
                .copy_out(&guest, &local)
                .await?;
            eprintln!("copied {n} entries to {}", local.display());
        }
        Direction::In {
            local,
            bottle,
            guest,
        } => {
            BottleHandle::find(&ctx.dirs, &bottle)?
                .copy_in(&local, &guest)
                .await?
        }
    }
    Ok(0)
}
