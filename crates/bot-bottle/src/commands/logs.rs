//! `bot-bottle logs <bottle> [--json] [--follow]`: the egress proxy's decisions, one line each.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bot_bottle::egress::EgressEvent;
use bot_bottle::sidecar::EGRESS_LOG;
use bot_bottle::state::StateDb;

use super::Context;

/// How often `--follow` looks for new lines and for the bottle's end.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Bottle id, or bottle name (the most recent run of that name).
    target: String,
    /// Show the egress proxy's decisions (the only log for now).
    #[arg(long, default_value_t = true)]
    egress: bool,
    /// Print the events as they are stored: one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Keep printing new events until the bottle stops (or Ctrl-C).
    #[arg(long, short)]
    follow: bool,
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
    // The older part of a rotated log first (see `EventLog`), then the current one.
    let mut older = Printer {
        json: args.json,
        pending: Vec::new(),
        offset: 0,
    };
    older.print_new(&bot_bottle::egress::events::previous_part(&path))?;
    let mut printer = Printer {
        json: args.json,
        pending: Vec::new(),
        offset: 0,
    };
    printer.print_new(&path)?;
    if args.follow {
        // Until the bottle's state row is gone (it stopped), then what it wrote last.
        while is_running(ctx, &id) {
            tokio::time::sleep(FOLLOW_POLL).await;
            printer.print_new(&path)?;
        }
        printer.print_new(&path)?;
    }
    Ok(0)
}

fn is_running(ctx: &Context, id: &str) -> bool {
    StateDb::open(&ctx.dirs.db_path())
        .and_then(|db| db.bottles())
        .is_ok_and(|rows| rows.iter().any(|r| r.id == id && r.live))
}

/// Prints the complete lines appended to the log since the last call.
struct Printer {
    json: bool,
    /// A line still being written when last read.
    pending: Vec<u8>,
    offset: u64,
}

impl Printer {
    fn print_new(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // Shorter than what was read: the log rotated, this is a new file. (Lines written to
        // the old one after the last look are not shown.)
        if file.metadata().is_ok_and(|m| m.len() < self.offset) {
            self.offset = 0;
            self.pending.clear();
        }
        file.seek(SeekFrom::Start(self.offset))
            .with_context(|| format!("reading {}", path.display()))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh)
            .with_context(|| format!("reading {}", path.display()))?;
        self.offset += fresh.len() as u64;
        self.pending.extend_from_slice(&fresh);
        let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let complete: Vec<u8> = self.pending.drain(..=end).collect();
        let mut out = std::io::stdout().lock();
        for line in complete.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let text = String::from_utf8_lossy(line);
            let shown = match (self.json, serde_json::from_str::<EgressEvent>(&text)) {
                (false, Ok(event)) => event.human(),
                // Raw when asked, or when a line is not an event (shown, never dropped).
                _ => text.into_owned(),
            };
            if writeln!(out, "{shown}").is_err() {
                // The reader went away (e.g. `| head`): nothing more to show.
                return Ok(());
            }
        }
        let _ = out.flush();
        Ok(())
    }
}
