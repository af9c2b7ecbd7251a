//! `bot-bottle start`: the session ([`bot_bottle::session::start`]: preflight, allocate, plan,
//! build, run, attach) under a guard stack that tears it down on the way out, however it ends:
//! the signals that would end this process are caught, and a reaper outlives it for the one
//! that cannot be (SIGKILL).

use anyhow::{bail, Context as _};
use bot_bottle::backend::microvm::session::layer_request;
use bot_bottle::config::manifest::Backend;
use bot_bottle::host::logging::say;
use bot_bottle::session::{self, guard::GuardStack, start::StartRequest};
use tokio::signal::unix::{signal, SignalKind};
use tracing::Instrument as _;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Bottle name (bundled: claude, codex, test; or your own).
    bottle: String,
    /// Isolation backend (default: $BOT_BOTTLE_BACKEND, else the manifest's, else microvm).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Host directory the agent gets a writable copy of, owned by its user (the host files
    /// are never modified), HOST[:GUEST] (repeatable).
    #[arg(long = "mount", value_name = "HOST[:GUEST]")]
    mounts: Vec<String>,
    /// microVM: keep the writable layer in guest memory (gone at power-off) instead of the
    /// bottle's kept disk.
    #[arg(long, conflicts_with = "fresh")]
    tmpfs: bool,
    /// microVM: discard the bottle's kept writable layer and start a new one.
    #[arg(long)]
    fresh: bool,
    /// Set by `bot-bottle resume`: continue the kept writable layer.
    #[arg(skip)]
    pub resume: bool,
    /// Run this command in the bottle instead of the agent, then tear down; exit code passes through.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Why the session ended early: the signal that ended it.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {name}: tearing down")]
struct Interrupted {
    name: &'static str,
    signal: i32,
}

impl Interrupted {
    /// The shell's convention: 128 + the signal's number.
    fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

/// Every signal whose default action would end `start` without its teardown (SIGKILL and
/// SIGSTOP cannot be caught: the reaper covers SIGKILL). SIGHUP is also what a closed terminal
/// or a lost SSH session sends; SIGPIPE what writing to a closed pipe does once handled.
const ENDING_SIGNALS: &[(&str, nix::sys::signal::Signal)] = &[
    ("Ctrl-C", nix::sys::signal::Signal::SIGINT),
    ("SIGTERM", nix::sys::signal::Signal::SIGTERM),
    ("SIGHUP", nix::sys::signal::Signal::SIGHUP),
    ("SIGQUIT", nix::sys::signal::Signal::SIGQUIT),
    ("SIGPIPE", nix::sys::signal::Signal::SIGPIPE),
];

/// Resolves with the first of [`ENDING_SIGNALS`] that arrives.
struct EndingSignals(Vec<(&'static str, i32, tokio::signal::unix::Signal)>);

impl EndingSignals {
    fn install() -> anyhow::Result<Self> {
        let mut streams = Vec::new();
        for &(name, sig) in ENDING_SIGNALS {
            let stream = signal(SignalKind::from_raw(sig as i32))
                .with_context(|| format!("installing the {name} handler"))?;
            streams.push((name, sig as i32, stream));
        }
        Ok(Self(streams))
    }

    async fn recv(&mut self) -> Interrupted {
        let waits = self.0.iter_mut().map(|(name, signal, stream)| {
            Box::pin(async move {
                stream.recv().await;
                Interrupted {
                    name,
                    signal: *signal,
                }
            })
        });
        futures_util::future::select_all(waits).await.0
    }
}

pub async fn run(ctx: &Context, args: StartArgs) -> anyhow::Result<i32> {
    let resolved = super::resolve(ctx, &args.bottle, args.backend, &args.mounts)?;
    let id = super::new_bottle_id(&resolved.manifest.name)?;
    let span = tracing::info_span!("bottle", bottle_id = %id);
    let mut signals = EndingSignals::install()?;
    // Before anything is acquired: the reaper outlives this process and removes what the
    // bottle left if it dies without its teardown (SIGKILL).
    ctx.dirs.ensure_state()?;
    let exe = std::env::current_exe().context("locating the bot-bottle executable")?;
    let reaper = bot_bottle::session::orphans::Reaper::spawn(&exe, &id)?;
    tracing::debug!(parent: &span, reaper = reaper.pid(), "reaper started");
    let mut stack = GuardStack::new(id.clone());
    let request = StartRequest {
        dirs: &ctx.dirs,
        id: &id,
        manifest: resolved.manifest,
        backend: resolved.backend,
        mounts: resolved.mounts,
        command: args.command.clone(),
        layer: layer_request(args.resume, args.fresh, args.tmpfs),
    };
    let outcome = tokio::select! {
        r = session::start::run(request, &mut stack).instrument(span.clone()) => r.map_err(anyhow::Error::from),
        interrupted = signals.recv() => Err(interrupted.into()),
    };
    let errors = stack.unwind().instrument(span).await;
    for e in &errors {
        say(format_args!("teardown: {e}: {}", e.source));
    }
    if errors.is_empty() {
        reaper.dismiss();
    } else {
        // The reaper tries again once this process is gone.
        drop(reaper);
    }
    match outcome {
        Ok(code) if errors.is_empty() => Ok(code),
        Ok(_) => bail!(
            "{} teardown step(s) failed: run `bot-bottle cleanup`",
            errors.len()
        ),
        Err(err) => match err.downcast::<Interrupted>() {
            Ok(interrupted) => {
                say(format_args!("{interrupted}"));
                Ok(interrupted.exit_code())
            }
            Err(err) => Err(err),
        },
    }
}
