//! What the gate accepts: the pre-receive hook (`bot-bottle __git-hook pre-receive`, run by
//! git's `receive-pack` on the host with the pushed objects in quarantine) checks each ref
//! update against `[git]` and scans every new commit's added lines for secrets. A refusal is
//! one line on stderr, which git shows the pusher as `remote: bot-bottle: ...`, and an event in
//! the gate's log; the value of a secret is never printed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The environment variable naming the policy file for the hooks.
pub const POLICY_ENV: &str = "BOT_BOTTLE_GATE_POLICY";
/// The all-zero object id git uses for "no object" (a created or deleted ref).
const ZERO_OID: &str = "0000000000000000000000000000000000000000";
/// Most findings reported for one push (the first ones; the push is refused either way).
const MAX_REPORTED_FINDINGS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the gate policy {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the gate policy {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{POLICY_ENV} is not set: the hook runs under the gate, not by hand")]
    NoPolicy,
    #[error("malformed ref update line from git: `{0}`")]
    BadUpdate(String),
    #[error("cannot run git {args}")]
    Git {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("git {args} failed: {stderr}")]
    GitFailed { args: String, stderr: String },
    #[error("cannot write the gate log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The gate's policy, written by `start` for the hooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatePolicy {
    pub bottle_id: String,
    /// Ref patterns the agent may push (`refs/heads/bot/*`).
    pub push: Vec<String>,
    pub force: bool,
    pub delete: bool,
    /// The bottle's credentials, as fingerprints (never the values).
    pub fingerprints: Vec<bottle_scan::Fingerprint>,
    /// Where accepted and refused pushes are logged.
    pub log: PathBuf,
}

impl GatePolicy {
    pub fn read(path: &Path) -> Result<Self, PolicyError> {
        let bytes = std::fs::read(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| PolicyError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Whether `pattern` is a push pattern the gate can apply: `refs/...`, a `*` only as the last
/// character after a `/`, nothing git's ref-name rules forbid.
pub fn check_pattern(pattern: &str) -> Result<(), &'static str> {
    if !pattern.starts_with("refs/") {
        return Err("does not start with refs/");
    }
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    if pattern.ends_with('*') && !body.ends_with('/') {
        return Err("has a `*` that does not follow a `/`");
    }
    if body.contains('*') {
        return Err("has a `*` before its end");
    }
    if body.contains("..")
        || body.contains("//")
        || body.contains("@{")
        || body
            .bytes()
            .any(|b| b.is_ascii_control() || b" ~^:?[\\".contains(&b))
    {
        return Err("is not a valid ref name");
    }
    Ok(())
}

/// Whether `refname` matches `pattern` (exactly, or under a `prefix/*`).
pub fn ref_matches(pattern: &str, refname: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => refname.starts_with(prefix) && refname.len() > prefix.len(),
        None => pattern == refname,
    }
}

/// One ref update as git hands it to pre-receive: `<old> <new> <ref>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub old: String,
    pub new: String,
    pub refname: String,
}

impl Update {
    pub fn is_delete(&self) -> bool {
        self.new == ZERO_OID
    }
    pub fn is_create(&self) -> bool {
        self.old == ZERO_OID
    }
}

pub fn parse_updates(stdin: &str) -> Result<Vec<Update>, PolicyError> {
    stdin
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(old), Some(new), Some(refname), None)
                    if is_oid(old) && is_oid(new) && !refname.is_empty() =>
                {
                    Ok(Update {
                        old: old.to_owned(),
                        new: new.to_owned(),
                        refname: refname.to_owned(),
                    })
                }
                _ => Err(PolicyError::BadUpdate(line.escape_debug().to_string())),
            }
        })
        .collect()
}

fn is_oid(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Why an update is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotAllowed {
        refname: String,
        push: Vec<String>,
    },
    Delete {
        refname: String,
    },
    Force {
        refname: String,
    },
    Secret {
        refname: String,
        commit: String,
        path: String,
        line: usize,
        rule: String,
    },
}

impl Refusal {
    pub fn refname(&self) -> &str {
        match self {
            Refusal::NotAllowed { refname, .. }
            | Refusal::Delete { refname }
            | Refusal::Force { refname }
            | Refusal::Secret { refname, .. } => refname,
        }
    }

    /// A short name for the log.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::NotAllowed { .. } => "ref-not-allowed",
            Refusal::Delete { .. } => "delete",
            Refusal::Force { .. } => "force-push",
            Refusal::Secret { .. } => "secret",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotAllowed { refname, push } => write!(
                f,
                "{refname}: this bottle may push only to {} (the manifest's `[git] push`)",
                push.join(", ")
            ),
            Refusal::Delete { refname } => write!(
                f,
                "{refname}: deleting a ref is not allowed (`[git] delete = true` allows it)"
            ),
            Refusal::Force { refname } => write!(
                f,
                "{refname}: not a fast-forward: force-pushing is not allowed (`[git] force = true` allows it)"
            ),
            Refusal::Secret {
                refname,
                commit,
                path,
                line,
                rule,
            } => write!(
                f,
                "{refname}: commit {} adds a secret at {path}:{line} ({rule}; the value is not shown): remove it from the history and push again",
                &commit[..commit.len().min(12)]
            ),
        }
    }
}

/// The ref-level checks (no repository needed): pattern, deletion, force.
/// `fast_forward`: whether `old` is an ancestor of `new` (asked only for an update of an
/// existing ref).
pub fn check_update(
    policy: &GatePolicy,
    update: &Update,
    fast_forward: impl FnOnce() -> bool,
) -> Option<Refusal> {
    let refname = update.refname.clone();
    if !policy.push.iter().any(|p| ref_matches(p, &update.refname)) {
        return Some(Refusal::NotAllowed {
            refname,
            push: policy.push.clone(),
        });
    }
    if update.is_delete() {
        return (!policy.delete).then_some(Refusal::Delete { refname });
    }
    if !update.is_create() && !policy.force && !fast_forward() {
        return Some(Refusal::Force { refname });
    }
    None
}

/// A line a commit adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    pub path: String,
    pub line: usize,
    pub text: Vec<u8>,
}

/// The lines a patch (`git diff-tree -p -U0` output) adds, with their file and line number in
/// the new version.
pub fn added_lines(patch: &[u8]) -> Vec<Added> {
    let mut out = Vec::new();
    let mut path: Option<String> = None;
    let mut next_line = 0usize;
    for raw in patch.split(|&b| b == b'\n') {
        if let Some(p) = raw.strip_prefix(b"+++ ") {
            path = match p {
                b"/dev/null" => None,
                p => Some(String::from_utf8_lossy(p.strip_prefix(b"b/").unwrap_or(p)).into_owned()),
            };
            continue;
        }
        if raw.starts_with(b"diff --git ") {
            path = None;
            continue;
        }
        if let Some(hunk) = raw.strip_prefix(b"@@ ") {
            // `@@ -a[,b] +c[,d] @@`: new lines start at c.
            next_line = std::str::from_utf8(hunk)
                .ok()
                .and_then(|h| h.split(' ').find(|t| t.starts_with('+')))
                .and_then(|t| t[1..].split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            continue;
        }
        match (raw.first(), &path) {
            (Some(b'+'), Some(p)) => {
                out.push(Added {
                    path: p.clone(),
                    line: next_line,
                    text: raw[1..].to_vec(),
                });
                next_line += 1;
            }
            (Some(b' '), _) => next_line += 1,
            _ => {}
        }
    }
    out
}

/// Runs git with the hook's environment (git's own: the repository and its quarantine).
fn git(args: &[&str]) -> Result<Vec<u8>, PolicyError> {
    let out = Command::new("git")
        .args(args)
        .output()
        .map_err(|source| PolicyError::Git {
            args: args.join(" "),
            source,
        })?;
    if !out.status.success() {
        return Err(PolicyError::GitFailed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// The secret findings in the commits `update` brings that no ref has yet.
fn scan_update(
    scanner: &bottle_scan::Scanner,
    update: &Update,
) -> Result<Vec<Refusal>, PolicyError> {
    let list = git(&["rev-list", &update.new, "--not", "--all"])?;
    let mut found = Vec::new();
    for commit in String::from_utf8_lossy(&list).lines() {
        let patch = git(&[
            "diff-tree",
            "-r",
            "-p",
            "-U0",
            "--root",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--no-renames",
            "--format=",
            commit,
        ])?;
        for added in added_lines(&patch) {
            for finding in scanner.scan_line(&added.text) {
                found.push(Refusal::Secret {
                    refname: update.refname.clone(),
                    commit: commit.to_owned(),
                    path: added.path.clone(),
                    line: added.line,
                    rule: finding.rule,
                });
            }
        }
        // The path of a new file can carry a secret too.
        let names = git(&[
            "diff-tree",
            "-r",
            "--root",
            "--name-only",
            "--format=",
            commit,
        ])?;
        for name in String::from_utf8_lossy(&names).lines() {
            for finding in scanner.scan_line(name.as_bytes()) {
                found.push(Refusal::Secret {
                    refname: update.refname.clone(),
                    commit: commit.to_owned(),
                    path: "(a file name)".to_owned(),
                    line: 0,
                    rule: finding.rule,
                });
            }
        }
    }
    Ok(found)
}

/// One event in the gate's log.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GateEvent {
    pub time: u64,
    pub bottle: String,
    /// `accepted`, `refused` or `pushed`.
    pub event: String,
    #[serde(rename = "ref")]
    pub refname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl GateEvent {
    /// An event about ref update `update`, now.
    pub fn for_update(bottle: &str, event: &str, update: &Update) -> GateEvent {
        GateEvent {
            time: now(),
            bottle: bottle.to_owned(),
            event: event.to_owned(),
            refname: update.refname.clone(),
            old: Some(update.old.clone()),
            new: Some(update.new.clone()),
            reason: None,
            detail: None,
        }
    }
}

fn log(policy: &GatePolicy, events: &[GateEvent]) -> Result<(), PolicyError> {
    append_events(&policy.log, events)
}

/// Append `events` to the gate log at `path`, one JSON line each.
pub fn append_events(path: &Path, events: &[GateEvent]) -> Result<(), PolicyError> {
    let err = |source| PolicyError::Log {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let mut text = String::new();
    for e in events {
        text.push_str(&serde_json::to_string(e).unwrap_or_default());
        text.push('\n');
    }
    file.write_all(text.as_bytes()).map_err(err)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `bot-bottle __git-hook pre-receive`: every update checked; any refusal refuses the whole
/// push (git's `pre-receive` contract). Returns the hook's exit status.
pub fn pre_receive(
    policy: &GatePolicy,
    stdin: &str,
    stderr: &mut dyn std::io::Write,
) -> Result<i32, PolicyError> {
    let updates = parse_updates(stdin)?;
    let scanner = bottle_scan::Scanner::new(policy.fingerprints.clone());
    let mut refusals = Vec::new();
    for update in &updates {
        let ancestry = || {
            Command::new("git")
                .args(["merge-base", "--is-ancestor", &update.old, &update.new])
                .status()
                .is_ok_and(|s| s.success())
        };
        match check_update(policy, update, ancestry) {
            Some(refusal) => refusals.push(refusal),
            None if !update.is_delete() => refusals.extend(scan_update(&scanner, update)?),
            None => {}
        }
    }
    let events: Vec<GateEvent> = if refusals.is_empty() {
        updates
            .iter()
            .map(|u| GateEvent::for_update(&policy.bottle_id, "accepted", u))
            .collect()
    } else {
        refusals
            .iter()
            .map(|r| GateEvent {
                time: now(),
                bottle: policy.bottle_id.clone(),
                event: "refused".into(),
                refname: r.refname().to_owned(),
                old: None,
                new: None,
                reason: Some(r.kind().to_owned()),
                detail: Some(r.to_string()),
            })
            .collect()
    };
    log(policy, &events)?;
    for r in refusals.iter().take(MAX_REPORTED_FINDINGS) {
        let _ = writeln!(stderr, "bot-bottle: push refused: {r}");
    }
    if refusals.len() > MAX_REPORTED_FINDINGS {
        let _ = writeln!(
            stderr,
            "bot-bottle: ... and {} more",
            refusals.len() - MAX_REPORTED_FINDINGS
        );
    }
    Ok(if refusals.is_empty() { 0 } else { 1 })
}

/// How many ref updates landed in the gate whose log is `log` (what `list` shows).
pub fn pushed_count(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<GateEvent>(l).ok())
                .filter(|e| e.event == "pushed")
                .count()
        })
        .unwrap_or(0)
}

/// `bot-bottle __git-hook post-receive`: the refs that were updated, logged.
pub fn post_receive(policy: &GatePolicy, stdin: &str) -> Result<i32, PolicyError> {
    let events: Vec<GateEvent> = parse_updates(stdin)?
        .iter()
        .map(|u| GateEvent::for_update(&policy.bottle_id, "pushed", u))
        .collect();
    log(policy, &events)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> GatePolicy {
        GatePolicy {
            bottle_id: "b".into(),
            push: vec!["refs/heads/bot/*".into()],
            force: false,
            delete: false,
            fingerprints: vec![],
            log: PathBuf::from("/dev/null"),
        }
    }

    fn update(old: &str, new: &str, refname: &str) -> Update {
        Update {
            old: old.repeat(40),
            new: new.repeat(40),
            refname: refname.into(),
        }
    }

    #[test]
    fn test_patterns_are_checked() {
        assert!(check_pattern("refs/heads/bot/*").is_ok());
        assert!(check_pattern("refs/heads/main").is_ok());
        for bad in [
            "heads/bot/*",
            "refs/heads/bot*",
            "refs/*/x",
            "refs/heads/a..b",
            "refs/heads/a\u{7}",
            "refs/heads/a b",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_ref_matches_a_prefix_pattern_or_exactly() {
        assert!(ref_matches("refs/heads/bot/*", "refs/heads/bot/x"));
        assert!(ref_matches("refs/heads/bot/*", "refs/heads/bot/x/y"));
        assert!(!ref_matches("refs/heads/bot/*", "refs/heads/bot/"));
        assert!(!ref_matches("refs/heads/bot/*", "refs/heads/botx"));
        assert!(!ref_matches("refs/heads/bot/*", "refs/heads/main"));
        assert!(ref_matches("refs/heads/main", "refs/heads/main"));
        assert!(!ref_matches("refs/heads/main", "refs/heads/main2"));
    }

    #[test]
    fn test_updates_outside_the_patterns_deletions_and_force_pushes_are_refused() {
        let p = policy();
        let outside = check_update(&p, &update("0", "a", "refs/heads/main"), || true);
        assert!(matches!(outside, Some(Refusal::NotAllowed { .. })));
        let delete = check_update(&p, &update("a", "0", "refs/heads/bot/x"), || true);
        assert!(matches!(delete, Some(Refusal::Delete { .. })));
        let force = check_update(&p, &update("a", "b", "refs/heads/bot/x"), || false);
        assert!(matches!(force, Some(Refusal::Force { .. })));
        assert_eq!(
            check_update(&p, &update("a", "b", "refs/heads/bot/x"), || true),
            None
        );
        assert_eq!(
            check_update(&p, &update("0", "b", "refs/heads/bot/x"), || panic!(
                "not asked"
            )),
            None
        );
        let lenient = GatePolicy {
            force: true,
            delete: true,
            ..policy()
        };
        assert_eq!(
            check_update(&lenient, &update("a", "b", "refs/heads/bot/x"), || false),
            None
        );
        assert_eq!(
            check_update(&lenient, &update("a", "0", "refs/heads/bot/x"), || true),
            None
        );
    }

    #[test]
    fn test_malformed_update_lines_are_errors() {
        assert!(parse_updates("x y z").is_err());
        assert!(parse_updates(&format!(
            "{} {} refs/heads/a extra",
            "0".repeat(40),
            "1".repeat(40)
        ))
        .is_err());
        let ok = parse_updates(&format!(
            "{} {} refs/heads/a\n",
            "0".repeat(40),
            "1".repeat(40)
        ))
        .unwrap();
        assert_eq!(ok.len(), 1);
        assert!(ok[0].is_create());
    }

    #[test]
    fn test_added_lines_carry_their_file_and_new_line_number() {
        let patch = b"diff --git a/src/a.rs b/src/a.rs\n\
index 1..2 100644\n\
--- a/src/a.rs\n\
+++ b/src/a.rs\n\
@@ -3,0 +4,2 @@ fn x()\n\
+let a = 1;\n\
+let b = 2;\n\
@@ -10 +12 @@\n\
-old\n\
+new\n\
diff --git a/gone b/gone\n\
deleted file mode 100644\n\
--- a/gone\n\
+++ /dev/null\n\
@@ -1 +0,0 @@\n\
-bye\n";
        let added = added_lines(patch);
        let got: Vec<(&str, usize, &[u8])> = added
            .iter()
            .map(|a| (a.path.as_str(), a.line, a.text.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("src/a.rs", 4, &b"let a = 1;"[..]),
                ("src/a.rs", 5, &b"let b = 2;"[..]),
                ("src/a.rs", 12, &b"new"[..]),
            ]
        );
    }

    #[test]
    fn test_a_secret_refusal_names_file_line_and_rule_but_not_the_value() {
        let r = Refusal::Secret {
            refname: "refs/heads/bot/x".into(),
            commit: "0123456789abcdef0123".into(),
            path: "config.env".into(),
            line: 3,
            rule: "credential API_TOKEN".into(),
        };
        let text = r.to_string();
        assert!(text.contains("config.env:3"), "{text}");
        assert!(text.contains("credential API_TOKEN"), "{text}");
        assert!(text.contains("0123456789ab"), "{text}");
    }
}
