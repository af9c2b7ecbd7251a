//! bot-bottle: run AI coding agents inside a sandbox they cannot talk their way out of.
//!
//! The orchestrator crate. Async (tokio), no `unsafe`: everything that touches `/dev/kvm`
//! lives in `bottle-vmm`.
#![forbid(unsafe_code)]

pub mod egress;
pub mod kernel;
pub mod rootfs;
