//! Attacks on message framing and on the event log, end to end over real sockets on 127.0.0.1:
//! a recording upstream (plain TCP, or TLS for an intercepted credential host), the proxy, and
//! a hostile client speaking raw HTTP/1.1. Each attack has a positive control (a well-framed
//! request on the same setup goes through), so a proxy that refuses everything cannot pass.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::intercept::{BottleCa, Injection, Interception};
use super::test_pki::{pki, provider};
use super::*;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Upper bound for any single test step, so a broken proxy fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);
/// How long the recording upstream waits for more bytes before it answers what it has.
const UPSTREAM_QUIET: Duration = Duration::from_millis(300);

/// Everything each upstream connection received, in order of connection.
type Recorded = Arc<Mutex<Vec<Vec<u8>>>>;

/// Serves one upstream connection: records every byte; whenever the client has been quiet for
/// [`UPSTREAM_QUIET`], answers `200` and (when `keep`) goes on reading, until the client
/// closes.
async fn record_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    recorded: Recorded,
    keep: bool,
) {
    let slot = {
        let mut all = recorded.lock().unwrap();
        all.push(Vec::new());
        all.len() - 1
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = false;
    loop {
        match tokio::time::timeout(UPSTREAM_QUIET, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                recorded.lock().unwrap()[slot].extend_from_slice(&buf[..n]);
                pending = true;
            }
            Err(_) if pending => {
                pending = false;
                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if conn.write_all(reply).await.is_err() || conn.flush().await.is_err() || !keep {
                    let _ = conn.shutdown().await;
                    return;
                }
            }
            Err(_) => {}
        }
    }
}

/// A plain-TCP recording upstream.
async fn tcp_upstream() -> (u16, Recorded) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let recorded = Recorded::default();
    let all = Arc::clone(&recorded);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(record_connection(stream, Arc::clone(&all), false));
        }
    });
    (port, recorded)
}

/// A TLS recording upstream for `api.test`; returns its port, its root and what it received.
async fn tls_upstream() -> (u16, CertificateDer<'static>, Recorded) {
    let (root, config) = pki("api.test");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let recorded = Recorded::default();
    let all = Arc::clone(&recorded);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, all) = (acceptor.clone(), Arc::clone(&all));
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    record_connection(tls, all, true).await;
                }
            });
        }
    });
    (port, root, recorded)
}

/// A proxy allowing `allowed.test` and `api.test` (credential `Authorization`), both on this
/// host; `root` verifies the real `api.test`. Returns its address and the bottle CA.
async fn proxy(
    root: Option<CertificateDer<'static>>,
    log: Option<(std::path::PathBuf, u64)>,
) -> (SocketAddr, CertificateDer<'static>) {
    let policy = EgressPolicy::new(
        &["allowed.test:*".to_owned(), "api.test:*".to_owned()],
        &[],
        "denied by the test bottle",
    )
    .unwrap();
    let mut config = ProxyConfig::new("b-framing", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed([("allowed.test", LOCALHOST), ("api.test", LOCALHOST)]);
    config.allow_loopback_upstream = true;
    let ca = BottleCa::generate("b-framing").unwrap();
    let ca_der = ca.cert_der().clone();
    let mut roots = RootCertStore::empty();
    if let Some(root) = root {
        roots.add(root).unwrap();
    }
    let injection = Injection::new("Authorization", "Bearer real-secret".into()).unwrap();
    config.interception = Some(Arc::new(Interception::with_roots(
        ca,
        HashMap::from([("api.test".to_owned(), injection)]),
        roots,
    )));
    if let Some((path, bound)) = log {
        config.event_log = Some(path);
        config.event_log_max_bytes = bound;
    }
    let proxy = EgressProxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    (addr, ca_der)
}

/// Sends `request` on a new connection and reads until the proxy closes (or [`STEP`]).
async fn exchange(proxy: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

fn status(response: &str) -> &str {
    response.split(' ').nth(1).unwrap_or("")
}

/// Waits until every upstream connection has been closed by the proxy (or [`STEP`]), then
/// returns what the upstream received, all connections joined.
async fn received(recorded: &Recorded) -> String {
    tokio::time::sleep(UPSTREAM_QUIET * 2).await;
    let all = recorded.lock().unwrap();
    all.iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\n--- next connection ---\n")
}

const CHUNKED: &str = "Transfer-Encoding: chunked\r\n";

/// Bodies a strict RFC 9112 parser refuses, each with the marker that must never reach the
/// upstream.
const BAD_CHUNKED_BODIES: &[(&str, &str)] = &[
    // 17 hex digits (u64 overflow): the size line used to go up before it was checked.
    (
        "10000000000000000\r\nSMUGGLED-A\r\n0\r\n\r\n",
        "10000000000000000",
    ),
    // u64::MAX: `size + 2` overflowed.
    (
        "ffffffffffffffff\r\nSMUGGLED-B\r\n0\r\n\r\n",
        "ffffffffffffffff",
    ),
    // A sign or leading whitespace is not a chunk size.
    ("+5\r\nSMUGGLED-C\r\n0\r\n\r\n", "SMUGGLED-C"),
    (" 5\r\nSMUGGLED-D\r\n0\r\n\r\n", "SMUGGLED-D"),
    // Bare LF line endings.
    ("5\nSMUGG\n0\n\n", "SMUGG"),
    // Chunk data not followed by CRLF.
    ("3\r\nSMUGGLED-F\r\n0\r\n\r\n", "SMU"),
    // A bare LF inside a chunk extension.
    ("5;a\nb\r\nSMUGG\r\n0\r\n\r\n", "SMUGG"),
    // An empty size line.
    ("\r\nSMUGGLED-H\r\n0\r\n\r\n", "SMUGGLED-H"),
];

#[tokio::test]
async fn plain_http_bad_chunked_framing_gets_400_and_never_reaches_the_upstream() {
    let (port, recorded) = tcp_upstream().await;
    let (proxy, _) = proxy(None, None).await;
    let head = format!(
        "POST http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    // Positive control: a well-framed chunked body goes through whole.
    let good = exchange(proxy, format!("{head}5\r\nGOODY\r\n0\r\n\r\n").as_bytes()).await;
    assert_eq!(status(&good), "200", "{good}");
    assert!(received(&recorded)
        .await
        .contains("5\r\nGOODY\r\n0\r\n\r\n"));

    let mut answers = Vec::new();
    for (body, _) in BAD_CHUNKED_BODIES {
        let response = exchange(proxy, format!("{head}{body}").as_bytes()).await;
        answers.push(status(&response).to_owned());
    }
    let upstream_saw = received(&recorded).await;

    assert_eq!(answers, vec!["400"; BAD_CHUNKED_BODIES.len()]);
    for (body, marker) in BAD_CHUNKED_BODIES {
        assert!(
            !upstream_saw.contains(marker),
            "{body:?}: {marker:?} reached the upstream:\n{upstream_saw}"
        );
    }
}

/// `Transfer-Encoding` headers other than one lone `chunked`.
const BAD_CODINGS: &[&str] = &[
    "Transfer-Encoding: identity, chunked\r\n",
    "Transfer-Encoding: gzip, chunked\r\n",
    "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding: chunked, chunked\r\n",
    "Transfer-Encoding: \"chunked\"\r\n",
    "Transfer-Encoding: \r\n",
    "Transfer-Encoding: ,chunked\r\n",
];

#[tokio::test]
async fn plain_http_transfer_codings_other_than_a_lone_chunked_get_400_and_no_connection() {
    let (port, recorded) = tcp_upstream().await;
    let (proxy, _) = proxy(None, None).await;
    let codings = BAD_CODINGS;

    let mut answers = Vec::new();
    for coding in codings {
        let request = format!(
            "POST http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n{coding}\r\n5\r\nSMUGG\r\n0\r\n\r\n"
        );
        answers.push(status(&exchange(proxy, request.as_bytes()).await).to_owned());
    }

    assert_eq!(answers, vec!["400"; codings.len()]);
    assert_eq!(received(&recorded).await, "");
}

/// The agent's side of an intercepted tunnel to `api.test`, trusting the bottle CA.
async fn agent_tls(
    proxy: SocketAddr,
    port: u16,
    trust: CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut established = [0u8; 39];
    tcp.read_exact(&mut established).await.unwrap();
    assert!(established.starts_with(b"HTTP/1.1 200"));
    let mut roots = RootCertStore::empty();
    roots.add(trust).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("api.test").unwrap(), tcp)
        .await
        .unwrap()
}

/// Sends a request framed by `coding` with `body`, then a second request on the same kept
/// connection; returns everything the agent read until the proxy closed (or [`STEP`]).
async fn two_requests(
    proxy: SocketAddr,
    port: u16,
    trust: CertificateDer<'static>,
    coding: &str,
    body: &str,
) -> String {
    let mut tls = agent_tls(proxy, port, trust).await;
    let requests = format!(
        "POST /first HTTP/1.1\r\nHost: api.test\r\n{coding}\r\n{body}\
         GET /second-on-the-same-connection HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(requests.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn intercepted_bad_chunked_framing_gets_400_and_ends_the_upstream_connection() {
    let (port, root, recorded) = tls_upstream().await;
    let (proxy, ca) = proxy(Some(root), None).await;
    // Positive control: well framed, both requests go up on one kept connection.
    let good = two_requests(proxy, port, ca.clone(), CHUNKED, "5\r\nGOODY\r\n0\r\n\r\n").await;
    let control = received(&recorded).await;
    assert!(good.starts_with("HTTP/1.1 200"), "{good}");
    assert!(
        control.contains("GET /second-on-the-same-connection"),
        "{control}"
    );
    recorded.lock().unwrap().clear();

    let mut answers = Vec::new();
    for (body, _) in BAD_CHUNKED_BODIES {
        let response = two_requests(proxy, port, ca.clone(), CHUNKED, body).await;
        answers.push(status(&response).to_owned());
    }
    let upstream_saw = received(&recorded).await;

    assert_eq!(answers, vec!["400"; BAD_CHUNKED_BODIES.len()]);
    assert!(
        !upstream_saw.contains("/second-on-the-same-connection"),
        "a request followed a framing error on the same upstream connection:\n{upstream_saw}"
    );
    for (body, marker) in BAD_CHUNKED_BODIES {
        assert!(
            !upstream_saw.contains(marker),
            "{body:?}: {marker:?} reached the upstream:\n{upstream_saw}"
        );
    }
}

#[tokio::test]
async fn intercepted_transfer_codings_other_than_a_lone_chunked_get_400_and_go_no_further() {
    let (port, root, recorded) = tls_upstream().await;
    let (proxy, ca) = proxy(Some(root), None).await;
    // Positive control: a lone `chunked` and the request after it go up.
    let good = two_requests(proxy, port, ca.clone(), CHUNKED, "5\r\nGOODY\r\n0\r\n\r\n").await;
    assert!(good.starts_with("HTTP/1.1 200"), "{good}");
    assert!(received(&recorded)
        .await
        .contains("GET /second-on-the-same-connection"));
    recorded.lock().unwrap().clear();

    let mut answers = Vec::new();
    for coding in BAD_CODINGS {
        let response =
            two_requests(proxy, port, ca.clone(), coding, "5\r\nSMUGG\r\n0\r\n\r\n").await;
        answers.push(status(&response).to_owned());
    }
    let upstream_saw = received(&recorded).await;

    assert_eq!(answers, vec!["400"; BAD_CODINGS.len()]);
    assert!(!upstream_saw.contains("SMUGG"), "{upstream_saw}");
    assert!(
        !upstream_saw.contains("/second-on-the-same-connection"),
        "{upstream_saw}"
    );
}

/// Every line of every part of the log at `path` (first part, previous, current).
fn log_lines(path: &std::path::Path) -> Vec<String> {
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_string_lossy();
    let names = [format!("{name}.0"), format!("{name}.1"), name.into_owned()];
    names
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(dir.join(p))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[tokio::test]
async fn a_flood_of_long_denied_connects_cannot_wash_the_start_of_the_log_out() {
    const BOUND: u64 = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("egress.jsonl");
    let (port, _) = tcp_upstream().await;
    let (proxy, _) = proxy(None, Some((path.clone(), BOUND))).await;
    // The run's first event: an allowed request.
    let first = exchange(
        proxy,
        format!("GET http://allowed.test:{port}/first-event HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&first), "200", "{first}");

    // 2,400 denied CONNECTs, each naming a different ~30 KB host.
    for i in 0..2400 {
        let host = format!("{i}-{}.evil.test", "a".repeat(30 * 1024));
        let response = exchange(
            proxy,
            format!("CONNECT {host}:443 HTTP/1.1\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status(&response), "403", "{i}");
    }

    let lines = log_lines(&path);
    let longest = lines.iter().map(String::len).max().unwrap();
    let events: Vec<EgressEvent> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let start: String = events[0].host.chars().take(40).collect();
    assert_eq!(
        (start.as_str(), events[0].verdict.as_str()),
        ("allowed.test", "allow")
    );
    assert!(longest <= 4096, "a line of {longest} bytes");
    assert!(dir_bytes(&path) <= 3 * BOUND, "{}", dir_bytes(&path));
    // The newest denial is there, its host cut and marked.
    let last = events.last().unwrap();
    let (head, tail) = last.host.split_at(last.host.len().min(9));
    assert_eq!(head, "2399-aaaa");
    assert!(tail.ends_with(" bytes]"), "{} bytes", last.host.len());
}

#[tokio::test]
async fn repeated_denials_are_aggregated_into_one_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("egress.jsonl");
    let (proxy, _) = proxy(None, Some((path.clone(), 1 << 20))).await;

    for _ in 0..500 {
        let response = exchange(proxy, b"CONNECT same.evil.test:443 HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&response), "403");
    }
    // Another decision ends the run of repeats: the count is written.
    exchange(proxy, b"CONNECT other.evil.test:443 HTTP/1.1\r\n\r\n").await;

    let events: Vec<EgressEvent> = log_lines(&path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let same: Vec<&EgressEvent> = events
        .iter()
        .filter(|e| e.host == "same.evil.test")
        .collect();
    let counted: u64 = same.iter().map(|e| e.repeated.unwrap_or(1)).sum();
    assert!(
        same.len() <= 2,
        "{} lines for one repeated denial",
        same.len()
    );
    assert_eq!(counted, 500);
    assert!(same[1]
        .detail
        .as_deref()
        .unwrap()
        .contains("499 more like this"));
}
