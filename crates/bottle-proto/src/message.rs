//! The JSON bodies of control frames.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// First frame of every session: proves the client knows this boot's token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub token: String,
}

/// What the client asks for, once per session, after [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent up? Answered with [`Response::Health`].
    Health,
    /// Run a command; streams `Stdout`/`Stderr`, ends with `Exit`.
    Exec(ExecRequest),
    /// Run a command on a pseudo-terminal; `Stdin`/`Resize`/`Signal` in, `Stdout` out, `Exit`.
    Pty(PtyRequest),
    /// Unpack the client's tar stream (`TarData`… `TarEof`) into the directory `dest`.
    CopyIn { dest: String },
    /// Send `path` (file or directory) back as a tar stream (`TarData`… `TarEof`).
    CopyOut { path: String },
    /// Power the guest off.
    Shutdown,
}

/// A command to run without a terminal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to the agent's base environment (the bottle's env); later keys win.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the user's home when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Killed (SIGKILL to its process group) after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Run as this uid/gid; the bottle's agent user when absent.
    #[serde(default)]
    pub user: Option<UserIds>,
}

impl ExecRequest {
    /// A request for `argv` with everything else defaulted.
    pub fn new<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }
}

/// A command to run on a pseudo-terminal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PtyRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub size: WindowSize,
    #[serde(default)]
    pub user: Option<UserIds>,
    /// Power the guest off when this command exits (the attached agent session).
    #[serde(default)]
    pub power_off_on_exit: bool,
}

/// Numeric ids: the guest never looks names up (no NSS in a static PID 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl Default for WindowSize {
    fn default() -> WindowSize {
        WindowSize { rows: 24, cols: 80 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalBody {
    pub signal: i32,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The code a shell would report: the exit code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }
}

/// Final answer of a session that is not `exec`/`pty`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Health(HealthInfo),
    Ok,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthInfo {
    /// bottle-init's crate version.
    pub agent_version: String,
    /// Milliseconds since the guest kernel started (from /proc/uptime).
    pub uptime_ms: u64,
}

/// Body of an `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}
