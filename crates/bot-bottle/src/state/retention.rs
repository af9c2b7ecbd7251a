//! Keeping the directories of ended runs (`<state>/bottles/<id>`: the egress log, the console,
//! the CA certificate), but not forever: `bot-bottle logs` reads them after a bottle stops, and
//! without a limit every run would leave one behind. The newest [`KEEP_RUNS_PER_BOTTLE`] ended
//! runs of each bottle are kept, with their logs only (a killed run's workspace snapshots and
//! sockets go); a run with a state row (running, or killed and waiting for `cleanup`) is never
//! touched. Callers list the directories *before* reading the rows: a run starting in between
//! has its row inserted before its directory is made, so it is then seen as running.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Ended runs kept per bottle name.
pub const KEEP_RUNS_PER_BOTTLE: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("cannot list the run directories in {path}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the run directory {path}: remove it by hand")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One run's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEntry {
    pub id: String,
    pub modified: SystemTime,
}

/// The bottle a run id belongs to (`claude-1a2b3c` is a run of `claude`).
pub fn bottle_of(id: &str) -> &str {
    id.rsplit_once('-').map_or(id, |(bottle, _)| bottle)
}

/// Which run directories to remove: of the runs without a state row (`known` holds the ids
/// that have one), all but the newest `keep` of each bottle. Pure: decides, touches nothing.
pub fn plan_pruning(runs: &[RunEntry], known: &BTreeSet<String>, keep: usize) -> Vec<String> {
    let mut by_bottle: BTreeMap<&str, Vec<&RunEntry>> = BTreeMap::new();
    for run in runs.iter().filter(|r| !known.contains(&r.id)) {
        by_bottle.entry(bottle_of(&run.id)).or_default().push(run);
    }
    let mut remove = Vec::new();
    for mut ended in by_bottle.into_values() {
        // Newest first; ties broken by id so the plan does not depend on listing order.
        ended.sort_by(|a, b| b.modified.cmp(&a.modified).then_with(|| b.id.cmp(&a.id)));
        remove.extend(ended.into_iter().skip(keep).map(|r| r.id.clone()));
    }
    remove.sort();
    remove
}

/// The run directories under `root` (missing `root`: none).
pub fn list_runs(root: &Path) -> Result<Vec<RunEntry>, RetentionError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RetentionError::List {
                path: root.to_path_buf(),
                source,
            })
        }
    };
    let mut runs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| RetentionError::List {
            path: root.to_path_buf(),
            source,
        })?;
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_dir() {
            continue;
        }
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        runs.push(RunEntry {
            id,
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    Ok(runs)
}

/// Removes what [`plan_pruning`] picks among `runs` (listed by [`list_runs`] before `known`
/// was read) under `root`, and trims the ended runs it keeps to their logs (`RunDir::KEPT_LOGS`); returns
/// the removed ids.
pub fn prune(
    root: &Path,
    runs: &[RunEntry],
    known: &BTreeSet<String>,
    keep: usize,
) -> Result<Vec<String>, RetentionError> {
    let plan = plan_pruning(runs, known, keep);
    for id in &plan {
        remove(&root.join(id))?;
    }
    for run in runs
        .iter()
        .filter(|r| !known.contains(&r.id) && !plan.contains(&r.id))
    {
        trim(&root.join(&run.id), run.modified)?;
    }
    Ok(plan)
}

/// Removes a file or a directory tree (gone already is fine).
fn remove(path: &Path) -> Result<(), RetentionError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RetentionError::Remove {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The runs of bottle `bottle` under `root`, newest first.
pub fn runs_of(root: &Path, bottle: &str) -> Vec<String> {
    let mut runs: Vec<(SystemTime, String)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (bottle_of(&name) == bottle).then(|| {
                let t = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (t, name)
            })
        })
        .collect();
    runs.sort();
    runs.into_iter().rev().map(|(_, id)| id).collect()
}

/// The run directory `target` names under `root`: the run of that id, or the newest run of
/// the bottle of that name (runs outlive their bottle: `logs` and `pull` read them after).
pub fn newest_run(root: &Path, target: &str) -> Option<String> {
    let mut candidates: Vec<(SystemTime, String)> = Vec::new();
    for e in std::fs::read_dir(root).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == target || bottle_of(&name) == target {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            candidates.push((t, name));
        }
    }
    candidates.sort();
    candidates.pop().map(|(_, id)| id)
}

/// Leaves only the logs in an ended run's directory, keeping its age (the pruning order).
fn trim(dir: &Path, modified: SystemTime) -> Result<(), RetentionError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut trimmed = false;
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(crate::host::run_dir::RunDir::is_kept)
        {
            continue;
        }
        remove(&entry.path())?;
        trimmed = true;
    }
    if trimmed {
        let _ = std::fs::File::open(dir).and_then(|f| f.set_modified(modified));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn run(id: &str, age_s: u64) -> RunEntry {
        RunEntry {
            id: id.into(),
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
        }
    }

    #[test]
    fn the_newest_runs_of_each_bottle_are_kept_and_the_rest_removed() {
        let runs = vec![
            run("claude-a", 50),
            run("claude-b", 10),
            run("claude-c", 30),
            run("claude-d", 40),
            run("my-bot-x", 99),
            run("my-bot-y", 1),
        ];
        let plan = plan_pruning(&runs, &BTreeSet::new(), 2);
        // claude keeps b (10 s old) and c (30 s); my-bot keeps both of its runs.
        assert_eq!(plan, vec!["claude-a".to_owned(), "claude-d".to_owned()]);
    }

    #[test]
    fn runs_with_a_state_row_are_never_removed_nor_counted() {
        let runs = vec![run("claude-old", 100), run("claude-new", 1)];
        let known: BTreeSet<String> = ["claude-old".to_owned()].into();
        assert!(plan_pruning(&runs, &known, 1).is_empty());
        assert_eq!(
            plan_pruning(&runs, &known, 0),
            vec!["claude-new".to_owned()]
        );
    }

    #[test]
    fn a_run_that_appears_after_the_listing_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let runs = list_runs(root.path()).unwrap();
        // A `start` makes its directory now (its row was read as absent, or not at all).
        let late = root.path().join("t-late");
        std::fs::create_dir(&late).unwrap();
        std::fs::write(late.join("vsock.sock"), "").unwrap();
        assert!(prune(root.path(), &runs, &BTreeSet::new(), 0)
            .unwrap()
            .is_empty());
        assert!(late.join("vsock.sock").exists());
    }

    #[test]
    fn a_name_with_dashes_is_one_bottle() {
        assert_eq!(bottle_of("my-team-bot-9f8e"), "my-team-bot");
        assert_eq!(bottle_of("plain"), "plain");
    }

    #[test]
    fn prune_removes_the_old_directories_and_only_them() {
        let root = tempfile::tempdir().unwrap();
        for (id, age) in [("t-1", 300), ("t-2", 200), ("t-3", 100), ("t-live", 400)] {
            let dir = root.path().join(id);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("egress.jsonl"), id).unwrap();
            // What a killed run leaves beside its logs.
            std::fs::write(dir.join("workspace-0.sqfs"), "big").unwrap();
            std::fs::create_dir(dir.join("sub")).unwrap();
            let when = SystemTime::now() - Duration::from_secs(age);
            std::fs::File::open(&dir)
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        // A stray file is not a run.
        std::fs::write(root.path().join("t-file"), "x").unwrap();
        let known: BTreeSet<String> = ["t-live".to_owned()].into();
        let runs = list_runs(root.path()).unwrap();
        let removed = prune(root.path(), &runs, &known, 2).unwrap();
        assert_eq!(removed, vec!["t-1".to_owned()]);
        let mut left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["t-2", "t-3", "t-file", "t-live"]);
        // Kept ended runs keep their logs only, and their age; the running one is untouched.
        let files = |id: &str| {
            let mut f: Vec<_> = std::fs::read_dir(root.path().join(id))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            f.sort();
            f
        };
        assert_eq!(files("t-2"), ["egress.jsonl"]);
        assert_eq!(files("t-live"), ["egress.jsonl", "sub", "workspace-0.sqfs"]);
        let again = list_runs(root.path()).unwrap();
        let age = |id: &str| again.iter().find(|r| r.id == id).unwrap().modified;
        assert!(age("t-2") < age("t-3"));
        let missing = root.path().join("missing");
        assert!(list_runs(&missing).unwrap().is_empty());
        assert!(prune(&missing, &[], &known, 2).unwrap().is_empty());
    }

    #[test]
    fn a_kept_run_keeps_every_segment_of_its_egress_log_and_the_vmm_denials() {
        let root = tempfile::tempdir().unwrap();
        let run = crate::host::run_dir::RunDir::new(root.path().join("t-1"));
        run.prepare().unwrap();
        // A rotated log: the run's first segment (kept for the whole run), the previous one,
        // the current one; the VMM's denied vsock egress; the console.
        for log in [run.egress_log(), run.vsock_egress_log(), run.console_log()] {
            std::fs::write(&log, "x").unwrap();
        }
        for suffix in [".0", ".1"] {
            let mut name = run.egress_log().into_os_string();
            name.push(suffix);
            std::fs::write(name, "x").unwrap();
        }
        std::fs::write(run.workspace_snapshot(0), "big").unwrap();
        let runs = list_runs(root.path()).unwrap();
        assert!(prune(root.path(), &runs, &BTreeSet::new(), 1)
            .unwrap()
            .is_empty());
        let mut left: Vec<_> = std::fs::read_dir(run.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "egress.jsonl",
                "egress.jsonl.0",
                "egress.jsonl.1",
                "serial.log",
                "vsock-egress.jsonl"
            ]
        );
    }
}
