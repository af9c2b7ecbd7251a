//! Attacks by a hostile agent on what binds the proxy's decisions to the traffic it carries,
//! end to end over real sockets on 127.0.0.1: inside an intercepted (credential-injecting)
//! tunnel, requests for another host, methods and upgrades that leave HTTP, responses that
//! carry the credential back, paths a server could read another way, another spelling of the
//! credential host; and names that resolve below the address floor. Each test has a positive
//! control (a well-formed request on the same setup goes through), so a proxy that refuses
//! everything cannot pass.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::intercept::{BottleCa, Injection, Interception};
use super::test_pki::{pki, provider};
use super::*;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Upper bound for any single test step, so a broken proxy fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);
const SECRET: &str = "Bearer real-secret-4242";
const MAX_HEAD: usize = 64 * 1024;

/// Every request head the upstream received, in order.
type Heads = Arc<Mutex<Vec<String>>>;

/// The real `api.test`: records each request head and answers by path. `/echo-body` returns
/// the request head as its body (as a debugging endpoint would), `/echo-chunked` the same in
/// two chunks split inside the credential, `/echo-header` the `Authorization` it got in a
/// response header, `/echo-gzip` the head as a body labelled `Content-Encoding: gzip` (its
/// bytes reversed: a stand-in for compression, which likewise hides the credential's bytes
/// from a search; the proxy must refuse any encoding it did not ask for, whatever the bytes);
/// anything else `200 ok`.
async fn upstream() -> (u16, CertificateDer<'static>, Heads) {
    let (root, config) = pki("api.test");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Heads::default();
    let seen = Arc::clone(&heads);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut tls = BufReader::new(tls);
                while let Ok(Some(head)) = body::read_head(&mut tls, MAX_HEAD).await {
                    let text = String::from_utf8_lossy(&head).into_owned();
                    seen.lock().unwrap().push(text.clone());
                    let target = text.split(' ').nth(1).unwrap_or("").to_owned();
                    let auth = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Authorization: "))
                        .unwrap_or("")
                        .to_owned();
                    let reply = match target.as_str() {
                        "/echo-body" => format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                            text.len()
                        ),
                        "/echo-chunked" => {
                            let (a, b) = text.split_at(text.find("real-secret").unwrap() + 4);
                            let first = format!(
                                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}",
                                text.len()
                            );
                            let _ = tls.write_all(first.as_bytes()).await;
                            let _ = tls.flush().await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            format!("{b}\r\n0\r\n\r\n")
                        }
                        "/echo-gzip" => {
                            let hidden: String = text.chars().rev().collect();
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n{hidden}",
                                hidden.len()
                            )
                        }
                        "/echo-header" => {
                            format!(
                                "HTTP/1.1 200 OK\r\nX-Seen: {auth}\r\nContent-Length: 2\r\n\r\nok"
                            )
                        }
                        _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_owned(),
                    };
                    if tls.write_all(reply.as_bytes()).await.is_err() || tls.flush().await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, root, heads)
}

/// Whether a refusal with `reason` was recorded. (Counts are not compared: the event log
/// folds repeated denials of one kind into a count line of its own making.)
fn logged(events: &[EgressEvent], reason: &str) -> bool {
    events
        .iter()
        .any(|e| e.reason == reason && e.verdict == "deny")
}

struct Proxy {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn events(&self) -> Vec<EgressEvent> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn logged(&self, reason: &str) -> bool {
        logged(&self.events(), reason)
    }
}

/// A proxy allowing `api.test:<port>` with the credential [`SECRET`] limited to `paths`.
async fn proxy(port: u16, root: CertificateDer<'static>, paths: &[&str]) -> Proxy {
    proxy_with_rules(port, root, paths, &[]).await
}

/// [`proxy`] with `[egress] allow` tables (`requests`) as well.
async fn proxy_with_rules(
    port: u16,
    root: CertificateDer<'static>,
    paths: &[&str],
    requests: &[RequestRuleSpec],
) -> Proxy {
    let ca = BottleCa::generate("b-binding").unwrap();
    let ca_der = ca.cert_der().clone();
    let mut roots = RootCertStore::empty();
    roots.add(root).unwrap();
    let paths: Vec<String> = paths.iter().map(|p| (*p).to_owned()).collect();
    let injection = Injection::new("Authorization", SECRET.into())
        .unwrap()
        .with_paths(&paths)
        .unwrap();
    let policy = EgressPolicy::new(&[format!("api.test:{port}")], &[], "denied")
        .unwrap()
        .with_request_rules(requests)
        .unwrap();
    let mut config = ProxyConfig::new("b-binding", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed([("api.test", LOCALHOST)]);
    config.allow_loopback_upstream = true;
    config.interception = Some(Arc::new(Interception::with_roots(
        ca,
        HashMap::from([("api.test".to_owned(), injection)]),
        roots,
    )));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("egress.jsonl");
    config.event_log = Some(log.clone());
    let bound = EgressProxy::bind(config).await.unwrap();
    let addr = bound.local_addr();
    tokio::spawn(bound.run(std::future::pending()));
    Proxy {
        addr,
        ca: ca_der,
        log,
        _dir: dir,
    }
}

/// `CONNECT <authority>` through the proxy, then TLS for `api.test` trusting only the bottle CA.
async fn agent_tls(
    proxy: &Proxy,
    authority: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(proxy.addr).await?;
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut established = Vec::new();
    while !established.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if tcp.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        established.push(byte[0]);
    }
    if !established.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&established).into_owned(),
        ));
    }
    let mut roots = RootCertStore::empty();
    roots.add(proxy.ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("api.test").unwrap(), tcp)
        .await
}

/// Sends `request` on a new intercepted connection to `authority`; reads until the proxy
/// closes (or [`STEP`]). The TLS error's text when the tunnel cannot be opened.
async fn ask_via(proxy: &Proxy, authority: &str, request: &str) -> String {
    let mut tls = match agent_tls(proxy, authority).await {
        Ok(tls) => tls,
        Err(e) => return format!("no intercepted tunnel: {e}"),
    };
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

async fn ask(proxy: &Proxy, port: u16, request: &str) -> String {
    ask_via(proxy, &format!("api.test:{port}"), request).await
}

fn status(response: &str) -> &str {
    response.split(' ').nth(1).unwrap_or("")
}

fn upstream_saw(heads: &Heads) -> String {
    heads.lock().unwrap().join("")
}

#[tokio::test]
async fn inside_an_intercepted_tunnel_a_request_for_another_host_is_refused_logged_and_never_sent_up(
) {
    let (port, root, heads) = upstream().await;
    let proxy = proxy(port, root, &[]).await;
    // Positive control: the bound host, with or without its port.
    let good = ask(
        &proxy,
        port,
        &format!("GET /good HTTP/1.1\r\nHost: api.test:{port}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    let bare = ask(
        &proxy,
        port,
        "GET /good-bare HTTP/1.1\r\nHost: API.test.\r\nConnection: close\r\n\r\n",
    )
    .await;

    let attacks = [
        "GET /a1 HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
        "GET /a2 HTTP/1.1\r\nHost: api.test:1\r\nConnection: close\r\n\r\n",
        "GET https://attacker.example/a3 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        "GET http://attacker.example/a4 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        "GET /a5 HTTP/1.1\r\nHost: api.test\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
        "GET /a6 HTTP/1.1\r\nConnection: close\r\n\r\n",
    ];
    let mut answers = Vec::new();
    for attack in attacks {
        answers.push(status(&ask(&proxy, port, attack).await).to_owned());
    }
    let saw = upstream_saw(&heads);

    assert_eq!(status(&good), "200", "{good}");
    assert_eq!(status(&bare), "200", "{bare}");
    assert_eq!(answers, vec!["403"; attacks.len()]);
    for marker in ["/a1", "/a2", "/a3", "/a4", "/a5", "/a6", "attacker"] {
        assert!(!saw.contains(marker), "{marker} reached the host:\n{saw}");
    }
    let first = proxy
        .events()
        .into_iter()
        .find(|e| e.reason == "host_mismatch")
        .and_then(|e| e.detail)
        .unwrap_or_default();
    assert!(first.contains("attacker.example"), "{:?}", proxy.events());
}

#[tokio::test]
async fn trace_connect_and_protocol_upgrades_inside_an_intercepted_tunnel_are_refused() {
    let (port, root, heads) = upstream().await;
    let proxy = proxy(port, root, &[]).await;
    let good = ask(
        &proxy,
        port,
        "GET /good HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    .await;

    let trace = ask(&proxy, port, "TRACE /m1 HTTP/1.1\r\nHost: api.test\r\n\r\n").await;
    let connect = ask(
        &proxy,
        port,
        "CONNECT attacker.example:443 HTTP/1.1\r\nHost: api.test\r\n\r\n",
    )
    .await;
    let websocket = ask(
        &proxy,
        port,
        "GET /m3 HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let h2c = ask(
        &proxy,
        port,
        "GET /m4 HTTP/1.1\r\nHost: api.test\r\nConnection: keep-alive, upgrade\r\n\r\n",
    )
    .await;
    let bare_upgrade = ask(
        &proxy,
        port,
        "GET /m5 HTTP/1.1\r\nHost: api.test\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let saw = upstream_saw(&heads);

    assert_eq!(status(&good), "200", "{good}");
    assert_eq!(status(&trace), "405", "{trace}");
    assert_eq!(status(&connect), "405", "{connect}");
    assert_eq!(status(&websocket), "403", "{websocket}");
    assert_eq!(status(&h2c), "403", "{h2c}");
    assert_eq!(status(&bare_upgrade), "403", "{bare_upgrade}");
    for marker in ["/m1", "attacker", "/m3", "/m4", "/m5"] {
        assert!(!saw.contains(marker), "{marker} reached the host:\n{saw}");
    }
    assert!(
        proxy.logged("method_not_allowed") && proxy.logged("upgrade_refused"),
        "{:?}",
        proxy.events()
    );
}

#[tokio::test]
async fn the_injected_credential_never_comes_back_to_the_agent_in_a_response() {
    let (port, root, heads) = upstream().await;
    let proxy = proxy(port, root, &[]).await;
    let request =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");

    let body = ask(&proxy, port, &request("/echo-body")).await;
    let chunked = ask(&proxy, port, &request("/echo-chunked")).await;
    let header = ask(&proxy, port, &request("/echo-header")).await;
    let saw = upstream_saw(&heads);

    // The host did get the credential (three times), and the agent never saw it.
    assert_eq!(saw.matches(SECRET).count(), 3, "{saw}");
    assert_eq!(status(&body), "200", "{body}");
    assert!(body.contains("Host: api.test"), "{body}");
    assert_eq!(status(&chunked), "200", "{chunked}");
    assert_eq!(status(&header), "502", "{header}");
    for response in [&body, &chunked, &header] {
        assert!(!response.contains("real-secret"), "{response}");
    }
    assert!(proxy.logged("credential_echo"), "{:?}", proxy.events());
}

#[tokio::test]
async fn an_encoded_echo_of_the_credential_is_refused_and_identity_is_asked_for() {
    let (port, root, heads) = upstream().await;
    let proxy = proxy(port, root, &[]).await;
    // The agent asks for gzip, hoping the echo comes back in a form the proxy cannot search.
    let request = "GET /echo-gzip HTTP/1.1\r\nHost: api.test\r\nAccept-Encoding: gzip, br\r\nConnection: close\r\n\r\n";

    let response = ask(&proxy, port, request).await;
    let saw = upstream_saw(&heads);

    // The host got the credential and an identity request, never the agent's gzip.
    assert!(saw.contains(SECRET), "{saw}");
    assert!(saw.contains("Accept-Encoding: identity\r\n"), "{saw}");
    assert!(!saw.contains("gzip, br"), "{saw}");
    // The encoded answer (the credential in it, reversed) never reaches the agent.
    assert_eq!(status(&response), "502", "{response}");
    assert!(response.contains("Content-Encoding: gzip"), "{response}");
    let reversed: String = "real-secret".chars().rev().collect();
    assert!(!response.contains(&reversed), "{response}");
    assert!(!response.contains("real-secret"), "{response}");
    assert!(proxy.logged("credential_echo"), "{:?}", proxy.events());
}

#[tokio::test]
async fn credential_paths_decide_on_one_canonical_form_and_refuse_what_has_none() {
    let (port, root, heads) = upstream().await;
    let proxy = proxy(port, root, &["/me/app"]).await;
    let get = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
    };
    // Positive controls: under the prefix, and a dot segment that stays under it (sent up
    // resolved, so the host reads what was decided).
    let good = ask(&proxy, port, &get("/me/app/pulls?x=1")).await;
    let resolved = ask(&proxy, port, &get("/me/app/x/../y")).await;

    let attacks = [
        "/me/app/..;/other",
        "/me/app;x=1/../../other",
        "/me/app/%252e%252e/other",
        "/me/app/%c0%ae%c0%ae/other",
        "/me/app/%e0%80%ae%e0%80%ae/other",
        "/me/app/..%2fother",
        "/me/app/..%5cother",
        "/me/app\\..\\other",
        "/me/app/%2e%2e/other",
        "/me/app//../other",
        "/me/app/%00/x",
    ];
    let mut answers = Vec::new();
    for attack in attacks {
        answers.push(status(&ask(&proxy, port, &get(attack)).await).to_owned());
    }
    let saw = upstream_saw(&heads);

    assert_eq!(status(&good), "200", "{good}");
    assert_eq!(status(&resolved), "200", "{resolved}");
    assert!(saw.contains("GET /me/app/y HTTP/1.1\r\n"), "{saw}");
    assert_eq!(answers, vec!["403"; attacks.len()]);
    assert!(!saw.contains("other"), "{saw}");
    assert!(!saw.contains("/x "), "{saw}");
}

#[tokio::test]
async fn another_spelling_of_the_credential_host_is_intercepted_exactly_like_it() {
    let (port, root, heads) = upstream().await;
    let proxy = proxy(port, root, &["/me/app"]).await;
    let get = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
    };
    let good = ask(&proxy, port, &get("/me/app/a")).await;

    let dotted = ask_via(&proxy, &format!("API.TEST.:{port}"), &get("/me/app/b")).await;
    let cased = ask_via(&proxy, &format!("Api.Test:{port}"), &get("/elsewhere")).await;
    let saw = upstream_saw(&heads);
    let events = proxy.events();

    assert_eq!(status(&good), "200", "{good}");
    // Intercepted (the bottle CA answered), the credential injected, the path checked.
    assert_eq!(status(&dotted), "200", "{dotted}");
    assert_eq!(saw.matches(SECRET).count(), 2, "{saw}");
    assert_eq!(status(&cased), "403", "{cased}");
    assert!(!saw.contains("/elsewhere"), "{saw}");
    // Logged under the one spelling.
    let connects: Vec<&str> = events
        .iter()
        .filter(|e| e.method == "CONNECT" && e.verdict == "allow")
        .map(|e| e.host.as_str())
        .collect();
    assert_eq!(connects, vec!["api.test"; 3], "{events:?}");
}

#[tokio::test]
async fn an_allowed_name_resolving_below_the_address_floor_is_refused_before_any_dial() {
    // Every name is allowed; each resolves to one address the proxy must never dial.
    let floor = [
        ("private-10", "10.1.2.3"),
        ("private-172", "172.17.0.1"),
        ("private-192", "192.168.1.1"),
        ("cgnat", "100.64.0.1"),
        ("benchmark", "198.18.72.2"),
        ("doc-1", "192.0.2.1"),
        ("doc-2", "198.51.100.1"),
        ("doc-3", "203.0.113.1"),
        ("doc-v6", "2001:db8::1"),
        ("this-net", "0.1.2.3"),
        ("metadata", "169.254.169.254"),
        ("multicast", "239.1.1.1"),
        ("broadcast", "255.255.255.255"),
        ("ula", "fd00::1"),
        ("v6-link-local", "fe80::1"),
        ("mapped-private", "::ffff:10.0.0.1"),
        ("mapped-metadata", "::ffff:169.254.169.254"),
    ];
    // Positive control: a public-looking name (here: this host, loopback allowed for tests).
    let ok = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ok_port = ok.local_addr().unwrap().port();
    let entries: Vec<(String, IpAddr)> = floor
        .iter()
        .map(|(n, ip)| (format!("{n}.floor.test"), ip.parse().unwrap()))
        .collect();
    let policy = EgressPolicy::new(
        &[
            "*.floor.test:443".to_owned(),
            "10.0.0.5:443".to_owned(),
            format!("ok.floor.test:{ok_port}"),
        ],
        &[],
        "denied",
    )
    .unwrap();
    let mut config = ProxyConfig::new("b-floor", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed(
        entries
            .iter()
            .map(|(n, ip)| (n.as_str(), *ip))
            .chain([("ok.floor.test", LOCALHOST)]),
    );
    config.allow_loopback_upstream = true;
    config.limits.connect_timeout = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("egress.jsonl");
    config.event_log = Some(log.clone());
    let bound = EgressProxy::bind(config).await.unwrap();
    let addr = bound.local_addr();
    tokio::spawn(bound.run(std::future::pending()));
    let connect = |authority: String| async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = vec![0u8; 4096];
        let n = tokio::time::timeout(STEP, tcp.read(&mut response))
            .await
            .map_or(0, |r| r.unwrap_or(0));
        String::from_utf8_lossy(&response[..n]).into_owned()
    };

    let good = connect(format!("ok.floor.test:{ok_port}")).await;
    let mut answers = Vec::new();
    for (name, _) in &entries {
        answers.push((
            name.clone(),
            status(&connect(format!("{name}:443")).await).to_owned(),
        ));
    }
    let literal = connect("10.0.0.5:443".to_owned()).await;
    let events: Vec<EgressEvent> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let expected: Vec<(String, String)> = entries
        .iter()
        .map(|(n, _)| (n.clone(), "403".to_owned()))
        .collect();
    assert_eq!(status(&good), "200", "{good}");
    assert_eq!(answers, expected);
    assert_eq!(status(&literal), "403", "{literal}");
    assert!(logged(&events, "blocked_address"), "{events:?}");
}

/// An `[egress] allow` table for `host`.
fn table(host: &str, methods: Option<&[&str]>, paths: Option<&[&str]>) -> RequestRuleSpec {
    let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
    RequestRuleSpec {
        host: host.to_owned(),
        methods: methods.map(owned),
        paths: paths.map(owned),
    }
}

#[tokio::test]
async fn a_method_rule_lets_a_get_through_and_refuses_a_post_logged_and_never_sent_up() {
    let (port, root, heads) = upstream().await;
    let rule = table(&format!("api.test:{port}"), Some(&["GET"]), None);
    let proxy = proxy_with_rules(port, root, &[], std::slice::from_ref(&rule)).await;

    // Positive control, then a POST on the same kept connection.
    let mut tls = agent_tls(&proxy, &format!("api.test:{port}"))
        .await
        .unwrap();
    tls.write_all(b"GET /repos/me/app HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = vec![0u8; "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".len()];
    tokio::time::timeout(STEP, tls.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    tls.write_all(
        b"POST /repos/me/app/issues HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    let mut refused = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut refused)).await;
    let refused = String::from_utf8_lossy(&refused).into_owned();
    let request = |line: &str, extra: &str| {
        format!("{line} HTTP/1.1\r\nHost: api.test\r\n{extra}Connection: close\r\n\r\n")
    };
    // Methods are case-sensitive: `get` is no `GET` (and a host that upper-cases it would
    // read whatever it likes); an override header asks for another method than the one seen.
    let lower = ask(&proxy, port, &request("get /m-lower", "")).await;
    let overridden = ask(
        &proxy,
        port,
        &request("GET /m-override", "X-HTTP-Method-Override: DELETE\r\n"),
    )
    .await;
    let delete = ask(&proxy, port, &request("DELETE /m-delete", "")).await;
    let saw = upstream_saw(&heads);
    let events = proxy.events();

    assert_eq!(status(&String::from_utf8_lossy(&first)), "200");
    assert!(saw.contains("GET /repos/me/app HTTP/1.1"), "{saw}");
    assert_eq!(status(&refused), "403", "{refused}");
    assert!(refused.contains(&rule.text()), "{refused}");
    assert!(refused.contains("POST /repos/me/app/issues fits no request rule"));
    for response in [&lower, &overridden, &delete] {
        assert_eq!(status(response), "403", "{response}");
    }
    for marker in ["POST", "hello", "/m-lower", "/m-override", "/m-delete"] {
        assert!(!saw.contains(marker), "{marker} reached the host:\n{saw}");
    }
    let denial = events
        .iter()
        .find(|e| e.reason == "request_not_allowed")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(
        (denial.method.as_str(), denial.verdict.as_str()),
        ("POST", "deny")
    );
    assert_eq!(denial.rule.as_deref(), Some(rule.text().as_str()));
    assert_eq!(denial.host, "api.test");
}

#[tokio::test]
async fn a_path_rule_decides_on_the_canonical_path_and_refuses_what_has_none() {
    let (port, root, heads) = upstream().await;
    let host = format!("api.test:{port}");
    let rules = [
        table(&host, Some(&["GET"]), None),
        table(&host, Some(&["POST"]), Some(&["/repos/me/app/**"])),
    ];
    let proxy = proxy_with_rules(port, root, &[], &rules).await;
    let post = |target: &str| {
        format!("POST {target} HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    };
    // Positive controls: GET anywhere (the first rule), POST under the repository, a dot
    // segment that stays under it (sent up resolved: the host reads what was decided).
    let get = ask(
        &proxy,
        port,
        "GET /users/me HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let push = ask(&proxy, port, &post("/repos/me/app/git-receive-pack")).await;
    let resolved = ask(&proxy, port, &post("/repos/me/app/x/../pulls")).await;

    let attacks = [
        "/repos/me/other",
        "/repos/me/app/../other",
        "/repos/me/app/x/../../other",
        "/repos/me/app/%2e%2e/other",
        "/repos/me/app/%2E%2e/other",
        "/repos/me/app/.%2e/other",
        "/repos/me/app//../other",
        "/repos/me/app/..;/other",
        "/repos/me/app;x/../other",
        "/repos/me/app%2f..%2fother",
        "/repos/me/app/..%5cother",
        "/repos/me/app/%252e%252e/other",
        "/repos/me/app/%c0%ae%c0%ae/other",
        "/repos/me/apps-other",
        "/repos/me/app#/../../other",
        "https://api.test/repos/me/other",
    ];
    let mut answers = Vec::new();
    for attack in attacks {
        answers.push((
            attack,
            status(&ask(&proxy, port, &post(attack)).await).to_owned(),
        ));
    }
    let lower = ask(
        &proxy,
        port,
        "post /repos/me/app/x HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    let saw = upstream_saw(&heads);

    assert_eq!(status(&get), "200", "{get}");
    assert_eq!(status(&push), "200", "{push}");
    assert_eq!(status(&resolved), "200", "{resolved}");
    let expected: Vec<(&str, String)> = attacks.iter().map(|a| (*a, "403".to_owned())).collect();
    assert_eq!(answers, expected);
    assert!(
        saw.contains("POST /repos/me/app/pulls HTTP/1.1\r\n"),
        "{saw}"
    );
    assert_eq!(status(&lower), "403", "{lower}");
    assert!(!saw.contains("other"), "{saw}");
    assert!(!saw.contains("post "), "{saw}");
    assert!(proxy.logged("request_not_allowed"), "{:?}", proxy.events());
}

#[tokio::test]
async fn request_rules_and_credential_paths_both_hold() {
    let (port, root, heads) = upstream().await;
    let rule = table(&format!("api.test:{port}"), Some(&["GET"]), None);
    let proxy = proxy_with_rules(port, root, &["/me/app"], &[rule]).await;
    let request =
        |line: &str| format!("{line} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");

    let good = ask(&proxy, port, &request("GET /me/app/x")).await;
    let outside_credential = ask(&proxy, port, &request("GET /elsewhere")).await;
    let outside_rule = ask(&proxy, port, &request("DELETE /me/app/x")).await;
    let saw = upstream_saw(&heads);

    assert_eq!(status(&good), "200", "{good}");
    assert_eq!(status(&outside_credential), "403");
    assert_eq!(status(&outside_rule), "403");
    assert!(
        !saw.contains("/elsewhere") && !saw.contains("DELETE"),
        "{saw}"
    );
    assert!(proxy.logged("path_not_allowed") && proxy.logged("request_not_allowed"));
}
