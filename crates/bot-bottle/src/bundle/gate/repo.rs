//! The gate's bare repository, one per bottle run, in the run directory: made at `start` with
//! the safety settings every git process on it runs under, the host repository's branches and
//! tags offered for fetching (its objects borrowed through `objects/info/alternates`, so a large
//! repository costs no copy), the hooks that apply `[git]`, and the policy they read.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::policy::{GatePolicy, POLICY_ENV};
use crate::config::manifest::Git;
use crate::host::run_dir::RunDir;

/// The environment variable naming the bot-bottle executable for the hooks.
pub const EXE_ENV: &str = "BOT_BOTTLE_EXE";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot prepare the git gate in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run git for the gate (is git installed? `apt-get install git`)")]
    NoGit(#[source] std::io::Error),
    #[error("git {args} failed for the gate: {stderr}")]
    Git { args: String, stderr: String },
    #[error("cannot read the gate of this run ({path}): was it started with a git gate?")]
    Info {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the gate's record {path} is not valid")]
    BadInfo {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What `pull` reads after the bottle stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateInfo {
    pub bottle_id: String,
    /// The host repository the workspace came from (`None`: no mount was a git repository).
    pub host_repo: Option<PathBuf>,
    /// The push patterns in force.
    pub push: Vec<String>,
}

impl GateInfo {
    pub fn read(run: &RunDir) -> Result<Self, RepoError> {
        let path = run.gate_info();
        let bytes = std::fs::read(&path).map_err(|source| RepoError::Info {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| RepoError::BadInfo { path, source })
    }
}

/// A git command that sees no system or user configuration and a home of its own.
pub fn git_command(run: &RunDir) -> Command {
    let mut cmd = Command::new("git");
    cmd.env("HOME", run.gate_home())
        .env("XDG_CONFIG_HOME", run.gate_home())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_CONFIG")
        .env_remove("GIT_CONFIG_COUNT");
    cmd
}

fn run_git(mut cmd: Command, what: &str) -> Result<(), RepoError> {
    let out = cmd.output().map_err(RepoError::NoGit)?;
    if !out.status.success() {
        return Err(RepoError::Git {
            args: what.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// The git repository of `dir`: its `.git` directory when it is the top of a plain checkout.
pub fn host_repository(dir: &Path) -> Option<PathBuf> {
    let git_dir = dir.join(".git");
    git_dir.join("objects").is_dir().then_some(git_dir)
}

/// The configuration of the gate repository: what every receive-pack and upload-pack on it
/// runs with.
fn settings(git: &Git, hooks: &Path) -> Vec<(&'static str, String)> {
    let mut s = vec![
        ("http.receivepack", "true".to_owned()),
        ("http.uploadpack", "true".to_owned()),
        // Every object checked on receipt; a `.git` path in a tree is an error too.
        ("receive.fsckObjects", "true".to_owned()),
        ("receive.fsck.hasDotgit", "error".to_owned()),
        ("transfer.fsckObjects", "true".to_owned()),
        (
            "receive.maxInputSize",
            (u64::from(git.max_pack_mib) << 20).to_string(),
        ),
        ("receive.denyNonFastForwards", (!git.force).to_string()),
        ("receive.denyDeletes", (!git.delete).to_string()),
        ("receive.advertisePushOptions", "false".to_owned()),
        ("receive.autogc", "false".to_owned()),
        ("gc.auto", "0".to_owned()),
        ("uploadpack.allowFilter", "false".to_owned()),
        ("uploadpack.allowAnySHA1InWant", "false".to_owned()),
        ("uploadpack.allowReachableSHA1InWant", "false".to_owned()),
        ("core.hooksPath", hooks.display().to_string()),
    ];
    s.sort();
    s
}

/// Make the gate of run `run`: its repository, hooks and policy; `host` is the workspace's
/// host directory when it is a git checkout (its branches and tags are offered to the agent).
pub fn prepare(
    run: &RunDir,
    host: Option<&Path>,
    git: &Git,
    policy: &GatePolicy,
) -> Result<GateInfo, RepoError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RepoError::Io { path, source }
    };
    for dir in [run.gate_dir(), run.gate_home(), run.gate_hooks()] {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    }
    let repo = run.gate_repo();
    let mut init = git_command(run);
    init.args(["init", "--bare", "--quiet"]).arg(&repo);
    run_git(init, "init --bare")?;
    for (key, value) in settings(git, &run.gate_hooks()) {
        let mut cmd = git_command(run);
        cmd.arg("--git-dir")
            .arg(&repo)
            .args(["config", key, &value]);
        run_git(cmd, &format!("config {key}"))?;
    }
    let host_repo = host.and_then(host_repository);
    if let Some(host_git) = &host_repo {
        // The host's objects are borrowed, not copied; pushes add only what is new.
        let alternates = repo.join("objects/info/alternates");
        std::fs::write(
            &alternates,
            format!("{}\n", host_git.join("objects").display()),
        )
        .map_err(io(&alternates))?;
        let mut fetch = git_command(run);
        fetch
            .arg("--git-dir")
            .arg(&repo)
            .args(["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"])
            .arg(host_git)
            .args(["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]);
        run_git(fetch, "fetch (the host repository's branches)")?;
    }
    for hook in ["pre-receive", "post-receive"] {
        let path = run.gate_hooks().join(hook);
        let script = format!("#!/bin/sh\nexec \"${EXE_ENV}\" __git-hook {hook}\n");
        write_executable(&path, &script).map_err(io(&path))?;
    }
    let policy_path = run.gate_policy();
    let json = serde_json::to_vec_pretty(policy).unwrap_or_default();
    std::fs::write(&policy_path, json).map_err(io(&policy_path))?;
    let info = GateInfo {
        bottle_id: policy.bottle_id.clone(),
        host_repo: host_repo
            .as_ref()
            .and_then(|g| g.parent().map(Path::to_path_buf)),
        push: git.push.clone(),
    };
    let info_path = run.gate_info();
    std::fs::write(
        &info_path,
        serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )
    .map_err(io(&info_path))?;
    Ok(info)
}

fn write_executable(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

/// The variables the hooks need, for the CGI environment.
pub fn hook_env(run: &RunDir, exe: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        (POLICY_ENV, run.gate_policy()),
        (EXE_ENV, exe.to_path_buf()),
    ]
}

/// Where `pull` puts what the agent pushed under `pattern`: `refs/heads/bot/*` becomes
/// `+refs/heads/bot/*:refs/remotes/bottle/bot/*` (never the user's own branches).
pub fn pull_refspec(pattern: &str) -> String {
    let rest = pattern
        .strip_prefix("refs/heads/")
        .or_else(|| pattern.strip_prefix("refs/"))
        .unwrap_or(pattern);
    format!("+{pattern}:refs/remotes/bottle/{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pull_lands_under_refs_remotes_bottle_only() {
        assert_eq!(
            pull_refspec("refs/heads/bot/*"),
            "+refs/heads/bot/*:refs/remotes/bottle/bot/*"
        );
        assert_eq!(
            pull_refspec("refs/heads/agent"),
            "+refs/heads/agent:refs/remotes/bottle/agent"
        );
        assert_eq!(
            pull_refspec("refs/tags/v*"),
            "+refs/tags/v*:refs/remotes/bottle/tags/v*"
        );
    }

    #[test]
    fn test_the_gate_denies_force_and_deletes_and_checks_objects_by_default() {
        let git = Git {
            enabled: true,
            push: vec!["refs/heads/bot/*".into()],
            force: false,
            delete: false,
            max_pack_mib: 7,
            upstream: None,
        };
        let s = settings(&git, Path::new("/h"));
        let get = |k: &str| s.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("receive.fsckObjects"), Some("true"));
        assert_eq!(get("receive.denyNonFastForwards"), Some("true"));
        assert_eq!(get("receive.denyDeletes"), Some("true"));
        assert_eq!(get("receive.maxInputSize"), Some("7340032"));
        assert_eq!(get("core.hooksPath"), Some("/h"));
    }
}
