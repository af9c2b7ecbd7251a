//! `bot-bottle cp BOTTLE:/path LOCAL_DIR` and `bot-bottle cp LOCAL BOTTLE:/dir`.

use anyhow::{bail, Context as _};
use bot_bottle::backend::transfer::{self, Direction};
use bot_bottle::config::manifest::Backend;
use bot_bottle::plan::BottlePlan;
use bot_bottle::state::StateDb;
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

/// How many archive chunks may wait between the Docker stream and the unpacking thread (or
/// the packing thread and the upload): the most `cp` holds in memory at once.
const CHUNKS_IN_FLIGHT: usize = 16;
/// Bytes per chunk read from the packing thread when copying in.
const PACK_CHUNK_BYTES: usize = 64 * 1024;

async fn docker_cp(plan: &BottlePlan, direction: Direction) -> anyhow::Result<i32> {
    let docker = bot_bottle::host::docker::connect().await?;
    let name = &plan.agent.name;
    match direction {
        Direction::Out { guest, local, .. } => {
            let limit = transfer::max_copy_bytes()?;
            let mut stream = docker.download_from_container(
                name,
                Some(bollard::container::DownloadFromContainerOptions {
                    path: guest.clone(),
                }),
            );
            // Unpacked as it arrives: never held whole, and bounded.
            let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
            let dst = local.clone();
            let unpack = tokio::task::spawn_blocking(move || {
                transfer::unpack_safely(transfer::ChunkReader::new(rx), &dst)
            });
            let mut bound = transfer::Bounded::new(std::io::sink(), limit);
            let mut produced: anyhow::Result<()> = Ok(());
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        produced = Err(anyhow::Error::new(e)
                            .context(format!("reading {guest} from the bottle")));
                        break;
                    }
                };
                if let Err(e) = bound.admit(chunk.len()) {
                    produced = Err(e.into());
                    break;
                }
                if tx.send(chunk).await.is_err() {
                    // The unpacking stopped: its error is reported below.
                    break;
                }
            }
            drop(tx);
            let unpacked = unpack.await.context("the unpacking thread panicked")?;
            produced?;
            let n = unpacked?;
            eprintln!("copied {n} entries to {}", local.display());
        }
        Direction::In { local, guest, .. } => {
            let (reader, packer) = transfer::pack_stream(&local)?;
            let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(CHUNKS_IN_FLIGHT);
            let feeder = tokio::task::spawn_blocking(move || {
                use std::io::Read as _;
                let mut reader = reader;
                loop {
                    let mut buf = vec![0u8; PACK_CHUNK_BYTES];
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            buf.truncate(n);
                            if tx.blocking_send(buf.into()).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
            let body = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (chunk, rx))
            });
            let uploaded = docker
                .upload_to_container_streaming(
                    name,
                    Some(bollard::container::UploadToContainerOptions {
                        path: guest.clone(),
                        ..Default::default()
                    }),
                    body,
                )
                .await;
            let _ = feeder.await;
            packer
                .join()
                .map_err(|_| anyhow::anyhow!("the packing thread panicked"))??;
            uploaded.with_context(|| {
                format!("copying into {guest} (it must be an existing directory)")
            })?;
        }
    }
    Ok(0)
}

async fn microvm_cp(ctx: &Context, id: &str, direction: Direction) -> anyhow::Result<i32> {
    let mut client = super::exec::control_client(ctx, id).await?;
    let limit = transfer::max_copy_bytes()?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<i32> {
        match direction {
            Direction::Out { guest, local, .. } => {
                // Unpacked as it arrives from the guest: never held whole, and bounded.
                let n =
                    transfer::stream_out(move |out| client.copy_out(&guest, out), &local, limit)?;
                eprintln!("copied {n} entries to {}", local.display());
            }
            Direction::In { local, guest, .. } => {
                let (reader, packer) = transfer::pack_stream(&local)?;
                let sent = client.copy_in(&guest, reader);
                packer
                    .join()
                    .map_err(|_| anyhow::anyhow!("the packing thread panicked"))??;
                sent?;
            }
        }
        Ok(0)
    })
    .await?
}
