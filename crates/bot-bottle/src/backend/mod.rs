//! Where the agent runs: a Docker container (`docker/`, gVisor's runsc when registered) or a
//! microVM under our own VMM (`microvm/`). Both are reached the same way once running: exec,
//! copy in and out (`transfer`).

pub mod docker;
pub mod microvm;
pub mod transfer;
