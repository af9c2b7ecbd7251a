//! Egress proxy: allowlist policy, HTTP CONNECT / forward proxy, decision events.
//!
//! - [`policy`]: which `host:port` a bottle may reach (pure, exhaustively unit-tested);
//! - [`request_rules`]: which methods and paths requests to a host the proxy sees inside may
//!   use (`[egress] allow` tables);
//! - [`resolve`]: pure-Rust name resolution (`/etc/hosts`, then the `/etc/resolv.conf`
//!   nameserver over UDP/TCP), or a fixed map for tests — never glibc NSS;
//! - [`approvals`]: requests to unlisted hosts held for a human's answer (`unknown = "ask"`);
//! - [`events`]: one JSON line per decision, appended to the bottle's event log;
//! - [`proxy`]: the tokio server (`CONNECT` tunnels and plain-HTTP forwarding);
//! - [`intercept`]: credential injection by TLS interception, for hosts with a credential;
//! - [`secrets`]: outbound secret scanning of what the proxy sees inside (`[egress] secrets`).
//!
//! The policy and its reasons are documented in `prds/0003-egress-policy.md`.

pub mod approvals;
pub mod events;
pub mod intercept;
pub mod policy;
pub mod proxy;
pub mod request_rules;
pub mod resolve;
pub mod secrets;

pub(crate) mod body;
pub(crate) mod http;
#[cfg(test)]
mod test_pki;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_approvals;
#[cfg(test)]
mod tests_binding;
#[cfg(test)]
mod tests_framing;
#[cfg(test)]
mod tests_secrets;
mod tunnel;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use events::EgressEvent;
pub use policy::{
    normalize_host, CredentialPaths, Decision, DenyReason, EgressPolicy, FloorRefusal, LivePolicy,
    PathError, RuleError,
};
pub use proxy::{serve, EgressProxy, ProxyConfig, ProxyLimits};
pub use request_rules::{RequestDenied, RequestRuleSpec, RequestRules};
pub use resolve::{FloorRange, Resolver};
pub use secrets::{SecretMode, SecretScan};

/// Everything that can go wrong in the egress module.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("invalid egress rule {rule:?}: {reason}")]
    InvalidRule { rule: String, reason: RuleError },
    /// An `[egress] allow` table; `rule` is its text (`{ host = "…", methods = […] }`).
    #[error("invalid egress rule {rule}: {reason}")]
    InvalidRequestRule { rule: String, reason: RuleError },
    #[error("cannot listen for egress on {addr} (is another process using the port?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the address the egress proxy listens on")]
    LocalAddr(#[source] io::Error),
    #[error("cannot open the egress event log {} (check the directory exists and is writable)", path.display())]
    OpenEventLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot append to the egress event log {}", path.display())]
    WriteEventLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read resolver configuration {}", path.display())]
    ReadResolverConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no `nameserver` line in {}; add one (e.g. `nameserver 127.0.0.11`)", path.display())]
    NoNameserver { path: PathBuf },
    #[error("no address found for {host}")]
    HostNotFound { host: String },
    #[error("DNS lookup of {host} timed out (nameservers: {nameservers})")]
    DnsTimeout { host: String, nameservers: String },
    #[error("DNS lookup of {host} failed (nameservers: {nameservers})")]
    DnsLookup {
        host: String,
        nameservers: String,
        /// Boxed: hickory's error is large, and every egress `Result` would carry its size.
        #[source]
        source: Box<hickory_resolver::net::NetError>,
    },
    #[error("cannot connect to {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {host}:{port} timed out")]
    ConnectTimeout { host: String, port: u16 },
    #[error("{host} resolves only to addresses the proxy refuses to dial ({addresses})")]
    BlockedAddress { host: String, addresses: String },
}
