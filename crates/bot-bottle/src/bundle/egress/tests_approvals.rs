//! The approval queue end to end over real sockets on 127.0.0.1: an upstream, the proxy with
//! `unknown = "ask"`, and the bundle's supervisor sharing its queue; the agent speaks raw
//! HTTP/1.1 to the proxy, the host answers through the supervisor with the bottle's token.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::approvals::{Answer, Approvals};
use super::*;
use crate::bundle::supervisor::{self, Supervisor, SupervisorError};

const TOKEN: &str = "feedface0123456789";
const STEP: Duration = Duration::from_secs(10);

/// An upstream answering every request `200` with body `up`.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nup",
                    )
                    .await;
            });
        }
    });
    addr
}

struct Bundle {
    proxy: SocketAddr,
    supervisor: SocketAddr,
    policy: LivePolicy,
    events: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Bundle {
    fn reasons(&self) -> Vec<String> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<EgressEvent>(l).unwrap().reason)
            .collect()
    }
}

/// A proxy allowing `allowed.test`, denying `evil.test`, asking for everything else (held
/// `hold`), and its supervisor.
async fn bundle(hold: Duration) -> Bundle {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("egress.jsonl");
    let policy =
        EgressPolicy::new(&["allowed.test:*".into()], &["evil.test".into()], "denied").unwrap();
    let mut config = ProxyConfig::new("b1", "127.0.0.1:0".parse().unwrap(), policy);
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    config.resolver = Resolver::fixed(
        ["allowed.test", "new.test", "evil.test"]
            .into_iter()
            .map(|h| (h, local)),
    );
    config.allow_loopback_upstream = true;
    config.event_log = Some(events.clone());
    config.approvals = Some(Approvals::new(hold));
    let proxy = EgressProxy::bind(config).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let supervisor_addr = listener.local_addr().unwrap();
    let s = Supervisor {
        bottle_id: "b1".into(),
        token: TOKEN.into(),
        policy: proxy.live_policy(),
        events: proxy.event_log(),
        approvals: proxy.approvals(),
    };
    tokio::spawn(s.serve(listener));
    let (addr, policy) = (proxy.local_addr(), proxy.live_policy());
    tokio::spawn(proxy.run(std::future::pending()));
    Bundle {
        proxy: addr,
        supervisor: supervisor_addr,
        policy,
        events,
        _dir: dir,
    }
}

/// The agent's plain-HTTP GET of `http://host:port/path` through the proxy: the whole answer.
async fn get(proxy: SocketAddr, host: &str, port: u16) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!("GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(STEP * 7, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The host polls the supervisor until a request waits; returns it and how long that took.
async fn first_pending(b: &Bundle) -> (approvals::Pending, Duration) {
    let t = Instant::now();
    loop {
        let pending = supervisor::request_pending(b.supervisor, TOKEN)
            .await
            .unwrap();
        if let Some(p) = pending.into_iter().next() {
            return (p, t.elapsed());
        }
        assert!(t.elapsed() < STEP, "no request ever waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_unlisted_host_waits_then_is_denied_with_how_to_approve() {
    let up = upstream().await;
    let b = bundle(Duration::from_millis(300)).await;
    let t = Instant::now();
    let answer = get(b.proxy, "new.test", up.port()).await;
    assert!(t.elapsed() >= Duration::from_millis(300), "not held");
    assert!(
        answer.starts_with(
            "HTTP/1.1 403 Forbidden (waiting for approval: run `bot-bottle approvals`)"
        ),
        "{answer}"
    );
    // Still listed, so the human can answer after the agent gave up.
    let pending = supervisor::request_pending(b.supervisor, TOKEN)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].host.as_str(), pending[0].method.as_str()),
        ("new.test", "GET")
    );
    assert_eq!(pending[0].path.as_deref(), Some("/x"));
    assert_eq!(b.reasons(), ["approval_pending", "approval_timeout"]);
    // A deny rule and a listed host never ask.
    assert!(get(b.proxy, "evil.test", up.port())
        .await
        .starts_with("HTTP/1.1 403"));
    assert!(get(b.proxy, "allowed.test", up.port())
        .await
        .ends_with("up"));
    assert_eq!(
        supervisor::request_pending(b.supervisor, TOKEN)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn approved_once_the_held_request_passes_and_the_next_one_asks_again() {
    let up = upstream().await;
    let b = bundle(Duration::from_secs(30)).await;
    let agent = tokio::spawn(get(b.proxy, "new.test", up.port()));
    let (pending, within) = first_pending(&b).await;
    assert!(within < Duration::from_secs(1), "listed after {within:?}");
    let answered = supervisor::request_decide(b.supervisor, TOKEN, pending.id, Answer::Once)
        .await
        .unwrap();
    assert_eq!(answered.waiting, 1);
    let got = agent.await.unwrap();
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("up"),
        "{got}"
    );
    // Once: the policy is unchanged and the next request waits again.
    assert!(!b.policy.decide("new.test", up.port()).is_allowed());
    let again = tokio::spawn(get(b.proxy, "new.test", up.port()));
    let (next, _) = first_pending(&b).await;
    assert_ne!(next.id, pending.id);
    supervisor::request_decide(b.supervisor, TOKEN, next.id, Answer::Deny)
        .await
        .unwrap();
    let refused = again.await.unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("the user denied it"), "{refused}");
    let reasons = b.reasons();
    assert!(reasons.contains(&"approved_once".to_owned()), "{reasons:?}");
    assert!(
        reasons.contains(&"supervisor_approved_once".to_owned()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"approval_denied".to_owned()),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn approved_for_the_session_later_requests_pass_without_asking() {
    let up = upstream().await;
    let b = bundle(Duration::from_secs(30)).await;
    let agent = tokio::spawn(get(b.proxy, "new.test", up.port()));
    let (pending, _) = first_pending(&b).await;
    supervisor::request_decide(b.supervisor, TOKEN, pending.id, Answer::Session)
        .await
        .unwrap();
    assert!(agent.await.unwrap().ends_with("up"));
    let t = Instant::now();
    assert!(get(b.proxy, "new.test", up.port()).await.ends_with("up"));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(supervisor::request_pending(b.supervisor, TOKEN)
        .await
        .unwrap()
        .is_empty());
    let (allow, _) = b.policy.rules();
    assert!(
        allow.contains(&format!("new.test:{}", up.port())),
        "{allow:?}"
    );
}

#[tokio::test]
async fn the_agent_cannot_approve_its_own_request() {
    let up = upstream().await;
    let b = bundle(Duration::from_millis(800)).await;
    let agent = tokio::spawn(get(b.proxy, "new.test", up.port()));
    let (pending, _) = first_pending(&b).await;
    // The agent reaches the supervisor port like every bundle port, without the token.
    for token in ["", "guess", "feedface0123456780"] {
        let tried =
            supervisor::request_decide(b.supervisor, token, pending.id, Answer::Session).await;
        assert!(
            matches!(tried, Err(SupervisorError::Refused { status: 401, .. })),
            "{tried:?}"
        );
        let listed = supervisor::request_pending(b.supervisor, token).await;
        assert!(
            matches!(listed, Err(SupervisorError::Refused { status: 401, .. })),
            "{listed:?}"
        );
    }
    let mut raw = TcpStream::connect(b.supervisor).await.unwrap();
    let body = format!("{{\"id\":{},\"answer\":\"session\"}}", pending.id);
    let req = format!(
        "POST /decide HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    raw.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    // Still waiting, still refused when the hold ends.
    assert!(agent.await.unwrap().starts_with("HTTP/1.1 403"));
    assert!(!b.policy.decide("new.test", up.port()).is_allowed());
    assert!(b.reasons().iter().any(|r| r == "supervisor_unauthorized"));
}

#[tokio::test]
async fn a_connect_tunnel_is_held_and_opened_once_approved() {
    let up = upstream().await;
    let b = bundle(Duration::from_secs(30)).await;
    let agent = tokio::spawn(async move {
        let mut s = TcpStream::connect(b.proxy).await.unwrap();
        let target = format!("new.test:{}", up.port());
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut head = [0u8; 39];
        s.read_exact(&mut head).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        (String::from_utf8_lossy(&head).into_owned(), rest)
    });
    let (pending, _) = first_pending(&b).await;
    assert_eq!(
        (pending.method.as_str(), pending.path.as_deref()),
        ("CONNECT", None)
    );
    supervisor::request_decide(b.supervisor, TOKEN, pending.id, Answer::Once)
        .await
        .unwrap();
    let (head, rest) = tokio::time::timeout(STEP, agent).await.unwrap().unwrap();
    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
    assert!(rest.ends_with("up"), "{rest}");
}
