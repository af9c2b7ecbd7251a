//! What the user asked for: bottle manifests (bundled and the user's own) and the workspace
//! mounts from `--mount` and `[[mount]]`, checked on the host. Nothing here allocates anything.

pub mod manifest;
pub mod mounts;
pub mod save;
