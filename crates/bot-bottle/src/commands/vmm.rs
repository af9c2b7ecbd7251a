//! `bot-bottle __vmm --config FILE` (hidden): the VMM child process.
//!
//! The parent (`start`) writes the machine config and verifies the machine's allowlist in the
//! state DB. This process takes the allowlist from that same row — never from the config file —
//! so what was verified is what is enforced. Any doubt (no DB, no row, an unreadable entry, an
//! allowlist in the file) refuses to boot.

use std::path::PathBuf;

use anyhow::Context as _;
use bot_bottle::backend::microvm::launch::Launch;

#[derive(Debug, clap::Args)]
pub struct VmmArgs {
    /// The launch file written by `start` (JSON: machine name, state DB, VMM config).
    #[arg(long)]
    config: PathBuf,
}

/// Exit status: how the guest ended (`bottle_vmm::EXIT_CODE_*`); `EXIT_CODE_VMM_ERROR` with the
/// cause on stderr when the VM was refused or could not run.
pub async fn run(args: VmmArgs) -> anyhow::Result<i32> {
    let result = match die_with_parent() {
        Ok(()) => boot(args).await,
        Err(err) => Err(err),
    };
    report(result)
}

/// SIGTERM is our VMM's clean stop: the kernel sends it when `start` ends (PRD 0007).
fn die_with_parent() -> anyhow::Result<()> {
    Ok(bot_bottle::session::orphans::die_with_parent(
        nix::sys::signal::Signal::SIGTERM,
    )?)
}

fn report(result: anyhow::Result<i32>) -> anyhow::Result<i32> {
    match result {
        Ok(code) => Ok(code),
        Err(err) => {
            eprintln!("bot-bottle __vmm: error: {err}");
            for (i, cause) in err.chain().skip(1).enumerate() {
                eprintln!("  {}: {cause}", i + 1);
            }
            Ok(bottle_vmm::EXIT_CODE_VMM_ERROR)
        }
    }
}

async fn boot(args: VmmArgs) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the VMM launch file {}", args.config.display()))?;
    let mut launch: Launch = serde_json::from_str(&text)
        .with_context(|| format!("parsing the VMM launch file {}", args.config.display()))?;
    let rules = bot_bottle::backend::microvm::launch::verified_rules(&launch)?;
    tracing::info!(machine = %launch.machine, rules = rules.len(), "booting");
    // `verified_rules` refuses a launch without vsock: there is always one here.
    if let Some(vsock) = launch.vmm.vsock.as_mut() {
        vsock.allowlist = rules;
    }
    let config = launch.vmm;
    // SIGTERM/SIGINT stop the vCPUs, join them and remove the vsock socket.
    bottle_vmm::install_stop_signals().context("installing the VMM's stop signals")?;
    let result = tokio::task::spawn_blocking(move || bottle_vmm::run(&config))
        .await
        .context("the VMM thread panicked")?;
    let exit = match result {
        Ok(exit) => exit,
        Err(bottle_vmm::VmmError::Stopped) => return Ok(bottle_vmm::EXIT_CODE_STOPPED),
        Err(e) => return Err(e.into()),
    };
    if let bottle_vmm::GuestExit::Crash(why) = &exit {
        eprintln!("bot-bottle: the VM crashed: {why}");
    }
    Ok(exit.exit_code())
}
