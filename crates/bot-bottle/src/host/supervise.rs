//! The host's side of the bundles' supervisors: which running bottles can be asked, the
//! requests waiting for approval across them, and the answers (`bot-bottle approvals`,
//! `approve`, `deny`, and the waiting count `start` shows in the terminal's title).

use std::net::{Ipv4Addr, SocketAddr};

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
        let token = supervisor::read_token(&dirs.run_dir(&row.id))?;
        Ok(Self {
            id: row.id.clone(),
            bottle: row.bottle.clone(),
            addr: SocketAddr::from((alias, crate::plan::SUPERVISOR_PORT)),
            token,
        })
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
