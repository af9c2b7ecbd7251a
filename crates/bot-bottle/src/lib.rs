//! bot-bottle: run AI coding agents inside a sandbox they cannot talk their way out of.
//!
//! The orchestrator crate. Async (tokio), no `unsafe`: everything that touches `/dev/kvm`
//! lives in `bottle-vmm`. The folders follow a bottle's life, in the order a reader opens them:
//! [`config`] (the manifest) → [`plan`] (every name and address, pure) → [`state`] (the alias
//! and the rows that record what is allocated) → [`session`] (the start sequence and its guard
//! stack) → [`bundle`] (the sidecar container: egress proxy, supervisor) and [`backend`] (the
//! agent: container or microVM; attach, exec, copy) built from [`image`] → teardown (the guard
//! stack, [`session::orphans`] for a run that was killed). [`host`] is the machine around them; [`ui`] the approvals screen.
#![forbid(unsafe_code)]

pub mod backend;
pub mod bundle;
pub mod config;
pub mod host;
pub mod image;
pub mod plan;
pub mod session;
pub mod state;
pub mod ui;
