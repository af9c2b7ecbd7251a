//! Credential injection end to end, against the real bundle in a real Docker engine: a fake
//! API (`api.test`, a TLS server on the host with a certificate from the test's own CA) is
//! reached through the bottle's proxy, the way the agent reaches it, trusting the bottle's CA.
//! `start` hands the bundle the host's trust store (`SSL_CERT_FILE`, here a file holding the
//! test's CA), so the proxy verifies the fake API as it would a real one behind a
//! TLS-inspecting corporate proxy. Positive control first: a normal request reaches the fake
//! API with the injected credential, which the agent never holds; then the attacks on the
//! binding (another `Host`, `TRACE`, a path outside the credential's `paths`) are refused and
//! never reach it. Without the test CA in the trust store the normal request fails (502):
//! the verification is real.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{docker_available, Sandbox};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const SECRET: &str = "secret-value-8c1f2a";
const AGENT_VALUE: &str = "agent-own-value";
const FAKE_API_BODY: &str = "fake-api-ok-61d0";
/// How long a request through the proxy may take.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `start` may take to bring the bottle up (images may need building).
const START_TIMEOUT: Duration = Duration::from_secs(180);

const CREDS_BOTTLE: &str = "extends = \"test\"\n\
[egress]\n\
allow = [\"api.test:*\"]\n\
hosts = { \"api.test\" = \"host-gateway\" }\n\
allow_private = [\"api.test\"]\n\
[credentials.\"api.test\"]\n\
env = \"BB_TEST_TOKEN\"\n\
scheme = \"Bearer\"\n\
paths = [\"/me/app\"]\n";

/// A CA (its PEM) and a server configuration for `host` with a certificate it signed.
fn fake_pki(host: &str) -> (String, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "escape_credentials test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![host.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
    )
    .unwrap();
    (ca.pem(), config)
}

/// The fake API on 0.0.0.0 (the bundle reaches it through the Docker host gateway): records
/// every request head it receives and answers each with [`FAKE_API_BODY`]. Returns its port.
fn fake_api(config: rustls::ServerConfig) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = Arc::new(config);
    let record = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let (config, record) = (config.clone(), record.clone());
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{FAKE_API_BODY}",
                    FAKE_API_BODY.len()
                );
                let _ = tls.write_all(reply.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (port, seen)
}

/// One request through the bottle's proxy at `proxy`, as the agent makes it: `CONNECT
/// api.test:<port>`, TLS trusting the bottle's CA (`bottle_ca`, PEM), then `request`.
/// Returns the whole response the agent gets.
fn through_proxy(proxy: &str, bottle_ca: &[u8], port: u16, request: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(bottle_ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = TcpStream::connect(proxy).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        tcp,
        "CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "the proxy refused the tunnel: {}",
        String::from_utf8_lossy(&head)
    );
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("api.test").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    // The proxy may close without a TLS close_notify: what arrived is the answer.
    let _ = tls.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// A request for `path` with the `Host` header `host` and the method `method`; the agent
/// sends its own value for the credential's header, which the proxy must drop.
fn request(method: &str, path: &str, host: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {AGENT_VALUE}\r\nConnection: close\r\n\r\n"
    )
}

/// `start` of the credential bottle with the trust store `trust_store`; the agent prints how
/// many copies of the secret its environment holds, then waits. Returns the running start,
/// its stdout lines, and the bottle's CA (PEM).
fn start_creds_bottle(
    sb: &Sandbox,
    trust_store: &Path,
) -> (common::Running, std::sync::mpsc::Receiver<String>, Vec<u8>) {
    start_bottle_with(sb, trust_store, CREDS_BOTTLE)
}

/// [`start_creds_bottle`] with the manifest `toml` for the `creds` bottle.
fn start_bottle_with(
    sb: &Sandbox,
    trust_store: &Path,
    toml: &str,
) -> (common::Running, std::sync::mpsc::Receiver<String>, Vec<u8>) {
    sb.add_bottle("creds", toml);
    let mut cmd = sb.cmd();
    cmd.env("BB_TEST_TOKEN", SECRET)
        .env("SSL_CERT_FILE", trust_store)
        .args([
            "start",
            "creds",
            "--",
            "sh",
            "-c",
            &format!("env | grep -c {SECRET}; sleep 120"),
        ]);
    let mut run = common::Running::spawn(cmd);
    let out = run.stdout_lines();
    let id = sb.wait_running(START_TIMEOUT);
    let ca = std::fs::read(sb.state().join("bottles").join(&id).join("ca.pem")).unwrap();
    (run, out, ca)
}

#[test]
fn the_credential_reaches_a_host_the_trust_store_vouches_for_and_its_binding_holds() {
    if !docker_available("the_credential_reaches_a_host_the_trust_store_vouches_for") {
        return;
    }
    let sb = Sandbox::new("230-230");
    let (test_ca, server) = fake_pki("api.test");
    let (port, seen) = fake_api(server);
    let store = sb.dir.path().join("trust-store.pem");
    std::fs::write(&store, &test_ca).unwrap();
    let (run, out, bottle_ca) = start_creds_bottle(&sb, &store);
    let proxy = "127.0.0.230:3128";

    // Positive control: a normal request.
    let normal = through_proxy(
        proxy,
        &bottle_ca,
        port,
        &request("GET", "/me/app/repos", "api.test"),
    );
    let after_normal = seen.lock().unwrap().clone();
    // The attacks.
    let other_host = through_proxy(
        proxy,
        &bottle_ca,
        port,
        &request("GET", "/me/app/other-host", "attacker.example"),
    );
    let trace = through_proxy(
        proxy,
        &bottle_ca,
        port,
        &request("TRACE", "/me/app/trace", "api.test"),
    );
    let outside_paths = through_proxy(
        proxy,
        &bottle_ca,
        port,
        &request("GET", "/me/app/..;/other", "api.test"),
    );
    let agent_copies = common::lines_until(&out, |l| l.trim().parse::<u32>().is_ok(), IO_TIMEOUT);
    // Whatever the attacks sent has had time to arrive.
    std::thread::sleep(Duration::from_secs(1));
    let received = seen.lock().unwrap().clone();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait();

    assert!(normal.starts_with("HTTP/1.1 200"), "{normal}");
    assert!(normal.ends_with(FAKE_API_BODY), "{normal}");
    assert!(!normal.contains(SECRET), "{normal}");
    assert_eq!(after_normal.len(), 1, "{after_normal:?}");
    assert!(
        after_normal[0].starts_with("GET /me/app/repos HTTP/1.1\r\n"),
        "{after_normal:?}"
    );
    assert!(
        after_normal[0].contains(&format!("Authorization: Bearer {SECRET}\r\n")),
        "{after_normal:?}"
    );
    assert!(!after_normal[0].contains(AGENT_VALUE), "{after_normal:?}");
    assert_eq!(agent_copies.last().map(|l| l.trim()), Some("0"));
    assert!(other_host.starts_with("HTTP/1.1 403"), "{other_host}");
    assert!(trace.starts_with("HTTP/1.1 405"), "{trace}");
    assert!(outside_paths.starts_with("HTTP/1.1 403"), "{outside_paths}");
    assert_eq!(received, after_normal, "an attack reached the fake API");
}

#[test]
fn without_the_hosts_ca_in_the_trust_store_the_request_fails_and_never_arrives() {
    if !docker_available("without_the_hosts_ca_in_the_trust_store_the_request_fails") {
        return;
    }
    let sb = Sandbox::new("231-231");
    let (_, server) = fake_pki("api.test");
    let (port, seen) = fake_api(server);
    // A trust store holding some other CA: the fake API's certificate is vouched for by none.
    let (other_ca, _) = fake_pki("other.test");
    let store = sb.dir.path().join("trust-store.pem");
    std::fs::write(&store, &other_ca).unwrap();
    let (run, _out, bottle_ca) = start_creds_bottle(&sb, &store);

    let normal = through_proxy(
        "127.0.0.231:3128",
        &bottle_ca,
        port,
        &request("GET", "/me/app/repos", "api.test"),
    );
    let received = seen.lock().unwrap().clone();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait();

    assert!(normal.starts_with("HTTP/1.1 502"), "{normal}");
    assert!(
        normal.contains("cannot open a verified TLS connection to api.test"),
        "{normal}"
    );
    assert!(received.is_empty(), "{received:?}");
}

#[test]
fn a_trust_store_without_certificates_stops_start_naming_it() {
    if !docker_available("a_trust_store_without_certificates_stops_start_naming_it") {
        return;
    }
    let sb = Sandbox::new("232-232");
    sb.add_bottle("creds", CREDS_BOTTLE);
    let store = sb.dir.path().join("empty-store.pem");
    std::fs::write(&store, "not a certificate\n").unwrap();

    let out = sb
        .cmd()
        .env("BB_TEST_TOKEN", SECRET)
        .env("SSL_CERT_FILE", &store)
        .args(["start", "creds", "--", "true"])
        .output()
        .unwrap();

    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains(&store.display().to_string()),
        "{}",
        common::stderr(&out)
    );
    assert!(
        sb.docker_leftovers().is_empty(),
        "{:?}",
        sb.docker_leftovers()
    );
}

/// A method and path rule (`[egress] allow` table) holds end to end in the real bundle: a GET
/// under the rule's paths reaches the API with the credential; a POST there, and a GET outside
/// the rule's paths (inside the credential's), get 403 and never arrive.
#[test]
fn a_method_and_path_rule_lets_only_its_requests_reach_the_intercepted_host() {
    if !docker_available("a_method_and_path_rule_lets_only_its_requests_reach") {
        return;
    }
    let sb = Sandbox::new("233-233");
    let (test_ca, server) = fake_pki("api.test");
    let (port, seen) = fake_api(server);
    let store = sb.dir.path().join("trust-store.pem");
    std::fs::write(&store, &test_ca).unwrap();
    let toml = "extends = \"test\"\n\
[egress]\n\
allow = [{ host = \"api.test:*\", methods = [\"GET\"], paths = [\"/me/app/read/**\"] }]\n\
hosts = { \"api.test\" = \"host-gateway\" }\n\
allow_private = [\"api.test\"]\n\
[credentials.\"api.test\"]\n\
env = \"BB_TEST_TOKEN\"\n\
scheme = \"Bearer\"\n\
paths = [\"/me/app\"]\n";
    let (run, _out, bottle_ca) = start_bottle_with(&sb, &store, toml);
    let proxy = "127.0.0.233:3128";
    let get = through_proxy(
        proxy,
        &bottle_ca,
        port,
        &request("GET", "/me/app/read/x", "api.test"),
    );
    let post = through_proxy(
        proxy,
        &bottle_ca,
        port,
        &request("POST", "/me/app/read/x", "api.test"),
    );
    let outside = through_proxy(
        proxy,
        &bottle_ca,
        port,
        &request("GET", "/me/app/write", "api.test"),
    );
    std::thread::sleep(Duration::from_secs(1));
    let received = seen.lock().unwrap().clone();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait();

    assert!(get.starts_with("HTTP/1.1 200"), "{get}");
    assert!(post.starts_with("HTTP/1.1 403"), "{post}");
    assert!(outside.starts_with("HTTP/1.1 403"), "{outside}");
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(
        received[0].starts_with("GET /me/app/read/x HTTP/1.1\r\n"),
        "{received:?}"
    );
}

/// Outbound secret scanning in the real bundle (`[egress] secrets`, `block` by default): the
/// agent sends the bottle's own credential — which it never holds, so a test agent that sends
/// it stands for one that got it anyway, by a prompt injection or an echo — in a request body
/// to the intercepted host, and in a header of a plain-HTTP request to an allowed host. Both
/// are refused with the rule named, nothing of the first reaches the fake API, and the log
/// names the rule but never holds the value; clean requests on the same bottle still pass.
#[test]
fn a_request_carrying_the_bottles_credential_is_refused_and_never_arrives() {
    if !docker_available("a_request_carrying_the_bottles_credential_is_refused") {
        return;
    }
    let sb = Sandbox::new("234-234");
    let (test_ca, server) = fake_pki("api.test");
    let (port, seen) = fake_api(server);
    let plain_port = common::http_server("plain-ok");
    let store = sb.dir.path().join("trust-store.pem");
    std::fs::write(&store, &test_ca).unwrap();
    let toml = CREDS_BOTTLE.replace(
        "allow = [\"api.test:*\"]\nhosts = { \"api.test\" = \"host-gateway\" }\nallow_private = [\"api.test\"]",
        "allow = [\"api.test:*\", \"plain.test:*\"]\n\
         hosts = { \"api.test\" = \"host-gateway\", \"plain.test\" = \"host-gateway\" }\n\
         allow_private = [\"api.test\", \"plain.test\"]",
    );
    assert_ne!(toml, CREDS_BOTTLE);
    let (run, _out, bottle_ca) = start_bottle_with(&sb, &store, &toml);
    let proxy = "127.0.0.234:3128";

    let body = format!("{{\"note\":\"{SECRET}\"}}");
    let leak = format!(
        "POST /me/app/issues HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let in_body = through_proxy(proxy, &bottle_ca, port, &leak);
    let clean = through_proxy(
        proxy,
        &bottle_ca,
        port,
        &request("GET", "/me/app/repos", "api.test"),
    );
    let plain = |extra: &str| {
        let mut tcp = TcpStream::connect(proxy).unwrap();
        tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        write!(
            tcp,
            "GET http://plain.test:{plain_port}/ HTTP/1.1\r\nHost: plain.test:{plain_port}\r\n{extra}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = tcp.read_to_string(&mut answer);
        answer
    };
    let in_header = plain(&format!("X-Note: {SECRET}\r\n"));
    let plain_clean = plain("");
    std::thread::sleep(Duration::from_millis(500));
    let received = seen.lock().unwrap().clone();
    let id = sb.rows()[0]["id"].as_str().unwrap().to_owned();
    let log =
        std::fs::read_to_string(sb.state().join("bottles").join(&id).join("egress.jsonl")).unwrap();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait();

    assert!(in_body.starts_with("HTTP/1.1 403"), "{in_body}");
    assert!(
        in_body.contains("credential api.test in the body"),
        "{in_body}"
    );
    assert!(in_header.starts_with("HTTP/1.1 403"), "{in_header}");
    assert!(
        in_header.contains("credential api.test in header X-Note"),
        "{in_header}"
    );
    assert!(!in_body.contains(SECRET) && !in_header.contains(SECRET));
    assert!(clean.starts_with("HTTP/1.1 200"), "{clean}");
    assert!(
        plain_clean.starts_with("HTTP/1.1 200") && plain_clean.ends_with("plain-ok"),
        "{plain_clean}"
    );
    // Only the clean request reached the fake API.
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(
        received[0].starts_with("GET /me/app/repos "),
        "{received:?}"
    );
    let blocked = log
        .lines()
        .filter(|l| l.contains("\"reason\":\"secret_blocked\""))
        .count();
    assert_eq!(blocked, 2, "{log}");
    assert!(log.contains("\"rule\":\"credential api.test\""), "{log}");
    assert!(!log.contains(SECRET), "the log holds the value: {log}");
}
