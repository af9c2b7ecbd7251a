//! `bot-bottle __gate --run-dir DIR` (hidden): the git gate's server for one bottle run,
//! spawned by `start` (and ending with it) on the run directory's gate socket
//! ([`bot_bottle::bundle::gate::server`]).

use std::path::PathBuf;

use anyhow::Context as _;
use bot_bottle::host::run_dir::RunDir;

#[derive(Debug, clap::Args)]
pub struct GateArgs {
    /// The bottle run's directory.
    #[arg(long)]
    run_dir: PathBuf,
}

pub async fn run(args: GateArgs) -> anyhow::Result<i32> {
    bot_bottle::session::orphans::die_with_parent(nix::sys::signal::Signal::SIGTERM)?;
    let exe = std::env::current_exe().context("locating the bot-bottle executable")?;
    let run = RunDir::new(args.run_dir);
    // The configuration comes on stdin from `start` (it may hold the upstream's credential).
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut json)
        .context("reading the gate configuration from start")?;
    let config: bot_bottle::bundle::gate::server::GateConfig =
        serde_json::from_slice(&json).context("the gate configuration from start is not valid")?;
    let _server = bot_bottle::bundle::gate::server::serve(&run, &exe, config)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    term.recv().await;
    Ok(0)
}
