//! The proxy end to end, over real sockets on 127.0.0.1: a real upstream server, the proxy, and
//! a client speaking raw HTTP/1.1 to it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const DENY_MESSAGE: &str = "This bottle may only reach allowed.test; ask the user to widen it.";
const EXPECTED_403: &str =
    "HTTP/1.1 403 Forbidden (This bottle may only reach allowed.test; ask the user to widen it.)";
/// Upper bound for any single test step, so a broken proxy fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// A local upstream: counts connections; `echo` echoes bytes back, otherwise it answers one HTTP
/// request with `200` and the raw request it received as the body.
struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn upstream(echo: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                if echo {
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    return;
                }
                let request = read_http_request(&mut r).await;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    request.len()
                );
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.write_all(&request).await;
            });
        }
    });
    Upstream { addr, connections }
}

/// Reads one request: the head and a `Content-Length` or chunked body (until `0\r\n\r\n`).
async fn read_http_request<R: AsyncReadExt + Unpin>(r: &mut R) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && r.read(&mut byte).await.unwrap_or(0) == 1 {
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).await.unwrap();
    buf.extend_from_slice(&body);
    if head.contains("transfer-encoding: chunked") {
        while !buf.ends_with(b"\r\n0\r\n\r\n") && r.read(&mut byte).await.unwrap_or(0) == 1 {
            buf.push(byte[0]);
        }
    }
    buf
}

struct Proxy {
    addr: SocketAddr,
    events: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), EgressError>>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn events(&self) -> Vec<EgressEvent> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A proxy for bottle `b1` allowing `allowed.test` (and `*.ok.test`), denying `bad.ok.test`;
/// `allowed.test`, `evil.test`, `x.ok.test` and `bad.ok.test` all resolve to 127.0.0.1.
fn config() -> ProxyConfig {
    let policy = EgressPolicy::new(
        &strings(&["allowed.test:*", "*.ok.test:*"]),
        &strings(&["bad.ok.test"]),
        DENY_MESSAGE,
    )
    .unwrap();
    let mut config = ProxyConfig::new("b1", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed(
        ["allowed.test", "evil.test", "x.ok.test", "bad.ok.test"]
            .into_iter()
            .map(|h| (h, LOCALHOST)),
    );
    config.allow_loopback_upstream = true;
    config
}

async fn start(config: ProxyConfig) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("egress.jsonl");
    start_logging_to(config, events, dir).await
}

async fn start_logging_to(
    mut config: ProxyConfig,
    events: PathBuf,
    dir: tempfile::TempDir,
) -> Proxy {
    config.event_log = Some(events.clone());
    let proxy = EgressProxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));
    Proxy {
        addr,
        events,
        shutdown: Some(tx),
        task,
        _dir: dir,
    }
}

/// Sends `request` on a fresh connection and reads until the proxy closes it.
async fn exchange(proxy: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// Opens a CONNECT tunnel and returns the stream after the `200` line.
async fn tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let expected = b"HTTP/1.1 200 Connection Established\r\n\r\n";
    let mut head = vec![0u8; expected.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&head),
        String::from_utf8_lossy(expected)
    );
    stream
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

#[tokio::test]
async fn connect_tunnel_carries_bytes_both_ways() {
    let up = upstream(true).await;
    let proxy = start(config()).await;
    let mut stream = tunnel(proxy.addr, &format!("allowed.test:{}", up.addr.port())).await;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();

    let (mut r, mut w) = stream.split();
    let sent = async {
        w.write_all(&payload).await.unwrap();
    };
    let mut echoed = vec![0u8; payload.len()];
    let received = tokio::time::timeout(STEP, r.read_exact(&mut echoed));
    let ((), read) = tokio::join!(sent, received);

    read.unwrap().unwrap();
    assert!(echoed == payload, "echoed bytes differ from sent bytes");
}

#[tokio::test]
async fn connect_forwards_bytes_sent_together_with_the_request() {
    let up = upstream(true).await;
    let proxy = start(config()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "CONNECT allowed.test:{} HTTP/1.1\r\n\r\nearly-bytes",
        up.addr.port()
    );

    stream.write_all(request.as_bytes()).await.unwrap();

    let expected = "HTTP/1.1 200 Connection Established\r\n\r\nearly-bytes";
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
}

#[tokio::test]
async fn connect_to_unlisted_host_gets_403_with_deny_message() {
    let up = upstream(true).await;
    let proxy = start(config()).await;

    let response = exchange(
        proxy.addr,
        format!("CONNECT evil.test:{} HTTP/1.1\r\n\r\n", up.addr.port()).as_bytes(),
    )
    .await;

    assert_eq!(status_line(&response), EXPECTED_403);
    assert!(response.contains(DENY_MESSAGE), "{response}");
    assert!(response.contains("no allow rule matches"), "{response}");
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn connect_to_deny_listed_host_is_denied_despite_suffix_allow() {
    let up = upstream(true).await;
    let proxy = start(config()).await;

    let response = exchange(
        proxy.addr,
        format!("CONNECT bad.ok.test:{} HTTP/1.1\r\n\r\n", up.addr.port()).as_bytes(),
    )
    .await;

    assert_eq!(status_line(&response), EXPECTED_403);
    assert_eq!(proxy.events()[0].rule.as_deref(), Some("bad.ok.test"));
}

#[tokio::test]
async fn connect_to_ip_literal_is_denied() {
    let up = upstream(true).await;
    let proxy = start(config()).await;

    let response = exchange(
        proxy.addr,
        format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", up.addr.port()).as_bytes(),
    )
    .await;

    assert_eq!(status_line(&response), EXPECTED_403);
    assert_eq!(proxy.events()[0].reason, "ip_literal");
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn connect_to_listed_ip_literal_is_allowed() {
    let up = upstream(true).await;
    let rule = format!("127.0.0.1:{}", up.addr.port());
    let mut config = config();
    config.policy = EgressPolicy::new(std::slice::from_ref(&rule), &[], DENY_MESSAGE).unwrap();
    // The address floor holds for listed literals too (loopback only with the test switch).
    config.allow_loopback_upstream = true;
    let proxy = start(config).await;

    let mut stream = tunnel(proxy.addr, &rule).await;
    stream.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    stream.read_exact(&mut one).await.unwrap();

    assert_eq!(&one, b"x");
}

#[tokio::test]
async fn allowed_name_resolving_to_loopback_is_refused_in_production_mode() {
    let up = upstream(true).await;
    let mut config = config();
    config.allow_loopback_upstream = false;
    let proxy = start(config).await;

    let response = exchange(
        proxy.addr,
        format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", up.addr.port()).as_bytes(),
    )
    .await;

    assert_eq!(status_line(&response), EXPECTED_403);
    assert_eq!(proxy.events()[0].reason, "blocked_address");
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn plain_http_is_forwarded_in_origin_form_without_proxy_headers() {
    let up = upstream(false).await;
    let proxy = start(config()).await;
    let port = up.addr.port();
    let request = format!(
        "GET http://allowed.test:{port}/some/path?q=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\n\
         Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"
    );

    let response = exchange(proxy.addr, request.as_bytes()).await;

    let expected_upstream = format!(
        "GET /some/path?q=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(status_line(&response), "HTTP/1.1 200 OK");
    assert!(response.ends_with(&expected_upstream), "{response}");
}

#[tokio::test]
async fn plain_http_post_body_is_forwarded_and_pipelined_request_is_not() {
    let up = upstream(false).await;
    let proxy = start(config()).await;
    let port = up.addr.port();
    let request = format!(
        "POST http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: 5\r\n\r\nhello\
         GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    );

    let response = exchange(proxy.addr, request.as_bytes()).await;

    assert!(response.ends_with("\r\n\r\nhello"), "{response}");
    assert!(!response.contains("evil.test"), "{response}");
}

#[tokio::test]
async fn plain_http_chunked_body_is_forwarded() {
    let up = upstream(false).await;
    let proxy = start(config()).await;
    let port = up.addr.port();
    let request = format!(
        "POST http://allowed.test:{port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );

    let response = exchange(proxy.addr, request.as_bytes()).await;

    assert!(
        response.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        "{response}"
    );
}

#[tokio::test]
async fn plain_http_spoofed_host_header_is_denied() {
    let up = upstream(false).await;
    let proxy = start(config()).await;
    let request = format!(
        "GET http://allowed.test:{}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        up.addr.port()
    );

    let response = exchange(proxy.addr, request.as_bytes()).await;

    let event = &proxy.events()[0];
    assert_eq!(status_line(&response), EXPECTED_403);
    assert!(response.contains(DENY_MESSAGE), "{response}");
    assert_eq!(
        (
            event.host.as_str(),
            event.verdict.as_str(),
            event.reason.as_str()
        ),
        ("allowed.test", "deny", "host_header_denied")
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn plain_http_denied_uri_with_allowed_host_header_is_denied() {
    let up = upstream(false).await;
    let proxy = start(config()).await;
    let request = format!(
        "GET http://evil.test:{}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        up.addr.port()
    );

    let response = exchange(proxy.addr, request.as_bytes()).await;

    assert_eq!(status_line(&response), EXPECTED_403);
    assert_eq!(proxy.events()[0].host, "evil.test");
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn plain_http_origin_form_is_decided_on_host_header() {
    let up = upstream(false).await;
    let proxy = start(config()).await;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: evil.test:{}\r\n\r\n",
        up.addr.port()
    );

    let response = exchange(proxy.addr, request.as_bytes()).await;

    assert_eq!(status_line(&response), EXPECTED_403);
    assert_eq!(proxy.events()[0].host, "evil.test");
}

#[tokio::test]
async fn decisions_are_written_as_parseable_event_lines() {
    let up = upstream(true).await;
    let proxy = start(config()).await;
    let port = up.addr.port();
    drop(tunnel(proxy.addr, &format!("x.ok.test:{port}")).await);
    exchange(proxy.addr, b"CONNECT dns.google:443 HTTP/1.1\r\n\r\n").await;

    let events = proxy.events();

    type Summary<'a> = (&'a str, &'a str, u16, &'a str, Option<&'a str>, &'a str);
    let summary: Vec<Summary> = events
        .iter()
        .map(|e| {
            (
                e.bottle_id.as_str(),
                e.host.as_str(),
                e.port,
                e.verdict.as_str(),
                e.rule.as_deref(),
                e.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "b1",
                "x.ok.test",
                port,
                "allow",
                Some("*.ok.test:*"),
                "allow_rule"
            ),
            ("b1", "dns.google", 443, "deny", None, "doh_endpoint"),
        ]
    );
    assert!(events[0].time.ends_with('Z') && events[0].time_unix_ms > 0);
}

#[tokio::test]
async fn malformed_request_gets_400() {
    let proxy = start(config()).await;

    let response = exchange(proxy.addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;

    assert_eq!(status_line(&response), "HTTP/1.1 400 Bad Request");
    assert_eq!(proxy.events()[0].reason, "bad_request");
}

#[tokio::test]
async fn https_absolute_target_gets_400_pointing_to_connect() {
    let proxy = start(config()).await;

    let response = exchange(proxy.addr, b"GET https://allowed.test/ HTTP/1.1\r\n\r\n").await;

    assert_eq!(status_line(&response), "HTTP/1.1 400 Bad Request");
    assert!(response.contains("CONNECT"), "{response}");
}

#[tokio::test]
async fn connect_without_port_gets_400() {
    let proxy = start(config()).await;

    let response = exchange(proxy.addr, b"CONNECT allowed.test HTTP/1.1\r\n\r\n").await;

    assert_eq!(status_line(&response), "HTTP/1.1 400 Bad Request");
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let mut config = config();
    config.limits.max_head_bytes = 1024;
    let proxy = start(config).await;
    let request = format!(
        "GET http://allowed.test/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4096)
    );

    let response = exchange(proxy.addr, request.as_bytes()).await;

    assert_eq!(
        status_line(&response),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
}

#[tokio::test]
async fn slow_request_head_gets_408() {
    let mut config = config();
    config.limits.head_timeout = Duration::from_millis(200);
    let proxy = start(config).await;

    let response = exchange(proxy.addr, b"GET http://allowed.test/ HTTP/1.1\r\n").await;

    assert_eq!(status_line(&response), "HTTP/1.1 408 Request Timeout");
}

#[tokio::test]
async fn idle_tunnel_is_closed_after_idle_timeout() {
    let up = upstream(true).await;
    let mut config = config();
    config.limits.idle_timeout = Duration::from_millis(300);
    let proxy = start(config).await;
    let mut stream = tunnel(proxy.addr, &format!("allowed.test:{}", up.addr.port())).await;
    let started = Instant::now();

    let mut rest = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();

    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert!(rest.is_empty());
}

#[tokio::test]
async fn connection_beyond_the_limit_gets_503() {
    let up = upstream(true).await;
    let mut config = config();
    config.limits.max_connections = 1;
    let proxy = start(config).await;
    let _held = tunnel(proxy.addr, &format!("allowed.test:{}", up.addr.port())).await;

    let response = exchange(proxy.addr, b"CONNECT allowed.test:1 HTTP/1.1\r\n\r\n").await;

    assert_eq!(status_line(&response), "HTTP/1.1 503 Service Unavailable");
}

#[tokio::test]
async fn unreachable_upstream_gets_502() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let proxy = start(config()).await;

    let response = exchange(
        proxy.addr,
        format!("CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;

    assert_eq!(status_line(&response), "HTTP/1.1 502 Bad Gateway");
}

#[tokio::test]
async fn garbage_never_stops_the_proxy_from_serving() {
    let up = upstream(true).await;
    let proxy = start(config()).await;
    let garbage: [&[u8]; 8] = [
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET\r\n\r\n",
        b"CONNECT [::1 HTTP/1.1\r\n\r\n",
        b"CONNECT :0 HTTP/1.1\r\n\r\n",
        b"GET http://[ HTTP/1.1\r\n\r\n",
        b"GET http://allowed.test/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST http://allowed.test/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET http://allowed.test/ HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    ];
    let mut statuses = Vec::new();
    for bytes in garbage {
        statuses.push(status_line(&exchange(proxy.addr, bytes).await).to_owned());
    }

    let mut stream = tunnel(proxy.addr, &format!("allowed.test:{}", up.addr.port())).await;
    stream.write_all(b"still alive").await.unwrap();
    let mut back = [0u8; 11];
    stream.read_exact(&mut back).await.unwrap();

    assert_eq!(
        statuses,
        vec!["HTTP/1.1 400 Bad Request".to_owned(); garbage.len()]
    );
    assert_eq!(&back, b"still alive");
}

#[tokio::test]
async fn serve_returns_after_shutdown() {
    let mut proxy = start(config()).await;

    proxy.shutdown.take().unwrap().send(()).unwrap();

    let result = tokio::time::timeout(STEP, &mut proxy.task)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok());
    assert!(TcpStream::connect(proxy.addr).await.is_err());
}

#[tokio::test]
async fn bind_to_busy_port_names_the_address() {
    let busy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = busy.local_addr().unwrap();
    let mut config = config();
    config.listen = addr;

    let err = EgressProxy::bind(config).await.unwrap_err();

    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[test]
fn deny_message_in_the_reason_phrase_cannot_inject_headers() {
    let reason = super::proxy::forbidden_reason("no\r\nSet-Cookie: x=1");
    assert_eq!(reason, "Forbidden (no  Set-Cookie: x=1)");
    assert!(!reason.contains('\n') && !reason.contains('\r'));
    assert_eq!(super::proxy::forbidden_reason("\r\n"), "Forbidden");
}

/// Deterministic pseudo-random inputs (xorshift) built from the characters parsers care about.
fn fuzz_inputs(count: usize) -> Vec<Vec<u8>> {
    const ALPHABET: &[u8] =
        b"aZ09.-_*:[]@/?#%\\ \t\r\n\x00\xff\xc3\xa9GETCONNECThttp://1HTTP/1.1Host:";
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let len = (next() % 48) as usize;
            (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect()
        })
        .collect()
}

#[test]
fn pure_parsers_never_panic_on_arbitrary_input() {
    let policy = EgressPolicy::new(&strings(&["*.a.test", "b.test:80", "::1"]), &[], "").unwrap();
    let inputs = fuzz_inputs(20_000);

    let handled = inputs
        .iter()
        .map(|bytes| {
            let text = String::from_utf8_lossy(bytes);
            let _ = policy.decide(&text, 443);
            let _ = EgressPolicy::new(&[text.to_string()], &[], "");
            let _ = http::parse_authority(&text, None);
            let _ = http::parse_absolute_http(&text);
            let _ = http::parse_head(bytes);
            let mut request = b"GET http://a.test/ HTTP/1.1\r\nHost: ".to_vec();
            request.extend_from_slice(bytes);
            request.extend_from_slice(b"\r\n\r\n");
            let _ = http::parse_head(&request).map(|h| h.map(|(h, _)| http::body_framing(&h)));
            let _ = super::proxy::forbidden_reason(&text);
        })
        .count();

    assert_eq!(handled, inputs.len());
}

#[tokio::test]
async fn allowed_request_is_refused_when_its_event_cannot_be_written() {
    // Every write to /dev/full fails with ENOSPC: a real unwritable log.
    let up = upstream(true).await;
    let proxy = start_logging_to(config(), "/dev/full".into(), tempfile::tempdir().unwrap()).await;

    let response = exchange(
        proxy.addr,
        format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", up.addr.port()).as_bytes(),
    )
    .await;

    assert_eq!(status_line(&response), "HTTP/1.1 503 Service Unavailable");
    assert!(response.contains("event log"), "{response}");
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn denied_request_is_still_denied_when_its_event_cannot_be_written() {
    let proxy = start_logging_to(config(), "/dev/full".into(), tempfile::tempdir().unwrap()).await;

    let response = exchange(proxy.addr, b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n").await;

    assert_eq!(status_line(&response), EXPECTED_403);
}

#[tokio::test]
async fn unwritable_event_log_path_fails_bind_naming_the_path() {
    let mut config = config();
    config.event_log = Some("/nonexistent-dir/egress.jsonl".into());

    let err = EgressProxy::bind(config).await.unwrap_err();

    assert!(
        err.to_string().contains("/nonexistent-dir/egress.jsonl"),
        "{err}"
    );
}

#[tokio::test]
async fn concurrent_tunnels_each_carry_their_own_bytes_and_log_one_line() {
    let up = upstream(true).await;
    let proxy = start(config()).await;
    let target = format!("allowed.test:{}", up.addr.port());

    let clients = (0..40u8).map(|i| {
        let target = target.clone();
        let addr = proxy.addr;
        tokio::spawn(async move {
            let mut stream = tunnel(addr, &target).await;
            let payload = vec![i; 64 * 1024];
            let (mut r, mut w) = stream.split();
            let mut echoed = vec![0u8; payload.len()];
            let (written, read) = tokio::join!(w.write_all(&payload), r.read_exact(&mut echoed));
            written.unwrap();
            read.unwrap();
            echoed == payload
        })
    });
    let mut intact = Vec::new();
    for client in clients.collect::<Vec<_>>() {
        intact.push(tokio::time::timeout(STEP, client).await.unwrap().unwrap());
    }

    assert_eq!(intact, vec![true; 40]);
    assert_eq!(proxy.events().len(), 40);
}

/// An agent flooding the proxy with denied requests cannot fill the host's disk through its
/// log: the log rotates at its bound, at most three parts exist (the first, kept for the
/// run, the previous and the current), the newest events are kept.
#[tokio::test]
async fn a_flood_of_denied_requests_keeps_the_log_bounded_and_its_newest_events() {
    const BOUND: u64 = 64 * 1024;
    let mut config = config();
    config.event_log_max_bytes = BOUND;
    let proxy = start(config).await;

    for i in 0..1500 {
        let request = format!("CONNECT flood-{i}.evil.test:443 HTTP/1.1\r\n\r\n");
        let response = exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(status_line(&response).split(' ').nth(1), Some("403"));
    }

    let current = std::fs::read_to_string(&proxy.events).unwrap();
    let previous = std::fs::read_to_string(super::events::previous_part(&proxy.events)).unwrap();
    assert!(current.len() as u64 <= BOUND, "{}", current.len());
    assert!(previous.len() as u64 <= BOUND, "{}", previous.len());
    // The last denial is there, whole; the first ones are gone; every line parses.
    assert!(current.contains("\"host\":\"flood-1499.evil.test\""));
    assert!(!previous.contains("\"host\":\"flood-0.evil.test\""));
    let first = std::fs::read_to_string(super::events::first_part(&proxy.events)).unwrap();
    assert!(first.contains("\"host\":\"flood-0.evil.test\""));
    for line in previous.lines().chain(current.lines()) {
        serde_json::from_str::<EgressEvent>(line).unwrap();
    }
    // Nothing else was written beside them.
    let parts = std::fs::read_dir(proxy.events.parent().unwrap())
        .unwrap()
        .count();
    assert_eq!(parts, 3);
}

/// [`config`] where `allowed.test` (any port) takes only `GET` under `/repos/me/app/**`
/// (an `[egress] allow` table); `*.ok.test` keeps its string rule.
fn config_with_request_rule() -> (ProxyConfig, RequestRuleSpec) {
    let rule = RequestRuleSpec {
        host: "allowed.test:*".to_owned(),
        methods: Some(strings(&["GET"])),
        paths: Some(strings(&["/repos/me/app/**"])),
    };
    let mut config = config();
    config.policy = config
        .policy
        .with_request_rules(std::slice::from_ref(&rule))
        .unwrap();
    (config, rule)
}

#[tokio::test]
async fn plain_http_requests_are_held_to_the_request_rules_on_their_canonical_path() {
    let up = upstream(false).await;
    let (config, rule) = config_with_request_rule();
    let proxy = start(config).await;
    let port = up.addr.port();
    let absolute = |method: &str, path: &str| {
        format!("{method} http://allowed.test:{port}{path} HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: 0\r\n\r\n")
    };
    // Positive controls: under the pattern, and a dot segment that stays under it (sent up
    // resolved).
    let good = exchange(
        proxy.addr,
        absolute("GET", "/repos/me/app/x?q=1").as_bytes(),
    )
    .await;
    let resolved = exchange(
        proxy.addr,
        absolute("GET", "/repos/me/app/x/../y").as_bytes(),
    )
    .await;
    let allowed = up.connections.load(Ordering::SeqCst);

    let mut attacks: Vec<String> = [
        "/repos/me/other",
        "/repos/me/app/../other",
        "/repos/me/app/%2e%2e/other",
        "/repos/me/app//../other",
        "/repos/me/app/..;/other",
        "/repos/me/app%2f..%2fother",
        "/repos/me/apps",
    ]
    .iter()
    .map(|path| absolute("GET", path))
    .collect();
    attacks.push(absolute("POST", "/repos/me/app/x"));
    attacks.push(absolute("get", "/repos/me/app/x"));
    attacks.push(format!(
        "GET http://allowed.test:{port}/repos/me/app/x HTTP/1.1\r\nHost: allowed.test:{port}\r\nX-HTTP-Method-Override: DELETE\r\n\r\n"
    ));
    // Origin form, decided on the Host header.
    attacks.push(format!(
        "GET /repos/me/other HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
    ));
    // Fronting: the URI names a host without rules, the Host header the one with them.
    attacks.push(format!(
        "GET http://x.ok.test:{port}/repos/me/other HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
    ));
    let mut answers = Vec::new();
    for attack in &attacks {
        let response = exchange(proxy.addr, attack.as_bytes()).await;
        answers.push(status_line(&response).to_owned());
    }
    let refused = exchange(proxy.addr, absolute("POST", "/repos/me/app/x").as_bytes()).await;
    let events = proxy.events();

    assert_eq!(status_line(&good), "HTTP/1.1 200 OK", "{good}");
    assert_eq!(answers, vec![EXPECTED_403.to_owned(); attacks.len()]);
    assert!(
        good.contains("GET /repos/me/app/x?q=1 HTTP/1.1\r\n"),
        "{good}"
    );
    assert!(
        resolved.contains("GET /repos/me/app/y HTTP/1.1\r\n"),
        "{resolved}"
    );
    // Nothing refused was dialled.
    assert_eq!(up.connections.load(Ordering::SeqCst), allowed);
    assert!(refused.contains(DENY_MESSAGE), "{refused}");
    assert!(refused.contains(&rule.text()), "{refused}");
    let denial = events
        .iter()
        .find(|e| e.reason == "request_not_allowed")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(denial.rule.as_deref(), Some(rule.text().as_str()));
    assert_eq!(denial.host, "allowed.test");
}

#[tokio::test]
async fn a_string_rule_for_another_host_is_untouched_by_request_rules() {
    let up = upstream(false).await;
    let (config, _) = config_with_request_rule();
    let proxy = start(config).await;
    let port = up.addr.port();

    let post = format!(
        "POST http://x.ok.test:{port}/anything/../else HTTP/1.1\r\nHost: x.ok.test:{port}\r\nContent-Length: 2\r\n\r\nhi"
    );
    let response = exchange(proxy.addr, post.as_bytes()).await;

    assert_eq!(status_line(&response), "HTTP/1.1 200 OK", "{response}");
    // Sent as given: no rule decided on its path.
    assert!(
        response.contains("POST /anything/../else HTTP/1.1\r\n"),
        "{response}"
    );
    assert!(response.ends_with("hi"), "{response}");
}

#[tokio::test]
async fn a_tunnel_the_proxy_would_not_see_into_is_refused_where_request_rules_apply() {
    let up = upstream(true).await;
    let (config, rule) = config_with_request_rule();
    let proxy = start(config).await;
    let port = up.addr.port();

    // `allowed.test` has no credential: a CONNECT would carry requests no rule sees.
    let refused = exchange(
        proxy.addr,
        format!("CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    let dialled = up.connections.load(Ordering::SeqCst);
    // Positive control: a host with a string rule only is tunnelled as before.
    drop(tunnel(proxy.addr, &format!("x.ok.test:{port}")).await);
    let events = proxy.events();

    assert_eq!(status_line(&refused), EXPECTED_403, "{refused}");
    assert!(refused.contains(&rule.text()), "{refused}");
    assert_eq!(dialled, 0);
    assert_eq!(events[0].reason, "rule_not_enforceable");
    assert_eq!(events[0].verdict, "deny");
    assert_eq!(events[0].rule.as_deref(), Some(rule.text().as_str()));
    assert_eq!(events[1].verdict, "allow");
}
