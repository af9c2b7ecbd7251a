//! The sidecar bundle's runtime (`bot-bottle sidecar`, PID 1 of the bundle container): the
//! egress proxy, and placeholders for the git gate and supervisor that say they are off.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::egress::{EgressPolicy, ProxyConfig};
use crate::plan::{GIT_GATE_PORT, PROXY_PORT, SUPERVISOR_PORT};

/// Environment variable carrying the sidecar's JSON configuration.
pub const CONFIG_ENV: &str = "BOT_BOTTLE_SIDECAR";
/// Directory inside the bundle where the host's per-bottle log directory is mounted.
pub const LOG_DIR_IN_BUNDLE: &str = "/var/log/bot-bottle";
/// File name of the egress decision log (JSON lines).
pub const EGRESS_LOG: &str = "egress.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("{CONFIG_ENV} is not set: the sidecar is started by `bot-bottle start`, not by hand")]
    NoConfig,
    #[error("{CONFIG_ENV} is not valid sidecar configuration")]
    BadConfig {
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid egress policy")]
    Policy {
        #[source]
        source: crate::egress::EgressError,
    },
    #[error("egress proxy failed")]
    Proxy {
        #[source]
        source: crate::egress::EgressError,
    },
    #[error("cannot listen on {addr} for the {service} placeholder")]
    Listen {
        addr: SocketAddr,
        service: &'static str,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarConfig {
    pub bottle_id: String,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub deny_message: String,
    /// Where the decision log goes (inside the bundle).
    pub event_log: Option<PathBuf>,
}

impl SidecarConfig {
    pub fn from_env() -> Result<Self, SidecarError> {
        let raw = std::env::var(CONFIG_ENV).map_err(|_| SidecarError::NoConfig)?;
        serde_json::from_str(&raw).map_err(|source| SidecarError::BadConfig { source })
    }
}

/// Answer every connection with a short 503 that names the disabled service.
async fn placeholder(listener: TcpListener, service: &'static str) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let body = format!("bot-bottle: the {service} is not enabled for this bottle\n");
            let reply = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

async fn bind(port: u16, service: &'static str) -> Result<TcpListener, SidecarError> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Listen {
            addr,
            service,
            source,
        })
}

/// Run the bundle until SIGTERM.
pub async fn run(config: SidecarConfig) -> Result<(), SidecarError> {
    let policy = EgressPolicy::new(&config.allow, &config.deny, &config.deny_message)
        .map_err(|source| SidecarError::Policy { source })?;
    let mut proxy = ProxyConfig::new(
        &config.bottle_id,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROXY_PORT)),
        policy,
    );
    proxy.event_log = config.event_log.clone();
    let git = bind(GIT_GATE_PORT, "git gate").await?;
    let supervisor = bind(SUPERVISOR_PORT, "supervisor").await?;
    tokio::spawn(placeholder(git, "git gate"));
    tokio::spawn(placeholder(supervisor, "supervisor"));
    let shutdown = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    eprintln!(
        "bot-bottle sidecar for {}: egress proxy on :{PROXY_PORT}",
        config.bottle_id
    );
    crate::egress::serve(proxy, shutdown)
        .await
        .map_err(|source| SidecarError::Proxy { source })
}
