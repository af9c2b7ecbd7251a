//! bottle-init: PID 1 of the bot-bottle guest. The library holds the pieces (the control
//! agent, the reaper, the boot steps, the network); `main.rs` puts them in order.

pub mod agent;
pub mod boot;
pub mod net;
pub mod pid1;
pub mod reaper;

pub use agent::chain;
