//! Credential injection by TLS interception.
//!
//! A bottle's `[credentials."host"]` are secrets the agent must use but never hold. When the
//! agent opens a `CONNECT` tunnel to such a host (and the policy allows it), the proxy answers
//! the TLS handshake itself, with a certificate for that host signed by the bottle's own CA —
//! made when the bundle starts, its key never leaving the proxy, its certificate trusted only
//! by this bottle's agent. The proxy opens its own TLS connection to the real host, verified
//! against the public roots and the host's trust store (`crate::host::trust_store`), and sends each request up with the credential's header set by
//! the proxy: whatever the agent put in that header is dropped. The secret never reaches the
//! agent. Connections stay open for the next request (HTTP/1.1 keep-alive), so each request
//! and response is read by its framing (`Content-Length`, chunked, or until close) and every
//! request on the connection gets the credential; responses are relayed as they arrive, so a
//! streamed (server-sent events) answer reaches the agent chunk by chunk.
//!
//! The credential is bound to the host it was given for: inside the tunnel, a request whose
//! `Host` header or absolute-form target names another host (or port) is refused, and so are
//! `TRACE`, `CONNECT` and protocol upgrades, which would leave HTTP (and the proxy's view)
//! behind. The credential never comes back to the agent: a response head carrying it is
//! refused, and in bodies it is overwritten (same length, so framing holds). The proxy asks
//! for `Accept-Encoding: identity` (the agent's own value dropped), and an answer with an
//! encoded body (gzip, br, ...) it could not search is refused rather than relayed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

use super::body::{self, BodyError};
use super::events::{EgressEvent, EventLog};
use super::http::{self, BodyFraming, ResponseFraming};
use super::policy::{normalize_host, CredentialPaths, PathError};
use super::request_rules::{self, RequestDenied, RequestRules};
use super::secrets::{self, ReadError, SecretScan, Verdict};

/// Longest request head the agent may send through an intercepted connection.
const MAX_HEAD: usize = 64 * 1024;
/// Most host certificates kept issued at once. Only credential hosts are intercepted and
/// their names are normalised first, so this bounds only a bottle with very many credentials.
const MAX_ISSUED_CERTS: usize = 64;
/// Shortest part of a credential (the token after its scheme) that is also redacted alone:
/// shorter ones would overwrite ordinary text.
const MIN_REDACTED_TOKEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("cannot make the bottle's certificate authority")]
    Ca(#[source] rcgen::Error),
    #[error("cannot issue a certificate for {host}")]
    Issue {
        host: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("TLS configuration for {host} failed")]
    Tls {
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{host} is not a valid TLS server name")]
    ServerName { host: String },
    #[error(
        "credential header {header:?} is not a valid header name or its value is not printable"
    )]
    BadHeader { header: String },
    /// The path error is the message (it names the path and why), not a cause to repeat.
    #[error("invalid credential paths: {0}")]
    BadPath(PathError),
}

/// Why a request inside an intercepted tunnel is refused before it goes up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("the request names host {named:?}, but this tunnel (and its credential) is bound to {bound}")]
    OtherHost { named: String, bound: String },
    #[error("the request has {count} Host headers; exactly one, naming {bound}, is required")]
    HostCount { count: usize, bound: String },
    #[error("request target {target:?} is neither a path nor an https:// URL of {bound}")]
    Target { target: String, bound: String },
    #[error("{method} is not allowed inside an intercepted tunnel")]
    Method { method: String },
    #[error("protocol upgrades (`Upgrade`, `Connection: upgrade`) are not allowed through an intercepted host")]
    Upgrade,
    #[error(transparent)]
    Path(#[from] PathError),
    /// Outside the `[egress] allow` tables (methods, paths) for this host.
    #[error(transparent)]
    Request(#[from] RequestDenied),
}

/// Why a request head inside an intercepted tunnel cannot go up (answered with a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestHeadError {
    #[error("incomplete request head")]
    Incomplete,
    /// Malformed, or too many header lines.
    #[error(transparent)]
    Head(#[from] http::HeadError),
    /// A framing a request smuggler would use.
    #[error(transparent)]
    Framing(#[from] http::FramingError),
}

/// Why the real host's answer is not relayed (answered with a 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UpstreamResponseError {
    /// A `101` the agent's request could not have asked for (its `Upgrade` is never sent up).
    #[error("an unrequested protocol switch")]
    ProtocolSwitch,
    #[error(transparent)]
    Response(#[from] http::ResponseError),
}

impl BindingError {
    fn status(&self) -> u16 {
        match self {
            BindingError::Method { .. } => 405,
            _ => 403,
        }
    }

    /// The event's `reason`.
    fn code(&self) -> &'static str {
        match self {
            BindingError::OtherHost { .. }
            | BindingError::HostCount { .. }
            | BindingError::Target { .. } => "host_mismatch",
            BindingError::Method { .. } => "method_not_allowed",
            BindingError::Upgrade => "upgrade_refused",
            BindingError::Path(_) => "path_not_allowed",
            BindingError::Request(_) => "request_not_allowed",
        }
    }

    /// The event's `rule`: the request rules that refused.
    fn rule(&self) -> Option<String> {
        match self {
            BindingError::Request(denied) => Some(denied.rules().to_owned()),
            _ => None,
        }
    }
}

/// What the proxy sets on every request to one host, and where on that host.
#[derive(Clone)]
pub struct Injection {
    /// Header name, e.g. `Authorization` or `x-api-key`.
    pub header: String,
    /// Full header value, e.g. `Bearer <token>`.
    pub value: String,
    /// The paths the credential may be used for; requests elsewhere are refused.
    pub paths: CredentialPaths,
}

impl std::fmt::Debug for Injection {
    // The value is a secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injection")
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .field("paths", &self.paths.prefixes())
            .finish()
    }
}

impl Injection {
    pub fn new(header: &str, value: String) -> Result<Self, InterceptError> {
        let valid_name = !header.is_empty()
            && header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        let valid_value = value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        if !valid_name || !valid_value {
            return Err(InterceptError::BadHeader {
                header: header.to_owned(),
            });
        }
        Ok(Injection {
            header: header.to_owned(),
            value,
            paths: CredentialPaths::default(),
        })
    }

    /// The same injection, only for requests under `prefixes` (see [`CredentialPaths`]).
    pub fn with_paths(mut self, prefixes: &[String]) -> Result<Self, InterceptError> {
        self.paths = CredentialPaths::new(prefixes).map_err(InterceptError::BadPath)?;
        Ok(self)
    }

    /// What must never reach the agent: the whole value, and the token after its scheme
    /// (`Bearer <token>`) when that is long enough to be unmistakable.
    fn secrets(&self) -> Vec<Vec<u8>> {
        let mut secrets = vec![self.value.as_bytes().to_vec()];
        if let Some((_, token)) = self.value.split_once(' ') {
            let token = token.trim();
            if token.len() >= MIN_REDACTED_TOKEN {
                secrets.push(token.as_bytes().to_vec());
            }
        }
        secrets
    }
}

/// Where a request refused inside an intercepted tunnel (its host, path, method, request
/// rules) is recorded, and what the agent is told.
pub(crate) struct PathRefusals<'a> {
    pub log: Option<&'a EventLog>,
    /// The tunnel's event (client, host, port); method, verdict and reason are filled in.
    pub template: EgressEvent,
    pub deny_message: String,
    /// The `[egress] allow` tables for the tunnel's host and port: every request must fit one
    /// (empty: not checked).
    pub rules: RequestRules,
    /// Outbound secret scanning of each request (see [`super::secrets`]); none: off.
    pub secrets: Option<&'a SecretScan>,
}

/// What becomes of a request inside the tunnel once it is scanned.
enum Scanned {
    /// It goes up: its body as framed for the real host, and its turn (held until sent).
    Send(Vec<u8>, secrets::Turn),
    /// Refused; its body was read whole, so the connection goes on.
    Refused(Vec<u8>),
    /// Refused; its body could not be read (too large, or badly framed): the connection ends.
    End(Vec<u8>),
}

impl PathRefusals<'_> {
    /// Records a refusal (`reason` is the event's code).
    async fn record(&self, method: &str, reason: &str, why: &str) {
        self.record_rule(method, reason, None, why).await;
    }

    /// Records a refusal by `rule` (the event's `rule`).
    async fn record_rule(&self, method: &str, reason: &str, rule: Option<String>, why: &str) {
        let mut event = self.template.clone();
        event.method = method.to_owned();
        event.verdict = "deny".into();
        event.reason = reason.to_owned();
        event.rule = rule;
        event.detail = Some(why.to_owned());
        tracing::info!(host = %event.host, port = event.port, reason = %event.reason, detail = why, "egress decision");
        if let Some(log) = self.log {
            if let Err(e) = log.append(&event).await {
                tracing::error!(error = %e, "cannot record egress event");
            }
        }
    }

    /// Reads the request's body whole and scans it with the head as it goes up (the injected
    /// credential's header left out).
    async fn scan<R: tokio::io::AsyncBufRead + Unpin>(
        &self,
        scan: &SecretScan,
        request: &mut Rewritten,
        agent: &mut R,
        injection: &Injection,
    ) -> std::io::Result<Scanned> {
        let method = request.method.clone();
        let (mut body, turn) = match scan.read_body(agent, request.framing).await {
            Ok(read) => read,
            Err(ReadError::Body(BodyError::Io(e))) => return Err(e),
            Err(e) => {
                let (status, phrase, reason) = match e {
                    ReadError::TooLarge => (413, "Content Too Large", "secret_scan_limit"),
                    ReadError::Body(_) => (400, "Bad Request", "bad_request"),
                };
                let why = e.to_string();
                self.record(&method, reason, &why).await;
                let reply = http::response(status, phrase, &format!("bot-bottle egress: {why}\n"));
                return Ok(Scanned::End(reply));
            }
        };
        let hits = scan.scan(&request.head, Some(&injection.header), &body);
        if hits.is_empty() {
            return Ok(Scanned::Send(secrets::framed(body, request.framing), turn));
        }
        let mut event = self.template.clone();
        event.method = method;
        let target = request.target.clone();
        match scan.act(&hits, self.log, &event, Some(&target)).await {
            Verdict::Send { redact, .. } => {
                if redact {
                    hits.redact(&mut request.head, &mut body);
                }
                Ok(Scanned::Send(secrets::framed(body, request.framing), turn))
            }
            Verdict::Refuse {
                status,
                phrase,
                body,
                ..
            } => Ok(Scanned::Refused(http::response(status, &phrase, &body))),
        }
    }

    /// Records the refusal and returns the 403 (405 for a method) for the agent.
    async fn refuse(&self, method: &str, refused: &BindingError) -> Vec<u8> {
        let why = refused.to_string();
        self.record_rule(method, refused.code(), refused.rule(), &why)
            .await;
        let message = self.deny_message.trim_end();
        let separator = if message.is_empty() { "" } else { "\n" };
        let (status, reason) = match refused.status() {
            405 => (405, "Method Not Allowed".to_owned()),
            _ => (403, super::proxy::forbidden_reason(message)),
        };
        let event = &self.template;
        http::response(
            status,
            &reason,
            &format!(
                "{message}{separator}bot-bottle egress: {}:{} denied: {why}\n",
                event.host, event.port
            ),
        )
    }
}

/// The bottle's certificate authority and the host certificates it has issued.
pub struct BottleCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issued: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for BottleCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BottleCa").finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl BottleCa {
    /// A new CA for `bottle_id` (P-256; its key exists only in this process).
    pub fn generate(bottle_id: &str) -> Result<Self, InterceptError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("bot-bottle {bottle_id}"));
        dn.push(DnType::OrganizationName, "bot-bottle (this bottle only)");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(InterceptError::Ca)?;
        let cert = params
            .clone()
            .self_signed(&key)
            .map_err(InterceptError::Ca)?;
        Ok(BottleCa {
            params,
            key,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate the agent trusts (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The same certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The TLS server configuration presenting a certificate for `host` (normalised: every
    /// spelling of a name shares one), issued once; at most [`MAX_ISSUED_CERTS`] are kept.
    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, InterceptError> {
        let normal = normalize_host(host).ok_or_else(|| InterceptError::ServerName {
            host: host.to_owned(),
        })?;
        let host = normal.as_str();
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = issued.get(host) {
            return Ok(config.clone());
        }
        if issued.len() >= MAX_ISSUED_CERTS {
            // Any one goes: it is issued again if asked for.
            if let Some(evicted) = issued.keys().next().cloned() {
                issued.remove(&evicted);
            }
        }
        let issue = |source| InterceptError::Issue {
            host: host.to_owned(),
            source,
        };
        let ca = self.params.clone().self_signed(&self.key).map_err(issue)?;
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(issue)?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.to_owned());
        let key = KeyPair::generate().map_err(issue)?;
        let leaf = params.signed_by(&key, &ca, &self.key).map_err(issue)?;
        // The leaf alone: the agent holds the CA as a trust anchor. (`ca` here is the same
        // name and key re-signed, only to sign with; it is not the certificate the agent has.)
        let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let tls = |source| InterceptError::Tls {
            host: host.to_owned(),
            source,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(tls)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        issued.insert(host.to_owned(), config.clone());
        Ok(config)
    }
}

/// Interception for one bottle: its CA, the credentials by host, and the roots the real hosts
/// are verified against.
pub struct Interception {
    ca: BottleCa,
    credentials: HashMap<String, Injection>,
    /// The proxy's TLS client towards the real hosts, made once.
    upstream: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("hosts", &self.credentials.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Interception {
    /// The real hosts verified against the public roots (Mozilla's, compiled in).
    pub fn new(ca: BottleCa, credentials: HashMap<String, Injection>) -> Self {
        let roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Interception::with_roots(ca, credentials, roots)
    }

    /// The real hosts verified against the public roots and `extra` (the host's trust store,
    /// e.g. a TLS-inspecting proxy's CA). Returns how many of `extra` are not usable as roots.
    pub fn with_extra_roots(
        ca: BottleCa,
        credentials: HashMap<String, Injection>,
        extra: Vec<CertificateDer<'static>>,
    ) -> (Self, usize) {
        let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let (_, unusable) = roots.add_parsable_certificates(extra);
        (Interception::with_roots(ca, credentials, roots), unusable)
    }

    /// The real hosts verified against `roots` (tests and benchmarks: a local PKI).
    pub fn with_roots(
        ca: BottleCa,
        credentials: HashMap<String, Injection>,
        roots: RootCertStore,
    ) -> Self {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Interception {
            ca,
            credentials: credentials
                .into_iter()
                .map(|(host, i)| {
                    let host = normalize_host(&host).unwrap_or(host.to_ascii_lowercase());
                    (host, i)
                })
                .collect(),
            upstream: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    /// The injection for `host`, when it has a credential.
    pub fn for_host(&self, host: &str) -> Option<&Injection> {
        self.credentials.get(&normalize_host(host)?)
    }

    /// Serves one intercepted tunnel: `client` has been told the tunnel is open (and may
    /// already have sent `leftover`), `upstream` is the TCP connection to the real host.
    pub(crate) async fn serve<U: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut TcpStream,
        leftover: Vec<u8>,
        upstream: U,
        host: &str,
        injection: &Injection,
        refusals: &PathRefusals<'_>,
    ) -> std::io::Result<()> {
        let host = normalize_host(host).ok_or_else(|| {
            std::io::Error::other(InterceptError::ServerName {
                host: host.to_owned(),
            })
        })?;
        let host = host.as_str();
        let port = refusals.template.port;
        let secrets = injection.secrets();
        let server = self.ca.server_config(host).map_err(std::io::Error::other)?;
        let client = Prefixed {
            prefix: leftover,
            inner: client,
        };
        let agent = tokio_rustls::TlsAcceptor::from(server)
            .accept(client)
            .await?;
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            std::io::Error::other(InterceptError::ServerName {
                host: host.to_owned(),
            })
        })?;
        let real = match self.upstream.connect(name, upstream).await {
            Ok(real) => real,
            Err(e) => {
                // The agent's request waits on a connection that cannot be made (typically a
                // certificate no trusted root signed): it gets a 502 saying why, not a reset.
                let why = format!("cannot open a verified TLS connection to {host}: {e}");
                refusals.record("CONNECT", "upstream_tls", &why).await;
                let mut agent = agent;
                let reply =
                    http::response(502, "Bad Gateway", &format!("bot-bottle egress: {why}\n"));
                agent.write_all(&reply).await?;
                agent.flush().await?;
                return agent.shutdown().await;
            }
        };
        let mut agent = BufReader::new(agent);
        let mut real = BufReader::new(real);
        loop {
            // Between requests, watch both ends: when the real host closes an idle connection,
            // close the agent's too, so that its client opens a new one instead of sending its
            // next request into a dead end.
            let agent_first = tokio::select! {
                a = agent.fill_buf() => a.map(|b| !b.is_empty())?,
                r = real.fill_buf() => {
                    // Bytes with no request pending, or the end: either way this connection
                    // carries nothing more.
                    let _ = r?;
                    false
                }
            };
            if !agent_first {
                break;
            }
            let Some(head) = body::read_head(&mut agent, MAX_HEAD).await? else {
                break;
            };
            let mut request = match rewrite_head(&head, injection) {
                Ok(request) => request,
                Err(why) => {
                    let reply =
                        http::response(400, "Bad Request", &format!("bot-bottle egress: {why}\n"));
                    agent.write_all(&reply).await?;
                    break;
                }
            };
            // Bound to the host, under the credential's paths, within the request rules: the
            // target goes up in the canonical form it was decided on.
            let bound = bind_request(&request, host, port)
                .and_then(|target| Ok(injection.paths.allows(&target)?))
                .and_then(|target| {
                    let method_override = request.method_override.as_deref();
                    Ok(refusals
                        .rules
                        .check(&request.method, &target, method_override)?)
                });
            match bound {
                Ok(target) => request.set_target(&target),
                Err(refused) => {
                    // Its body was not read: the connection cannot go on.
                    let reply = refusals.refuse(&request.method, &refused).await;
                    agent.write_all(&reply).await?;
                    break;
                }
            }
            if request.expects_continue {
                agent.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                agent.flush().await?;
            }
            if let Some(scan) = refusals.secrets {
                match refusals
                    .scan(scan, &mut request, &mut agent, injection)
                    .await?
                {
                    Scanned::Send(body, turn) => {
                        real.write_all(&request.head).await?;
                        real.write_all(&body).await?;
                        drop(turn);
                    }
                    Scanned::Refused(reply) => {
                        agent.write_all(&reply).await?;
                        agent.flush().await?;
                        if request.closes {
                            break;
                        }
                        continue;
                    }
                    Scanned::End(reply) => {
                        agent.write_all(&reply).await?;
                        break;
                    }
                }
            } else {
                real.write_all(&request.head).await?;
                if let Err(e) = body::forward(&mut agent, &mut real, request.framing).await {
                    if !e.is_framing() {
                        return Err(e.into());
                    }
                    // The real host holds a request it will never see the end of: this connection
                    // ends here (the caller closes it), nothing more goes up on it.
                    let reply =
                        http::response(400, "Bad Request", &format!("bot-bottle egress: {e}\n"));
                    agent.write_all(&reply).await?;
                    break;
                }
            }
            real.flush().await?;

            // The answer: interim (1xx) heads pass through, then the final one and its body.
            let (raw, response) = loop {
                let Some(raw) = body::read_head(&mut real, MAX_HEAD).await? else {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                };
                let response = http::parse_response_head(&raw).map_err(std::io::Error::other)?;
                if secrets.iter().any(|secret| contains(&raw, secret)) {
                    let why = "the response head carries the injected credential: refused";
                    refusals
                        .record(&request.method, "credential_echo", why)
                        .await;
                    let reply =
                        http::response(502, "Bad Gateway", &format!("bot-bottle egress: {why}\n"));
                    agent.write_all(&reply).await?;
                    agent.flush().await?;
                    return agent.shutdown().await;
                }
                if (100..200).contains(&response.status) && response.status != 101 {
                    agent.write_all(&raw).await?;
                    continue;
                }
                break (raw, response);
            };
            let framing = match http::response_framing(&response, &request.method) {
                // The agent's Upgrade is never sent up: a protocol switch is not expected.
                Ok(_) if response.status == 101 => Err(UpstreamResponseError::ProtocolSwitch),
                other => other.map_err(UpstreamResponseError::from),
            };
            let framing = match framing {
                Ok(framing) => framing,
                Err(why) => {
                    let reply = http::response(
                        502,
                        "Bad Gateway",
                        &format!("bot-bottle egress: the upstream's response: {why}\n"),
                    );
                    agent.write_all(&reply).await?;
                    break;
                }
            };
            if let Some(encoding) = compressed(&response, framing) {
                // Asked for identity, sent something the proxy cannot search for the
                // credential: nothing of it reaches the agent, and the connection ends.
                let why = format!(
                    "the upstream sent an encoded body (Content-Encoding: {encoding}) although \
                     identity was asked; the proxy cannot check it for the injected credential: refused"
                );
                refusals
                    .record(&request.method, "credential_echo", &why)
                    .await;
                let reply =
                    http::response(502, "Bad Gateway", &format!("bot-bottle egress: {why}\n"));
                agent.write_all(&reply).await?;
                break;
            }
            agent.write_all(&raw).await?;
            let mut redacting = Redactor::new(&mut agent, &secrets);
            let until_close = match framing {
                ResponseFraming::Body(framing) => {
                    body::forward(&mut real, &mut redacting, framing).await?;
                    false
                }
                ResponseFraming::UntilClose => {
                    tokio::io::copy_buf(&mut real, &mut redacting).await?;
                    true
                }
            };
            let redacted = redacting.finish().await?;
            agent.flush().await?;
            if redacted > 0 {
                let why = format!(
                    "the response body carried the injected credential {redacted} time(s): overwritten"
                );
                refusals
                    .record(&request.method, "credential_echo", &why)
                    .await;
            }
            if until_close {
                break;
            }
            if request.closes || http::closes_connection(response.version, &response.headers) {
                break;
            }
        }
        agent.flush().await?;
        agent.shutdown().await
    }
}

/// The response's content coding when it has a body in one other than `identity` (the
/// proxy asked for `identity`, and can only search a plain body for the credential).
fn compressed(response: &http::ResponseHead, framing: ResponseFraming) -> Option<String> {
    if matches!(
        framing,
        ResponseFraming::Body(BodyFraming::None | BodyFraming::Length(0))
    ) {
        return None;
    }
    let codings: Vec<String> = http::header_tokens(&response.headers, "content-encoding")
        .into_iter()
        .filter(|c| c != "identity")
        .collect();
    if codings.is_empty() {
        return None;
    }
    let mut named = codings.join(", ");
    super::events::cut(&mut named, 64);
    Some(named)
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Binds a request to the tunnel's host: exactly one `Host` header naming `host` (its port,
/// if written, `port`), an origin-form target or an `https://` URL of the same host, no
/// `TRACE` or `CONNECT`, no protocol upgrade. Returns the origin-form target to send up.
pub fn bind_request(request: &Rewritten, host: &str, port: u16) -> Result<String, BindingError> {
    let method = request.method.to_ascii_uppercase();
    if ["TRACE", "TRACK", "CONNECT"].contains(&method.as_str()) {
        return Err(BindingError::Method {
            method: request.method.clone(),
        });
    }
    if request.upgrade {
        return Err(BindingError::Upgrade);
    }
    let bound = format!("{host}:{port}");
    let names_bound = |authority: &str| {
        http::parse_authority(authority.trim(), Some(port))
            .is_ok_and(|(h, p)| normalize_host(&h).as_deref() == Some(host) && p == port)
    };
    let [only] = request.hosts.as_slice() else {
        return Err(BindingError::HostCount {
            count: request.hosts.len(),
            bound,
        });
    };
    if !names_bound(only) {
        return Err(BindingError::OtherHost {
            named: only.clone(),
            bound,
        });
    }
    let target = &request.target;
    if target.starts_with('/') || (target == "*" && method == "OPTIONS") {
        return Ok(target.clone());
    }
    let lower = target.to_ascii_lowercase();
    let Some(rest) = lower
        .starts_with("https://")
        .then(|| &target["https://".len()..])
    else {
        return Err(BindingError::Target {
            target: target.clone(),
            bound,
        });
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if !names_bound(authority) {
        return Err(BindingError::OtherHost {
            named: authority.to_owned(),
            bound,
        });
    }
    Ok(match path {
        "" => "/".to_owned(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_owned(),
    })
}

/// Writes through to `inner`, overwriting every occurrence of a secret with `*` (same
/// length: the body's framing still holds). A tail that could be the start of a secret is
/// held back until the next write shows whether it is one, or until [`Redactor::finish`].
struct Redactor<'a, W> {
    inner: &'a mut W,
    secrets: &'a [Vec<u8>],
    /// Accepted, redacted as far as it can be, held: it may still become part of a secret.
    held: Vec<u8>,
    /// Redacted and final, not yet taken by `inner`.
    out: Vec<u8>,
    hits: usize,
}

impl<'a, W: AsyncWrite + Unpin> Redactor<'a, W> {
    fn new(inner: &'a mut W, secrets: &'a [Vec<u8>]) -> Self {
        Redactor {
            inner,
            secrets,
            held: Vec::new(),
            out: Vec::new(),
            hits: 0,
        }
    }

    /// Redacts `held` and moves what is final (cannot become part of a secret, whatever
    /// comes next; everything when `all`) to `out`.
    fn redact(&mut self, all: bool) {
        for secret in self.secrets {
            let mut at = 0;
            while at + secret.len() <= self.held.len() {
                if self.held[at..].starts_with(secret) {
                    self.held[at..at + secret.len()].fill(b'*');
                    self.hits += 1;
                    at += secret.len();
                } else {
                    at += 1;
                }
            }
        }
        // The longest tail that is a proper prefix of a secret stays held.
        let keep = if all {
            0
        } else {
            self.secrets
                .iter()
                .filter_map(|secret| {
                    (1..secret.len().min(self.held.len() + 1))
                        .rev()
                        .find(|&n| self.held.ends_with(&secret[..n]))
                })
                .max()
                .unwrap_or(0)
        };
        let final_len = self.held.len() - keep;
        self.out.extend(self.held.drain(..final_len));
    }

    /// Writes `out` on; `Ready(Ok)` once `inner` took all of it.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.out.is_empty() {
            match Pin::new(&mut *self.inner).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what is held and returns how many secrets were overwritten.
    async fn finish(mut self) -> std::io::Result<usize> {
        self.redact(true);
        let out = std::mem::take(&mut self.out);
        self.inner.write_all(&out).await?;
        Ok(self.hits)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Redactor<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // Earlier bytes go on first; only then is `buf` taken, and sent on at once if it can
        // be (a streamed response must not wait for the next piece).
        match self.poll_out(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        self.held.extend_from_slice(buf);
        self.redact(false);
        if let Poll::Ready(Err(e)) = self.poll_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.poll_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut *self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// One request as it goes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The head sent to the real host.
    pub head: Vec<u8>,
    pub method: String,
    /// The request target as the agent sent it (checked against the credential's paths).
    pub target: String,
    pub(crate) framing: BodyFraming,
    /// The agent's request ends the connection (`Connection: close`, or HTTP/1.0).
    pub closes: bool,
    /// The agent waits for `100 Continue` before its body: the proxy answers it.
    pub expects_continue: bool,
    /// Every `Host` header value, in order.
    pub hosts: Vec<String>,
    /// The agent asks for a protocol switch (`Upgrade`, or `upgrade` in `Connection`).
    pub upgrade: bool,
    /// A header asking the host to act as another method (`X-HTTP-Method-Override`, …).
    pub method_override: Option<String>,
}

impl Rewritten {
    /// Sends the request up for `target` (the canonical form it was decided on).
    pub fn set_target(&mut self, target: &str) {
        if target == self.target {
            return;
        }
        let line_end = self
            .head
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or(self.head.len());
        let line = format!("{} {target} HTTP/1.1", self.method);
        self.head.splice(..line_end, line.into_bytes());
        self.target = target.to_owned();
    }
}

/// The request head as sent up: the credential's header set by the proxy (the agent's own
/// value for it dropped), hop-by-hop headers and `Expect` removed, `Connection: close` only
/// when the agent's request ends its connection. Framings a request smuggler would use are
/// refused.
pub(crate) fn rewrite_head(
    head: &[u8],
    injection: &Injection,
) -> Result<Rewritten, RequestHeadError> {
    let Some((parsed, _)) = http::parse_head(head)? else {
        return Err(RequestHeadError::Incomplete);
    };
    let framing = http::body_framing(&parsed)?;
    let closes = http::closes_connection(parsed.version, &parsed.headers);
    let named_by_connection = http::connection_tokens(&parsed.headers);
    let hosts: Vec<String> = parsed
        .header_values("host")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let upgrade = named_by_connection.iter().any(|t| t == "upgrade")
        || parsed.header_values("upgrade").next().is_some();
    let method_override =
        request_rules::method_override(parsed.headers.iter().map(|(name, _)| name.as_str()));
    let mut expects_continue = false;
    let mut out = format!("{} {} HTTP/1.1\r\n", parsed.method, parsed.target).into_bytes();
    for (name, value) in &parsed.headers {
        let lower = name.to_ascii_lowercase();
        if lower == "expect" {
            expects_continue |= value.eq_ignore_ascii_case(b"100-continue");
            continue;
        }
        // The agent's `Accept-Encoding` is replaced by `identity`: the proxy must read the
        // answer to keep the credential out of it, and cannot read a compressed one.
        let drop = name.eq_ignore_ascii_case(&injection.header)
            || lower == "accept-encoding"
            || http::HOP_BY_HOP.contains(&lower.as_str())
            || named_by_connection.contains(&lower);
        if drop {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("{}: {}\r\n", injection.header, injection.value).as_bytes());
    out.extend_from_slice(b"Accept-Encoding: identity\r\n");
    if closes {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Rewritten {
        head: out,
        method: parsed.method,
        target: parsed.target,
        framing,
        closes,
        expects_continue,
        hosts,
        upgrade,
        method_override,
    })
}

/// A stream that first yields bytes already read from it.
struct Prefixed<'a> {
    prefix: Vec<u8>,
    inner: &'a mut TcpStream,
}

impl AsyncRead for Prefixed<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer() -> Injection {
        Injection::new("Authorization", "Bearer real-secret".into()).unwrap()
    }

    #[test]
    fn the_agents_own_credential_header_is_replaced_and_the_connection_kept() {
        let head = b"POST /v1/messages HTTP/1.1\r\nHost: api.test\r\nauthorization: Bearer fake\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n";

        let out = rewrite_head(head, &bearer()).unwrap();

        assert_eq!(
            String::from_utf8(out.head).unwrap(),
            "POST /v1/messages HTTP/1.1\r\nHost: api.test\r\nContent-Length: 2\r\nAuthorization: Bearer real-secret\r\nAccept-Encoding: identity\r\n\r\n"
        );
        assert_eq!(out.framing, BodyFraming::Length(2));
        assert!(!out.closes);
        assert!(out.expects_continue);
    }

    #[test]
    fn a_request_that_ends_its_connection_says_so_upstream() {
        let close =
            rewrite_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", &bearer()).unwrap();
        let old = rewrite_head(b"GET / HTTP/1.0\r\n\r\n", &bearer()).unwrap();

        for out in [close, old] {
            assert!(out.closes);
            assert!(String::from_utf8(out.head)
                .unwrap()
                .ends_with(
                    "Authorization: Bearer real-secret\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
                ));
        }
    }

    #[test]
    fn a_malformed_head_or_a_smuggling_framing_is_refused() {
        assert!(rewrite_head(b"GET\r\n\r\n", &bearer()).is_err());
        let both = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(rewrite_head(both, &bearer()).is_err());
    }

    #[test]
    fn header_names_and_values_that_would_split_the_request_are_refused() {
        assert!(Injection::new("X-Key\r\nEvil", "v".into()).is_err());
        assert!(Injection::new("X-Key", "v\r\nX-Evil: 1".into()).is_err());
        assert!(Injection::new("x-api-key", "sk-123".into()).is_ok());
    }

    #[test]
    fn the_secret_is_never_printed() {
        assert!(!format!("{:?}", bearer()).contains("real-secret"));
    }

    use crate::bundle::egress::test_pki::pki;

    /// How many connections and requests a test upstream has seen.
    #[derive(Default)]
    struct Seen {
        connections: std::sync::atomic::AtomicUsize,
        requests: std::sync::atomic::AtomicUsize,
        /// Every request head received, in order (what the agent sees back is redacted).
        heads: Mutex<Vec<String>>,
        /// Every request body received, as framed on the wire.
        bodies: Mutex<Vec<Vec<u8>>>,
    }

    impl Seen {
        fn heads(&self) -> String {
            self.heads.lock().unwrap().join("")
        }
    }

    /// A TLS server that keeps connections open and answers each request with `200` and the
    /// raw request as the body (`Content-Length`). `/stream` answers in two chunks, the second
    /// only once `go` is notified; `/until-close` answers without a length and closes.
    async fn tls_upstream(
        config: Arc<rustls::ServerConfig>,
        go: Arc<tokio::sync::Notify>,
    ) -> (u16, Arc<Seen>) {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let counter = seen.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, go) = (acceptor.clone(), counter.clone(), go.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    seen.connections.fetch_add(1, Ordering::SeqCst);
                    let mut tls = BufReader::new(tls);
                    while let Ok(Some(head)) = body::read_head(&mut tls, MAX_HEAD).await {
                        seen.requests.fetch_add(1, Ordering::SeqCst);
                        seen.heads
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let (parsed, _) = http::parse_head(&head).unwrap().unwrap();
                        let mut echo = head.clone();
                        let framing = http::body_framing(&parsed).unwrap();
                        body::forward(&mut tls, &mut echo, framing).await.unwrap();
                        seen.bodies
                            .lock()
                            .unwrap()
                            .push(echo[head.len()..].to_vec());
                        let closes = http::closes_connection(parsed.version, &parsed.headers);
                        match parsed.target.as_str() {
                            "/stream" => {
                                let first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                                tls.write_all(first).await.unwrap();
                                tls.flush().await.unwrap();
                                go.notified().await;
                                tls.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
                            }
                            "/then-idle-close" => {
                                // Answered as kept, then closed as an idle server would.
                                let reply = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    echo.len()
                                );
                                tls.write_all(reply.as_bytes()).await.unwrap();
                                tls.write_all(&echo).await.unwrap();
                                tls.flush().await.unwrap();
                                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                                let _ = tls.shutdown().await;
                                return;
                            }
                            "/until-close" => {
                                tls.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
                                tls.write_all(&echo).await.unwrap();
                                let _ = tls.shutdown().await;
                                return;
                            }
                            _ => {
                                let close = if closes { "Connection: close\r\n" } else { "" };
                                let reply = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{close}\r\n",
                                    echo.len()
                                );
                                tls.write_all(reply.as_bytes()).await.unwrap();
                                tls.write_all(&echo).await.unwrap();
                            }
                        }
                        tls.flush().await.unwrap();
                        if closes {
                            let _ = tls.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        (port, seen)
    }

    /// The proxy for a bottle allowing `api.test` (with a credential) and `other.test`
    /// (without), both resolving to this host; upstream certificates are checked against
    /// `root`. Returns the proxy's address and the bottle CA's certificate.
    async fn proxy(
        root: CertificateDer<'static>,
    ) -> (std::net::SocketAddr, CertificateDer<'static>) {
        proxy_with(root, bearer(), None, None).await
    }

    /// [`proxy`] with `injection` for `api.test`, and decision events written to `log`.
    async fn proxy_with(
        root: CertificateDer<'static>,
        injection: Injection,
        log: Option<std::path::PathBuf>,
        secrets: Option<super::secrets::SecretMode>,
    ) -> (std::net::SocketAddr, CertificateDer<'static>) {
        use crate::bundle::egress::{EgressPolicy, EgressProxy, ProxyConfig, Resolver};
        let ca = BottleCa::generate("test-intercept").unwrap();
        let ca_der = ca.cert_der().clone();
        let mut roots = RootCertStore::empty();
        roots.add(root).unwrap();
        let interception = Interception::with_roots(
            ca,
            HashMap::from([("api.test".to_owned(), injection)]),
            roots,
        );
        let policy = EgressPolicy::new(
            &["api.test:*".to_owned(), "other.test:*".to_owned()],
            &[],
            "denied",
        )
        .unwrap();
        let mut config = ProxyConfig::new("test-intercept", "127.0.0.1:0".parse().unwrap(), policy);
        let localhost = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        config.resolver = Resolver::fixed([("api.test", localhost), ("other.test", localhost)]);
        config.allow_loopback_upstream = true;
        config.interception = Some(Arc::new(interception));
        config.event_log = log;
        config.secrets = secrets.map(|mode| {
            // What the sidecar gives it: each injected value, and its token alone.
            let known = [
                ("api.test", "Bearer real-secret"),
                ("api.test", "real-secret"),
            ];
            Arc::new(SecretScan::new(mode, &known))
        });
        let proxy = EgressProxy::bind(config).await.unwrap();
        let addr = proxy.local_addr();
        tokio::spawn(proxy.run(std::future::pending()));
        (addr, ca_der)
    }

    /// The agent's side: `CONNECT host:port` through the proxy, then TLS trusting only `trust`.
    async fn agent_connect(
        proxy: std::net::SocketAddr,
        host: &str,
        port: u16,
        trust: CertificateDer<'static>,
    ) -> std::io::Result<BufReader<tokio_rustls::client::TlsStream<TcpStream>>> {
        let mut tcp = BufReader::new(TcpStream::connect(proxy).await?);
        tcp.write_all(
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
        )
        .await?;
        let head = body::read_head(&mut tcp, MAX_HEAD).await?.unwrap();
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut roots = RootCertStore::empty();
        roots.add(trust).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                ServerName::try_from(host.to_owned()).unwrap(),
                tcp.into_inner(),
            )
            .await?;
        Ok(BufReader::new(tls))
    }

    /// One request over a fresh intercepted connection; returns the whole response (the
    /// request ends its connection), or the TLS error.
    async fn agent_request(
        proxy: std::net::SocketAddr,
        host: &str,
        port: u16,
        trust: CertificateDer<'static>,
        request: &str,
    ) -> std::io::Result<String> {
        use tokio::io::AsyncReadExt;
        let mut tls = agent_connect(proxy, host, port, trust).await?;
        tls.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        Ok(String::from_utf8_lossy(&response).into_owned())
    }

    /// Reads one response (head and body by its framing) from the agent's connection.
    async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
        conn: &mut R,
        method: &str,
    ) -> (http::ResponseHead, Vec<u8>) {
        let raw = body::read_head(conn, MAX_HEAD).await.unwrap().unwrap();
        let head = http::parse_response_head(&raw).unwrap();
        let mut out = Vec::new();
        match http::response_framing(&head, method).unwrap() {
            ResponseFraming::Body(framing) => body::forward(conn, &mut out, framing).await.unwrap(),
            ResponseFraming::UntilClose => {
                tokio::io::copy_buf(conn, &mut out).await.unwrap();
            }
        }
        (head, out)
    }

    const REQUEST: &str = "POST /v1/messages HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer fake\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

    #[tokio::test]
    async fn the_credential_reaches_the_real_host_and_never_the_agent() {
        let (root, server) = pki("api.test");
        let (port, seen) = tls_upstream(server, notify()).await;
        let (proxy, bottle_ca) = proxy(root).await;

        let response = agent_request(proxy, "api.test", port, bottle_ca, REQUEST)
            .await
            .unwrap();

        // The upstream got the proxy's credential, not the agent's; it echoes the request
        // back, and the credential in that echo is overwritten before the agent sees it.
        let received = seen.heads();
        assert!(
            received.contains("Authorization: Bearer real-secret\r\n"),
            "{received}"
        );
        assert!(!received.contains("Bearer fake"), "{received}");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(!response.contains("real-secret"), "{response}");
        assert!(
            response.contains("Authorization: ******************\r\n"),
            "{response}"
        );
        assert!(response.ends_with("hello"), "{response}");
    }

    #[tokio::test]
    async fn hosts_without_a_credential_are_tunnelled_untouched() {
        let (root, server) = pki("other.test");
        let (port, _) = tls_upstream(server, notify()).await;
        let (proxy, bottle_ca) = proxy(root.clone()).await;

        // The agent sees the real host's certificate (the bottle CA would not verify it).
        let with_bottle_ca = agent_request(proxy, "other.test", port, bottle_ca, REQUEST).await;
        let response = agent_request(proxy, "other.test", port, root, REQUEST)
            .await
            .unwrap();

        assert!(with_bottle_ca.is_err());
        assert!(
            response.contains("Authorization: Bearer fake"),
            "{response}"
        );
        assert!(!response.contains("real-secret"), "{response}");
    }

    #[tokio::test]
    async fn an_impostor_of_the_credential_host_never_sees_a_request() {
        // The name resolves to a server whose certificate no trusted root signed.
        let (_, impostor) = pki("api.test");
        let (port, seen) = tls_upstream(impostor, notify()).await;
        let (real_root, _) = pki("api.test");
        let (proxy, bottle_ca) = proxy(real_root).await;

        let response = agent_request(proxy, "api.test", port, bottle_ca, REQUEST).await;

        let response = response.unwrap();
        assert!(response.starts_with("HTTP/1.1 502"), "{response}");
        assert!(
            response.contains("cannot open a verified TLS connection to api.test"),
            "{response}"
        );
        assert_eq!(seen.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn a_host_certificate_is_issued_once_and_reused() {
        let ca = BottleCa::generate("test-1").unwrap();

        let a = ca.server_config("api.test").unwrap();
        let b = ca.server_config("api.test").unwrap();

        assert!(Arc::ptr_eq(&a, &b));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn every_casing_and_trailing_dot_of_a_host_shares_one_certificate() {
        let ca = BottleCa::generate("test-casings").unwrap();
        let host = "credentialhost.example";

        for i in 0..2048u32 {
            let mut letter = 0;
            let casing: String = host
                .chars()
                .map(|c| {
                    letter += 1;
                    if c.is_ascii_alphabetic() && (i >> (letter % 16)) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            let dotted = format!("{casing}.");
            ca.server_config(&casing).unwrap();
            ca.server_config(&dotted).unwrap();
        }

        assert_eq!(ca.issued.lock().unwrap().len(), 1);
    }

    fn notify() -> Arc<tokio::sync::Notify> {
        Arc::new(tokio::sync::Notify::new())
    }

    #[tokio::test]
    async fn every_request_on_a_kept_connection_gets_the_credential_over_one_upstream_connection() {
        use std::sync::atomic::Ordering;
        let (root, server) = pki("api.test");
        let (port, seen) = tls_upstream(server, notify()).await;
        let (proxy, bottle_ca) = proxy(root).await;
        let mut conn = agent_connect(proxy, "api.test", port, bottle_ca)
            .await
            .unwrap();

        // Three requests on one connection: a GET, a POST with a chunked body carrying the
        // agent's own credential, and one asking for 100 Continue.
        conn.write_all(b"GET /a HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .unwrap();
        let (a_head, a) = read_response(&mut conn, "GET").await;
        conn.write_all(b"POST /b HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer fake\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").await.unwrap();
        let (_, b) = read_response(&mut conn, "POST").await;
        conn.write_all(b"PUT /c HTTP/1.1\r\nHost: api.test\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n").await.unwrap();
        let continued = body::read_head(&mut conn, MAX_HEAD).await.unwrap().unwrap();
        conn.write_all(b"data").await.unwrap();
        let (_, c) = read_response(&mut conn, "PUT").await;

        assert_eq!(a_head.status, 200);
        let (a, b, c) = (
            String::from_utf8(a).unwrap(),
            String::from_utf8(b).unwrap(),
            String::from_utf8(c).unwrap(),
        );
        let received = seen.heads();
        assert_eq!(
            received
                .matches("Authorization: Bearer real-secret\r\n")
                .count(),
            3,
            "{received}"
        );
        assert!(!received.contains("fake"), "{received}");
        for echoed in [&a, &b, &c] {
            assert!(!echoed.contains("real-secret"), "{echoed}");
        }
        assert!(b.ends_with("3\r\nabc\r\n0\r\n\r\n"), "{b}");
        assert_eq!(continued, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(!c.to_ascii_lowercase().contains("expect"), "{c}");
        assert!(c.ends_with("\r\n\r\ndata"), "{c}");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
        assert_eq!(seen.requests.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_streamed_response_reaches_the_agent_chunk_by_chunk_and_the_connection_goes_on() {
        let (root, server) = pki("api.test");
        let go = notify();
        let (port, _) = tls_upstream(server, go.clone()).await;
        let (proxy, bottle_ca) = proxy(root).await;
        let mut conn = agent_connect(proxy, "api.test", port, bottle_ca)
            .await
            .unwrap();

        conn.write_all(b"POST /stream HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        // The first chunk arrives while the upstream still holds back the second: nothing
        // waits for the whole body.
        let head = body::read_head(&mut conn, MAX_HEAD).await.unwrap().unwrap();
        let mut first = vec![0u8; b"5\r\nfirst\r\n".len()];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_exact(&mut conn, &mut first),
        )
        .await
        .expect("the first chunk was held back")
        .unwrap();
        go.notify_one();
        let mut rest = Vec::new();
        body::forward(&mut conn, &mut rest, BodyFraming::Chunked)
            .await
            .unwrap();
        // And the connection carries the next request.
        conn.write_all(b"GET /next HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .unwrap();
        let (_, next) = read_response(&mut conn, "GET").await;

        assert!(head.ends_with(b"Transfer-Encoding: chunked\r\n\r\n"));
        assert_eq!(first, b"5\r\nfirst\r\n");
        assert_eq!(rest, b"6\r\nsecond\r\n0\r\n\r\n");
        assert!(String::from_utf8(next)
            .unwrap()
            .starts_with("GET /next HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn a_response_without_a_length_ends_the_connection_and_a_smuggled_request_is_refused() {
        use tokio::io::AsyncReadExt;
        let (root, server) = pki("api.test");
        let (port, seen) = tls_upstream(server, notify()).await;
        let (proxy, bottle_ca) = proxy(root).await;

        let mut conn = agent_connect(proxy, "api.test", port, bottle_ca.clone())
            .await
            .unwrap();
        conn.write_all(b"GET /until-close HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .unwrap();
        let (_, until_close) = read_response(&mut conn, "GET").await;

        let mut smuggler = agent_connect(proxy, "api.test", port, bottle_ca)
            .await
            .unwrap();
        smuggler
            .write_all(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut refused = String::new();
        let _ = smuggler.read_to_string(&mut refused).await;

        assert!(String::from_utf8(until_close)
            .unwrap()
            .contains("GET /until-close"));
        assert!(seen.heads().contains("Authorization: Bearer real-secret"));
        assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
        assert!(
            refused.contains("both Content-Length and Transfer-Encoding"),
            "{refused}"
        );
        // Only the first connection's request reached the upstream.
        assert_eq!(seen.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_credential_is_used_only_under_its_paths_and_a_request_elsewhere_is_refused() {
        use std::sync::atomic::Ordering;
        let (root, server) = pki("api.test");
        let (port, seen) = tls_upstream(server, notify()).await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("egress.jsonl");
        let injection = bearer().with_paths(&["/me/app".to_owned()]).unwrap();
        let (proxy, bottle_ca) = proxy_with(root, injection, Some(log.clone()), None).await;

        // Allowed, then (on the same connection) an escape through a dot segment.
        let mut conn = agent_connect(proxy, "api.test", port, bottle_ca.clone())
            .await
            .unwrap();
        conn.write_all(
            b"GET /me/app/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: api.test\r\n\r\n",
        )
        .await
        .unwrap();
        let (_, allowed) = read_response(&mut conn, "GET").await;
        conn.write_all(b"POST /me/app/../../evil/repo/git-receive-pack HTTP/1.1\r\nHost: api.test\r\nContent-Length: 4\r\n\r\npush")
            .await
            .unwrap();
        let (escaped_head, escaped) = read_response(&mut conn, "POST").await;
        // And another repository outright, on a new connection.
        let other = agent_request(
            proxy,
            "api.test",
            port,
            bottle_ca,
            "GET /someone/else HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();

        let allowed = String::from_utf8(allowed).unwrap();
        assert!(allowed.contains("GET /me/app/info/refs"), "{allowed}");
        assert!(seen.heads().contains("Authorization: Bearer real-secret"));
        assert_eq!(escaped_head.status, 403);
        let escaped = String::from_utf8(escaped).unwrap();
        assert!(
            escaped.contains("canonical \"/evil/repo/git-receive-pack\""),
            "{escaped}"
        );
        assert!(other.starts_with("HTTP/1.1 403"), "{other}");
        assert!(other.contains("outside the paths"), "{other}");
        // Only the allowed request reached the host.
        assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
        // Each refusal is in the bottle's egress log.
        let events: Vec<crate::bundle::egress::EgressEvent> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|e: &crate::bundle::egress::EgressEvent| e.reason == "path_not_allowed")
            .collect();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].method, "POST");
        assert_eq!(events[0].verdict, "deny");
        assert_eq!(events[0].host, "api.test");
    }

    #[tokio::test]
    async fn when_the_real_host_closes_an_idle_connection_the_agents_closes_too() {
        use tokio::io::AsyncReadExt;
        let (root, server) = pki("api.test");
        let (port, _) = tls_upstream(server, notify()).await;
        let (proxy, bottle_ca) = proxy(root).await;
        let mut conn = agent_connect(proxy, "api.test", port, bottle_ca)
            .await
            .unwrap();

        conn.write_all(b"GET /then-idle-close HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut conn, "GET").await;
        // The agent sends nothing more; the host closes; so does the proxy, promptly.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            conn.read_to_end(&mut rest),
        )
        .await;

        assert_eq!(head.status, 200);
        assert!(
            ended.is_ok(),
            "the agent's connection stayed open to a closed host"
        );
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// The agent's request with `body` on a kept connection to `api.test`.
    fn post_with(body: &str) -> String {
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn a_body_carrying_the_injected_credential_is_blocked_inside_the_tunnel_and_the_connection_goes_on(
    ) {
        use std::sync::atomic::Ordering;
        let (root, server) = pki("api.test");
        let (port, seen) = tls_upstream(server, notify()).await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("egress.jsonl");
        let block = Some(super::super::secrets::SecretMode::Block);
        let (proxy, bottle_ca) = proxy_with(root, bearer(), Some(log.clone()), block).await;
        let mut conn = agent_connect(proxy, "api.test", port, bottle_ca)
            .await
            .unwrap();

        // The credential the proxy injects, sent back out by the agent in a body.
        conn.write_all(post_with("{\"note\":\"real-secret\"}").as_bytes())
            .await
            .unwrap();
        let (head, body) = read_response(&mut conn, "POST").await;
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(head.status, 403, "{body}");
        assert!(body.contains("credential api.test in the body"), "{body}");
        assert!(!body.contains("real-secret"), "{body}");
        assert_eq!(seen.requests.load(Ordering::SeqCst), 0, "nothing went up");

        // The body was read whole: the same connection carries the next, clean request.
        conn.write_all(post_with("hello").as_bytes()).await.unwrap();
        let (head, _) = read_response(&mut conn, "POST").await;
        assert_eq!(head.status, 200);
        assert_eq!(seen.bodies.lock().unwrap().clone(), vec![b"hello".to_vec()]);
        // The injected header itself is not a finding.
        assert!(seen
            .heads()
            .contains("Authorization: Bearer real-secret\r\n"));

        let text = std::fs::read_to_string(&log).unwrap();
        let blocked: Vec<EgressEvent> = text
            .lines()
            .map(|l| serde_json::from_str::<EgressEvent>(l).unwrap())
            .filter(|e| e.reason == "secret_blocked")
            .collect();
        assert_eq!(blocked.len(), 1, "{text}");
        assert_eq!(
            (blocked[0].method.as_str(), blocked[0].rule.as_deref()),
            ("POST", Some("credential api.test"))
        );
        assert!(!text.contains("real-secret"), "{text}");
    }

    #[tokio::test]
    async fn redact_mode_overwrites_the_credential_before_the_real_host_gets_the_body() {
        let (root, server) = pki("api.test");
        let (port, seen) = tls_upstream(server, notify()).await;
        let redact = Some(super::super::secrets::SecretMode::Redact);
        let (proxy, bottle_ca) = proxy_with(root, bearer(), None, redact).await;
        let mut conn = agent_connect(proxy, "api.test", port, bottle_ca)
            .await
            .unwrap();

        conn.write_all(post_with("k=real-secret&x=1").as_bytes())
            .await
            .unwrap();
        let (head, _) = read_response(&mut conn, "POST").await;

        assert_eq!(head.status, 200);
        assert_eq!(
            seen.bodies.lock().unwrap().clone(),
            vec![b"k=***********&x=1".to_vec()]
        );
    }
}
