//! `bot-bottle cp BOTTLE:/path LOCAL_DIR` and `bot-bottle cp LOCAL BOTTLE:/dir`.

use anyhow::{bail, Context as _};
use bot_bottle::manifest::Backend;
use bot_bottle::plan::BottlePlan;
use bot_bottle::state::StateDb;
use bot_bottle::transfer::{self, Direction};
use futures_util::StreamExt;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct CpArgs {
    /// BOTTLE:/path in the bottle, or a local path.
    src: String,
    /// A local directory (copying out), or BOTTLE:/directory (copying in).
    dst: String,
}

pub async fn run(ctx: &Context, args: CpArgs) -> anyhow::Result<i32> {
    let direction = transfer::parse(&args.src, &args.dst)?;
    let bottle = match &direction {
        Direction::Out { bottle, .. } | Direction::In { bottle, .. } => bottle.clone(),
    };
    let db = StateDb::open_existing(&ctx.dirs.db_path()).context("no bottles are running")?;
    let row = super::stop::find_live(&db, &bottle)?;
    let plan: BottlePlan = serde_json::from_str(
        &db.plan_json(&row.id)?
            .with_context(|| format!("bottle {} has no plan", row.id))?,
    )?;
    if row.status != "running" {
        bail!("bottle {} is {}, not running yet", row.id, row.status);
    }
    match plan.backend {
        Backend::Docker => docker_cp(&plan, direction).await,
        Backend::Microvm => microvm_cp(ctx, &row.id, direction).await,
    }
}

async fn docker_cp(plan: &BottlePlan, direction: Direction) -> anyhow::Result<i32> {
    let docker = bot_bottle::docker::connect().await?;
    let name = &plan.agent.name;
    match direction {
        Direction::Out { guest, local, .. } => {
            let mut stream = docker.download_from_container(
                name,
                Some(bollard::container::DownloadFromContainerOptions {
                    path: guest.clone(),
                }),
            );
            let mut tar = Vec::new();
            while let Some(chunk) = stream.next().await {
                tar.extend_from_slice(
                    &chunk.with_context(|| format!("reading {guest} from the bottle"))?,
                );
            }
            let n = transfer::unpack_safely(tar.as_slice(), &local)?;
            eprintln!("copied {n} entries to {}", local.display());
        }
        Direction::In { local, guest, .. } => {
            let tar = transfer::pack(&local)?;
            docker
                .upload_to_container(
                    name,
                    Some(bollard::container::UploadToContainerOptions {
                        path: guest.clone(),
                        ..Default::default()
                    }),
                    tar.into(),
                )
                .await
                .with_context(|| {
                    format!("copying into {guest} (it must be an existing directory)")
                })?;
        }
    }
    Ok(0)
}

async fn microvm_cp(ctx: &Context, id: &str, direction: Direction) -> anyhow::Result<i32> {
    let mut client = super::exec::control_client(ctx, id).await?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<i32> {
        match direction {
            Direction::Out { guest, local, .. } => {
                let mut tar = Vec::new();
                client.copy_out(&guest, &mut tar)?;
                let n = transfer::unpack_safely(tar.as_slice(), &local)?;
                eprintln!("copied {n} entries to {}", local.display());
            }
            Direction::In { local, guest, .. } => {
                client.copy_in(&guest, transfer::pack(&local)?.as_slice())?;
            }
        }
        Ok(0)
    })
    .await?
}
