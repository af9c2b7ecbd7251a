//! Bottles whose `start` is gone (PRD 0007): finding them, and removing what they left.
//!
//! Three places remove an orphan with the same code ([`remove_bottle`]): the bottle's reaper
//! (a small process `start` spawns in its own session, which wakes when `start`'s end of a
//! pipe closes, however `start` died), `cleanup` and `stop`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use crate::host::docker::{self, DockerError};
use crate::host::paths::Dirs;
use crate::state::{BottleRow, StateDb, StateError, Status};

/// What `start` writes to its reaper after a teardown that left nothing behind: the reaper
/// then exits without touching anything.
pub const ALL_CLEAN: &[u8] = b"clean\n";
/// How long the reaper waits between its passes over the bottle's Docker objects: a create
/// `start` sent just before it died may land in the engine after the first pass.
pub const REAP_PASS_INTERVAL: Duration = Duration::from_secs(1);
/// How long the reaper waits, after the pipe closed, for `start` to be gone from /proc (a
/// SIGKILLed process's descriptors close before it becomes a zombie).
pub const START_EXIT_GRACE: Duration = Duration::from_secs(5);
/// How many passes in a row must find nothing before the reaper is done.
pub const REAP_EMPTY_PASSES: usize = 3;
/// The most passes the reaper makes (then `cleanup` finds what is left, with its row).
pub const REAP_MAX_PASSES: usize = 10;
/// Set by `start` on its VMM child: the parent's pid. The child asks the kernel to send it
/// SIGTERM when that parent ends (PR_SET_PDEATHSIG), and refuses to run if it already has.
pub const PARENT_PID_ENV: &str = "BOT_BOTTLE_PARENT_PID";
/// The hidden subcommand that runs the reaper.
pub const REAPER_SUBCOMMAND: &str = "__reaper";

#[derive(Debug, thiserror::Error)]
pub enum OrphansError {
    #[error("cannot start the reaper of bottle {bottle_id} ({exe}): check the bot-bottle executable is still there")]
    SpawnReaper {
        bottle_id: String,
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot ask to be stopped when start ends (PR_SET_PDEATHSIG)")]
    DeathSignal(#[source] nix::Error),
    #[error("start (pid {parent}, from {PARENT_PID_ENV}) ended before the VMM began: not booting")]
    ParentGone { parent: String },
    #[error("cannot remove the Docker objects of bottle {bottle_id}: run `bot-bottle cleanup {bottle_id}` again")]
    Docker {
        bottle_id: String,
        #[source]
        source: DockerError,
    },
    #[error("cannot remove the state row of bottle {bottle_id}: run `bot-bottle cleanup {bottle_id}` again")]
    State {
        bottle_id: String,
        #[source]
        source: StateError,
    },
}

/// For a VMM child (ours, or a test's stand-in): with `start` gone, however it went (SIGKILL
/// included), the VM must not run on unseen. When `start` passed its pid in
/// [`PARENT_PID_ENV`], ask the kernel to send `signal` to this process when its parent ends,
/// and refuse to go on if that parent already has (the request would come too late). Without
/// the variable (the VMM run by hand), nothing.
pub fn die_with_parent(signal: nix::sys::signal::Signal) -> Result<(), OrphansError> {
    let Ok(parent) = std::env::var(PARENT_PID_ENV) else {
        return Ok(());
    };
    nix::sys::prctl::set_pdeathsig(signal).map_err(OrphansError::DeathSignal)?;
    if nix::unistd::getppid().as_raw().to_string() != parent {
        return Err(OrphansError::ParentGone { parent });
    }
    Ok(())
}

/// A bottle as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    pub id: String,
    pub bottle: String,
    pub backend: String,
    pub alias: Option<String>,
    /// `starting`/`running` while its `start` lives; `orphaned` once it is gone.
    pub status: Status,
    pub pid: u32,
    pub created_at: i64,
    pub live: bool,
    /// Docker containers of this bottle (by label) that exist now.
    pub containers: Vec<String>,
    /// What to do about it, for orphans.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn hint(id: &str) -> String {
    format!("its `start` is gone: run `bot-bottle cleanup {id}` (or `bot-bottle cleanup`)")
}

/// Every bottle of this state directory: the rows, and bottles that have Docker objects but no
/// row (a row removed while its agent ran is still listed). A bottle whose `start` is gone is
/// `orphaned`. `containers` maps bottle id to container names, `networks` lists the ids that
/// own a network, `names` the bottle name from the objects' labels.
pub fn classify(
    rows: Vec<BottleRow>,
    containers: &BTreeMap<String, Vec<String>>,
    networks: &BTreeSet<String>,
    names: &BTreeMap<String, String>,
) -> Vec<Listed> {
    let mut listed: Vec<Listed> = rows
        .into_iter()
        .map(|r| {
            let status = if r.live { r.status } else { Status::Orphaned };
            Listed {
                hint: (!r.live).then(|| hint(&r.id)),
                containers: containers.get(&r.id).cloned().unwrap_or_default(),
                id: r.id,
                bottle: r.bottle,
                backend: r.backend,
                alias: r.alias,
                status,
                pid: r.pid,
                created_at: r.created_at,
                live: r.live,
            }
        })
        .collect();
    let known: BTreeSet<String> = listed.iter().map(|l| l.id.clone()).collect();
    let unknown: BTreeSet<&String> = containers
        .keys()
        .chain(networks.iter())
        .filter(|id| !known.contains(*id))
        .collect();
    for id in unknown {
        listed.push(Listed {
            id: id.clone(),
            bottle: names.get(id).cloned().unwrap_or_else(|| "?".to_owned()),
            backend: "?".to_owned(),
            alias: None,
            status: Status::Orphaned,
            pid: 0,
            created_at: 0,
            live: false,
            containers: containers.get(id).cloned().unwrap_or_default(),
            hint: Some(hint(id)),
        });
    }
    listed
}

/// The Docker objects of this state directory, grouped by bottle id: (containers, networks,
/// bottle names from the labels).
pub async fn docker_objects(
    docker: &bollard::Docker,
    state_tag: &str,
) -> Result<
    (
        BTreeMap<String, Vec<String>>,
        BTreeSet<String>,
        BTreeMap<String, String>,
    ),
    DockerError,
> {
    let scope = docker::Scope::state(state_tag);
    let mut containers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut names = BTreeMap::new();
    for c in docker::managed_containers(docker, scope).await? {
        names.insert(c.bottle_id.clone(), c.bottle.clone());
        containers.entry(c.bottle_id).or_default().push(c.name);
    }
    let networks = docker::managed_networks(docker, scope)
        .await?
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    Ok((containers, networks, names))
}

/// Remove everything of bottle `bottle_id`: the sockets a killed VMM left in its run directory
/// (the logs stay, for `logs`), its containers and networks (by label), then its state row with
/// its machine row and lease (with any other lease whose owner is gone). Keeps going past failures and returns them all.
/// The caller has checked that the bottle's `start` is gone.
pub async fn remove_bottle(
    docker: &bollard::Docker,
    db: Option<&StateDb>,
    dirs: &Dirs,
    bottle_id: &str,
) -> Vec<OrphansError> {
    dirs.run_dir(bottle_id).remove_sockets();
    let mut errors: Vec<OrphansError> = docker::remove_bottle_objects(docker, bottle_id)
        .await
        .into_iter()
        .map(|source| OrphansError::Docker {
            bottle_id: bottle_id.to_owned(),
            source,
        })
        .collect();
    // The row stays while objects remain, so `list` and `cleanup` still find the bottle.
    if errors.is_empty() {
        if let Some(db) = db {
            // The row, then the leases whose owner is gone (this bottle's among them).
            if let Err(source) = db
                .delete_bottle(bottle_id)
                .and_then(|()| db.prune_dead_leases().map(drop))
            {
                errors.push(OrphansError::State {
                    bottle_id: bottle_id.to_owned(),
                    source,
                });
            }
        }
    }
    errors
}

/// Whether bottle `bottle_id` still has a container or network.
pub async fn has_objects(docker: &bollard::Docker, bottle_id: &str) -> Result<bool, DockerError> {
    let scope = docker::Scope::bottle(bottle_id);
    Ok(!docker::managed_containers(docker, scope).await?.is_empty()
        || !docker::managed_networks(docker, scope).await?.is_empty())
}

/// `start`'s side of its reaper: the write end of the pipe the reaper waits on. Dropping it
/// (or `start` dying, however) wakes the reaper, which removes what the bottle left;
/// [`Reaper::dismiss`] tells it the teardown left nothing.
#[derive(Debug)]
pub struct Reaper {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Reaper {
    /// Spawn `exe __reaper <bottle_id>` with stdin a pipe from this process and no stdout or
    /// stderr (the terminal may be gone when it works); it moves itself into a session of its
    /// own, so neither Ctrl-C nor a closed terminal reaches it.
    pub fn spawn(exe: &Path, bottle_id: &str) -> Result<Reaper, OrphansError> {
        let mut child = Command::new(exe)
            .arg(REAPER_SUBCOMMAND)
            .arg(bottle_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| OrphansError::SpawnReaper {
                bottle_id: bottle_id.to_owned(),
                exe: exe.to_path_buf(),
                source,
            })?;
        let pipe = child.stdin.take();
        Ok(Reaper { child, pipe })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The teardown left nothing: the reaper exits without looking (and is waited for).
    pub fn dismiss(mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            if let Err(e) = pipe.write_all(ALL_CLEAN) {
                tracing::debug!(error = %e, "the reaper is already gone");
            }
        }
        if let Err(e) = self.child.wait() {
            tracing::debug!(error = %e, "cannot wait for the reaper");
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Closing the pipe wakes the reaper; it outlives us and removes what is left. (After
        // `dismiss` the pipe is already gone and the child reaped.)
        self.pipe.take();
    }
}

/// What the reaper read on its stdin before EOF.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// `start` said its teardown left nothing.
    Clean,
    /// `start` ended without saying so: it died.
    Died,
}

/// Block until the pipe from `start` closes; what it said before.
pub fn wait_for_start(mut from_start: impl std::io::Read) -> Wake {
    let mut said = Vec::new();
    // Bounded: `start` writes at most ALL_CLEAN.
    let _ = (&mut from_start)
        .take(ALL_CLEAN.len() as u64)
        .read_to_end(&mut said);
    let mut rest = [0u8; 64];
    while matches!(from_start.read(&mut rest), Ok(n) if n > 0) {}
    if said == ALL_CLEAN {
        Wake::Clean
    } else {
        Wake::Died
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, live: bool) -> BottleRow {
        BottleRow {
            id: id.into(),
            bottle: "test".into(),
            backend: "docker".into(),
            alias: Some("127.0.0.16".into()),
            status: Status::Running,
            pid: 1,
            pid_start: 1,
            created_at: 0,
            live,
        }
    }

    #[test]
    fn a_row_whose_start_is_gone_is_orphaned_with_the_cleanup_hint() {
        let containers = BTreeMap::from([("b-1".to_owned(), vec!["bot-bottle-b-1-agent".into()])]);

        let listed = classify(
            vec![row("b-1", false), row("b-2", true)],
            &containers,
            &BTreeSet::new(),
            &BTreeMap::new(),
        );

        assert_eq!(listed[0].status, Status::Orphaned);
        assert!(listed[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("bot-bottle cleanup b-1"));
        assert_eq!(listed[0].containers, vec!["bot-bottle-b-1-agent"]);
        assert_eq!(listed[1].status, Status::Running);
        assert_eq!(listed[1].hint, None);
    }

    #[test]
    fn objects_without_a_row_are_listed_as_orphaned() {
        let containers = BTreeMap::from([("b-9".to_owned(), vec!["bot-bottle-b-9-agent".into()])]);
        let networks = BTreeSet::from(["b-9".to_owned(), "b-8".to_owned()]);
        let names = BTreeMap::from([("b-9".to_owned(), "claude".to_owned())]);

        let listed = classify(Vec::new(), &containers, &networks, &names);

        let ids: Vec<(&str, &str, &str)> = listed
            .iter()
            .map(|l| (l.id.as_str(), l.bottle.as_str(), l.status.as_str()))
            .collect();
        assert_eq!(
            ids,
            vec![("b-8", "?", "orphaned"), ("b-9", "claude", "orphaned")]
        );
    }

    #[test]
    fn the_reaper_wakes_clean_only_when_start_said_so() {
        assert_eq!(wait_for_start(ALL_CLEAN), Wake::Clean);
        assert_eq!(wait_for_start(&b""[..]), Wake::Died);
        assert_eq!(wait_for_start(&b"cle"[..]), Wake::Died);
    }
}
