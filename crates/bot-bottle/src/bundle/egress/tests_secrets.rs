//! Outbound secret scanning as attacks, over real sockets on 127.0.0.1: the agent tries to
//! send a secret out through plain HTTP (in the body, a header, the URL, a chunked body split
//! across chunks, a `CONNECT` name), and the test shows what the upstream received — nothing,
//! the secret overwritten, or (where the bottle says so) the request after a human's answer.
//! The intercepted (TLS) path is tested in `intercept::tests`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::approvals::{Answer, Approvals};
use super::*;

const STEP: Duration = Duration::from_secs(10);

/// The bottle's credential, as the proxy injects it (the agent never holds it; a test agent
/// that sends it stands for one that obtained it anyway).
const CREDENTIAL: &str = "Bearer s3cr3t-Value-of-the-bottle-42";
const CREDENTIAL_TOKEN: &str = "s3cr3t-Value-of-the-bottle-42";

/// A GitHub-format token, assembled at run time so this file holds none.
fn github_token() -> String {
    format!("ghp_{}", "aB3dE6gH9j".repeat(4)[..36].to_owned())
}

/// Every request the upstream received: head and body (as framed on the wire).
#[derive(Default)]
struct Received(Mutex<Vec<(String, Vec<u8>)>>);

impl Received {
    fn all(&self) -> Vec<(String, Vec<u8>)> {
        self.0.lock().unwrap().clone()
    }
}

/// An upstream that records each request and answers `200 up`.
async fn upstream() -> (SocketAddr, Arc<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Received::default());
    let seen = received.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                let Ok(Some(head)) = body::read_head(&mut s, 64 * 1024).await else {
                    return;
                };
                let (parsed, _) = http::parse_head(&head).unwrap().unwrap();
                let mut got = Vec::new();
                let framing = http::body_framing(&parsed).unwrap();
                if body::forward(&mut s, &mut got, framing).await.is_err() {
                    return;
                }
                seen.0
                    .lock()
                    .unwrap()
                    .push((String::from_utf8_lossy(&head).into_owned(), got));
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nup",
                    )
                    .await;
            });
        }
    });
    (addr, received)
}

struct Bottle {
    proxy: SocketAddr,
    upstream_port: u16,
    received: Arc<Received>,
    approvals: Approvals,
    events: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Bottle {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.events).unwrap_or_default()
    }

    fn events(&self) -> Vec<EgressEvent> {
        self.log()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The event of `reason`; panics naming the reasons seen if there is none.
    fn event(&self, reason: &str) -> EgressEvent {
        let events = self.events();
        let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
        events
            .iter()
            .find(|e| e.reason == reason)
            .cloned()
            .unwrap_or_else(|| panic!("no {reason} event in {reasons:?}"))
    }

    /// Sends `request` (with `{port}` filled in) and returns the whole answer.
    async fn send(&self, request: &str) -> String {
        let request = request.replace("{port}", &self.upstream_port.to_string());
        let mut s = TcpStream::connect(self.proxy).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(STEP, s.read_to_end(&mut out))
            .await
            .expect("the proxy answered")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// A proxy allowing `allowed.test` and `*.wild.test`, scanning in `mode` with the bottle's
/// credential known, and an approval queue holding for `hold`.
async fn bottle(mode: SecretMode, hold: Duration) -> Bottle {
    let (up, received) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("egress.jsonl");
    let policy = EgressPolicy::new(
        &["allowed.test:*".into(), "*.wild.test:*".into()],
        &[],
        "denied",
    )
    .unwrap();
    let mut config = ProxyConfig::new("b1", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed([("allowed.test", IpAddr::V4(Ipv4Addr::LOCALHOST))]);
    config.allow_loopback_upstream = true;
    config.event_log = Some(events.clone());
    let approvals = Approvals::new(hold);
    // Unlisted hosts are refused at once (no `config.approvals`); flagged requests ask.
    config.secrets = Some(Arc::new(
        SecretScan::new(
            mode,
            &[("api.test", CREDENTIAL), ("api.test", CREDENTIAL_TOKEN)],
        )
        .with_approvals(approvals.clone()),
    ));
    let proxy = EgressProxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    Bottle {
        proxy: addr,
        upstream_port: up.port(),
        received,
        approvals,
        events,
        _dir: dir,
    }
}

fn post(body: &str) -> String {
    format!(
        "POST http://allowed.test:{{port}}/upload HTTP/1.1\r\nHost: allowed.test:{{port}}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn a_body_carrying_the_bottles_credential_is_blocked_and_never_goes_up() {
    let b = bottle(SecretMode::Block, STEP).await;

    let answer = b.send(&post(&format!("leak={CREDENTIAL_TOKEN}"))).await;

    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(
        answer.contains("secret in request: credential api.test"),
        "{answer}"
    );
    assert!(
        answer.contains("credential api.test in the body"),
        "{answer}"
    );
    assert!(
        answer.contains(
            "carries what looks like a secret (credential api.test in the body); it was not sent."
        ),
        "{answer}"
    );
    assert!(!answer.contains(CREDENTIAL_TOKEN), "{answer}");
    assert!(b.received.all().is_empty(), "nothing went up");
    let event = b.event("secret_blocked");
    assert_eq!(
        (event.verdict.as_str(), event.rule.as_deref()),
        ("deny", Some("credential api.test"))
    );
    assert!(
        !b.log().contains(CREDENTIAL_TOKEN),
        "the log holds no value"
    );

    // A clean request still passes, untouched.
    let answer = b.send(&post("hello")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.received.all()[0].1, b"hello");
}

#[tokio::test]
async fn token_formats_in_a_header_the_url_or_split_across_chunks_are_blocked() {
    let b = bottle(SecretMode::Block, STEP).await;
    let token = github_token();
    let (front, back) = token.split_at(10);
    let chunked = format!(
        "POST http://allowed.test:{{port}}/c HTTP/1.1\r\nHost: allowed.test:{{port}}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{front}\r\n{:x}\r\n{back}\r\n0\r\n\r\n",
        front.len(),
        back.len()
    );
    for (request, place) in [
        (
            format!(
                "GET http://allowed.test:{{port}}/ HTTP/1.1\r\nHost: allowed.test:{{port}}\r\n\
                 X-Debug: {token}\r\n\r\n"
            ),
            "github-token in header X-Debug",
        ),
        (
            format!(
                "GET http://allowed.test:{{port}}/?t={token} HTTP/1.1\r\n\
                 Host: allowed.test:{{port}}\r\n\r\n"
            ),
            "github-token in the request target",
        ),
        (chunked, "github-token in the body"),
    ] {
        let answer = b.send(&request).await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        assert!(answer.contains(place), "{place}: {answer}");
        assert!(!answer.contains(&token));
    }
    assert!(b.received.all().is_empty(), "nothing went up");
    assert!(!b.log().contains(&token));

    // A name under an allowed wildcard cannot carry one out either (refused before DNS).
    let answer = b
        .send(&format!(
            "CONNECT {}.wild.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            token.to_ascii_lowercase()
        ))
        .await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(answer.contains("the CONNECT authority"), "{answer}");
}

#[tokio::test]
async fn redact_mode_sends_the_request_with_the_secret_overwritten() {
    let b = bottle(SecretMode::Redact, STEP).await;
    let token = github_token();
    let body = format!("{{\"note\":\"{token}\",\"key\":\"{CREDENTIAL_TOKEN}\"}}");
    let request = format!(
        "POST http://allowed.test:{{port}}/r HTTP/1.1\r\nHost: allowed.test:{{port}}\r\n\
         X-Token: {token}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );

    let answer = b.send(&request).await;

    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let received = b.received.all();
    let (head, got) = &received[0];
    let expected = body
        .replace(&token, &"*".repeat(token.len()))
        .replace(CREDENTIAL_TOKEN, &"*".repeat(CREDENTIAL_TOKEN.len()));
    // Re-framed as one chunk: the upstream's decoder reads exactly the redacted body.
    let mut decoded = Vec::new();
    let mut reader = BufReader::new(&got[..]);
    body::decode(&mut reader, &mut decoded, http::BodyFraming::Chunked)
        .await
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), expected);
    assert!(
        head.contains(&format!("X-Token: {}\r\n", "*".repeat(token.len()))),
        "{head}"
    );
    assert!(!head.contains(&token) && !head.contains(CREDENTIAL_TOKEN));
    let event = b.event("secret_redacted");
    assert_eq!(event.verdict, "allow");
    assert_eq!(
        event.rule.as_deref(),
        Some("credential api.test, github-token")
    );
    assert!(!b.log().contains(&token) && !b.log().contains(CREDENTIAL_TOKEN));
}

#[tokio::test]
async fn log_mode_sends_it_unchanged_and_records_the_rule() {
    let b = bottle(SecretMode::Log, STEP).await;
    let token = github_token();
    let body = format!("t={token}");

    let answer = b.send(&post(&body)).await;

    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.received.all()[0].1, body.as_bytes());
    let event = b.event("secret_logged");
    assert_eq!(event.rule.as_deref(), Some("github-token"));
    assert_eq!(event.detail.as_deref(), Some("github-token in the body"));
    assert!(!b.log().contains(&token));
}

/// Waits until a request is held; returns it.
async fn held(approvals: &Approvals) -> approvals::Pending {
    let t = Instant::now();
    loop {
        if let Some(p) = approvals.pending().into_iter().find(|p| p.waiting > 0) {
            return p;
        }
        assert!(t.elapsed() < STEP, "no request was held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn ask_mode_holds_it_until_the_human_answers_and_a_session_answer_remembers_the_string() {
    let b = Arc::new(bottle(SecretMode::Ask, STEP).await);
    let token = github_token();
    let body = format!("t={token}");

    // Held, listed with what was found (never the value), let through once.
    let sending = tokio::spawn({
        let (b, request) = (b.clone(), post(&body));
        async move { b.send(&request).await }
    });
    let pending = held(&b.approvals).await;
    assert_eq!(pending.secret.as_deref(), Some("github-token in the body"));
    assert_eq!(
        (pending.host.as_str(), pending.method.as_str()),
        ("allowed.test", "POST")
    );
    assert!(!serde_json::to_string(&pending).unwrap().contains(&token));
    assert!(
        b.received.all().is_empty(),
        "nothing goes up while it waits"
    );
    b.approvals.answer(pending.id, Answer::Once).unwrap();
    let answer = sending.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.received.all().len(), 1);

    // Once: the same string asks again; answered for the session, it then passes unasked.
    let sending = tokio::spawn({
        let (b, request) = (b.clone(), post(&body));
        async move { b.send(&request).await }
    });
    let pending = held(&b.approvals).await;
    b.approvals.answer(pending.id, Answer::Session).unwrap();
    assert!(sending.await.unwrap().starts_with("HTTP/1.1 200"));
    let answer = b.send(&post(&format!("again {token}"))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.received.all().len(), 3);
    assert!(b.approvals.pending().is_empty());

    // Another secret is not covered by that answer: denied, it never goes up.
    let sending = tokio::spawn({
        let (b, request) = (b.clone(), post(&format!("k={CREDENTIAL_TOKEN}")));
        async move { b.send(&request).await }
    });
    let pending = held(&b.approvals).await;
    assert_eq!(
        pending.secret.as_deref(),
        Some("credential api.test in the body")
    );
    b.approvals.answer(pending.id, Answer::Deny).unwrap();
    let answer = sending.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert_eq!(b.received.all().len(), 3);
    let reasons: Vec<String> = b.events().into_iter().map(|e| e.reason).collect();
    for reason in [
        "secret_pending",
        "secret_approved_once",
        "secret_approved_session",
        "secret_denied",
    ] {
        assert!(reasons.iter().any(|r| r == reason), "{reason}: {reasons:?}");
    }
    assert!(!b.log().contains(&token) && !b.log().contains(CREDENTIAL_TOKEN));
}

#[tokio::test]
async fn ask_mode_refuses_as_waiting_when_nobody_answers() {
    let b = bottle(SecretMode::Ask, Duration::from_millis(100)).await;
    let answer = b.send(&post(&format!("t={}", github_token()))).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(
        answer.contains("waiting for approval: run `bot-bottle approvals`"),
        "{answer}"
    );
    assert!(b.received.all().is_empty());
    b.event("secret_approval_timeout");
}

#[tokio::test]
async fn a_body_too_large_to_scan_is_refused_before_it_is_read_and_expect_continue_is_answered() {
    let b = bottle(SecretMode::Block, STEP).await;
    let too_large = format!(
        "POST http://allowed.test:{{port}}/big HTTP/1.1\r\nHost: allowed.test:{{port}}\r\n\
         Content-Length: {}\r\n\r\n",
        secrets::MAX_SCANNED_BODY + 1
    );
    let answer = b.send(&too_large).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("secrets = \"off\""), "{answer}");
    b.event("secret_scan_limit");

    // A client that waits for `100 Continue` gets it from the proxy, then its body is scanned.
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    let head = format!(
        "POST http://allowed.test:{p}/e HTTP/1.1\r\nHost: allowed.test:{p}\r\n\
         Expect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        p = b.upstream_port
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(STEP, s.read_exact(&mut interim))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let received = b.received.all();
    assert_eq!(received[0].1, b"hello");
    assert!(!received[0].0.to_ascii_lowercase().contains("expect:"));
}

#[tokio::test]
async fn the_bundle_holds_at_most_a_few_bodies_at_once_and_a_request_without_one_never_waits() {
    let b = Arc::new(bottle(SecretMode::Ask, STEP).await);
    let token = github_token();
    // Four bodies held for approval take every turn.
    let mut held_posts = Vec::new();
    for i in 0..secrets::MAX_BODIES_AT_ONCE {
        let (b, request) = (b.clone(), post(&format!("n={i}&t={token}")));
        held_posts.push(tokio::spawn(async move { b.send(&request).await }));
    }
    let t = Instant::now();
    while b.approvals.pending().first().map_or(0, |p| p.waiting) < secrets::MAX_BODIES_AT_ONCE {
        assert!(t.elapsed() < STEP, "the bodies were never all held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A fifth body waits for a turn; a request without a body goes straight through.
    let fifth = tokio::spawn({
        let (b, request) = (b.clone(), post("clean"));
        async move { b.send(&request).await }
    });
    let get = b
        .send("GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n")
        .await;
    assert!(get.starts_with("HTTP/1.1 200"), "{get}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !fifth.is_finished(),
        "a fifth body was taken while four were held"
    );
    assert_eq!(b.received.all().len(), 1, "only the GET went up");

    // Denied, the held ones give their turns back and the fifth goes up.
    let id = b.approvals.pending()[0].id;
    b.approvals.answer(id, Answer::Deny).unwrap();
    for h in held_posts {
        assert!(h.await.unwrap().starts_with("HTTP/1.1 403 "));
    }
    let answer = fifth.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.received.all()[1].1, b"clean");
}
