//! `bot-bottle exec <bottle> -- cmd args`: run a command in a running bottle; its exit code
//! passes through.

use anyhow::{bail, Context as _};
use bot_bottle::backend::microvm::launch::Launch;
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
        bot_bottle::config::manifest::Backend::Docker => {
            let docker = bot_bottle::host::docker::connect().await?;
            Ok(
                bot_bottle::backend::docker::exec_in_agent(
                    &docker,
                    &plan.agent.name,
                    &args.command,
                )
                .await?,
            )
        }
        bot_bottle::config::manifest::Backend::Microvm => {
            let client = control_client(ctx, &row.id).await?;
            let (code, _) = bot_bottle::backend::microvm::run::exec(
                client,
                args.command,
                plan.agent.workdir.clone(),
            )
            .await?;
            Ok(code)
        }
    }
}

/// A control connection to the guest of microVM bottle `id`: the socket, port and per-boot
/// token from its launch file.
pub async fn control_client(
    ctx: &Context,
    id: &str,
) -> anyhow::Result<bottle_proto::Client<std::os::unix::net::UnixStream>> {
    let dir = ctx.dirs.bottle_dir(id);
    let control =
        Launch::read_control(&dir).with_context(|| format!("reaching the guest of bottle {id}"))?;
    let stream = tokio::task::spawn_blocking({
        let (socket, port) = (control.socket.clone(), control.port);
        move || bottle_proto::client::connect_vsock(&socket, port)
    })
    .await?
    .with_context(|| {
        format!(
            "connecting to the guest of bottle {id} on {}",
            control.socket.display()
        )
    })?;
    Ok(bottle_proto::Client::new(stream, control.token))
}
