//! `bot-bottle __reaper <bottle-id>` (hidden): spawned by `start`, outlives it, and removes
//! what the bottle left when `start` ends without saying its teardown was complete: SIGKILL,
//! the OOM killer, a crash (PRD 0007).
//!
//! It waits on a pipe from `start` (EOF comes however `start` dies), then removes the bottle's
//! containers, networks and state row with the code `cleanup` uses, in passes until the engine
//! shows nothing of it twice in a row.

use std::io::Write as _;

use anyhow::Context as _;
use bot_bottle::session::orphans::{self, Wake};
use bot_bottle::state::StateDb;
use tokio::signal::unix::{signal, SignalKind};
use tracing::Instrument as _;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct ReaperArgs {
    /// The bottle whose `start` this process watches.
    bottle_id: String,
}

pub async fn run(ctx: &Context, args: ReaperArgs) -> anyhow::Result<i32> {
    // A session of its own: no controlling terminal, so Ctrl-C and a closed terminal (which
    // end `start`) never reach the process that cleans up after it.
    if let Err(e) = nix::unistd::setsid() {
        tracing::debug!(error = %e, "the reaper stays in start's session");
    }
    // And the same signals sent to it directly only wake these (ignored) streams.
    let mut held = Vec::new();
    for kind in [
        SignalKind::hangup(),
        SignalKind::interrupt(),
        SignalKind::quit(),
        SignalKind::pipe(),
    ] {
        held.push(signal(kind).context("installing the reaper's signal handlers")?);
    }
    let wake = tokio::task::spawn_blocking(|| orphans::wait_for_start(std::io::stdin()))
        .await
        .context("the reaper's wait panicked")?;
    if wake == Wake::Clean {
        return Ok(0);
    }
    let span = tracing::info_span!("reaper", bottle_id = %args.bottle_id);
    reap(ctx, &args.bottle_id).instrument(span).await
}

async fn reap(ctx: &Context, id: &str) -> anyhow::Result<i32> {
    let log = ReaperLog::open(&ctx.dirs.run_dir(id));
    let db = StateDb::open_if_exists(&ctx.dirs.db_path()).context("opening the state database")?;
    if let Some(db) = &db {
        // The kernel closes a dying process's descriptors (our pipe) before /proc shows it
        // gone: a `start` still listed as running is given a moment to finish exiting.
        let deadline = tokio::time::Instant::now() + orphans::START_EXIT_GRACE;
        while let Some(row) = db.bottles()?.into_iter().find(|r| r.id == id && r.live) {
            if tokio::time::Instant::now() >= deadline {
                // Never expected: the pipe closed while its `start` runs. Leave it alone.
                log.line(&format!(
                    "start (pid {}) still runs: leaving the bottle alone",
                    row.pid
                ));
                return Ok(0);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    log.line("start ended without tearing down: removing what the bottle left");
    let docker = bot_bottle::host::docker::connect()
        .await
        .context("the reaper needs Docker")?;
    let mut empty = 0;
    let mut failures = 0;
    for _ in 0..orphans::REAP_MAX_PASSES {
        let had = orphans::has_objects(&docker, id).await.unwrap_or(true);
        let errors = orphans::remove_bottle(&docker, db.as_ref(), &ctx.dirs, id).await;
        for e in &errors {
            log.line(&format!("{e}: {}", error_chain(e)));
        }
        failures = errors.len();
        if !had && errors.is_empty() {
            empty += 1;
            if empty >= orphans::REAP_EMPTY_PASSES {
                break;
            }
        } else {
            empty = 0;
        }
        tokio::time::sleep(orphans::REAP_PASS_INTERVAL).await;
    }
    if failures == 0 {
        log.line("removed: nothing of the bottle is left");
    } else {
        log.line("some objects are left with the state row: run `bot-bottle cleanup`");
    }
    Ok(i32::from(failures > 0))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut next = e.source();
    while let Some(cause) = next {
        causes.push(cause.to_string());
        next = cause.source();
    }
    causes.join(": ")
}

/// `<run dir>/reaper.log`: the reaper's stderr may be a terminal that is gone.
struct ReaperLog(Option<std::fs::File>);

impl ReaperLog {
    fn open(run: &bot_bottle::host::run_dir::RunDir) -> Self {
        let file = run.prepare().and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(run.reaper_log())
        });
        Self(file.ok())
    }

    fn line(&self, text: &str) {
        tracing::info!("{text}");
        if let Some(mut f) = self.0.as_ref() {
            let _ = writeln!(f, "{text}");
        }
    }
}
