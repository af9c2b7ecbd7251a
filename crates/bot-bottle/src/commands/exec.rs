//! `bot-bottle exec <bottle> -- cmd args`: run a command in a running bottle; its exit code
//! passes through.

use anyhow::{bail, Context as _};
use bot_bottle::microvm::Launch;
use bot_bottle::plan::BottlePlan;
use bot_bottle::state::StateDb;

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
    let db = StateDb::open_existing(&ctx.dirs.db_path()).context("no bottles are running")?;
    let row = super::stop::find_live(&db, &args.target)?;
    let plan: BottlePlan = serde_json::from_str(
        &db.plan_json(&row.id)?
            .with_context(|| format!("bottle {} has no plan", row.id))?,
    )
    .with_context(|| format!("reading the plan of bottle {}", row.id))?;
    if row.status != "running" {
        bail!(
            "bottle {} is {}, not running yet: try again in a moment",
            row.id,
            row.status
        );
    }
    match plan.backend {
        bot_bottle::manifest::Backend::Docker => {
            let docker = bot_bottle::docker::connect().await?;
            Ok(
                bot_bottle::docker_backend::exec_in_agent(&docker, &plan.agent.name, &args.command)
                    .await?,
            )
        }
        bot_bottle::manifest::Backend::Microvm => {
            let dir = ctx.dirs.bottle_dir(&row.id);
            let launch: Launch = serde_json::from_slice(
                &std::fs::read(dir.join("launch.json"))
                    .with_context(|| format!("bottle {} has no launch file", row.id))?,
            )?;
            let token = launch_token(&launch)?;
            let stream = tokio::task::spawn_blocking({
                let uds = dir.join("vsock.sock");
                move || {
                    bottle_proto::client::connect_vsock(
                        &uds,
                        bottle_proto::config::CONTROL_VSOCK_PORT,
                    )
                }
            })
            .await??;
            let client = bottle_proto::Client::new(stream, token);
            let (code, _) =
                bot_bottle::microvm_run::exec(client, args.command, plan.agent.workdir.clone())
                    .await?;
            Ok(code)
        }
    }
}

/// The per-boot token, read back from the guest configuration on the command line.
pub fn launch_token(launch: &Launch) -> anyhow::Result<String> {
    match bottle_proto::config::parse_cmdline(&launch.vmm.cmdline)? {
        bottle_proto::ConfigSource::Inline(cfg) => Ok(cfg.token),
        _ => bail!("the launch file does not carry the guest configuration inline"),
    }
}
