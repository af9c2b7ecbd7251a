//! The egress proxy server: HTTP `CONNECT` tunnels and plain-HTTP forwarding, each request
//! decided by the [`EgressPolicy`] and recorded as one [`EgressEvent`].
//!
//! One request per client connection for plain HTTP (the upstream request carries
//! `Connection: close` and the client connection closes after the response), so bytes a client
//! pipelines after the first request can never reach a host the policy did not decide on.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::Instrument;

use super::approvals::{Answer, Approvals, Outcome, MAX_PENDING};
use super::body;
use super::events::{EgressEvent, EventLog};
use super::http::{self, HeadError, RequestHead};
use super::intercept::{Interception, PathRefusals};
use super::policy::{
    canonical_host, normalize_host, Decision, DenyReason, EgressPolicy, LivePolicy,
};
use super::request_rules;
use super::resolve::Resolver;
use super::secrets::{self, Hits, SecretMode, SecretScan, Verdict};
use super::tunnel;
use super::EgressError;

/// Buffer per direction of a forwarded exchange (plain tunnels splice: [`tunnel`]).
const TUNNEL_BUFFER: usize = 64 * 1024;
/// How long a denied or refused client may keep sending before we close (lets it read the
/// response instead of getting a reset), and how much of it we read meanwhile.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: u64 = 256 * 1024;
/// Refused (over-limit) connections allowed to linger at once.
const MAX_LINGERING_REFUSALS: usize = 32;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Resource limits and timeouts. [`Default`] gives the production values.
#[derive(Debug, Clone)]
pub struct ProxyLimits {
    /// Client connections served at once; beyond it a client gets `503` and is closed.
    pub max_connections: usize,
    /// Largest request head (request line + headers) in bytes; beyond it `431`.
    pub max_head_bytes: usize,
    /// Time a client has to send its complete request head; beyond it `408`.
    pub head_timeout: Duration,
    /// Time to resolve and connect upstream; beyond it `504`.
    pub connect_timeout: Duration,
    /// A tunnel or forwarded exchange with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// On shutdown, how long open connections may finish before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_connections: 512,
            max_head_bytes: 32 * 1024,
            head_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Everything the proxy needs to run for one bottle.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub bottle_id: String,
    pub listen: SocketAddr,
    pub policy: EgressPolicy,
    /// Where decision events are appended (JSON lines); `None` logs them only via `tracing`.
    pub event_log: Option<PathBuf>,
    /// Size at which the event log rotates (see [`EventLog`]).
    pub event_log_max_bytes: u64,
    /// Upstream name resolution; [`Resolver::system`] in production.
    pub resolver: Resolver,
    pub limits: ProxyLimits,
    /// Dial loopback addresses that an allowed *name* resolves to. Off in production (a name
    /// must not lead back into the bundle's own services); tests and benchmarks turn it on.
    /// An IP literal the policy lists exactly is always dialled.
    pub allow_loopback_upstream: bool,
    /// Credential injection: `CONNECT`s to hosts with a credential are intercepted.
    pub interception: Option<Arc<Interception>>,
    /// `[egress] unknown = "ask"`: requests no rule lists wait here for the human's answer;
    /// `None` refuses them at once.
    pub approvals: Option<Approvals>,
    /// Outbound secret scanning of what the proxy sees inside (`[egress] secrets`); `None`
    /// scans nothing.
    pub secrets: Option<Arc<SecretScan>>,
}

impl ProxyConfig {
    /// Production defaults: system resolver, default limits, no loopback upstreams.
    pub fn new(bottle_id: &str, listen: SocketAddr, policy: EgressPolicy) -> Self {
        ProxyConfig {
            bottle_id: bottle_id.to_owned(),
            listen,
            policy,
            event_log: None,
            event_log_max_bytes: super::events::DEFAULT_MAX_LOG_BYTES,
            resolver: Resolver::system(),
            limits: ProxyLimits::default(),
            allow_loopback_upstream: false,
            interception: None,
            approvals: None,
            secrets: None,
        }
    }
}

/// A bound proxy, not yet serving. Lets callers (tests) listen on port 0 and learn the address.
#[derive(Debug)]
pub struct EgressProxy {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    bottle_id: String,
    policy: LivePolicy,
    resolver: Resolver,
    events: Option<Arc<EventLog>>,
    limits: ProxyLimits,
    allow_loopback_upstream: bool,
    interception: Option<Arc<Interception>>,
    approvals: Option<Approvals>,
    /// Scanning on (not `off`).
    secrets: Option<Arc<SecretScan>>,
}

/// Binds `config.listen` and serves until `shutdown` completes.
pub async fn serve(
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EgressError> {
    EgressProxy::bind(config).await?.run(shutdown).await
}

impl EgressProxy {
    /// Opens the event log and binds the listener.
    pub async fn bind(config: ProxyConfig) -> Result<Self, EgressError> {
        let events = match &config.event_log {
            Some(path) => Some(Arc::new(EventLog::open_bounded(
                path,
                config.event_log_max_bytes,
            )?)),
            None => None,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EgressError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(EgressError::LocalAddr)?;
        Ok(EgressProxy {
            listener,
            local_addr,
            shared: Arc::new(Shared {
                bottle_id: config.bottle_id,
                policy: LivePolicy::new(config.policy),
                resolver: config.resolver,
                events,
                limits: config.limits,
                allow_loopback_upstream: config.allow_loopback_upstream,
                interception: config.interception,
                approvals: config.approvals,
                secrets: config.secrets.filter(|s| s.mode() != SecretMode::Off),
            }),
        })
    }

    /// The log this proxy writes its decisions to (shared with the supervisor).
    pub fn event_log(&self) -> Option<Arc<EventLog>> {
        self.shared.events.clone()
    }

    /// The policy this proxy decides with; rules added to it apply to the next request.
    pub fn live_policy(&self) -> LivePolicy {
        self.shared.policy.clone()
    }

    /// The queue of requests waiting for approval (shared with the supervisor), if it asks.
    pub fn approvals(&self) -> Option<Approvals> {
        self.shared.approvals.clone()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops accepting, gives open connections
    /// [`ProxyLimits::shutdown_grace`] to finish and cuts the rest.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), EgressError> {
        let span = tracing::info_span!("egress", bottle_id = %self.shared.bottle_id);
        self.serve_connections(shutdown).instrument(span).await
    }

    async fn serve_connections(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), EgressError> {
        tracing::info!(listen = %self.local_addr, "egress proxy listening");
        let permits = Arc::new(Semaphore::new(self.shared.limits.max_connections));
        let refusals = Arc::new(Semaphore::new(MAX_LINGERING_REFUSALS));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    };
                    let shared = Arc::clone(&self.shared);
                    match Arc::clone(&permits).try_acquire_owned() {
                        Ok(permit) => {
                            let span = tracing::info_span!("egress_conn", %peer);
                            tasks.spawn(async move {
                                handle_connection(stream, peer, &shared).await;
                                drop(permit);
                            }.instrument(span));
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "connection limit reached; refusing with 503");
                            let body = "bot-bottle egress: too many open connections, retry later\n";
                            let response = http::response(503, "Service Unavailable", body);
                            // A few refusals linger so the client reads the 503 rather than a
                            // reset; under a flood the rest cost one non-blocking write.
                            match Arc::clone(&refusals).try_acquire_owned() {
                                Ok(permit) => {
                                    tasks.spawn(async move {
                                        refuse(stream, &response).await;
                                        drop(permit);
                                    });
                                }
                                Err(_) => {
                                    let _ = stream.try_write(&response);
                                }
                            }
                        }
                    }
                }
            }
        }
        drop(self.listener);
        let grace = self.shared.limits.shutdown_grace;
        let drained = timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::info!(
                open = tasks.len(),
                "cutting connections still open after shutdown grace"
            );
        }
        tasks.shutdown().await;
        Ok(())
    }
}

/// What the proxy answers when it does not tunnel or forward.
struct Refusal {
    status: u16,
    reason: std::borrow::Cow<'static, str>,
    body: String,
}

/// Longest deny message carried in a 403's reason phrase.
const MAX_REASON_MESSAGE: usize = 160;

/// `Forbidden (<deny message>)`: many clients (busybox wget, curl's CONNECT errors, npm) show
/// only the status line, so the manifest's message rides there too. Control characters are
/// dropped so the line stays one valid HTTP reason phrase.
pub(crate) fn forbidden_reason(message: &str) -> String {
    let clean: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .filter(|c| c.is_ascii())
        .take(MAX_REASON_MESSAGE)
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        "Forbidden".to_owned()
    } else {
        format!("Forbidden ({clean})")
    }
}

impl Refusal {
    fn bad_request(why: &str) -> Self {
        Refusal {
            status: 400,
            reason: "Bad Request".into(),
            body: format!("bot-bottle egress: bad request: {why}\n"),
        }
    }
}

async fn handle_connection(mut client: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = client.set_nodelay(true);
    let conn = Conn { peer, shared };
    let (head, leftover) = match read_head(&mut client, &shared.limits).await {
        Ok(Some(read)) => read,
        Ok(None) => return,
        Err(refusal) => {
            if refusal.status != 408 {
                conn.log_bad_request("", &refusal.body).await;
            }
            return refuse(
                client,
                &http::response(refusal.status, &refusal.reason, &refusal.body),
            )
            .await;
        }
    };
    let outcome = if head.method == "CONNECT" {
        conn.connect(&mut client, &head, leftover).await
    } else {
        conn.forward(&mut client, &head, leftover).await
    };
    if let Err(refusal) = outcome {
        refuse(
            client,
            &http::response(refusal.status, &refusal.reason, &refusal.body),
        )
        .await;
    }
}

/// Reads a complete request head. `Ok(None)`: the client closed before sending one.
async fn read_head(
    client: &mut TcpStream,
    limits: &ProxyLimits,
) -> Result<Option<(RequestHead, Vec<u8>)>, Refusal> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 8192];
    let reading = async {
        loop {
            let n = client
                .read(&mut chunk)
                .await
                .map_err(|e| Refusal::bad_request(&e.to_string()))?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
            match http::parse_head(&buf) {
                Ok(Some((head, len))) if len <= limits.max_head_bytes => {
                    return Ok(Some((head, buf[len..].to_vec())))
                }
                Ok(Some(_)) | Err(HeadError::TooManyHeaders) => return Err(too_large(limits)),
                Ok(None) if buf.len() > limits.max_head_bytes => return Err(too_large(limits)),
                Ok(None) => {}
                Err(HeadError::Malformed(why)) => {
                    return Err(Refusal::bad_request(&why.to_string()))
                }
            }
        }
    };
    timeout(limits.head_timeout, reading)
        .await
        .unwrap_or_else(|_| {
            Err(Refusal {
                status: 408,
                reason: "Request Timeout".into(),
                body: "bot-bottle egress: request head not received in time\n".into(),
            })
        })
}

fn too_large(limits: &ProxyLimits) -> Refusal {
    Refusal {
        status: 431,
        reason: "Request Header Fields Too Large".into(),
        body: format!(
            "bot-bottle egress: request head larger than {} bytes or {} header lines\n",
            limits.max_head_bytes,
            http::MAX_HEADERS
        ),
    }
}

/// Writes a response, half-closes, and lingers briefly so the client reads it rather than a
/// reset caused by bytes it sent that we never read.
async fn refuse(mut client: TcpStream, response: &[u8]) {
    if client.write_all(response).await.is_err() || client.shutdown().await.is_err() {
        return;
    }
    linger(&mut client).await;
}

/// After our side is shut down: read and discard what the client still sends, briefly, so that
/// closing does not turn into a reset that destroys response bytes still in flight.
async fn linger(client: &mut TcpStream) {
    let mut sink = tokio::io::sink();
    let _ = timeout(
        LINGER,
        tokio::io::copy(&mut client.take(LINGER_BYTES), &mut sink),
    )
    .await;
}

/// One client connection's view of the proxy.
struct Conn<'a> {
    peer: SocketAddr,
    shared: &'a Shared,
}

impl Conn<'_> {
    fn event(&self, method: &str, host: &str, port: u16) -> EgressEvent {
        EgressEvent::now(
            &self.shared.bottle_id,
            &self.peer.to_string(),
            method,
            host,
            port,
        )
    }

    /// Writes an event (and mirrors it to `tracing`). `Err` only when the log file fails.
    async fn record(&self, event: &EgressEvent) -> Result<(), EgressError> {
        super::events::record(self.shared.events.as_deref(), event).await
    }

    async fn log_bad_request(&self, method: &str, why: &str) {
        let mut event = self.event(method, "", 0);
        event.verdict = "deny".into();
        event.reason = "bad_request".into();
        event.detail = Some(why.trim_end().to_owned());
        if let Err(e) = self.record(&event).await {
            tracing::error!(error = %e, "cannot record egress event");
        }
    }

    async fn bad_request(&self, method: &str, why: &str) -> Refusal {
        let refusal = Refusal::bad_request(why);
        self.log_bad_request(method, &refusal.body).await;
        refusal
    }

    /// Records a deny and builds the 403 carrying the manifest's deny message.
    async fn deny(&self, event: EgressEvent, explanation: &str) -> Refusal {
        let message = self.shared.policy.deny_message();
        let separator = if message.is_empty() || message.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        let body = format!(
            "{message}{separator}bot-bottle egress: {}:{} denied: {explanation}\n",
            event.host, event.port
        );
        self.forbidden(event, &message, body).await
    }

    /// Records `event` as a deny and builds a 403 whose reason phrase carries `phrase`.
    async fn forbidden(&self, mut event: EgressEvent, phrase: &str, body: String) -> Refusal {
        event.verdict = "deny".into();
        if let Err(e) = self.record(&event).await {
            tracing::error!(error = %e, "cannot record egress event");
        }
        Refusal {
            status: 403,
            reason: forbidden_reason(phrase).into(),
            body,
        }
    }

    /// A request the policy denied: refused, unless no rule lists its host and the bottle asks
    /// (`unknown = "ask"`): then it waits in the approval queue for the human's answer, and
    /// `Ok` means it was approved (`event` says how). The wait and its outcome are logged.
    async fn ask_or_deny(
        &self,
        event: &mut EgressEvent,
        reason: &DenyReason,
        path: Option<&str>,
    ) -> Result<(), Refusal> {
        let approvals = match (&self.shared.approvals, reason) {
            (Some(approvals), DenyReason::NotAllowed) => approvals,
            _ => return Err(self.deny(event.clone(), &reason.to_string()).await),
        };
        let (host, port) = (event.host.clone(), event.port);
        let mut asked = event.clone();
        asked.verdict = "ask".into();
        asked.reason = "approval_pending".into();
        if let Err(e) = self.record(&asked).await {
            tracing::error!(error = %e, "cannot record egress event");
        }
        let outcome = approvals.ask(&host, port, &event.method, path).await;
        let why = match outcome {
            Outcome::Approved(answer) => {
                event.verdict = "allow".into();
                event.reason = match answer {
                    Answer::Session => "approved_session",
                    _ => "approved_once",
                }
                .into();
                event.rule = Some(format!("{host}:{port}"));
                return Ok(());
            }
            Outcome::Denied => {
                event.reason = "approval_denied".into();
                "the user denied it (`bot-bottle deny`)".to_owned()
            }
            Outcome::QueueFull => {
                event.reason = "approval_queue_full".into();
                format!("{MAX_PENDING} hosts already wait for approval")
            }
            Outcome::TimedOut => {
                event.reason = "approval_timeout".into();
                let waiting = "waiting for approval: run `bot-bottle approvals`";
                let body = format!(
                    "bot-bottle egress: {host}:{port} is not on the allowlist and is {waiting} on \
                     the host (nobody answered within {}s; ask again once it is approved)\n",
                    approvals.hold().as_secs()
                );
                return Err(self.forbidden(event.clone(), waiting, body).await);
            }
        };
        Err(self.deny(event.clone(), &why).await)
    }

    /// Acts on the secrets found in a request (see [`SecretScan::act`]): whether to
    /// overwrite them, or the refusal.
    async fn judge_secrets(
        &self,
        scan: &SecretScan,
        hits: &Hits,
        event: &EgressEvent,
        path: Option<&str>,
    ) -> Result<bool, Refusal> {
        let log = self.shared.events.as_deref();
        match scan.act(hits, log, event, path).await {
            Verdict::Send { redact, .. } => Ok(redact),
            Verdict::Refuse {
                status,
                phrase,
                body,
                ..
            } => Err(Refusal {
                status,
                reason: phrase.into(),
                body,
            }),
        }
    }

    /// Reads a plain-HTTP request's body whole and scans it with its head (`request`, as it
    /// goes up); returns the body as it goes up (overwritten where the mode redacts).
    async fn scan_forwarded(
        &self,
        scan: &SecretScan,
        client: &mut TcpStream,
        (leftover, framing): (Vec<u8>, http::BodyFraming),
        request: &mut [u8],
        event: &EgressEvent,
        path: &str,
    ) -> Result<(Vec<u8>, secrets::Turn), Refusal> {
        let mut reader = BufReader::new(io::Cursor::new(leftover).chain(&mut *client));
        let (mut body, turn) = match scan.read_body(&mut reader, framing).await {
            Ok(read) => read,
            Err(secrets::ReadError::TooLarge) => {
                let mut refused = event.clone();
                refused.reason = "secret_scan_limit".into();
                let why = secrets::ReadError::TooLarge.to_string();
                refused.detail = Some(why.clone());
                refused.verdict = "deny".into();
                if let Err(e) = self.record(&refused).await {
                    tracing::error!(error = %e, "cannot record egress event");
                }
                return Err(Refusal {
                    status: 413,
                    reason: "Content Too Large".into(),
                    body: format!("bot-bottle egress: {why}\n"),
                });
            }
            Err(secrets::ReadError::Body(e)) => {
                return Err(self.bad_request(&event.method, &e.to_string()).await)
            }
        };
        let hits = scan.scan(request, None, &body);
        if !hits.is_empty() && self.judge_secrets(scan, &hits, event, Some(path)).await? {
            hits.redact(request, &mut body);
        }
        Ok((secrets::framed(body, framing), turn))
    }

    /// Fills an event from a policy decision.
    fn decided(&self, method: &str, host: &str, port: u16, decision: &Decision) -> EgressEvent {
        let mut event = self.event(method, host, port);
        event.verdict = if decision.is_allowed() {
            "allow"
        } else {
            "deny"
        }
        .into();
        event.rule = decision.rule().map(str::to_owned);
        event.reason = decision.reason_code().into();
        event
    }

    /// Resolves and connects after an allow decision; records the final event.
    async fn open_upstream(
        &self,
        mut event: EgressEvent,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, Refusal> {
        let limits = &self.shared.limits;
        let addresses =
            match timeout(limits.connect_timeout, self.shared.resolver.lookup(host)).await {
                Ok(Ok(addresses)) => addresses,
                Ok(Err(e)) => return Err(self.upstream_failed(event, host, port, &e).await),
                Err(_) => {
                    let e = EgressError::ConnectTimeout {
                        host: host.to_owned(),
                        port,
                    };
                    return Err(self.upstream_failed(event, host, port, &e).await);
                }
            };
        // The address floor, for every dial (IP literals the policy lists included).
        let (dialable, blocked): (Vec<_>, Vec<_>) = addresses
            .into_iter()
            .map(|ip| {
                let floor =
                    self.shared
                        .policy
                        .may_dial(host, ip, self.shared.allow_loopback_upstream);
                (ip, floor)
            })
            .partition(|(_, floor)| floor.is_ok());
        let dialable: Vec<IpAddr> = dialable.into_iter().map(|(ip, _)| ip).collect();
        if dialable.is_empty() {
            let e = EgressError::BlockedAddress {
                host: host.to_owned(),
                addresses: blocked
                    .iter()
                    .filter_map(|(_, floor)| floor.as_ref().err().map(ToString::to_string))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            event.reason = "blocked_address".into();
            event.rule = None;
            event.detail = Some(e.to_string());
            return Err(self.deny(event, &e.to_string()).await);
        }
        if let Err(e) = self.record(&event).await {
            tracing::error!(error = %e, "cannot record egress event; refusing (fail closed)");
            return Err(Refusal {
                status: 503,
                reason: "Service Unavailable".into(),
                body: "bot-bottle egress: the egress event log cannot be written; refusing traffic that cannot be recorded\n".into(),
            });
        }
        let connecting = async {
            let mut last = None;
            for ip in dialable {
                match TcpStream::connect(SocketAddr::new(ip, port)).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable)))
        };
        match timeout(limits.connect_timeout, connecting).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(source)) => Err(gateway_error(&EgressError::Connect {
                host: host.to_owned(),
                port,
                source,
            })),
            Err(_) => Err(gateway_error(&EgressError::ConnectTimeout {
                host: host.to_owned(),
                port,
            })),
        }
    }

    /// Records the allow decision with the failure, and builds the 502/504.
    async fn upstream_failed(
        &self,
        mut event: EgressEvent,
        host: &str,
        port: u16,
        e: &EgressError,
    ) -> Refusal {
        event.detail = Some(format!("upstream: {e}"));
        if let Err(log_error) = self.record(&event).await {
            tracing::error!(error = %log_error, "cannot record egress event");
        }
        tracing::warn!(%host, port, error = %e, "upstream unreachable");
        gateway_error(e)
    }

    async fn connect(
        &self,
        client: &mut TcpStream,
        head: &RequestHead,
        leftover: Vec<u8>,
    ) -> Result<(), Refusal> {
        let (host, port) = match http::parse_authority(&head.target, None) {
            // One spelling of the host for the policy, interception and the log.
            Ok((host, port)) => (normalize_host(&host).unwrap_or(host), port),
            Err(why) => {
                return Err(self
                    .bad_request("CONNECT", &format!("CONNECT target: {why}"))
                    .await)
            }
        };
        let decision = self.shared.policy.decide(&host, port);
        let mut event = self.decided("CONNECT", &host, port, &decision);
        if let Decision::Deny { reason } = &decision {
            self.ask_or_deny(&mut event, reason, None).await?;
        }
        // A host with a credential is intercepted; any other is tunnelled untouched.
        let injection = self
            .shared
            .interception
            .as_deref()
            .and_then(|i| Some((i, i.for_host(&host)?)));
        // Request rules are decided per request: a tunnel the proxy does not open would carry
        // requests it never sees (its credential missing on the host, or plain HTTP through
        // CONNECT), so it is refused rather than let through unchecked.
        let rules = self.shared.policy.request_rules(&host, port);
        if !rules.is_empty() && injection.is_none() {
            let why = format!(
                "its request rules ({rules}) are decided on each request, and the proxy cannot \
                 see inside a tunnel to a host without a credential: give the host its \
                 credential (`bot-bottle start` names one that is missing); plain HTTP through \
                 the proxy is checked"
            );
            event.reason = "rule_not_enforceable".into();
            event.rule = Some(rules.text());
            event.detail = Some(why.clone());
            return Err(self.deny(event, &why).await);
        }
        if let Some(scan) = self.shared.secrets.clone() {
            let hits = scan.scan_authority(&head.target);
            if !hits.is_empty() {
                self.judge_secrets(&scan, &hits, &event, None).await?;
            }
        }
        let upstream = self.open_upstream(event, &host, port).await?;
        let mut upstream = Tracked::new(upstream);
        let activity = upstream.activity();
        let _ = async {
            client
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await?;
            let serving = async {
                if let Some((i, injection)) = injection {
                    let refusals = PathRefusals {
                        log: self.shared.events.as_deref(),
                        template: self.event("CONNECT", &host, port),
                        deny_message: self.shared.policy.deny_message(),
                        rules,
                        secrets: self.shared.secrets.as_deref(),
                    };
                    return i
                        .serve(client, leftover, &mut upstream, &host, injection, &refusals)
                        .await;
                }
                upstream.write_all(&leftover).await?;
                tunnel::relay(client, &mut upstream.inner, &upstream.activity).await
            };
            tokio::select! {
                served = serving => served,
                () = idle(&activity, self.shared.limits.idle_timeout) => Ok(()),
            }
        }
        .await
        .inspect_err(|e: &io::Error| tracing::debug!(%host, port, error = %e, "tunnel ended"));
        // An intercepted tunnel may end with the agent's next request unread (after a refusal):
        // drain it briefly so closing does not reset the answer still in flight.
        linger(client).await;
        Ok(())
    }

    async fn forward(
        &self,
        client: &mut TcpStream,
        head: &RequestHead,
        leftover: Vec<u8>,
    ) -> Result<(), Refusal> {
        let method = head.method.as_str();
        let hosts: Vec<&[u8]> = head.header_values("host").collect();
        if hosts.len() > 1 {
            return Err(self.bad_request(method, "more than one Host header").await);
        }
        let host_header = match hosts.first() {
            Some(value) => {
                let Ok(text) = std::str::from_utf8(value).map(str::trim) else {
                    return Err(self.bad_request(method, "Host header is not UTF-8").await);
                };
                match http::parse_authority(text, Some(80)) {
                    Ok((host, port)) => Some((host, port, text.to_owned())),
                    Err(why) => {
                        return Err(self
                            .bad_request(method, &format!("Host header: {why}"))
                            .await)
                    }
                }
            }
            None => None,
        };
        let target = if head.target.starts_with('/') {
            // Origin form (a client treating us as the server): the Host header is the target.
            match &host_header {
                Some((host, port, text)) => http::AbsoluteTarget {
                    host: host.clone(),
                    port: *port,
                    authority: text.clone(),
                    path: head.target.clone(),
                },
                None => {
                    return Err(self
                        .bad_request(method, "origin-form request without a Host header")
                        .await)
                }
            }
        } else {
            match http::parse_absolute_http(&head.target) {
                Ok(target) => target,
                Err(why) => return Err(self.bad_request(method, &why.to_string()).await),
            }
        };
        let framing = match http::body_framing(head) {
            Ok(framing) => framing,
            Err(why) => return Err(self.bad_request(method, &why.to_string()).await),
        };

        // One spelling of the host for the policy, the floor and the log.
        let target = http::AbsoluteTarget {
            host: normalize_host(&target.host).unwrap_or(target.host),
            ..target
        };
        // Decide on the URI host; a Host header naming anything else must be allowed too.
        let decision = self.shared.policy.decide(&target.host, target.port);
        let mut event = self.decided(method, &target.host, target.port, &decision);
        if let Decision::Deny { reason } = &decision {
            self.ask_or_deny(&mut event, reason, Some(&target.path))
                .await?;
        }
        // The request rules of the target, and of a Host header naming another host (a host
        // serving both names reads the header).
        let mut rule_sets = vec![self.shared.policy.request_rules(&target.host, target.port)];
        if let Some((h_host, h_port, text)) = &host_header {
            if canonical_host(h_host) != canonical_host(&target.host) || *h_port != target.port {
                let header_decision = self.shared.policy.decide(h_host, *h_port);
                event.detail = Some(format!(
                    "Host header {text:?} differs from the request target"
                ));
                if let Decision::Deny { reason } = &header_decision {
                    event.reason = "host_header_denied".into();
                    event.rule = header_decision.rule().map(str::to_owned);
                    let why = format!("the Host header names {text}, which is denied: {reason}");
                    return Err(self.deny(event, &why).await);
                }
                rule_sets.push(self.shared.policy.request_rules(h_host, *h_port));
            }
        }
        // Within the request rules, decided on the canonical path, which is what goes up.
        let method_override =
            request_rules::method_override(head.headers.iter().map(|(name, _)| name.as_str()));
        let mut path = target.path.clone();
        for rules in &rule_sets {
            match rules.check(method, &path, method_override.as_deref()) {
                Ok(checked) => path = checked,
                Err(denied) => {
                    event.reason = "request_not_allowed".into();
                    event.rule = Some(denied.rules().to_owned());
                    event.detail = Some(denied.to_string());
                    return Err(self.deny(event, &denied.to_string()).await);
                }
            }
        }

        // With scanning on, the body is read whole and scanned with the head before anything
        // goes up (the proxy answers `Expect: 100-continue` itself); otherwise it streams.
        let (request, outgoing) = match self.shared.secrets.clone() {
            None => (
                http::upstream_head(head, &path, &target.authority),
                Outgoing::Stream(leftover),
            ),
            Some(scan) => {
                let expects = head
                    .header_values("expect")
                    .any(|v| v.eq_ignore_ascii_case(b"100-continue"));
                let without_expect = RequestHead {
                    headers: head
                        .headers
                        .iter()
                        .filter(|(name, _)| !name.eq_ignore_ascii_case("expect"))
                        .cloned()
                        .collect(),
                    ..head.clone()
                };
                let mut request = http::upstream_head(&without_expect, &path, &target.authority);
                if expects && framing != http::BodyFraming::None {
                    let _ = client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                }
                let (body, turn) = self
                    .scan_forwarded(
                        &scan,
                        client,
                        (leftover, framing),
                        &mut request,
                        &event,
                        &path,
                    )
                    .await?;
                (request, Outgoing::Buffered(body, turn))
            }
        };
        let upstream = self.open_upstream(event, &target.host, target.port).await?;
        let mut upstream = Tracked::new(upstream);
        let activity = upstream.activity();
        // Whether any byte of the upstream's answer has gone to the client (after that, a
        // framing error can no longer be answered with a 400).
        let responded = AtomicBool::new(false);
        let exchange = async {
            upstream
                .write_all(&request)
                .await
                .map_err(body::BodyError::Io)?;
            let (client_read, mut client_write) = client.split();
            let (mut upstream_read, mut upstream_write) = tokio::io::split(&mut upstream);
            let sending = async {
                match outgoing {
                    Outgoing::Stream(leftover) => {
                        let mut body = BufReader::new(io::Cursor::new(leftover).chain(client_read));
                        body::forward(&mut body, &mut upstream_write, framing).await
                    }
                    Outgoing::Buffered(bytes, turn) => {
                        let sent = upstream_write.write_all(&bytes).await;
                        drop(turn);
                        sent.map_err(body::BodyError::Io)
                    }
                }
            };
            let receiving = async {
                let mut buf = vec![0u8; TUNNEL_BUFFER];
                loop {
                    let n = upstream_read.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    responded.store(true, Ordering::Relaxed);
                    client_write.write_all(&buf[..n]).await?;
                }
                client_write.shutdown().await
            };
            tokio::pin!(sending, receiving);
            tokio::select! {
                received = &mut receiving => received.map_err(body::BodyError::Io),
                sent = &mut sending => {
                    sent?;
                    receiving.await.map_err(body::BodyError::Io)
                }
            }
        };
        let outcome = tokio::select! {
            done = exchange => done,
            () = idle(&activity, self.shared.limits.idle_timeout) => Ok(()),
        };
        match outcome {
            Err(e) if e.is_framing() => {
                // The upstream holds a request it will never see the end of: close it first.
                drop(upstream);
                tracing::info!(host = %target.host, error = %e, "request body framing refused");
                if !responded.load(Ordering::Relaxed) {
                    return Err(self.bad_request(method, &e.to_string()).await);
                }
                let _ = client.shutdown().await;
            }
            Err(e) => tracing::debug!(host = %target.host, error = %e, "forwarding ended"),
            Ok(()) => {}
        }
        // The response is complete (upstream closed); the client write side is shut down.
        linger(client).await;
        Ok(())
    }
}

/// A forwarded request's body as it goes up: streamed from the client, or read and scanned.
enum Outgoing {
    Stream(Vec<u8>),
    /// With the turn it holds (see `SecretScan::read_body`), given back once sent.
    Buffered(Vec<u8>, secrets::Turn),
}

fn gateway_error(e: &EgressError) -> Refusal {
    let (status, reason) = match e {
        EgressError::ConnectTimeout { .. } | EgressError::DnsTimeout { .. } => {
            (504, "Gateway Timeout")
        }
        _ => (502, "Bad Gateway"),
    };
    Refusal {
        status,
        reason: reason.into(),
        body: format!("bot-bottle egress: {e}\n"),
    }
}

/// Milliseconds since `base` of the last byte moved, shared between a stream and its watchdog.
#[derive(Debug)]
pub(super) struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Completes once no byte has moved for `limit`.
async fn idle(activity: &Activity, limit: Duration) {
    loop {
        let idle_for = activity.idle_for();
        if idle_for >= limit {
            return;
        }
        tokio::time::sleep(limit - idle_for).await;
    }
}

/// A stream that notes the time of every successful read and write.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    fn new(inner: S) -> Self {
        Tracked {
            inner,
            activity: Arc::new(Activity::new()),
        }
    }

    fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
