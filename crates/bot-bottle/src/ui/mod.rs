//! What the user sees beyond the agent's own terminal: the terminal UI of `bot-bottle
//! approvals`.

pub mod approvals;
