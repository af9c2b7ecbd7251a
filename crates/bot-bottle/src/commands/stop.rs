//! `bot-bottle stop`: ask a bottle's `start` process to tear down, and wait for it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bot_bottle::backend::handle::find_live;
use bot_bottle::state::StateDb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::Context;

/// How long `stop` waits for the owner to finish its teardown.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// Bottle id, or bottle name when only one bottle of that name runs.
    target: String,
}

pub async fn run(ctx: &Context, args: StopArgs) -> anyhow::Result<i32> {
    let db = StateDb::open_existing(&ctx.dirs.db_path()).context("no bottles to stop")?;
    let row = match find_live(&db, &args.target) {
        Ok(row) => row,
        // Its `start` is gone: nothing can tear it down but us (what `cleanup <bottle>` does).
        Err(err) => match super::cleanup::find_orphan(ctx, &args.target).await? {
            Some(orphan) => return super::cleanup::remove_orphan(ctx, &orphan).await,
            None => return Err(err.into()),
        },
    };
    let pid = Pid::from_raw(i32::try_from(row.pid).context("bad pid in state row")?);
    kill(pid, Signal::SIGTERM)
        .with_context(|| format!("signalling bottle {} (pid {pid})", row.id))?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        let still = db.bottles()?.into_iter().any(|r| r.id == row.id && r.live);
        if !still {
            println!("stopped {}", row.id);
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "bottle {} did not stop within {}s: kill it and run `bot-bottle cleanup`",
        row.id,
        STOP_TIMEOUT.as_secs()
    )
}
