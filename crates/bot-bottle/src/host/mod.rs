//! The machine bot-bottle runs on: where it keeps things (XDG paths), what it requires
//! (preflight: KVM, Docker, the guest kernel), the Docker engine through bollard, the user's
//! terminal, logging, and the host's trust store handed to the bundle.

pub mod docker;
pub mod logging;
pub mod paths;
pub mod preflight;
pub mod run_dir;
pub mod supervise;
pub mod terminal;
pub mod trust_store;
