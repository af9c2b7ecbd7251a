//! `bot-bottle __vmm --config FILE` (hidden): the VMM child process.
//!
//! The parent (`start`) writes the machine config and verifies the machine's allowlist in the
//! state DB. This process takes the allowlist from that same row — never from the config file —
//! so what was verified is what is enforced. Any doubt (no DB, no row, an unreadable entry, an
//! allowlist in the file) refuses to boot.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use bot_bottle::microvm::Launch;
use bot_bottle::plan::AllowEntry;
use bot_bottle::state::StateDb;
use bottle_vmm::AllowRule;

#[derive(Debug, clap::Args)]
pub struct VmmArgs {
    /// The launch file written by `start` (JSON: machine name, state DB, VMM config).
    #[arg(long)]
    config: PathBuf,
}

/// Turn verified DB entries into the VMM's rules. Only /32s are accepted.
pub fn rules_from_entries(entries: &[AllowEntry]) -> anyhow::Result<Vec<AllowRule>> {
    entries
        .iter()
        .map(|e| {
            let addr = e
                .cidr
                .strip_suffix("/32")
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
                .with_context(|| {
                    format!(
                        "allowlist entry `{}` is not an IPv4 /32: refusing to boot (fail closed)",
                        e.cidr
                    )
                })?;
            Ok(AllowRule { addr, port: e.port })
        })
        .collect()
}

/// Exit status: how the guest ended (`bottle_vmm::EXIT_CODE_*`); `EXIT_CODE_VMM_ERROR` with the
/// cause on stderr when the VM was refused or could not run.
pub async fn run(args: VmmArgs) -> anyhow::Result<i32> {
    match boot(args).await {
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
    let Some(vsock) = launch.vmm.vsock.as_mut() else {
        bail!("the launch file has no vsock device: the guest would have no way out, nothing to enforce");
    };
    if !vsock.allowlist.is_empty() {
        bail!(
            "the launch file carries its own allowlist: refusing (the allowlist comes only from the verified state DB row)"
        );
    }
    let db = StateDb::open_existing(&launch.state_db).context("reading the machine allowlist")?;
    let entries = db.read_allowlist(&launch.machine)?;
    if entries.is_empty() {
        bail!(
            "machine {} has an empty allowlist: it was never verified; refusing to boot (fail closed)",
            launch.machine
        );
    }
    vsock.allowlist = rules_from_entries(&entries)?;
    let cid = db.machine_cid(&launch.machine)?;
    if cid != Some(vsock.guest_cid) {
        bail!(
            "machine {} has CID {:?} in the state DB but {} in the launch file: refusing to boot",
            launch.machine,
            cid,
            vsock.guest_cid
        );
    }
    drop(db);
    tracing::info!(machine = %launch.machine, rules = vsock.allowlist.len(), "booting");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipv4_slash_32_entries_become_rules() {
        let ok = rules_from_entries(&[AllowEntry {
            cidr: "127.0.0.16/32".into(),
            port: 3128,
        }])
        .unwrap();
        assert_eq!(ok[0].addr, Ipv4Addr::new(127, 0, 0, 16));
        for bad in ["127.0.0.0/8", "0.0.0.0/0", "127.0.0.16", "localhost/32"] {
            let entry = AllowEntry {
                cidr: bad.into(),
                port: 1,
            };
            assert!(rules_from_entries(&[entry]).is_err(), "{bad}");
        }
    }
}
