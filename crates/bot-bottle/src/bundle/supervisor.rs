//! The supervisor: the bundle's control port, through which the host changes a running
//! bottle's egress policy (`bot-bottle allow <bottle> <rule>`). The agent can reach the port
//! like every bundle port, so every request must carry the bottle's supervisor token: made on
//! the host for each bottle, kept in the bottle's directory (mode 0600) and the bundle, never
//! in the agent's environment or filesystem. Rules added here last until the bottle stops;
//! the manifest's deny rules still win; every change and every refused attempt is logged.
//!
//! The protocol is a sliver of HTTP/1.1, one request per connection:
//! `POST /allow` (body: one rule), `GET /rules`, `GET /pending` (the requests waiting for
//! approval, JSON) and `POST /decide` (body: `{"id": N, "answer": "once" | "session" |
//! "deny"}`), with `Authorization: Bearer <token>`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::bundle::egress::approvals::{Answer, ApprovalError, Approvals, Pending};
use crate::bundle::egress::events::{EgressEvent, EventLog};
use crate::bundle::egress::{body, http, LivePolicy};

/// The token's file in the bottle's directory.
/// Longest request head and body the supervisor reads.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: u64 = 4096;
/// A client that sends nothing for this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; one beyond is closed as soon as it is accepted, so an agent
/// holding connections open costs the bundle at most this many descriptors and buffers (issue
/// 15: 2,000 held connections used to cost 18 MiB and 2,013 descriptors). The host's own
/// requests are short; while an agent holds them all, `allow` fails and is retried.
pub const MAX_CONNECTIONS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot make the supervisor token")]
    Random(#[source] std::io::Error),
    #[error("cannot read the supervisor token {path}: is the bottle still running?")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the bottle's supervisor at {addr}: is the bottle still running?")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the bottle's supervisor at {addr} did not answer")]
    Exchange {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the bottle's supervisor refused: {status} {body}")]
    Refused { status: u16, body: String },
}

/// A new token: 32 random bytes, hex.
pub fn new_token() -> Result<String, SupervisorError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(SupervisorError::Random)?;
    Ok(hex::encode(bytes))
}

/// The token of the bottle whose directory is `run`.
pub fn read_token(run: &crate::host::run_dir::RunDir) -> Result<String, SupervisorError> {
    let path = run.supervisor_token();
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_owned())
        .map_err(|source| SupervisorError::Token { path, source })
}

/// What the supervisor needs: the proxy's policy, the token, where to log.
pub struct Supervisor {
    pub bottle_id: String,
    pub token: String,
    pub policy: LivePolicy,
    pub events: Option<std::sync::Arc<EventLog>>,
    /// The proxy's approval queue (`unknown = "ask"`); `None`: nothing is ever pending.
    pub approvals: Option<Approvals>,
}

impl Supervisor {
    /// Serves `listener` for as long as the task runs.
    pub async fn serve(self, listener: TcpListener) {
        let this = std::sync::Arc::new(self);
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok((sock, peer)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                // Over the limit: closed at once (dropped), never read.
                drop(sock);
                continue;
            };
            let this = this.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, this.handle(sock, peer)).await;
                drop(permit);
            });
        }
    }

    async fn handle(&self, mut sock: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
        let (status, reply) = self.answer(&mut sock, peer).await;
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            _ => "Not Found",
        };
        sock.write_all(&http::response(status, reason, &reply))
            .await?;
        sock.shutdown().await
    }

    async fn answer(&self, sock: &mut TcpStream, peer: SocketAddr) -> (u16, String) {
        let mut reader = BufReader::new(sock);
        let head = match body::read_head(&mut reader, MAX_HEAD).await {
            Ok(Some(head)) => head,
            _ => return (400, "bot-bottle supervisor: no request\n".into()),
        };
        let Ok(Some((head, _))) = http::parse_head(&head) else {
            return (400, "bot-bottle supervisor: malformed request\n".into());
        };
        let authorized = head
            .header_values("authorization")
            .any(|v| same(v, format!("Bearer {}", self.token).as_bytes()));
        if !authorized {
            self.log(peer, &head.method, "deny", "supervisor_unauthorized", None)
                .await;
            return (
                401,
                "bot-bottle supervisor: this needs the bottle's token\n".into(),
            );
        }
        match (head.method.as_str(), head.target.as_str()) {
            ("POST", "/allow") => {
                let rule = match read_body(&mut reader, &head, "one rule").await {
                    Ok(rule) => rule,
                    Err(refused) => return refused,
                };
                match self.policy.allow_more(&rule) {
                    Ok(()) => {
                        self.log(peer, "SUPERVISE", "allow", "supervisor_rule", Some(&rule))
                            .await;
                        (200, format!("allowed {rule}\n"))
                    }
                    Err(e) => (400, format!("bot-bottle supervisor: {e}\n")),
                }
            }
            ("GET", "/rules") => {
                let (allow, deny) = self.policy.rules();
                (
                    200,
                    serde_json::json!({ "allow": allow, "deny": deny }).to_string(),
                )
            }
            ("GET", "/pending") => {
                let pending = self
                    .approvals
                    .as_ref()
                    .map(Approvals::pending)
                    .unwrap_or_default();
                (200, serde_json::json!(pending).to_string())
            }
            ("POST", "/decide") => {
                let text = match read_body(&mut reader, &head, "one decision").await {
                    Ok(text) => text,
                    Err(refused) => return refused,
                };
                let Ok(decision) = serde_json::from_str::<Decide>(&text) else {
                    return (
                        400,
                        "bot-bottle supervisor: send {\"id\": N, \"answer\": \"once\" | \"session\" | \"deny\"}\n"
                            .into(),
                    );
                };
                self.decide(peer, decision).await
            }
            _ => (
                404,
                "bot-bottle supervisor: POST /allow, GET /rules, GET /pending or POST /decide\n"
                    .into(),
            ),
        }
    }

    /// Answers a pending request; for `session` the rule `host:port` is added first, so the
    /// requests it releases and every later one pass.
    async fn decide(&self, peer: SocketAddr, decision: Decide) -> (u16, String) {
        let Some(approvals) = &self.approvals else {
            return (
                404,
                "bot-bottle supervisor: this bottle does not ask (its manifest has neither \
                 `[egress] unknown = \"ask\"` nor `secrets = \"ask\"`): use `bot-bottle allow`\n"
                    .into(),
            );
        };
        let Some(pending) = approvals.get(decision.id) else {
            return (
                404,
                format!(
                    "bot-bottle supervisor: {}\n",
                    ApprovalError::Unknown { id: decision.id }
                ),
            );
        };
        let rule = format!("{}:{}", pending.host, pending.port);
        // A request held for a secret it carries is about those strings, not the host: the
        // queue remembers them for `session`, and no host rule is added.
        if decision.answer == Answer::Session && pending.secret.is_none() {
            if let Err(e) = self.policy.allow_more(&rule) {
                return (400, format!("bot-bottle supervisor: {e}\n"));
            }
        }
        match approvals.answer(decision.id, decision.answer) {
            Ok(answered) => {
                let (verdict, reason) = match decision.answer {
                    Answer::Deny => ("deny", "supervisor_denied"),
                    Answer::Once => ("allow", "supervisor_approved_once"),
                    Answer::Session => ("allow", "supervisor_approved_session"),
                };
                self.log(peer, "SUPERVISE", verdict, reason, Some(&rule))
                    .await;
                (200, serde_json::json!(answered).to_string())
            }
            Err(e) => (404, format!("bot-bottle supervisor: {e}\n")),
        }
    }

    async fn log(
        &self,
        peer: SocketAddr,
        method: &str,
        verdict: &str,
        reason: &str,
        rule: Option<&str>,
    ) {
        let mut event = EgressEvent::now(&self.bottle_id, &peer.to_string(), method, "", 0);
        event.verdict = verdict.into();
        event.reason = reason.into();
        event.rule = rule.map(str::to_owned);
        tracing::info!(verdict, reason, rule = rule.unwrap_or(""), "supervisor");
        if let Some(log) = &self.events {
            if let Err(e) = log.append(&event).await {
                tracing::error!(error = %e, "cannot record supervisor event");
            }
        }
    }
}

/// `POST /decide`'s body.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Decide {
    id: u64,
    answer: Answer,
}

/// A request's body of at most [`MAX_BODY`] bytes, with its length given; `what` names it in
/// the refusal.
async fn read_body(
    reader: &mut BufReader<&mut TcpStream>,
    head: &http::RequestHead,
    what: &str,
) -> Result<String, (u16, String)> {
    let length = match http::body_framing(head) {
        Ok(http::BodyFraming::Length(n)) if n <= MAX_BODY => n,
        _ => {
            return Err((
                400,
                format!("bot-bottle supervisor: send {what}, with a length\n"),
            ))
        }
    };
    let mut text = Vec::new();
    if reader.take(length).read_to_end(&mut text).await.is_err() || text.len() as u64 != length {
        return Err((
            400,
            format!("bot-bottle supervisor: {what} was cut short\n"),
        ));
    }
    Ok(String::from_utf8_lossy(&text).trim().to_owned())
}

/// Compares without stopping at the first difference (the agent may guess at the token).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Host side: asks the supervisor at `addr` to allow `rule`; returns its answer.
pub async fn request_allow(
    addr: SocketAddr,
    token: &str,
    rule: &str,
) -> Result<String, SupervisorError> {
    exchange(addr, &request(addr, token, "POST /allow", Some(rule))).await
}

/// Host side: the requests waiting for approval at the supervisor at `addr`.
pub async fn request_pending(
    addr: SocketAddr,
    token: &str,
) -> Result<Vec<Pending>, SupervisorError> {
    exchange_json(addr, &request(addr, token, "GET /pending", None)).await
}

/// Host side: answers pending request `id`; returns it as it was answered.
pub async fn request_decide(
    addr: SocketAddr,
    token: &str,
    id: u64,
    answer: Answer,
) -> Result<Pending, SupervisorError> {
    let body = serde_json::json!(Decide { id, answer }).to_string();
    exchange_json(addr, &request(addr, token, "POST /decide", Some(&body))).await
}

/// Host side: the rules in force at the supervisor at `addr`, as JSON (`allow`, `deny`).
pub async fn request_rules(addr: SocketAddr, token: &str) -> Result<String, SupervisorError> {
    exchange(addr, &request(addr, token, "GET /rules", None)).await
}

/// One request to the supervisor at `addr`: `line` is the method and path, `body` its body.
fn request(addr: SocketAddr, token: &str, line: &str, body: Option<&str>) -> String {
    let length = body.map_or(String::new(), |b| {
        format!("Content-Length: {}\r\n", b.len())
    });
    format!(
        "{line} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{length}Connection: close\r\n\r\n{}",
        body.unwrap_or("")
    )
}

/// [`exchange`], its answer read as JSON.
async fn exchange_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    request: &str,
) -> Result<T, SupervisorError> {
    let reply = exchange(addr, request).await?;
    serde_json::from_str(&reply).map_err(|e| SupervisorError::Exchange {
        addr,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

async fn exchange(addr: SocketAddr, request: &str) -> Result<String, SupervisorError> {
    let mut sock = TcpStream::connect(addr)
        .await
        .map_err(|source| SupervisorError::Connect { addr, source })?;
    let io = |source| SupervisorError::Exchange { addr, source };
    sock.write_all(request.as_bytes()).await.map_err(io)?;
    let mut reply = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, sock.read_to_end(&mut reply))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    if status == 200 {
        Ok(body.to_owned())
    } else {
        Err(SupervisorError::Refused {
            status,
            body: body.trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::egress::{Decision, EgressPolicy};
    use std::path::Path;

    const TOKEN: &str = "0123456789abcdef";

    /// A supervisor on loopback for a policy allowing `a.test` and denying `evil.test`.
    async fn supervisor(log: &Path) -> (SocketAddr, LivePolicy) {
        let policy = LivePolicy::new(
            EgressPolicy::new(&["a.test".into()], &["evil.test".into()], "denied").unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = Supervisor {
            bottle_id: "b1".into(),
            token: TOKEN.into(),
            policy: policy.clone(),
            events: Some(std::sync::Arc::new(EventLog::open(log).await.unwrap())),
            approvals: None,
        };
        tokio::spawn(s.serve(listener));
        (addr, policy)
    }

    #[tokio::test]
    async fn connections_held_open_beyond_the_limit_are_closed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _) = supervisor(&dir.path().join("egress.jsonl")).await;

        // The agent opens many connections and sends nothing.
        let (held, closed) =
            crate::bundle::test_connections::hold(addr, MAX_CONNECTIONS + 20).await;

        assert_eq!(closed, 20, "connections beyond {MAX_CONNECTIONS} stay open");
        // Once the held ones go, the host's request is served again.
        drop(held);
        let mut rules = Err(SupervisorError::Random(std::io::ErrorKind::Other.into()));
        for _ in 0..50 {
            rules = request_rules(addr, TOKEN).await;
            if rules.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(rules.is_ok(), "{rules:?}");
    }

    #[tokio::test]
    async fn only_the_token_holder_changes_the_policy_and_deny_rules_still_win() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("egress.jsonl");
        let (addr, policy) = supervisor(&log).await;

        // The agent's attempts: no token, a guessed one, a token-length guess.
        let none = exchange(
            addr,
            "POST /allow HTTP/1.1\r\nContent-Length: 10\r\n\r\nlater.test",
        )
        .await;
        let guessed = request_allow(addr, "guess", "later.test").await;
        let same_length = request_allow(addr, "0123456789abcdeX", "later.test").await;
        let before = policy.decide("later.test", 443);
        // The host's.
        let allowed = request_allow(addr, TOKEN, "later.test").await.unwrap();
        let denied_anyway = request_allow(addr, TOKEN, "evil.test").await;
        let bad_rule = request_allow(addr, TOKEN, "http://x/").await;
        let rules = request_rules(addr, TOKEN).await.unwrap();

        for refused in [none, guessed, same_length] {
            assert!(
                matches!(refused, Err(SupervisorError::Refused { status: 401, .. })),
                "{refused:?}"
            );
        }
        assert!(matches!(before, Decision::Deny { .. }));
        assert_eq!(allowed, "allowed later.test\n");
        assert!(matches!(
            policy.decide("later.test", 443),
            Decision::Allow { .. }
        ));
        match denied_anyway {
            Err(SupervisorError::Refused { status: 400, body }) => {
                assert!(body.contains("deny rule \"evil.test\""), "{body}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            policy.decide("evil.test", 443),
            Decision::Deny { .. }
        ));
        assert!(
            matches!(bad_rule, Err(SupervisorError::Refused { status: 400, .. })),
            "{bad_rule:?}"
        );
        let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
        assert_eq!(rules["allow"], serde_json::json!(["a.test", "later.test"]));
        assert_eq!(rules["deny"], serde_json::json!(["evil.test"]));
        // Every attempt and change is in the bottle's log (repeated refusals as one count).
        let events: Vec<EgressEvent> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let reasons: Vec<(&str, u64)> = events
            .iter()
            .map(|e| (e.reason.as_str(), e.repeated.unwrap_or(1)))
            .collect();
        assert_eq!(
            reasons,
            [
                ("supervisor_unauthorized", 1),
                ("supervisor_unauthorized", 2),
                ("supervisor_rule", 1)
            ]
        );
        assert_eq!(events[2].rule.as_deref(), Some("later.test"));
    }

    #[test]
    fn tokens_are_long_random_and_compared_whole() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
