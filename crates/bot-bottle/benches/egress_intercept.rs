//! Cost of credential injection: an HTTPS request on a fresh connection through the egress
//! proxy, tunnelled untouched (the baseline: TLS end to end between client and server) and
//! intercepted (TLS to the proxy with the bottle's CA, the proxy's own TLS to the server, the
//! credential header set), in the same run on loopback, printed as a ratio.
//! `cargo bench -p bot-bottle --bench egress_intercept`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bot_bottle::egress::intercept::{BottleCa, Injection, Interception};
use bot_bottle::egress::{EgressPolicy, EgressProxy, ProxyConfig, Resolver};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "bench.test";
const REQUESTS: usize = 300;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root and an HTTPS server for `HOST` under it, answering one request per connection.
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
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, ca.der().clone())
}

async fn proxy(interception: Option<Interception>) -> SocketAddr {
    let policy = EgressPolicy::new(&[HOST.to_owned()], &[], "denied").unwrap();
    let mut config = ProxyConfig::new("bench", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed([(HOST, IpAddr::V4(Ipv4Addr::LOCALHOST))]);
    config.allow_loopback_upstream = true;
    config.interception = interception.map(Arc::new);
    let proxy = EgressProxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    addr
}

/// Latencies of `REQUESTS` HTTPS GETs, each on a fresh CONNECT tunnel, trusting `root`.
async fn gets(proxy: SocketAddr, port: u16, root: CertificateDer<'static>) -> Vec<Duration> {
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
    let mut times = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let started = Instant::now();
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
        let mut tls = connector
            .connect(ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: x\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        assert!(response.ends_with(b"ok"), "bad response");
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

        let tunnelled = median(gets(tunnel, server.port(), root).await);
        let intercepted = median(gets(intercepting, server.port(), bottle_root).await);
        println!(
            "HTTPS GET on a new connection, p50 of {REQUESTS}: tunnelled {:.0} µs | intercepted \
             with injection {:.0} µs | ratio {:.2}x",
            tunnelled.as_secs_f64() * 1e6,
            intercepted.as_secs_f64() * 1e6,
            intercepted.as_secs_f64() / tunnelled.as_secs_f64()
        );
    });
}
