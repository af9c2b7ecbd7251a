//! Where bot-bottle keeps things on the host (XDG base directories).
//!
//! `BOT_BOTTLE_STATE_DIR`, `BOT_BOTTLE_CONFIG_DIR` and `BOT_BOTTLE_CACHE_DIR` override the XDG
//! locations; the tests use them to run isolated from the user's real bottles.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("cannot find a home directory: set HOME (or XDG_STATE_HOME and XDG_CONFIG_HOME)")]
    NoHome,
    #[error("cannot create directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    /// State DB, lock files, logs, sockets.
    pub state: PathBuf,
    /// The user's bottles live in `config/bottles`.
    pub config: PathBuf,
    /// Built kernels and root images.
    pub cache: PathBuf,
    pub home: PathBuf,
}

fn from_env(
    override_var: &str,
    xdg_var: &str,
    home: Option<&PathBuf>,
    fallback: &str,
) -> Option<PathBuf> {
    if let Some(v) = std::env::var_os(override_var).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(v));
    }
    if let Some(v) = std::env::var_os(xdg_var).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(v).join("bot-bottle"));
    }
    home.map(|h| h.join(fallback).join("bot-bottle"))
}

impl Dirs {
    /// Resolve the directories from the environment (nothing is created).
    pub fn from_env() -> Result<Self, PathsError> {
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let state = from_env(
            "BOT_BOTTLE_STATE_DIR",
            "XDG_STATE_HOME",
            home.as_ref(),
            ".local/state",
        )
        .ok_or(PathsError::NoHome)?;
        let config = from_env(
            "BOT_BOTTLE_CONFIG_DIR",
            "XDG_CONFIG_HOME",
            home.as_ref(),
            ".config",
        )
        .ok_or(PathsError::NoHome)?;
        let cache = from_env(
            "BOT_BOTTLE_CACHE_DIR",
            "XDG_CACHE_HOME",
            home.as_ref(),
            ".cache",
        )
        .ok_or(PathsError::NoHome)?;
        Ok(Self {
            state,
            config,
            cache,
            home: home.unwrap_or_else(|| PathBuf::from("/")),
        })
    }

    /// A short stable tag for this state directory, stamped on every Docker object as
    /// `bot-bottle.state` so cleanup only touches objects this state directory created.
    pub fn state_tag(&self) -> String {
        use sha2::Digest as _;
        let canonical = self
            .state
            .canonicalize()
            .unwrap_or_else(|_| self.state.clone());
        let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        hex::encode(&digest[..6])
    }

    pub fn bottles_dir(&self) -> PathBuf {
        self.config.join("bottles")
    }

    pub fn db_path(&self) -> PathBuf {
        self.state.join("state.db")
    }

    pub fn alias_lock_path(&self) -> PathBuf {
        self.state.join("alias-pool.lock")
    }

    /// Where the runs' directories are (see [`Dirs::run_dir`]).
    pub fn runs_dir(&self) -> PathBuf {
        self.state.join("bottles")
    }

    /// Bottle run `id`'s directory (logs, sockets, VMM config).
    pub fn run_dir(&self, id: &str) -> crate::host::run_dir::RunDir {
        crate::host::run_dir::RunDir::new(self.runs_dir().join(id))
    }

    /// Create the state directory (mode 0700: it holds sockets and logs of the agent).
    pub fn ensure_state(&self) -> Result<(), PathsError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state)
            .map_err(|source| PathsError::Create {
                path: self.state.clone(),
                source,
            })
    }
}
