//! Outbound secret scanning (`[egress] secrets`): what the proxy sees of a request — plain
//! HTTP, and the requests inside an intercepted tunnel — is scanned before it goes up, with the
//! scanner the git gate uses ([`bottle_scan`]): the bottle's own credential values, well-known
//! token formats and high-entropy strings, in the request target, the headers and the body.
//!
//! What a finding does depends on the bottle's [`SecretMode`]:
//! - `block` (the default): the request is refused with a 403 naming the rules, nothing of it
//!   goes up;
//! - `ask`: it waits in the approval queue like a request to an unlisted host (see
//!   [`super::approvals`]);
//! - `redact`: each finding is overwritten with `*` (same length, so the framing holds) and
//!   the request goes up; a finding in the `Host` header cannot be redacted and is blocked;
//! - `log`: it goes up unchanged;
//! - `off`: nothing is scanned (bodies stream as they arrive).
//!
//! Every finding is an event naming the rule and where it was found, never the value. To be
//! scanned, a body is read whole first (at most [`MAX_SCANNED_BODY`]; a larger one is refused
//! with a 413 that says so). A chunked body goes up as one chunk (trailers dropped).
//!
//! The header the proxy itself sets (the injected credential) is not scanned: the agent's own
//! value for it is dropped before the request goes up. What the proxy cannot see (a `CONNECT`
//! tunnel to a host it does not intercept) is not scanned.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufRead;

use super::approvals::{Answer, Approvals, Outcome};
use super::body::{self, BodyError};
use super::events::{EgressEvent, EventLog};
use super::http::BodyFraming;

/// Largest request body the proxy holds to scan.
pub const MAX_SCANNED_BODY: u64 = 16 * 1024 * 1024;
/// Bodies read to be scanned at once (each at most [`MAX_SCANNED_BODY`]): bounds what an agent
/// opening many connections can make the bundle hold (64 MiB); further ones wait their turn.
pub const MAX_BODIES_AT_ONCE: usize = 4;
/// Longest run the `high-entropy` rule judges in a request: tokens are shorter; a longer run
/// (a base64 image in an API request) is data.
pub const MAX_ENTROPY_RUN: usize = 256;

/// `[egress] secrets`: what a request carrying a secret gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretMode {
    #[default]
    Block,
    Ask,
    Redact,
    Log,
    Off,
}

impl SecretMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretMode::Block => "block",
            SecretMode::Ask => "ask",
            SecretMode::Redact => "redact",
            SecretMode::Log => "log",
            SecretMode::Off => "off",
        }
    }
}

/// The proxy's scanner and what its findings do.
pub struct SecretScan {
    scanner: bottle_scan::Scanner,
    mode: SecretMode,
    /// Where a flagged request waits in `ask` mode (none: refused as if blocked).
    approvals: Option<Approvals>,
    /// Turns to hold a body ([`MAX_BODIES_AT_ONCE`]).
    bodies: std::sync::Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for SecretScan {
    // The scanner's own Debug shows credential names and lengths, never values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretScan")
            .field("mode", &self.mode)
            .field("scanner", &self.scanner)
            .finish()
    }
}

/// Where in a request a secret was found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Place {
    /// A `CONNECT` request's `host:port` (a name under an allowed wildcard can carry data).
    Authority,
    /// The request line (method and target).
    Target,
    /// A header, by its name as sent.
    Header(String),
    Body,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Authority => f.write_str("the CONNECT authority"),
            Place::Target => f.write_str("the request target"),
            Place::Header(name) => write!(f, "header {name}"),
            Place::Body => f.write_str("the body"),
        }
    }
}

/// One finding: its rule, where, its byte range in the head or the body, and the SHA-256 of
/// the string (what a `session` approval remembers).
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub rule: String,
    pub place: Place,
    start: usize,
    end: usize,
    digest: [u8; 32],
}

/// The findings in one request.
#[derive(Debug, Default)]
pub(crate) struct Hits {
    head: Vec<Hit>,
    body: Vec<Hit>,
}

impl Hits {
    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.body.is_empty()
    }

    fn all(&self) -> impl Iterator<Item = &Hit> {
        self.head.iter().chain(&self.body)
    }

    /// `github-token in the body, credential api.test in header x-token`: each rule and place
    /// once, never a value.
    pub fn found(&self) -> String {
        let seen: BTreeSet<(&str, &Place)> =
            self.all().map(|h| (h.rule.as_str(), &h.place)).collect();
        seen.into_iter()
            .map(|(rule, place)| format!("{rule} in {place}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The rule names, each once.
    pub fn rules(&self) -> String {
        let seen: BTreeSet<&str> = self.all().map(|h| h.rule.as_str()).collect();
        seen.into_iter().collect::<Vec<_>>().join(", ")
    }

    pub fn digests(&self) -> Vec<[u8; 32]> {
        let seen: BTreeSet<[u8; 32]> = self.all().map(|h| h.digest).collect();
        seen.into_iter().collect()
    }

    /// Whether every finding can be overwritten: not one in the `Host` header or a `CONNECT`
    /// authority (the request would go to another name than the one decided on).
    pub fn redactable(&self) -> bool {
        !self.head.iter().any(|h| match &h.place {
            Place::Authority => true,
            Place::Header(name) => name.eq_ignore_ascii_case("host"),
            Place::Target | Place::Body => false,
        })
    }

    /// Overwrites every finding with `*`, in the head and the body it was found in.
    pub fn redact(&self, head: &mut [u8], body: &mut [u8]) {
        for h in &self.head {
            head[h.start..h.end].fill(b'*');
        }
        for h in &self.body {
            body[h.start..h.end].fill(b'*');
        }
    }
}

impl SecretScan {
    /// A scanner for `mode` that knows `credentials` (`(name, value)`: each host's injected
    /// value, and the token after its scheme) besides the built-in rules.
    pub fn new(mode: SecretMode, credentials: &[(&str, &str)]) -> Self {
        let scanner = bottle_scan::Scanner::new(Vec::new())
            .with_max_entropy_run(MAX_ENTROPY_RUN)
            .with_values(credentials);
        SecretScan {
            scanner,
            mode,
            approvals: None,
            bodies: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_BODIES_AT_ONCE)),
        }
    }

    /// Reads a request body whole to scan it ([`read_body`]), once a turn to hold one is free
    /// (a request without a body takes none). Keep the [`Turn`] until the body is sent or
    /// dropped: the bound is on bodies held, not only on bodies being read.
    pub(crate) async fn read_body<R: AsyncBufRead + Unpin>(
        &self,
        reader: &mut R,
        framing: BodyFraming,
    ) -> Result<(Vec<u8>, Turn), ReadError> {
        let turn = match framing {
            BodyFraming::None | BodyFraming::Length(0) => None,
            // The semaphore is never closed.
            _ => self.bodies.clone().acquire_owned().await.ok(),
        };
        Ok((read_body(reader, framing).await?, turn))
    }

    /// Flagged requests wait in `approvals` in `ask` mode (the queue the supervisor answers).
    pub fn with_approvals(mut self, approvals: Approvals) -> Self {
        self.approvals = Some(approvals);
        self
    }

    pub fn mode(&self) -> SecretMode {
        self.mode
    }

    /// Scans a `CONNECT` request's `host:port`.
    pub(crate) fn scan_authority(&self, authority: &str) -> Hits {
        let line = authority.as_bytes();
        Hits {
            head: self
                .scanner
                .scan_line(line)
                .into_iter()
                .map(|f| hit(f, Place::Authority, line, 0))
                .collect(),
            body: Vec::new(),
        }
    }

    /// Scans a request as it goes up: `head` (request line and headers, CRLF-separated; the
    /// line of header `skip`, which the proxy sets itself, left out) and its decoded `body`.
    pub(crate) fn scan(&self, head: &[u8], skip: Option<&str>, body: &[u8]) -> Hits {
        let mut hits = Hits::default();
        let mut at = 0;
        for (i, line) in head.split(|&b| b == b'\n').enumerate() {
            let start = at;
            at += line.len() + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let place = if i == 0 {
                Place::Target
            } else {
                let name = line.split(|&b| b == b':').next().unwrap_or_default();
                let name = String::from_utf8_lossy(name).trim().to_owned();
                if skip.is_some_and(|s| s.eq_ignore_ascii_case(&name)) {
                    continue;
                }
                Place::Header(name)
            };
            for f in self.scanner.scan_line(line) {
                hits.head.push(hit(f, place.clone(), line, start));
            }
        }
        for f in self.scanner.scan_spans(body) {
            hits.body.push(hit(f, Place::Body, body, 0));
        }
        hits
    }
}

/// What becomes of a request the scanner flagged.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// It goes up (overwritten first when `redact`); `reason` is the event's code.
    Send { reason: &'static str, redact: bool },
    /// It is refused with `status`, `phrase` (the reason phrase) and `body`.
    Refuse {
        reason: &'static str,
        status: u16,
        phrase: String,
        body: String,
    },
}

impl SecretScan {
    /// Decides on a flagged request to `host:port` by the bottle's mode; in `ask` mode it
    /// waits in the approval queue (none: refused as if blocked).
    pub(crate) async fn judge(
        &self,
        hits: &Hits,
        request: (&str, u16, &str, Option<&str>),
    ) -> Verdict {
        let (host, port, method, path) = request;
        let found = hits.found();
        let refuse = |reason, phrase: &str, why: String| {
            Verdict::Refuse {
            reason,
            status: 403,
            phrase: super::proxy::forbidden_reason(phrase),
            body: format!(
                "bot-bottle egress: {host}:{port}: the request carries what looks like a secret ({found}); it was not sent. {why}\n"
            ),
        }
        };
        let blocked = || {
            refuse(
                "secret_blocked",
                &format!("secret in request: {}", hits.rules()),
                "If it is meant to go there, set `[egress] secrets = \"ask\"` in the bottle's \
                 manifest to approve such requests one by one."
                    .to_owned(),
            )
        };
        match self.mode {
            SecretMode::Off | SecretMode::Log => Verdict::Send {
                reason: "secret_logged",
                redact: false,
            },
            SecretMode::Redact if hits.redactable() => Verdict::Send {
                reason: "secret_redacted",
                redact: true,
            },
            SecretMode::Redact | SecretMode::Block => blocked(),
            SecretMode::Ask => {
                let Some(approvals) = &self.approvals else {
                    return blocked();
                };
                let outcome = approvals
                    .ask_secret(host, port, method, path, &found, &hits.digests())
                    .await;
                match outcome {
                    Outcome::Approved(Answer::Session) => Verdict::Send {
                        reason: "secret_approved_session",
                        redact: false,
                    },
                    Outcome::Approved(_) => Verdict::Send {
                        reason: "secret_approved_once",
                        redact: false,
                    },
                    Outcome::Denied => refuse(
                        "secret_denied",
                        "secret in request: denied",
                        "The user denied it (`bot-bottle deny`).".to_owned(),
                    ),
                    Outcome::QueueFull => refuse(
                        "approval_queue_full",
                        "secret in request: approval queue full",
                        format!(
                            "{} requests already wait for approval.",
                            super::approvals::MAX_PENDING
                        ),
                    ),
                    Outcome::TimedOut => refuse(
                        "secret_approval_timeout",
                        "waiting for approval: run `bot-bottle approvals`",
                        format!(
                            "It is waiting for approval: run `bot-bottle approvals` on the host \
                             (nobody answered within {}s; send it again once it is approved).",
                            approvals.hold().as_secs()
                        ),
                    ),
                }
            }
        }
    }
}

impl SecretScan {
    /// Decides on a flagged request ([`SecretScan::judge`]) and records it: `secret_pending`
    /// while it waits (`ask`), then the verdict, each with the rules in `rule` and the rules
    /// and places in `detail` (never a value). `event` names the request (method, host, port).
    /// An event that cannot be written refuses the request (fail closed).
    pub(crate) async fn act(
        &self,
        hits: &Hits,
        log: Option<&EventLog>,
        event: &EgressEvent,
        path: Option<&str>,
    ) -> Verdict {
        let mut flagged = event.clone();
        flagged.rule = Some(hits.rules());
        flagged.detail = Some(hits.found());
        if self.mode == SecretMode::Ask {
            let mut asked = flagged.clone();
            asked.verdict = "ask".into();
            asked.reason = "secret_pending".into();
            let _ = super::events::record(log, &asked).await;
        }
        let request = (event.host.as_str(), event.port, event.method.as_str(), path);
        let verdict = self.judge(hits, request).await;
        let (verdict_text, reason) = match &verdict {
            Verdict::Send { reason, .. } => ("allow", *reason),
            Verdict::Refuse { reason, .. } => ("deny", *reason),
        };
        flagged.verdict = verdict_text.into();
        flagged.reason = reason.into();
        if super::events::record(log, &flagged).await.is_err() {
            return Verdict::Refuse {
                reason,
                status: 503,
                phrase: "Service Unavailable".into(),
                body: "bot-bottle egress: the egress event log cannot be written; refusing \
                       traffic that cannot be recorded\n"
                    .into(),
            };
        }
        verdict
    }
}

fn hit(f: bottle_scan::Finding, place: Place, text: &[u8], offset: usize) -> Hit {
    Hit {
        digest: Sha256::digest(&text[f.start..f.end]).into(),
        rule: f.rule,
        place,
        start: f.start + offset,
        end: f.end + offset,
    }
}

/// Why a body could not be read to be scanned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(
        "the request body is larger than {} MiB, the most the egress proxy holds to scan for \
         secrets (send it in smaller requests, or set `[egress] secrets = \"off\"` in the \
         bottle's manifest)",
        MAX_SCANNED_BODY >> 20
    )]
    TooLarge,
    #[error(transparent)]
    Body(#[from] BodyError),
}

/// A turn to hold a body (see [`SecretScan::read_body`]); `None` for a request without one.
pub(crate) type Turn = Option<tokio::sync::OwnedSemaphorePermit>;

/// Reads a request body whole (de-chunked, checked as strictly as [`body::forward`] checks
/// it), refusing one larger than [`MAX_SCANNED_BODY`] before holding it.
async fn read_body<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    framing: BodyFraming,
) -> Result<Vec<u8>, ReadError> {
    if let BodyFraming::Length(len) = framing {
        if len > MAX_SCANNED_BODY {
            return Err(ReadError::TooLarge);
        }
    }
    let mut limited = LimitedVec::default();
    match body::decode(reader, &mut limited, framing).await {
        Err(_) if limited.over => Err(ReadError::TooLarge),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(limited.bytes),
    }
}

/// The body as it goes up in `framing`: as is for a length, one chunk for chunked.
pub(crate) fn framed(body: Vec<u8>, framing: BodyFraming) -> Vec<u8> {
    match framing {
        BodyFraming::None | BodyFraming::Length(_) => body,
        BodyFraming::Chunked if body.is_empty() => b"0\r\n\r\n".to_vec(),
        BodyFraming::Chunked => {
            let mut out = format!("{:x}\r\n", body.len()).into_bytes();
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
            out
        }
    }
}

/// A writer that keeps at most [`MAX_SCANNED_BODY`] bytes and remembers it was offered more.
#[derive(Default)]
struct LimitedVec {
    bytes: Vec<u8>,
    over: bool,
}

impl tokio::io::AsyncWrite for LimitedVec {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.bytes.len() as u64 + buf.len() as u64 > MAX_SCANNED_BODY {
            self.over = true;
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "request body over the scanning limit",
            )));
        }
        self.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
