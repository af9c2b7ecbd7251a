//! The sidecar bundle's runtime (`bot-bottle sidecar`, PID 1 of the bundle container): the
//! egress proxy, the git gate's relay, and the supervisor (a placeholder that says it is off
//! when the bottle has no supervisor token).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::bundle::egress::approvals::Approvals;
use crate::bundle::egress::intercept::{BottleCa, Injection, Interception};
use crate::bundle::egress::{EgressPolicy, ProxyConfig, RequestRuleSpec, SecretMode, SecretScan};
use crate::plan::{GIT_GATE_PORT, PROXY_PORT, SUPERVISOR_PORT};

/// Environment variable carrying the sidecar's JSON configuration.
pub const CONFIG_ENV: &str = "BOT_BOTTLE_SIDECAR";

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
        source: crate::bundle::egress::EgressError,
    },
    #[error("egress proxy failed")]
    Proxy {
        #[source]
        source: crate::bundle::egress::EgressError,
    },
    #[error("cannot set up credential injection")]
    Intercept {
        #[source]
        source: crate::bundle::egress::intercept::InterceptError,
    },
    #[error("cannot read the supervisor token {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the host's trust store")]
    TrustStore {
        #[source]
        source: crate::host::trust_store::TrustStoreError,
    },
    #[error("credentials were given without a path for the bottle CA's certificate: the agent could not trust the proxy; `bot-bottle start` sets both")]
    CredentialsWithoutCa,
    #[error("cannot write the bottle CA's certificate to {path}")]
    CaCert {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
    /// Exceptions to the proxy's address floor (`[egress] allow_private`).
    #[serde(default)]
    pub allow_private: Vec<String>,
    /// `[egress] allow` tables limiting the methods and paths of requests to their hosts.
    #[serde(default)]
    pub request_rules: Vec<RequestRuleSpec>,
    /// Where the decision log goes (inside the bundle).
    pub event_log: Option<PathBuf>,
    /// Secrets the proxy adds to requests (by TLS interception); empty: no interception.
    #[serde(default)]
    pub credentials: Vec<SidecarCredential>,
    /// Where the bottle CA's certificate is written for the agent (inside the bundle).
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// The host's trust store, copied by `start` (inside the bundle): the real hosts of
    /// intercepted connections are verified against it and the compiled-in public roots;
    /// none: the public roots only.
    #[serde(default)]
    pub trust_store: Option<PathBuf>,
    /// The supervisor's token (inside the bundle); none: the supervisor port says it is off.
    #[serde(default)]
    pub supervisor_token_file: Option<PathBuf>,
    /// `[egress] unknown = "ask"`: how long a request to an unlisted host is held for the
    /// human's answer; none: such requests are refused at once.
    #[serde(default)]
    pub approval_hold_secs: Option<u64>,
    /// `[egress] secrets`: outbound secret scanning of what the proxy sees inside.
    #[serde(default)]
    pub secrets: SecretMode,
    /// `secrets = "ask"`: how long a request carrying a secret is held for the human's answer.
    #[serde(default)]
    pub secret_hold_secs: Option<u64>,
}

/// One host's credential as the proxy sets it: `header: value`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarCredential {
    pub host: String,
    pub header: String,
    pub value: String,
    /// Where on the host it may be used (empty: everywhere).
    #[serde(default)]
    pub paths: Vec<String>,
}

impl std::fmt::Debug for SidecarCredential {
    // The value is a secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarCredential")
            .field("host", &self.host)
            .field("header", &self.header)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
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
            let reply = crate::bundle::egress::http::response(503, "Service Unavailable", &body);
            let _ = sock.write_all(&reply).await;
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

/// The values of a manifest's `[credentials]`, read on the host (`env` through `env_var`,
/// `file` from disk). A credential whose value is missing is left out with a warning that
/// says how to provide it: the agent then signs in itself.
pub fn resolve_credentials(
    credentials: &std::collections::BTreeMap<String, crate::config::manifest::Credential>,
    env_var: impl Fn(&str) -> Option<String>,
) -> (Vec<SidecarCredential>, Vec<String>) {
    let mut resolved = Vec::new();
    let mut warnings = Vec::new();
    for (host, c) in credentials {
        let value = match (&c.env, &c.file) {
            (Some(var), _) => env_var(var)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    format!("{var} is not set: export it to give {host} its credential")
                }),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|v| v.trim().to_owned())
                .map_err(|e| format!("cannot read {} for {host}: {e}", path.display())),
            (None, None) => Err(format!("no `env` or `file` for {host}")),
        };
        let value = value.map(|secret| match &c.scheme {
            Some(scheme) => format!("{scheme} {secret}"),
            None => secret,
        });
        // Checked here, on the host, so the user hears about it rather than the bundle failing.
        let checked = value.and_then(|v| {
            Injection::new(&c.header, v)
                .and_then(|i| i.with_paths(&c.paths))
                .map_err(|e| format!("{host}: {e}"))
        });
        match checked {
            Ok(injection) => resolved.push(SidecarCredential {
                host: host.to_ascii_lowercase(),
                header: injection.header,
                value: injection.value,
                paths: c.paths.clone(),
            }),
            Err(why) => warnings.push(format!("{why} (until then the agent signs in itself)")),
        }
    }
    (resolved, warnings)
}

/// The bottle's CA (made here; its key never leaves this process), its certificate written
/// to `ca_cert` for the agent, and the credentials by host.
fn interception(config: &SidecarConfig, ca_cert: &Path) -> Result<Interception, SidecarError> {
    let ca = BottleCa::generate(&config.bottle_id)
        .map_err(|source| SidecarError::Intercept { source })?;
    std::fs::write(ca_cert, ca.cert_pem()).map_err(|source| SidecarError::CaCert {
        path: ca_cert.to_path_buf(),
        source,
    })?;
    let mut credentials = std::collections::HashMap::new();
    for c in &config.credentials {
        let injection = Injection::new(&c.header, c.value.clone())
            .and_then(|i| i.with_paths(&c.paths))
            .map_err(|source| SidecarError::Intercept { source })?;
        credentials.insert(c.host.clone(), injection);
    }
    let Some(path) = &config.trust_store else {
        return Ok(Interception::new(ca, credentials));
    };
    let trusted = crate::host::trust_store::load(path)
        .map_err(|source| SidecarError::TrustStore { source })?;
    let extra = trusted.certs.len();
    let (interception, unusable) = Interception::with_extra_roots(ca, credentials, trusted.certs);
    // A certificate that does not parse (or is no usable root) is skipped, not fatal.
    let skipped = trusted.skipped + unusable;
    eprintln!(
        "bot-bottle sidecar for {}: intercepted hosts verified against the public roots and {} certificates of the host's trust store ({skipped} skipped: not parsable)",
        config.bottle_id,
        extra - unusable
    );
    Ok(interception)
}

/// The Docker host as the bundle sees it: the gateways of its routes (one per network it is
/// on). Refused by the proxy's address floor unless `allow_private` names the host.
fn docker_host_addresses() -> Vec<std::net::IpAddr> {
    match std::fs::read_to_string("/proc/net/route") {
        Ok(table) => crate::bundle::egress::resolve::route_gateways(&table),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/net/route: the Docker host's gateway addresses are refused only by range");
            Vec::new()
        }
    }
}

/// The proxy's secret scanner: the bottle's mode, and every credential value it injects (and
/// the token after its scheme) as its own rule `credential <host>`.
fn secret_scan(config: &SidecarConfig, queue: Option<Approvals>) -> SecretScan {
    let mut known: Vec<(&str, &str)> = Vec::new();
    for c in &config.credentials {
        known.push((&c.host, &c.value));
        if let Some((_, token)) = c.value.split_once(' ') {
            known.push((&c.host, token.trim()));
        }
    }
    let scan = SecretScan::new(config.secrets, &known);
    match queue.filter(|_| config.secrets == SecretMode::Ask) {
        Some(queue) => scan.with_approvals(queue),
        None => scan,
    }
}

/// Run the bundle until SIGTERM.
pub async fn run(config: SidecarConfig) -> Result<(), SidecarError> {
    let policy = EgressPolicy::new(&config.allow, &config.deny, &config.deny_message)
        .and_then(|p| p.with_private_exceptions(&config.allow_private))
        .and_then(|p| p.with_request_rules(&config.request_rules))
        .map_err(|source| SidecarError::Policy { source })?
        .with_host_addresses(docker_host_addresses());
    let mut proxy = ProxyConfig::new(
        &config.bottle_id,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROXY_PORT)),
        policy,
    );
    proxy.event_log = config.event_log.clone();
    // One queue for both kinds of question, so that `bot-bottle approvals` lists them together.
    let queue = config
        .approval_hold_secs
        .or(config.secret_hold_secs)
        .map(|secs| Approvals::new(std::time::Duration::from_secs(secs)));
    proxy.approvals = queue
        .clone()
        .filter(|_| config.approval_hold_secs.is_some());
    proxy.secrets = Some(std::sync::Arc::new(secret_scan(&config, queue.clone())));
    // Interception needs an agent that trusts the CA: no certificate path, no interception.
    match &config.ca_cert {
        Some(path) => proxy.interception = Some(std::sync::Arc::new(interception(&config, path)?)),
        None if !config.credentials.is_empty() => return Err(SidecarError::CredentialsWithoutCa),
        None => {}
    }
    let proxy = crate::bundle::egress::EgressProxy::bind(proxy)
        .await
        .map_err(|source| SidecarError::Proxy { source })?;
    let git = bind(GIT_GATE_PORT, "git gate").await?;
    tokio::spawn(crate::bundle::gate::relay::serve(
        git,
        crate::host::run_dir::RunDir::in_bundle().gate_socket(),
    ));
    let supervisor_port = bind(SUPERVISOR_PORT, "supervisor").await?;
    match &config.supervisor_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|source| SidecarError::Token {
                    path: path.clone(),
                    source,
                })?;
            let supervisor = crate::bundle::supervisor::Supervisor {
                bottle_id: config.bottle_id.clone(),
                token,
                policy: proxy.live_policy(),
                events: proxy.event_log(),
                approvals: queue,
            };
            tokio::spawn(supervisor.serve(supervisor_port));
        }
        None => {
            tokio::spawn(placeholder(supervisor_port, "supervisor"));
        }
    }
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
    proxy
        .run(shutdown)
        .await
        .map_err(|source| SidecarError::Proxy { source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::manifest::Credential;
    use std::collections::BTreeMap;

    fn credential(env: Option<&str>, file: Option<PathBuf>, scheme: Option<&str>) -> Credential {
        Credential {
            env: env.map(str::to_owned),
            file,
            header: "Authorization".into(),
            scheme: scheme.map(str::to_owned),
            paths: Vec::new(),
        }
    }

    #[test]
    fn credentials_come_from_the_host_env_or_a_file_with_their_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "sk-from-file\n").unwrap();
        let creds = BTreeMap::from([
            (
                "API.example".to_owned(),
                credential(Some("TOKEN"), None, Some("Bearer")),
            ),
            (
                "files.example".to_owned(),
                credential(None, Some(file), None),
            ),
            (
                "missing.example".to_owned(),
                credential(Some("UNSET"), None, None),
            ),
        ]);

        let (found, warnings) =
            resolve_credentials(&creds, |var| (var == "TOKEN").then(|| "tok-123".to_owned()));

        let got: Vec<(String, String)> = found.into_iter().map(|c| (c.host, c.value)).collect();
        assert_eq!(
            got,
            [
                ("api.example".to_owned(), "Bearer tok-123".to_owned()),
                ("files.example".to_owned(), "sk-from-file".to_owned())
            ]
        );
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("UNSET is not set"), "{warnings:?}");
    }

    #[test]
    fn a_credential_that_would_split_the_request_is_left_out_with_a_warning() {
        let creds = BTreeMap::from([(
            "api.example".to_owned(),
            credential(Some("TOKEN"), None, Some("Bearer")),
        )]);

        let (found, warnings) =
            resolve_credentials(&creds, |_| Some("tok\r\nX-Evil: 1".to_owned()));

        assert!(found.is_empty());
        assert!(
            warnings[0].starts_with("api.example: credential header"),
            "{warnings:?}"
        );
    }

    fn intercepting_config(trust_store: Option<PathBuf>) -> SidecarConfig {
        SidecarConfig {
            bottle_id: "b1".into(),
            allow: Vec::new(),
            deny: Vec::new(),
            deny_message: String::new(),
            allow_private: Vec::new(),
            request_rules: Vec::new(),
            event_log: None,
            credentials: vec![SidecarCredential {
                host: "api.test".into(),
                header: "Authorization".into(),
                value: "Bearer s3cret".into(),
                paths: Vec::new(),
            }],
            ca_cert: None,
            trust_store,
            supervisor_token_file: None,
            approval_hold_secs: None,
            secrets: SecretMode::Block,
            secret_hold_secs: None,
        }
    }

    #[test]
    fn a_configuration_from_before_the_trust_store_still_parses() {
        let json = r#"{"bottle_id":"b1","allow":[],"deny":[],"deny_message":"","event_log":null}"#;

        let config: SidecarConfig = serde_json::from_str(json).unwrap();

        assert_eq!(config.trust_store, None);
        assert!(config.request_rules.is_empty());
    }

    #[test]
    fn a_named_trust_store_without_certificates_stops_the_bundle_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("trust-store.pem");
        std::fs::write(&store, "").unwrap();
        let config = intercepting_config(Some(store.clone()));

        let err = interception(
            &config,
            &crate::host::run_dir::RunDir::new(dir.path()).ca_cert(),
        )
        .unwrap_err();

        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains(&store.display().to_string()), "{chain}");
    }

    #[test]
    fn a_named_trust_store_with_a_certificate_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("trust-store.pem");
        let other = BottleCa::generate("other").unwrap();
        std::fs::write(&store, other.cert_pem()).unwrap();
        let config = intercepting_config(Some(store));

        let interception = interception(
            &config,
            &crate::host::run_dir::RunDir::new(dir.path()).ca_cert(),
        )
        .unwrap();

        assert!(interception.for_host("api.test").is_some());
    }

    #[test]
    fn a_credential_is_never_printed() {
        let c = SidecarCredential {
            host: "h".into(),
            header: "Authorization".into(),
            value: "Bearer s3cret".into(),
            paths: vec!["/v1/".into()],
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
