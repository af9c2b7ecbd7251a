//! `bot-bottle sidecar` (hidden): PID 1 of the sidecar bundle container.

use bot_bottle::bundle::runtime::{self as sidecar, SidecarConfig};

pub async fn run() -> anyhow::Result<i32> {
    let config = SidecarConfig::from_env()?;
    sidecar::run(config).await?;
    Ok(0)
}
