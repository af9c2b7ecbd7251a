//! The sidecar bundle: one container per bottle, beside the agent, holding what the agent must
//! not: the egress proxy with the allowlist and the credentials (`egress/`), the supervisor
//! through which the host changes the policy, and (to come) the git gate. `runtime` is its PID 1
//! (`bot-bottle sidecar`).

pub mod container;
pub mod egress;
pub mod gate;
pub mod runtime;
pub mod supervisor;
#[cfg(test)]
pub(crate) mod test_connections;
