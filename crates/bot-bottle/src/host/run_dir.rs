//! A run's directory, `<state>/bottles/<id>`, as a type: every file name a run's processes
//! share (the bundle, the VMM child, `start`, `logs`, the reaper, retention) is named here and
//! nowhere else. The bundle sees the same directory at [`RunDir::IN_BUNDLE`].

use std::path::{Path, PathBuf};

/// The egress proxy's decisions (JSON lines), written by the bundle; `.0` and `.1` beside it
/// after rotation (see `bundle::egress::events`).
const EGRESS_LOG: &str = "egress.jsonl";
/// The first segment of a rotated egress log, kept for the whole run.
const EGRESS_LOG_START: &str = "egress.jsonl.0";
/// The previous segment of a rotated egress log.
const EGRESS_LOG_PREVIOUS: &str = "egress.jsonl.1";
/// The VMM's denied vsock egress (JSON lines).
const VSOCK_EGRESS_LOG: &str = "vsock-egress.jsonl";
/// The guest's serial console.
const CONSOLE_LOG: &str = "serial.log";
/// The bottle CA's certificate, made by the bundle when it intercepts.
const CA_CERT: &str = "ca.pem";
/// The supervisor's token: for the host's `bot-bottle allow` and the bundle, never the agent.
const SUPERVISOR_TOKEN: &str = "supervisor.token";
/// The host's trust store, staged for the bundle.
const TRUST_STORE: &str = "trust-store.pem";
/// The VMM child's launch file.
const LAUNCH_FILE: &str = "launch.json";
/// The VMM's vsock Unix socket (the guest's control agent).
const CONTROL_SOCKET: &str = "vsock.sock";
/// The guest's config disk.
const CONFIG_DISK: &str = "config.img";
/// The reaper's own log.
const REAPER_LOG: &str = "reaper.log";
/// The Docker backend's kept workspace copies: `kept-workspace-<index>`.
const KEPT_WORKSPACE: &str = "kept-workspace-";
/// The record of where the kept workspaces came from.
const KEPT_WORKSPACES_RECORD: &str = "kept-workspaces.json";
/// The git gate's directory: its bare repository, hooks, policy and an empty home for git.
const GATE_DIR: &str = "gate";
/// The git gate's events (pushes accepted and refused), JSON lines.
const GATE_LOG: &str = "gate.jsonl";
/// The Unix socket the bundle relays the gate port to (served by `start` on the host).
const GATE_SOCKET: &str = "git.sock";

/// One run's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Where the bundle container sees the run directory (bind-mounted, read-write).
    pub const IN_BUNDLE: &'static str = "/var/log/bot-bottle";

    /// What an ended run keeps (`bot-bottle logs` reads them): the egress log (all three
    /// segments), the VMM's denials and the console. Everything else goes when it is pruned.
    pub const KEPT_LOGS: &'static [&'static str] = &[
        EGRESS_LOG,
        EGRESS_LOG_START,
        EGRESS_LOG_PREVIOUS,
        VSOCK_EGRESS_LOG,
        CONSOLE_LOG,
        GATE_LOG,
        // The gate repository: `bot-bottle pull` takes the agent's pushes from it after the
        // bottle stopped.
        GATE_DIR,
    ];

    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The directory as the bundle sees it.
    pub fn in_bundle() -> Self {
        Self::new(Self::IN_BUNDLE)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create the directory (writable by the bundle, which runs as this user).
    pub fn prepare(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.path)
    }

    pub fn egress_log(&self) -> PathBuf {
        self.path.join(EGRESS_LOG)
    }

    pub fn vsock_egress_log(&self) -> PathBuf {
        self.path.join(VSOCK_EGRESS_LOG)
    }

    pub fn console_log(&self) -> PathBuf {
        self.path.join(CONSOLE_LOG)
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.path.join(CA_CERT)
    }

    pub fn supervisor_token(&self) -> PathBuf {
        self.path.join(SUPERVISOR_TOKEN)
    }

    pub fn trust_store(&self) -> PathBuf {
        self.path.join(TRUST_STORE)
    }

    pub fn launch_file(&self) -> PathBuf {
        self.path.join(LAUNCH_FILE)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.path.join(CONTROL_SOCKET)
    }

    pub fn config_disk(&self) -> PathBuf {
        self.path.join(CONFIG_DISK)
    }

    /// The read-only snapshot of the `index`th workspace mount.
    pub fn workspace_snapshot(&self, index: usize) -> PathBuf {
        self.path.join(format!("workspace-{index}.sqfs"))
    }

    pub fn reaper_log(&self) -> PathBuf {
        self.path.join(REAPER_LOG)
    }

    /// The Docker backend's copy of the `index`th workspace as the agent left it (what
    /// `resume` continues from): kept with the run's logs.
    pub fn kept_workspace(&self, index: usize) -> PathBuf {
        self.path.join(format!("{KEPT_WORKSPACE}{index}"))
    }

    /// Which host directory each kept workspace came from (JSON: the plan's mounts).
    pub fn kept_workspaces_record(&self) -> PathBuf {
        self.path.join(KEPT_WORKSPACES_RECORD)
    }

    /// Whether the entry `name` of a run directory is kept when the run is pruned to its logs.
    pub fn is_kept(name: &str) -> bool {
        Self::KEPT_LOGS.contains(&name)
            || name == KEPT_WORKSPACES_RECORD
            || name
                .strip_prefix(KEPT_WORKSPACE)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    pub fn gate_dir(&self) -> PathBuf {
        self.path.join(GATE_DIR)
    }

    /// The gate's bare repository.
    pub fn gate_repo(&self) -> PathBuf {
        self.gate_dir().join(crate::bundle::gate::REPO_NAME)
    }

    /// The gate's policy for its hooks (no secret values in it: fingerprints only).
    pub fn gate_policy(&self) -> PathBuf {
        self.gate_dir().join("policy.json")
    }

    /// What `pull` needs after the bottle stopped: the host repository, the push patterns.
    pub fn gate_info(&self) -> PathBuf {
        self.gate_dir().join("gate.json")
    }

    pub fn gate_hooks(&self) -> PathBuf {
        self.gate_dir().join("hooks")
    }

    /// An empty HOME for the gate's git processes (no user configuration applies).
    pub fn gate_home(&self) -> PathBuf {
        self.gate_dir().join("home")
    }

    pub fn gate_log(&self) -> PathBuf {
        self.path.join(GATE_LOG)
    }

    pub fn gate_socket(&self) -> PathBuf {
        self.path.join(GATE_SOCKET)
    }

    /// Remove the Unix sockets directly in the directory (a VMM killed before its clean stop
    /// leaves its control socket and per-port listeners). Nothing else is touched.
    pub fn remove_sockets(&self) {
        use std::os::unix::fs::FileTypeExt as _;
        for entry in std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_type().is_ok_and(|t| t.is_socket()) {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::debug!(path = %entry.path().display(), error = %e, "cannot remove a socket");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_file_has_its_own_name() {
        let run = RunDir::new("/r");
        let mut paths = vec![
            run.egress_log(),
            run.vsock_egress_log(),
            run.console_log(),
            run.ca_cert(),
            run.supervisor_token(),
            run.trust_store(),
            run.launch_file(),
            run.control_socket(),
            run.config_disk(),
            run.workspace_snapshot(0),
            run.workspace_snapshot(1),
            run.reaper_log(),
            run.gate_dir(),
            run.gate_log(),
            run.gate_socket(),
        ];
        let n = paths.len();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), n);
        assert!(paths.iter().all(|p| p.parent() == Some(Path::new("/r"))));
    }

    #[test]
    fn test_kept_logs_include_every_segment_of_the_egress_log() {
        let run = RunDir::new("/r");
        for log in [run.egress_log(), run.vsock_egress_log(), run.console_log()] {
            let name = log.file_name().unwrap().to_str().unwrap();
            assert!(RunDir::KEPT_LOGS.contains(&name), "{name}");
        }
        // The rotation's names (bundle::egress::events) are the ones kept.
        for suffix in [".0", ".1"] {
            let name = format!("{EGRESS_LOG}{suffix}");
            assert!(RunDir::KEPT_LOGS.contains(&name.as_str()), "{name}");
        }
    }

    #[test]
    fn test_remove_sockets_leaves_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let _listener = std::os::unix::net::UnixListener::bind(run.control_socket()).unwrap();
        std::fs::write(run.egress_log(), "x").unwrap();
        run.remove_sockets();
        assert!(!run.control_socket().exists());
        assert!(run.egress_log().exists());
    }
}
