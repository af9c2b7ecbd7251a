//! The host's side of the bundles' supervisors: which running bottles can be asked, the
//! requests waiting for approval across them, and the answers (`bot-bottle approvals`,
//! `approve`, `deny`, and the waiting count `start` shows in the terminal's title).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::handle::{self, HandleError};
use crate::bundle::egress::approvals::{Answer, Pending};
use crate::bundle::supervisor::{self, SupervisorError};
use crate::host::paths::Dirs;
use crate::state::{BottleRow, StateDb};

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Handle(#[from] HandleError),
    #[error("bottle {id} has no loopback alias (its bundle has no supervisor to ask)")]
    NoAlias { id: String },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

/// A running bottle's supervisor, with the token that opens it.
#[derive(Debug, Clone)]
pub struct Supervised {
    pub id: String,
    pub bottle: String,
    pub addr: SocketAddr,
    token: String,
}

impl Supervised {
    /// The supervisor of bottle `row` (its token read from the bottle's directory).
    pub fn of(dirs: &Dirs, row: &BottleRow) -> Result<Self, SuperviseError> {
        let alias: Ipv4Addr = row
            .alias
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| SuperviseError::NoAlias { id: row.id.clone() })?;
        Self::at(dirs, &row.id, &row.bottle, alias)
    }

    /// The supervisor of bottle `id` (named `bottle`) on its loopback alias; an error until
    /// its bundle is created (the token is made then).
    pub fn at(
        dirs: &Dirs,
        id: &str,
        bottle: &str,
        alias: Ipv4Addr,
    ) -> Result<Self, SuperviseError> {
        let token = supervisor::read_token(&dirs.run_dir(id))?;
        Ok(Self {
            id: id.to_owned(),
            bottle: bottle.to_owned(),
            addr: SocketAddr::from((alias, crate::plan::SUPERVISOR_PORT)),
            token,
        })
    }

    /// Allows `rule` until the bottle stops (`bot-bottle allow`).
    pub async fn allow(&self, rule: &str) -> Result<String, SupervisorError> {
        supervisor::request_allow(self.addr, &self.token, rule).await
    }

    /// The rules in force, as JSON (`allow --list`).
    pub async fn rules(&self) -> Result<String, SupervisorError> {
        supervisor::request_rules(self.addr, &self.token).await
    }

    pub async fn pending(&self) -> Result<Vec<Pending>, SupervisorError> {
        supervisor::request_pending(self.addr, &self.token).await
    }

    pub async fn answer(&self, id: u64, answer: Answer) -> Result<Pending, SupervisorError> {
        supervisor::request_decide(self.addr, &self.token, id, answer).await
    }
}

/// The one running bottle `target` names (its id, or its name when only one runs).
pub fn one(dirs: &Dirs, target: &str) -> Result<Supervised, SuperviseError> {
    let db = StateDb::open_existing(&dirs.db_path()).map_err(HandleError::NoState)?;
    let row = handle::find_live(&db, target)?;
    Supervised::of(dirs, &row)
}

/// Every running bottle (or those `target` names) whose supervisor can be asked; none when
/// nothing runs. A bottle still starting (no token yet) is left out.
pub fn running(dirs: &Dirs, target: Option<&str>) -> Result<Vec<Supervised>, SuperviseError> {
    let Ok(db) = StateDb::open_existing(&dirs.db_path()) else {
        return Ok(Vec::new());
    };
    let rows = db.bottles().map_err(HandleError::from)?;
    Ok(rows
        .iter()
        .filter(|r| r.live && target.is_none_or(|t| r.id == t || r.bottle == t))
        .filter_map(|r| Supervised::of(dirs, r).ok())
        .collect())
}

/// A pending request and the bottle it waits in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// The bottle's id (`approve` takes it).
    pub bottle_id: String,
    /// The bottle's name (its manifest).
    pub bottle: String,
    #[serde(flatten)]
    pub request: Pending,
}

/// The requests waiting across `bottles`, oldest bottle first; a bottle whose supervisor does
/// not answer (it is stopping) is reported beside them, not fatal.
pub async fn waiting(bottles: &[Supervised]) -> (Vec<Waiting>, Vec<(String, SupervisorError)>) {
    let answers = futures_util::future::join_all(
        bottles
            .iter()
            .map(|b| async move { (b, b.pending().await) }),
    )
    .await;
    let (mut all, mut failed) = (Vec::new(), Vec::new());
    for (b, answer) in answers {
        match answer {
            Ok(pending) => all.extend(pending.into_iter().map(|request| Waiting {
                bottle_id: b.id.clone(),
                bottle: b.bottle.clone(),
                request,
            })),
            Err(e) => failed.push((b.id.clone(), e)),
        }
    }
    (all, failed)
}

/// How often `start` asks its bundle how many requests wait.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// While bottle `id` runs (a task `start` aborts when the session ends): the terminal's title
/// (OSC 2, when stderr is a terminal) says how many requests wait for approval, and each new
/// request is announced by a desktop notification where `notify-send` exists. Nothing is
/// written into the agent's screen itself.
pub async fn announce(dirs: Dirs, id: String, bottle: String, alias: Ipv4Addr) {
    let mut title = Title {
        on: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        pushed: false,
    };
    let notifier = notifier();
    let mut known = std::collections::HashSet::new();
    let mut shown = 0;
    let mut supervised = None;
    loop {
        tokio::time::sleep(ANNOUNCE_EVERY).await;
        // The token exists once the bundle is created; read once.
        if supervised.is_none() {
            supervised = Supervised::at(&dirs, &id, &bottle, alias).ok();
        }
        let Some(s) = &supervised else { continue };
        let Ok(pending) = s.pending().await else {
            continue;
        };
        for p in &pending {
            if known.insert(p.id) {
                if let Some(notify_send) = &notifier {
                    notify(notify_send, &bottle, p);
                }
            }
        }
        if pending.len() != shown {
            shown = pending.len();
            title.show(&bottle, shown);
        }
    }
}

/// The terminal's title while requests wait: the user's own title is pushed on the terminal's
/// title stack (XTWINOPS 22) and popped back (23) once none waits or the session ends.
struct Title {
    on: bool,
    pushed: bool,
}

impl Title {
    fn show(&mut self, bottle: &str, waiting: usize) {
        if !self.on {
            return;
        }
        let (sequence, pushed) = title_sequence(bottle, waiting, self.pushed);
        self.pushed = pushed;
        write_terminal(&sequence);
    }
}

impl Drop for Title {
    fn drop(&mut self) {
        if self.on && self.pushed {
            write_terminal(&title_sequence("", 0, true).0);
        }
    }
}

fn write_terminal(sequence: &str) {
    use std::io::Write as _;
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(sequence.as_bytes());
    let _ = err.flush();
}

/// The bytes that show `waiting` requests of `bottle` in the title, given whether the user's
/// title is pushed already; and whether it is pushed after them. None waiting: a plain title
/// first (for terminals without a title stack), then the pop.
fn title_sequence(bottle: &str, waiting: usize, pushed: bool) -> (String, bool) {
    match (waiting, pushed) {
        (0, false) => (String::new(), false),
        (0, true) => (format!("\x1b]2;bot-bottle {bottle}\x07\x1b[23;2t"), false),
        (n, pushed) => {
            let push = if pushed { "" } else { "\x1b[22;2t" };
            let s = if n == 1 { "" } else { "s" };
            (
                format!(
                    "{push}\x1b]2;bot-bottle {bottle}: {n} request{s} waiting for approval (bot-bottle approvals)\x07"
                ),
                true,
            )
        }
    }
}

/// `notify-send` on PATH, when there is a desktop session to show it in.
fn notifier() -> Option<std::path::PathBuf> {
    let desktop = ["DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if !desktop {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("notify-send"))
        .find(|p| p.is_file())
}

fn notify(notify_send: &std::path::Path, bottle: &str, p: &Pending) {
    let summary = format!("bot-bottle {bottle}: a request waits for approval");
    let carrying = match &p.secret {
        Some(secret) => format!(" carrying a secret ({secret})"),
        None => String::new(),
    };
    let body = format!(
        "{} {}:{}{carrying} — run `bot-bottle approvals`",
        p.method, p.host, p.port
    );
    // Not waited for; a notifier that fails costs nothing but the notification.
    let spawned = tokio::process::Command::new(notify_send)
        .args(["--app-name=bot-bottle", &summary, &body])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "notify-send failed");
    }
}

#[cfg(test)]
mod tests {
    use super::title_sequence;

    #[test]
    fn the_title_is_pushed_once_updated_and_popped_when_none_waits() {
        let (first, pushed) = title_sequence("b", 1, false);
        assert!(pushed);
        assert!(first.starts_with("\x1b[22;2t\x1b]2;"), "{first:?}");
        assert!(
            first.contains("b: 1 request waiting for approval"),
            "{first:?}"
        );
        let (more, pushed) = title_sequence("b", 2, true);
        assert!(pushed && !more.contains("\x1b[22;2t"), "{more:?}");
        assert!(more.contains("2 requests waiting"), "{more:?}");
        let (none, pushed) = title_sequence("b", 0, true);
        assert!(!pushed);
        assert!(none.ends_with("\x1b[23;2t"), "{none:?}");
        assert_eq!(title_sequence("b", 0, false), (String::new(), false));
    }
}
