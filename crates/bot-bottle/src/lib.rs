//! bot-bottle: run AI coding agents inside a sandbox they cannot talk their way out of.
//!
//! The orchestrator crate. Async (tokio), no `unsafe`: everything that touches `/dev/kvm`
//! lives in `bottle-vmm`.
#![forbid(unsafe_code)]

pub mod alias;
pub mod docker;
pub mod docker_backend;
pub mod egress;
pub mod guard;
pub mod images;
pub mod kernel;
pub mod logging;
pub mod manifest;
pub mod microvm;
pub mod microvm_run;
pub mod mounts;
pub mod orphans;
pub mod paths;
pub mod plan;
pub mod preflight;
pub mod retention;
pub mod rootfs;
pub mod sidecar;
pub mod squashfs;
pub mod state;
pub mod supervisor;
pub mod terminal;
pub mod transfer;
pub mod trust_store;
pub mod upper;
pub mod workspace;
