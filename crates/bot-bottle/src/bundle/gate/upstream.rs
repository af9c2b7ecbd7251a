//! Forwarding accepted pushes to the real remote (`[git] upstream`): after a push the gate
//! accepted, the gate's server pushes the same refs from the gate repository to the upstream,
//! with the bottle's credential for the upstream's host (its `[credentials."host"]`) injected
//! here on the host as an HTTP header, so the token never enters the bottle. The header goes
//! to git through its environment (`GIT_CONFIG_*`), never its command line.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::policy::{GateEvent, Update};
use crate::host::run_dir::RunDir;

/// Where accepted refs go, and the header that authenticates them there.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub url: String,
    /// `(name, value)` of the credential header, from the upstream host's credential.
    pub header: Option<(String, String)>,
    /// Whether non-fast-forward updates go on (`[git] force`).
    pub force: bool,
}

impl std::fmt::Debug for Upstream {
    // The header's value is a secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .field("header", &self.header.as_ref().map(|(name, _)| name))
            .field("force", &self.force)
            .finish()
    }
}

/// The host of an `http(s)://` URL (what its credential is found by).
pub fn host_of(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit('@').next()?;
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Whether `url` is an upstream the gate can push to: `https://`, `http://`, or an absolute
/// path to a repository on this host.
pub fn check_url(url: &str) -> Result<(), &'static str> {
    if url.starts_with("https://") || url.starts_with("http://") {
        return host_of(url).map(drop).ok_or("has no host");
    }
    if Path::new(url).is_absolute() {
        return Ok(());
    }
    Err("is not an https://, http:// URL or an absolute path")
}

/// The refspecs that carry `updates` to the upstream.
pub fn refspecs(updates: &[Update], force: bool) -> Vec<String> {
    updates
        .iter()
        .map(|u| match (u.is_delete(), force) {
            (true, _) => format!(":{}", u.refname),
            (false, true) => format!("+{}:{}", u.new, u.refname),
            (false, false) => format!("{}:{}", u.new, u.refname),
        })
        .collect()
}

/// Push `updates` from the gate repository of `run` to `upstream`; one event per update.
pub fn forward(
    run: &RunDir,
    bottle_id: &str,
    upstream: &Upstream,
    updates: &[Update],
) -> Vec<GateEvent> {
    if updates.is_empty() {
        return Vec::new();
    }
    let mut cmd = super::repo::git_command(run);
    if let Some((name, value)) = &upstream.header {
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", format!("{name}: {value}"));
    }
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .arg("--git-dir")
        .arg(run.gate_repo())
        .args(["push", "--porcelain", &upstream.url])
        .args(refspecs(updates, upstream.force));
    let (ok, detail) = match cmd.output() {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ),
        Err(e) => (false, format!("cannot run git: {e}")),
    };
    let event = if ok { "forwarded" } else { "forward-failed" };
    updates
        .iter()
        .map(|u| GateEvent {
            detail: (!ok).then(|| format!("to {}: {detail}", upstream.url)),
            ..GateEvent::for_update(bottle_id, event, u)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_credential_host_is_found_and_the_value_never_printed() {
        assert_eq!(
            host_of("https://GitHub.com/me/app.git").as_deref(),
            Some("github.com")
        );
        assert_eq!(
            host_of("https://x@git.example:8443/a").as_deref(),
            Some("git.example")
        );
        assert_eq!(host_of("/srv/repo.git"), None);
        let u = Upstream {
            url: "https://github.com/me/app.git".into(),
            header: Some(("Authorization".into(), "Bearer s3cr3t-value".into())),
            force: false,
        };
        assert!(!format!("{u:?}").contains("s3cr3t"));
    }

    #[test]
    fn test_urls_are_checked_and_refspecs_follow_force() {
        assert!(check_url("https://github.com/me/app.git").is_ok());
        assert!(check_url("/srv/app.git").is_ok());
        assert!(check_url("git@github.com:me/app.git").is_err());
        assert!(check_url("relative/path").is_err());
        let u = |old: &str, new: &str| Update {
            old: old.repeat(40),
            new: new.repeat(40),
            refname: "refs/heads/bot/x".into(),
        };
        assert_eq!(
            refspecs(&[u("a", "b"), u("a", "0")], false),
            vec![
                format!("{}:refs/heads/bot/x", "b".repeat(40)),
                ":refs/heads/bot/x".to_owned()
            ]
        );
        assert_eq!(
            refspecs(&[u("a", "b")], true)[0],
            format!("+{}:refs/heads/bot/x", "b".repeat(40))
        );
    }
}
