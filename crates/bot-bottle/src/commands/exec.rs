//! `bot-bottle exec <bottle> -- cmd args`: run a command in a running bottle; its exit code
//! passes through.

use bot_bottle::backend::handle::BottleHandle;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Bottle id, or bottle name when only one bottle of that name runs.
    target: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

pub async fn run(ctx: &Context, args: ExecArgs) -> anyhow::Result<i32> {
    let bottle = BottleHandle::find(&ctx.dirs, &args.target)?;
    Ok(bottle.exec(args.command).await?)
}
