//! Everything a bottle boots from, built locally and cached by content: the Docker images
//! (sidecar bundle, agent), the microVM's read-only root image (squashfs from the agent image),
//! workspace snapshots, and the guest kernel.

pub mod build;
pub mod export;
pub mod kernel;
pub mod rootfs;
pub mod squashfs;
pub mod workspace;
