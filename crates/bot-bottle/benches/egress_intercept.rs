//! Cost of credential injection: HTTPS requests through the egress proxy, tunnelled untouched
//! (the baseline: TLS end to end between client and server) and intercepted (TLS to the proxy
//! with the bottle's CA, the proxy's own TLS to the server, the credential header set), each
//! on a fresh connection and on one kept connection (keep-alive, as agents' HTTP clients do),
//! in the same run on loopback, printed as ratios.
//! `cargo bench -p bot-bottle --bench egress_intercept`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bot_bottle::bundle::egress::intercept::{BottleCa, Injection, Interception};
use bot_bottle::bundle::egress::{EgressPolicy, EgressProxy, ProxyConfig, Resolver};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "bench.test";
const REQUESTS: usize = 300;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's answer to every request.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// A root and an HTTPS server for `HOST` under it, answering every request on a connection
/// with [`OK`] until the client closes it.
async fn https_server() -> (SocketAddr, CertificateDer<'static>) {
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench root");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![HOST.to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // Requests carry no body: each ends at its empty line.
                let mut pending = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if tls.write_all(OK).await.is_err() {
                            return;
                        }
                    }
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, ca.der().clone())
}

async fn proxy(interception: Option<Interception>) -> SocketAddr {
    // `:*`: the bench servers listen on ports of their own (a portless rule opens 443 only).
    let policy = EgressPolicy::new(&[format!("{HOST}:*")], &[], "denied").unwrap();
    let mut config = ProxyConfig::new("bench", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed([(HOST, IpAddr::V4(Ipv4Addr::LOCALHOST))]);
    config.allow_loopback_upstream = true;
    config.interception = interception.map(Arc::new);
    let proxy = EgressProxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    addr
}

/// Latencies of `REQUESTS` HTTPS GETs trusting `root`, each on a fresh CONNECT tunnel, or
/// (`kept`) all on one, opened before the clock starts.
async fn gets(
    proxy: SocketAddr,
    port: u16,
    root: CertificateDer<'static>,
    kept: bool,
) -> Vec<Duration> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let connector = tokio_rustls::TlsConnector::from(config);
    let connect = || async {
        let mut tcp = TcpStream::connect(proxy).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.write_all(
            format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        connector
            .connect(ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .unwrap()
    };
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: x\r\n\r\n");
    let mut kept_conn = if kept { Some(connect().await) } else { None };
    let mut times = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let started = Instant::now();
        let mut fresh = None;
        let tls = match kept_conn.as_mut() {
            Some(tls) => tls,
            None => fresh.insert(connect().await),
        };
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut response = vec![0u8; OK.len()];
        tls.read_exact(&mut response).await.unwrap();
        assert_eq!(response, OK, "bad response");
        times.push(started.elapsed());
    }
    times
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (server, root) = https_server().await;
        let tunnel = proxy(None).await;
        let ca = BottleCa::generate("bench").unwrap();
        let bottle_root = ca.cert_der().clone();
        let mut upstream_roots = rustls::RootCertStore::empty();
        upstream_roots.add(root.clone()).unwrap();
        let intercepting = proxy(Some(Interception::with_roots(
            ca,
            HashMap::from([(
                HOST.to_owned(),
                Injection::new("Authorization", "Bearer bench-secret".into()).unwrap(),
            )]),
            upstream_roots,
        )))
        .await;

        let port = server.port();
        let tunnelled = median(gets(tunnel, port, root.clone(), false).await);
        let intercepted = median(gets(intercepting, port, bottle_root.clone(), false).await);
        let tunnelled_kept = median(gets(tunnel, port, root, true).await);
        let intercepted_kept = median(gets(intercepting, port, bottle_root, true).await);
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "HTTPS GET, p50 of {REQUESTS}, on a new connection: tunnelled {:.0} µs | intercepted \
             with injection {:.0} µs | ratio {:.2}x",
            us(tunnelled),
            us(intercepted),
            us(intercepted) / us(tunnelled)
        );
        println!(
            "HTTPS GET, p50 of {REQUESTS}, on a kept connection: tunnelled {:.0} µs | intercepted \
             with injection {:.0} µs | ratio {:.2}x; intercepted kept / tunnelled new {:.2}x",
            us(tunnelled_kept),
            us(intercepted_kept),
            us(intercepted_kept) / us(tunnelled_kept),
            us(intercepted_kept) / us(tunnelled)
        );
    });
}
