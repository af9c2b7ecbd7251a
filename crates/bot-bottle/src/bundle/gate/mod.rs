//! The git gate: the one way the agent's work leaves the bottle, through git's own smart HTTP
//! protocol so that a stock `git push bottle HEAD:bot/x` works from inside.
//!
//! The bundle listens on the gate port of the bottle's address and relays each connection
//! ([`relay`]) to a Unix socket in the run directory, where `start` on the host serves it
//! ([`server`]) with git's own `git http-backend`, run with a cleared environment and the
//! safety settings of [`repo`], against a bare repository per bottle run ([`repo`]): never the
//! user's own repository. Every object is fsck-checked on receipt; the pre-receive hook
//! (`bot-bottle __git-hook`, [`policy`]) refuses what `[git]` does not allow (refs outside the
//! push patterns, force-pushes, deletions) and any commit whose added lines carry a secret
//! (the bottle's credentials by fingerprint, well-known token formats, private keys,
//! high-entropy strings), naming the file, line and rule, never the value. The user takes the
//! accepted refs with `bot-bottle pull` into `refs/remotes/bottle/*` (PRD 0009).

pub mod policy;
pub mod relay;
pub mod repo;
pub mod server;
pub mod upstream;

/// The gate repository's name in its URL: `http://<bundle>:9418/workspace.git`.
pub const REPO_NAME: &str = "workspace.git";
