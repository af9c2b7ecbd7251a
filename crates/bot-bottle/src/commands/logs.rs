//! `bot-bottle logs <bottle> [--json] [--follow]`: the egress proxy's decisions, one line each.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bot_bottle::bundle::egress::EgressEvent;
use bot_bottle::bundle::gate::policy::GateEvent;
use bot_bottle::state::StateDb;

use super::Context;

/// How often `--follow` looks for new lines and for the bottle's end.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Bottle id, or bottle name (the most recent run of that name).
    target: String,
    /// Show the egress proxy's decisions (the default).
    #[arg(long, default_value_t = true)]
    egress: bool,
    /// Show the git gate's pushes instead: accepted, refused (with the reason), landed.
    #[arg(long)]
    git: bool,
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
    let Some(id) = bot_bottle::state::retention::newest_run(&dir, &args.target) else {
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
    let run = ctx.dirs.run_dir(&id);
    let path = match args.git {
        true => run.gate_log(),
        false => run.egress_log(),
    };
    // A rotated log's parts in order (see `EventLog`): the run's first part, the previous
    // one, then the current one. (The gate's log does not rotate: one line per ref pushed.)
    let parts = match args.git {
        true => vec![],
        false => vec![
            bot_bottle::bundle::egress::events::first_part(&path),
            bot_bottle::bundle::egress::events::previous_part(&path),
        ],
    };
    for part in parts {
        let mut older = Printer {
            json: args.json,
            pending: Vec::new(),
            offset: 0,
        };
        older.print_new(&part)?;
    }
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
            if writeln!(out, "{}", render(line, self.json)).is_err() {
                // The reader went away (e.g. `| head`): nothing more to show.
                return Ok(());
            }
        }
        let _ = out.flush();
        Ok(())
    }
}

/// One log line as shown: the event for a person (or the stored JSON with `--json`, or the
/// raw line when it is not an event: shown, never dropped), with every character that could
/// act on the terminal escaped (see [`escape_for_terminal`]).
fn render(line: &[u8], json: bool) -> String {
    let text = String::from_utf8_lossy(line);
    let shown = match (json, serde_json::from_str::<EgressEvent>(&text)) {
        (false, Ok(event)) => event.human(),
        (false, Err(_)) => match serde_json::from_str::<GateEvent>(&text) {
            Ok(event) => gate_human(&event),
            Err(_) => text.into_owned(),
        },
        _ => text.into_owned(),
    };
    escape_for_terminal(&shown)
}

/// Characters the agent could use to spoof what the user's terminal shows: C0 and C1 controls
/// and DEL (ESC starts escape sequences, BEL rings, CR and BS overwrite), bidirectional
/// embeddings, overrides, isolates and marks (U+202E shows text backwards), invisible
/// format characters, line and paragraph separators, and tag characters.
fn acts_on_terminal(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// `text` with each character of [`acts_on_terminal`] written as `\uXXXX` (UTF-16 units, so
/// a `--json` line stays valid JSON with the same meaning).
fn escape_for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if acts_on_terminal(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A gate event for a person: `<time> git <event> <ref> <old>..<new>` or the refusal's reason.
fn gate_human(e: &GateEvent) -> String {
    let short = |oid: &Option<String>| oid.as_deref().map(|o| o[..o.len().min(10)].to_owned());
    let mut line = format!("{} git {:<8} {}", e.time, e.event, e.refname);
    if let (Some(old), Some(new)) = (short(&e.old), short(&e.new)) {
        line.push_str(&format!(" {old}..{new}"));
    }
    if let Some(detail) = &e.detail {
        line.push_str(&format!(": {detail}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPOOF: &str = "evil\u{1b}[2J\u{7}\u{202e}moc.elgoog\u{2066}\r\u{9b}31m.test";

    fn event_line(host: &str) -> Vec<u8> {
        let mut event = EgressEvent::now("b1", "c", "CONNECT", host, 443);
        event.verdict = "deny".into();
        event.reason = "not_allowed".into();
        event.detail = Some(host.to_owned());
        serde_json::to_vec(&event).unwrap()
    }

    #[test]
    fn control_and_bidi_characters_are_escaped_in_both_forms() {
        let line = event_line(SPOOF);

        let shown = [render(&line, false), render(&line, true)];

        for text in &shown {
            assert!(!text.chars().any(acts_on_terminal), "{text:?}");
            assert!(
                text.contains("evil\\u001b[2J\\u0007\\u202emoc.elgoog\\u2066"),
                "{text}"
            );
        }
        let parsed: EgressEvent = serde_json::from_str(&shown[1]).unwrap();
        assert_eq!(parsed.host, SPOOF);
    }

    #[test]
    fn a_line_that_is_no_event_is_shown_escaped() {
        assert_eq!(
            render(b"not json \x1b]0;title\x07", false),
            "not json \\u001b]0;title\\u0007"
        );
    }

    #[test]
    fn characters_outside_the_basic_plane_are_escaped_as_surrogate_pairs() {
        assert_eq!(escape_for_terminal("a\u{E0041}b"), "a\\udb40\\udc41b");
        assert_eq!(escape_for_terminal("bücher ok"), "bücher ok");
    }
}
