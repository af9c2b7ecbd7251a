//! `bot-bottle logs <bottle> --egress`: the egress proxy's decisions, one JSON line each.

use anyhow::{bail, Context as _};
use bot_bottle::sidecar::EGRESS_LOG;
use bot_bottle::state::StateDb;

use super::Context;

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Bottle id, or bottle name (the most recent run of that name).
    target: String,
    /// Show the egress proxy's decisions (the only log for now).
    #[arg(long, default_value_t = true)]
    egress: bool,
}

pub async fn run(ctx: &Context, args: LogsArgs) -> anyhow::Result<i32> {
    // Logs outlive the bottle (they are kept for inspection after it stops): a direct id
    // works without a state row; a name picks the newest directory of that bottle.
    let dir = ctx.dirs.runs_dir();
    let mut candidates: Vec<(std::time::SystemTime, String)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let matches =
                name == args.target || bot_bottle::retention::bottle_of(&name) == args.target;
            if matches {
                let t = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                candidates.push((t, name));
            }
        }
    }
    candidates.sort();
    let Some((_, id)) = candidates.pop() else {
        let known = StateDb::open(&ctx.dirs.db_path())
            .and_then(|db| db.bottles())
            .map(|rows| {
                rows.into_iter()
                    .map(|r| r.id)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        bail!(
            "no logs for `{}` in {} (bottles: {known})",
            args.target,
            dir.display()
        );
    };
    let path = dir.join(&id).join(EGRESS_LOG);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    print!("{text}");
    Ok(0)
}
