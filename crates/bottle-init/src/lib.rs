//! bottle-init: PID 1 of the bot-bottle guest. The library holds everything that can be tested
//! on the host (the control agent, the reaper); `main.rs` adds the boot sequence.

pub mod agent;
pub mod reaper;
