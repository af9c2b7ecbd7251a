//! The state database: one SQLite file in the state dir (WAL mode, versioned migrations).
//!
//! Tables: `bottles` (one row per bottle run: plan, owner process, lifecycle), `machines` (one
//! row per microVM: guest CID and the allowlist the VMM enforces), `leases` (loopback aliases
//! held by running processes).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::plan::{derive_cid, AllowEntry, RESERVED_CIDS};

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many CIDs we derive before declaring the space hopelessly crowded.
const MAX_CID_ATTEMPTS: u32 = 64;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE bottles (
        id TEXT PRIMARY KEY,
        bottle TEXT NOT NULL,
        backend TEXT NOT NULL,
        alias TEXT,
        status TEXT NOT NULL,
        pid INTEGER NOT NULL,
        pid_start INTEGER NOT NULL,
        plan_json TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE machines (
        name TEXT PRIMARY KEY,
        bottle_id TEXT NOT NULL,
        guest_cid INTEGER NOT NULL UNIQUE,
        allowlist_json TEXT NOT NULL
    );
    CREATE TABLE leases (
        alias TEXT PRIMARY KEY,
        bottle_id TEXT NOT NULL,
        pid INTEGER NOT NULL,
        pid_start INTEGER NOT NULL
    );",
];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state database {path}: check the directory is writable, or remove a corrupt file")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the state database {path} does not exist: refusing to start a machine without it (fail closed)"
    )]
    Missing { path: PathBuf },
    #[error("state database query failed ({what})")]
    Query {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the state database {path} was written by a newer bot-bottle (schema {found}, this one knows {known}): upgrade bot-bottle")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("no machine row for {machine}: refusing to boot a VM whose allowlist cannot be verified (fail closed)")]
    MachineMissing { machine: String },
    #[error(
        "allowlist of machine {machine} does not match what was requested (stored {stored}, requested {requested}): \
         refusing to boot (fail closed)"
    )]
    AllowlistMismatch {
        machine: String,
        stored: String,
        requested: String,
    },
    #[error("stored allowlist of machine {machine} is unreadable: refusing to boot (fail closed)")]
    AllowlistCorrupt {
        machine: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not find a free guest CID for {bottle_id} after {MAX_CID_ATTEMPTS} attempts: run `bot-bottle cleanup`")]
    CidExhausted { bottle_id: String },
}

fn query(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
    move |source| StateError::Query { what, source }
}

/// A process identity that survives PID reuse: (pid, start time in clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    /// The current process.
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    }

    /// Whether this exact process is still running.
    pub fn is_alive(&self) -> bool {
        process_start(self.pid) == Some(self.start)
    }
}

/// Field 22 of /proc/PID/stat: the process start time. `None` when the process is gone.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let state = rest.split(' ').next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    rest.split(' ').nth(19)?.parse().ok()
}

/// Where a bottle is in its life, as `list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Its `start` is allocating, building, booting.
    Starting,
    /// The agent is up: `exec`, `cp` and `diff` may reach it.
    Running,
    /// Its `start` is gone and something of it remains (never stored: derived by `list`).
    Orphaned,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Orphaned => "orphaned",
        }
    }

    /// A stored status; an unknown one (a newer bot-bottle's) reads as starting: not
    /// reachable yet, still listed.
    fn from_stored(text: &str) -> Status {
        match text {
            "running" => Status::Running,
            "orphaned" => Status::Orphaned,
            _ => Status::Starting,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bottle row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BottleRow {
    pub id: String,
    pub bottle: String,
    pub backend: String,
    pub alias: Option<String>,
    pub status: Status,
    pub pid: u32,
    #[serde(skip)]
    pub pid_start: u64,
    pub created_at: i64,
    pub live: bool,
}

pub struct StateDb {
    conn: Connection,
    path: PathBuf,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl StateDb {
    /// Open (creating if needed) and migrate the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let conn = Connection::open(path).map_err(|source| StateError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(conn, path)
    }

    /// Open an existing database; a missing file is an error (used where failing closed matters).
    /// The database at `path` when there is one (`None`: no bottle has run in this state
    /// directory yet).
    pub fn open_if_exists(path: &Path) -> Result<Option<Self>, StateError> {
        if path.is_file() {
            Self::open_existing(path).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn open_existing(path: &Path) -> Result<Self, StateError> {
        if !path.is_file() {
            return Err(StateError::Missing {
                path: path.to_path_buf(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StateError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(conn, path)
    }

    fn init(conn: Connection, path: &Path) -> Result<Self, StateError> {
        let open_err = |source| StateError::Open {
            path: path.to_path_buf(),
            source,
        };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        let mut db = Self {
            conn,
            path: path.to_path_buf(),
        };
        db.migrate()?;
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn migrate(&mut self) -> Result<(), StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(query("begin migration"))?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(query("read schema version"))?;
        if version as usize > MIGRATIONS.len() {
            return Err(StateError::NewerSchema {
                path: self.path.clone(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).map_err(query("apply migration"))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(query("record schema version"))?;
        }
        tx.commit().map_err(query("commit migration"))
    }

    pub fn schema_version(&self) -> Result<i64, StateError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(query("read schema version"))
    }

    // ---- bottles ----------------------------------------------------------------------------

    pub fn insert_bottle(
        &self,
        id: &str,
        bottle: &str,
        backend: &str,
        alias: Option<Ipv4Addr>,
        owner: Owner,
        plan_json: &str,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO bottles (id, bottle, backend, alias, status, pid, pid_start, plan_json, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'starting', ?5, ?6, ?7, ?8)",
                params![
                    id,
                    bottle,
                    backend,
                    alias.map(|a| a.to_string()),
                    owner.pid,
                    owner.start as i64,
                    plan_json,
                    now_unix()
                ],
            )
            .map_err(query("insert bottle"))?;
        Ok(())
    }

    pub fn set_plan(&self, id: &str, plan_json: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "UPDATE bottles SET plan_json = ?2 WHERE id = ?1",
                params![id, plan_json],
            )
            .map_err(query("update bottle plan"))?;
        Ok(())
    }

    pub fn plan_json(&self, id: &str) -> Result<Option<String>, StateError> {
        self.conn
            .query_row(
                "SELECT plan_json FROM bottles WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(query("read bottle plan"))
    }

    pub fn set_status(&self, id: &str, status: Status) -> Result<(), StateError> {
        self.conn
            .execute(
                "UPDATE bottles SET status = ?2 WHERE id = ?1",
                params![id, status.as_str()],
            )
            .map_err(query("update bottle status"))?;
        Ok(())
    }

    /// Delete a bottle and everything keyed to it (machine rows, leases).
    pub fn delete_bottle(&self, id: &str) -> Result<(), StateError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(query("begin delete bottle"))?;
        let result = (|| {
            self.conn
                .execute("DELETE FROM machines WHERE bottle_id = ?1", params![id])?;
            self.conn
                .execute("DELETE FROM leases WHERE bottle_id = ?1", params![id])?;
            self.conn
                .execute("DELETE FROM bottles WHERE id = ?1", params![id])?;
            self.conn.execute_batch("COMMIT")
        })();
        if result.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        result.map_err(query("delete bottle"))
    }

    pub fn bottles(&self) -> Result<Vec<BottleRow>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, bottle, backend, alias, status, pid, pid_start, created_at
                 FROM bottles ORDER BY created_at, id",
            )
            .map_err(query("list bottles"))?;
        let rows = stmt
            .query_map([], |r| {
                let pid: u32 = r.get(5)?;
                let pid_start: i64 = r.get(6)?;
                Ok(BottleRow {
                    id: r.get(0)?,
                    bottle: r.get(1)?,
                    backend: r.get(2)?,
                    alias: r.get(3)?,
                    status: Status::from_stored(&r.get::<_, String>(4)?),
                    pid,
                    pid_start: pid_start as u64,
                    created_at: r.get(7)?,
                    live: Owner {
                        pid,
                        start: pid_start as u64,
                    }
                    .is_alive(),
                })
            })
            .map_err(query("list bottles"))?;
        rows.collect::<Result<_, _>>()
            .map_err(query("read bottle row"))
    }

    // ---- leases (loopback aliases) ----------------------------------------------------------

    /// Every lease row: (alias, bottle id, owner), ordered by alias.
    pub fn leases(&self) -> Result<Vec<(String, String, Owner)>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT alias, bottle_id, pid, pid_start FROM leases ORDER BY alias")
            .map_err(query("list leases"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    Owner {
                        pid: r.get(2)?,
                        start: r.get::<_, i64>(3)? as u64,
                    },
                ))
            })
            .map_err(query("list leases"))?;
        rows.collect::<Result<_, _>>()
            .map_err(query("read lease row"))
    }

    /// Aliases held by a live process, with the bottle holding each.
    pub fn live_leases(&self) -> Result<Vec<(Ipv4Addr, String)>, StateError> {
        Ok(self
            .leases()?
            .into_iter()
            .filter(|(_, _, owner)| owner.is_alive())
            .filter_map(|(alias, bottle, _)| alias.parse().ok().map(|a| (a, bottle)))
            .collect())
    }

    pub fn insert_lease(
        &self,
        alias: Ipv4Addr,
        bottle_id: &str,
        owner: Owner,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO leases (alias, bottle_id, pid, pid_start) VALUES (?1, ?2, ?3, ?4)",
                params![alias.to_string(), bottle_id, owner.pid, owner.start as i64],
            )
            .map_err(query("insert lease"))?;
        Ok(())
    }

    pub fn delete_lease(&self, alias: Ipv4Addr, bottle_id: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "DELETE FROM leases WHERE alias = ?1 AND bottle_id = ?2",
                params![alias.to_string(), bottle_id],
            )
            .map_err(query("delete lease"))?;
        Ok(())
    }

    /// Remove leases whose process is gone; returns how many.
    pub fn prune_dead_leases(&self) -> Result<usize, StateError> {
        let dead: Vec<(String, String)> = self
            .leases()?
            .into_iter()
            .filter(|(_, _, owner)| !owner.is_alive())
            .map(|(a, b, _)| (a, b))
            .collect();
        for (alias, bottle) in &dead {
            self.conn
                .execute(
                    "DELETE FROM leases WHERE alias = ?1 AND bottle_id = ?2",
                    params![alias, bottle],
                )
                .map_err(query("delete lease"))?;
        }
        Ok(dead.len())
    }

    // ---- machines ---------------------------------------------------------------------------

    /// Allocate a guest CID for `bottle_id` and create its machine row (empty allowlist).
    /// The CID is derived from the id; a clash with a live row re-derives it.
    pub fn create_machine(&self, machine: &str, bottle_id: &str) -> Result<u32, StateError> {
        for attempt in 0..MAX_CID_ATTEMPTS {
            let cid = derive_cid(bottle_id, attempt);
            debug_assert!(!RESERVED_CIDS.contains(&cid));
            let taken: Option<String> = self
                .conn
                .query_row(
                    "SELECT name FROM machines WHERE guest_cid = ?1",
                    params![cid],
                    |r| r.get(0),
                )
                .optional()
                .map_err(query("look up guest CID"))?;
            if taken.is_some() {
                continue;
            }
            self.conn
                .execute(
                    "INSERT INTO machines (name, bottle_id, guest_cid, allowlist_json) VALUES (?1, ?2, ?3, '[]')",
                    params![machine, bottle_id, cid],
                )
                .map_err(query("insert machine"))?;
            return Ok(cid);
        }
        Err(StateError::CidExhausted {
            bottle_id: bottle_id.to_owned(),
        })
    }

    pub fn machine_cid(&self, machine: &str) -> Result<Option<u32>, StateError> {
        self.conn
            .query_row(
                "SELECT guest_cid FROM machines WHERE name = ?1",
                params![machine],
                |r| r.get(0),
            )
            .optional()
            .map_err(query("read machine"))
    }

    /// Read a machine's allowlist. Missing row or unreadable JSON is an error (fail closed).
    pub fn read_allowlist(&self, machine: &str) -> Result<Vec<AllowEntry>, StateError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT allowlist_json FROM machines WHERE name = ?1",
                params![machine],
                |r| r.get(0),
            )
            .optional()
            .map_err(query("read allowlist"))?;
        let json = json.ok_or_else(|| StateError::MachineMissing {
            machine: machine.to_owned(),
        })?;
        serde_json::from_str(&json).map_err(|source| StateError::AllowlistCorrupt {
            machine: machine.to_owned(),
            source,
        })
    }

    /// Write the requested allowlist to the machine's row, read it back and compare.
    /// Any difference, a missing row, or a DB error refuses the start.
    pub fn verify_allowlist(
        &self,
        machine: &str,
        requested: &[AllowEntry],
    ) -> Result<Vec<AllowEntry>, StateError> {
        let mut want = requested.to_vec();
        want.sort();
        let json = serde_json::to_string(&want).expect("allowlist serialises");
        let changed = self
            .conn
            .execute(
                "UPDATE machines SET allowlist_json = ?2 WHERE name = ?1",
                params![machine, json],
            )
            .map_err(query("write allowlist"))?;
        if changed != 1 {
            return Err(StateError::MachineMissing {
                machine: machine.to_owned(),
            });
        }
        let mut stored = self.read_allowlist(machine)?;
        stored.sort();
        if stored != want {
            return Err(StateError::AllowlistMismatch {
                machine: machine.to_owned(),
                stored: describe(&stored),
                requested: describe(&want),
            });
        }
        Ok(stored)
    }

    /// Direct SQL access for tests that corrupt the database on purpose.
    #[doc(hidden)]
    pub fn raw(&self) -> &Connection {
        &self.conn
    }
}

fn describe(entries: &[AllowEntry]) -> String {
    if entries.is_empty() {
        return "nothing".to_owned();
    }
    entries
        .iter()
        .map(|e| format!("{}:{}", e.cidr, e.port))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, StateDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("state.db")).unwrap();
        (dir, db)
    }

    fn allow(port: u16) -> AllowEntry {
        AllowEntry {
            cidr: "127.0.0.16/32".into(),
            port,
        }
    }

    #[test]
    fn database_uses_wal_and_latest_schema() {
        let (_d, db) = db();
        let mode: String = db
            .raw()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    #[test]
    fn reopening_does_not_rerun_migrations() {
        let (dir, db) = db();
        db.create_machine("m", "b").unwrap();
        drop(db);
        let db = StateDb::open(&dir.path().join("state.db")).unwrap();
        assert!(db.machine_cid("m").unwrap().is_some());
    }

    #[test]
    fn newer_schema_is_refused() {
        let (dir, db) = db();
        db.raw().pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        let err = StateDb::open(&dir.path().join("state.db")).err().unwrap();
        assert!(matches!(err, StateError::NewerSchema { found: 99, .. }));
    }

    #[test]
    fn verify_allowlist_round_trips_the_requested_entries() {
        let (_d, db) = db();
        db.create_machine("m", "b").unwrap();
        let got = db
            .verify_allowlist("m", &[allow(3128), allow(7070)])
            .unwrap();
        assert_eq!(got, vec![allow(3128), allow(7070)]);
        assert_eq!(db.read_allowlist("m").unwrap(), got);
    }

    #[test]
    fn verify_allowlist_without_machine_row_fails_closed() {
        let (_d, db) = db();
        let err = db.verify_allowlist("ghost", &[allow(3128)]).unwrap_err();
        assert!(matches!(err, StateError::MachineMissing { .. }));
    }

    #[test]
    fn verify_allowlist_detects_a_row_changed_behind_its_back() {
        let (_d, db) = db();
        db.create_machine("m", "b").unwrap();
        // A trigger rewrites whatever is written: the read-back must notice.
        db.raw()
            .execute_batch(
                "CREATE TRIGGER widen AFTER UPDATE ON machines BEGIN
                   UPDATE machines SET allowlist_json = '[{\"cidr\":\"0.0.0.0/0\",\"port\":3128}]' WHERE name = NEW.name;
                 END;",
            )
            .unwrap();
        let err = db.verify_allowlist("m", &[allow(3128)]).unwrap_err();
        assert!(matches!(err, StateError::AllowlistMismatch { .. }), "{err}");
        assert!(err.to_string().contains("0.0.0.0/0"));
    }

    #[test]
    fn verify_allowlist_with_corrupt_stored_json_fails_closed() {
        let (_d, db) = db();
        db.create_machine("m", "b").unwrap();
        db.raw()
            .execute_batch(
                "CREATE TRIGGER garble AFTER UPDATE ON machines BEGIN
                   UPDATE machines SET allowlist_json = 'not json' WHERE name = NEW.name;
                 END;",
            )
            .unwrap();
        let err = db.verify_allowlist("m", &[allow(3128)]).unwrap_err();
        assert!(matches!(err, StateError::AllowlistCorrupt { .. }), "{err}");
    }

    #[test]
    fn open_existing_on_missing_database_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let err = StateDb::open_existing(&dir.path().join("nope.db"))
            .err()
            .unwrap();
        assert!(matches!(err, StateError::Missing { .. }));
    }

    #[test]
    fn unreadable_database_file_fails_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        std::fs::write(&path, b"this is not an sqlite database, just some bytes...").unwrap();
        assert!(StateDb::open_existing(&path).is_err());
    }

    #[test]
    fn cid_collision_with_a_live_row_rederives() {
        let (_d, db) = db();
        let first = derive_cid("b", 0);
        db.raw()
            .execute(
                "INSERT INTO machines (name, bottle_id, guest_cid, allowlist_json) VALUES ('other', 'x', ?1, '[]')",
                params![first],
            )
            .unwrap();
        let cid = db.create_machine("m", "b").unwrap();
        assert_eq!(cid, derive_cid("b", 1));
        assert_ne!(cid, first);
    }

    #[test]
    fn delete_bottle_removes_its_machine_and_leases() {
        let (_d, db) = db();
        let me = Owner::current();
        db.insert_bottle("b", "test", "docker", None, me, "{}")
            .unwrap();
        db.create_machine("m", "b").unwrap();
        db.insert_lease(Ipv4Addr::new(127, 0, 0, 16), "b", me)
            .unwrap();
        db.delete_bottle("b").unwrap();
        assert!(db.bottles().unwrap().is_empty());
        assert!(db.machine_cid("m").unwrap().is_none());
        assert!(db.live_leases().unwrap().is_empty());
    }

    #[test]
    fn owner_of_this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(Owner::current().is_alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let owner = Owner {
            pid: child.id(),
            start: process_start(child.id()).unwrap_or(0),
        };
        child.wait().unwrap();
        assert!(!owner.is_alive());
    }
}
