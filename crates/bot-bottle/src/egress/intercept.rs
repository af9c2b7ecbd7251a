//! Credential injection by TLS interception.
//!
//! A bottle's `[credentials."host"]` are secrets the agent must use but never hold. When the
//! agent opens a `CONNECT` tunnel to such a host (and the policy allows it), the proxy answers
//! the TLS handshake itself, with a certificate for that host signed by the bottle's own CA —
//! made when the bundle starts, its key never leaving the proxy, its certificate trusted only
//! by this bottle's agent. The proxy opens its own TLS connection to the real host, verified
//! against the public roots, and sends each request up with the credential's header set by
//! the proxy: whatever the agent put in that header is dropped. The secret never reaches the
//! agent. One request per connection (`Connection: close` both ways), so no body framing is
//! needed here; clients open a new connection for the next request.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Longest request head the agent may send through an intercepted connection.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("cannot make the bottle's certificate authority")]
    Ca(#[source] rcgen::Error),
    #[error("cannot issue a certificate for {host}")]
    Issue {
        host: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("TLS configuration for {host} failed")]
    Tls {
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{host} is not a valid TLS server name")]
    ServerName { host: String },
    #[error(
        "credential header {header:?} is not a valid header name or its value is not printable"
    )]
    BadHeader { header: String },
}

/// What the proxy sets on every request to one host.
#[derive(Clone)]
pub struct Injection {
    /// Header name, e.g. `Authorization` or `x-api-key`.
    pub header: String,
    /// Full header value, e.g. `Bearer <token>`.
    pub value: String,
}

impl std::fmt::Debug for Injection {
    // The value is a secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injection")
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl Injection {
    pub fn new(header: &str, value: String) -> Result<Self, InterceptError> {
        let valid_name = !header.is_empty()
            && header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        let valid_value = value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        if !valid_name || !valid_value {
            return Err(InterceptError::BadHeader {
                header: header.to_owned(),
            });
        }
        Ok(Injection {
            header: header.to_owned(),
            value,
        })
    }
}

/// The bottle's certificate authority and the host certificates it has issued.
pub struct BottleCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issued: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for BottleCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BottleCa").finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl BottleCa {
    /// A new CA for `bottle_id` (P-256; its key exists only in this process).
    pub fn generate(bottle_id: &str) -> Result<Self, InterceptError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("bot-bottle {bottle_id}"));
        dn.push(DnType::OrganizationName, "bot-bottle (this bottle only)");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(InterceptError::Ca)?;
        let cert = params
            .clone()
            .self_signed(&key)
            .map_err(InterceptError::Ca)?;
        Ok(BottleCa {
            params,
            key,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate the agent trusts (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The same certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The TLS server configuration presenting a certificate for `host`, issued once.
    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, InterceptError> {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = issued.get(host) {
            return Ok(config.clone());
        }
        let issue = |source| InterceptError::Issue {
            host: host.to_owned(),
            source,
        };
        let ca = self.params.clone().self_signed(&self.key).map_err(issue)?;
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(issue)?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.to_owned());
        let key = KeyPair::generate().map_err(issue)?;
        let leaf = params.signed_by(&key, &ca, &self.key).map_err(issue)?;
        // The leaf alone: the agent holds the CA as a trust anchor. (`ca` here is the same
        // name and key re-signed, only to sign with; it is not the certificate the agent has.)
        let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let tls = |source| InterceptError::Tls {
            host: host.to_owned(),
            source,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(tls)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        issued.insert(host.to_owned(), config.clone());
        Ok(config)
    }
}

/// Interception for one bottle: its CA, the credentials by host, and the roots the real hosts
/// are verified against.
pub struct Interception {
    ca: BottleCa,
    credentials: HashMap<String, Injection>,
    /// The proxy's TLS client towards the real hosts, made once.
    upstream: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("hosts", &self.credentials.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Interception {
    /// The real hosts verified against the public roots (Mozilla's, compiled in).
    pub fn new(ca: BottleCa, credentials: HashMap<String, Injection>) -> Self {
        let roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Interception::with_roots(ca, credentials, roots)
    }

    /// The real hosts verified against `roots` (tests and benchmarks: a local PKI).
    pub fn with_roots(
        ca: BottleCa,
        credentials: HashMap<String, Injection>,
        roots: RootCertStore,
    ) -> Self {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Interception {
            ca,
            credentials: credentials
                .into_iter()
                .map(|(host, i)| (host.to_ascii_lowercase(), i))
                .collect(),
            upstream: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    /// The injection for `host`, when it has a credential.
    pub fn for_host(&self, host: &str) -> Option<&Injection> {
        self.credentials.get(&host.to_ascii_lowercase())
    }

    /// Serves one intercepted tunnel: `client` has been told the tunnel is open (and may
    /// already have sent `leftover`), `upstream` is the TCP connection to the real host.
    pub async fn serve<U: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut TcpStream,
        leftover: Vec<u8>,
        upstream: U,
        host: &str,
        injection: &Injection,
    ) -> std::io::Result<()> {
        let server = self.ca.server_config(host).map_err(std::io::Error::other)?;
        let client = Prefixed {
            prefix: leftover,
            inner: client,
        };
        let mut agent = tokio_rustls::TlsAcceptor::from(server)
            .accept(client)
            .await?;
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            std::io::Error::other(InterceptError::ServerName {
                host: host.to_owned(),
            })
        })?;
        let mut real = self.upstream.connect(name, upstream).await?;

        let (head, rest) = read_head(&mut agent).await?;
        let head = match rewrite_head(&head, injection) {
            Ok(head) => head,
            Err(why) => {
                let body = format!("bot-bottle egress: {why}\n");
                let reply = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                agent.write_all(reply.as_bytes()).await?;
                return agent.shutdown().await;
            }
        };
        real.write_all(&head).await?;
        real.write_all(&rest).await?;
        tokio::io::copy_bidirectional(&mut agent, &mut real).await?;
        Ok(())
    }
}

/// Reads up to the end of the request head; returns the head and what followed it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The request head as sent up: the credential's header set by the proxy (the agent's own
/// value for it dropped), one request per connection.
pub fn rewrite_head(head: &[u8], injection: &Injection) -> Result<Vec<u8>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request head".into()),
        Err(e) => return Err(format!("malformed request head: {e}")),
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Err("request line without a method or path".into());
    };
    let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    for h in req.headers.iter() {
        let drop = h.name.eq_ignore_ascii_case(&injection.header)
            || ["connection", "proxy-connection", "keep-alive", "upgrade"]
                .iter()
                .any(|n| h.name.eq_ignore_ascii_case(n));
        if drop {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "{}: {}\r\nConnection: close\r\n\r\n",
            injection.header, injection.value
        )
        .as_bytes(),
    );
    Ok(out)
}

/// A stream that first yields bytes already read from it.
struct Prefixed<'a> {
    prefix: Vec<u8>,
    inner: &'a mut TcpStream,
}

impl AsyncRead for Prefixed<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer() -> Injection {
        Injection::new("Authorization", "Bearer real-secret".into()).unwrap()
    }

    #[test]
    fn the_agents_own_credential_header_is_replaced_and_the_connection_closes() {
        let head = b"POST /v1/messages HTTP/1.1\r\nHost: api.test\r\nauthorization: Bearer fake\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n";

        let out = String::from_utf8(rewrite_head(head, &bearer()).unwrap()).unwrap();

        assert_eq!(
            out,
            "POST /v1/messages HTTP/1.1\r\nHost: api.test\r\nContent-Length: 2\r\nAuthorization: Bearer real-secret\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn a_malformed_head_is_refused() {
        assert!(rewrite_head(b"GET\r\n\r\n", &bearer()).is_err());
    }

    #[test]
    fn header_names_and_values_that_would_split_the_request_are_refused() {
        assert!(Injection::new("X-Key\r\nEvil", "v".into()).is_err());
        assert!(Injection::new("X-Key", "v\r\nX-Evil: 1".into()).is_err());
        assert!(Injection::new("x-api-key", "sk-123".into()).is_ok());
    }

    #[test]
    fn the_secret_is_never_printed() {
        assert!(!format!("{:?}", bearer()).contains("real-secret"));
    }

    /// A CA and a server certificate for `host` signed by it: stands in for the public PKI.
    fn pki(host: &str) -> (CertificateDer<'static>, Arc<rustls::ServerConfig>) {
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test public root");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![host.to_owned()])
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
        (ca.der().clone(), Arc::new(config))
    }

    /// A TLS server answering one request per connection with `200` and the raw request as
    /// the body. Returns its port and a count of requests it received.
    async fn tls_upstream(
        config: Arc<rustls::ServerConfig>,
    ) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = requests.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counter) = (acceptor.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok((head, mut body)) = read_head(&mut tls).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    while body.len() < length {
                        let mut chunk = [0u8; 1024];
                        let n = tls.read(&mut chunk).await.unwrap();
                        body.extend_from_slice(&chunk[..n]);
                    }
                    let mut seen = head;
                    seen.extend_from_slice(&body);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        seen.len()
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.write_all(&seen).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (port, requests)
    }

    /// The proxy for a bottle allowing `api.test` (with a credential) and `other.test`
    /// (without), both resolving to this host; upstream certificates are checked against
    /// `root`. Returns the proxy's address and the bottle CA's certificate.
    async fn proxy(
        root: CertificateDer<'static>,
    ) -> (std::net::SocketAddr, CertificateDer<'static>) {
        use crate::egress::{EgressPolicy, EgressProxy, ProxyConfig, Resolver};
        let ca = BottleCa::generate("test-intercept").unwrap();
        let ca_der = ca.cert_der().clone();
        let mut roots = RootCertStore::empty();
        roots.add(root).unwrap();
        let interception = Interception::with_roots(
            ca,
            HashMap::from([("api.test".to_owned(), bearer())]),
            roots,
        );
        let policy = EgressPolicy::new(
            &["api.test".to_owned(), "other.test".to_owned()],
            &[],
            "denied",
        )
        .unwrap();
        let mut config = ProxyConfig::new("test-intercept", "127.0.0.1:0".parse().unwrap(), policy);
        let localhost = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        config.resolver = Resolver::fixed([("api.test", localhost), ("other.test", localhost)]);
        config.allow_loopback_upstream = true;
        config.interception = Some(Arc::new(interception));
        let proxy = EgressProxy::bind(config).await.unwrap();
        let addr = proxy.local_addr();
        tokio::spawn(proxy.run(std::future::pending()));
        (addr, ca_der)
    }

    /// The agent's side: `CONNECT host:port` through the proxy, TLS trusting only `trust`,
    /// one request; returns the whole response, or the TLS error.
    async fn agent_request(
        proxy: std::net::SocketAddr,
        host: &str,
        port: u16,
        trust: CertificateDer<'static>,
        request: &str,
    ) -> std::io::Result<String> {
        let mut tcp = TcpStream::connect(proxy).await?;
        tcp.write_all(
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
        )
        .await?;
        let (head, _) = read_head(&mut tcp).await?;
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut roots = RootCertStore::empty();
        roots.add(trust).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
            .await?;
        tls.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        Ok(String::from_utf8_lossy(&response).into_owned())
    }

    const REQUEST: &str = "POST /v1/messages HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer fake\r\nContent-Length: 5\r\n\r\nhello";

    #[tokio::test]
    async fn the_credential_reaches_the_real_host_and_never_the_agent() {
        let (root, server) = pki("api.test");
        let (port, _) = tls_upstream(server).await;
        let (proxy, bottle_ca) = proxy(root).await;

        let response = agent_request(proxy, "api.test", port, bottle_ca, REQUEST)
            .await
            .unwrap();

        // The upstream echoes what it received: the proxy's credential, not the agent's.
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("Authorization: Bearer real-secret"),
            "{response}"
        );
        assert!(!response.contains("Bearer fake"), "{response}");
        assert!(response.ends_with("hello"), "{response}");
    }

    #[tokio::test]
    async fn hosts_without_a_credential_are_tunnelled_untouched() {
        let (root, server) = pki("other.test");
        let (port, _) = tls_upstream(server).await;
        let (proxy, bottle_ca) = proxy(root.clone()).await;

        // The agent sees the real host's certificate (the bottle CA would not verify it).
        let with_bottle_ca = agent_request(proxy, "other.test", port, bottle_ca, REQUEST).await;
        let response = agent_request(proxy, "other.test", port, root, REQUEST)
            .await
            .unwrap();

        assert!(with_bottle_ca.is_err());
        assert!(
            response.contains("Authorization: Bearer fake"),
            "{response}"
        );
        assert!(!response.contains("real-secret"), "{response}");
    }

    #[tokio::test]
    async fn an_impostor_of_the_credential_host_never_sees_a_request() {
        // The name resolves to a server whose certificate no trusted root signed.
        let (_, impostor) = pki("api.test");
        let (port, requests) = tls_upstream(impostor).await;
        let (real_root, _) = pki("api.test");
        let (proxy, bottle_ca) = proxy(real_root).await;

        let response = agent_request(proxy, "api.test", port, bottle_ca, REQUEST).await;

        assert!(
            response.as_ref().map_or(true, |r| !r.contains("200 OK")),
            "{response:?}"
        );
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn a_host_certificate_is_issued_once_and_reused() {
        let ca = BottleCa::generate("test-1").unwrap();

        let a = ca.server_config("api.test").unwrap();
        let b = ca.server_config("api.test").unwrap();

        assert!(Arc::ptr_eq(&a, &b));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
