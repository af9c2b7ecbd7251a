//! Cost of outbound secret scanning (`[egress] secrets`) in the egress proxy: plain-HTTP
//! `POST`s with a 1 MiB body, each on a fresh connection, through a proxy that scans
//! (`secrets = "block"`, with two credential values known) and through one that does not
//! (`secrets = "off"`), paired and interleaved in one run; printed as the ratio of the medians
//! (target ≤ 1.2×). Two bodies: an API request of JSON-escaped source text (what an agent's
//! requests mostly are), and one carrying a 1 MiB base64 blob (an image). Also the scanner alone
//! in MiB/s. `cargo bench -p bot-bottle --bench egress_secrets`; `SECRETS_BENCH_RUNS` sets the
//! requests per path (default 60).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bot_bottle::bundle::egress::{
    EgressPolicy, EgressProxy, ProxyConfig, Resolver, SecretMode, SecretScan,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "bench.test";
const BODY_BYTES: usize = 1024 * 1024;
/// Ratio the scanning proxy must stay within on the 1 MiB request.
const TARGET: f64 = 1.2;

/// Reads one request (head, then `Content-Length` bytes), answers `200 ok`, closes.
async fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = BufReader::with_capacity(256 * 1024, stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap();
                        }
                    }
                }
                let mut body = vec![0u8; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                let _ = stream.get_mut().write_all(reply).await;
                let _ = stream.get_mut().shutdown().await;
            });
        }
    });
    addr
}

async fn proxy(mode: SecretMode) -> SocketAddr {
    let policy = EgressPolicy::new(&[format!("{HOST}:*")], &[], "denied").unwrap();
    let mut config = ProxyConfig::new("bench", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed([(HOST, IpAddr::V4(Ipv4Addr::LOCALHOST))]);
    config.allow_loopback_upstream = true;
    config.event_log = Some(std::env::temp_dir().join(format!(
        "bot-bottle-secrets-bench-{}-{}.jsonl",
        std::process::id(),
        mode.as_str()
    )));
    // As the sidecar builds it: each injected value, and its token alone.
    let known = [
        (
            "api.anthropic.com",
            "Bearer sk-ant-oat01-0123456789abcdefghijABCDEFGHIJ",
        ),
        (
            "api.anthropic.com",
            "sk-ant-oat01-0123456789abcdefghijABCDEFGHIJ",
        ),
    ];
    config.secrets = Some(Arc::new(SecretScan::new(mode, &known)));
    let proxy = EgressProxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    addr
}

/// A Messages-API-like JSON request of about 1 MiB: this crate's source, JSON-escaped.
fn api_body() -> Vec<u8> {
    let sources = [
        include_str!("../src/bundle/egress/proxy.rs"),
        include_str!("../src/bundle/egress/intercept.rs"),
        include_str!("../src/bundle/egress/policy.rs"),
    ];
    let mut text = String::new();
    while text.len() < BODY_BYTES {
        for s in sources {
            text.push_str(s);
        }
    }
    let escaped = serde_json::to_string(&text).unwrap();
    let mut body = format!(
        "{{\"model\":\"claude\",\"max_tokens\":1024,\"messages\":[{{\"role\":\"user\",\"content\":{escaped}}}]}}"
    )
    .into_bytes();
    body.truncate(BODY_BYTES);
    body
}

/// A JSON request carrying a base64 "image" of about 1 MiB (deterministic pseudo-random).
fn image_body() -> Vec<u8> {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut body = b"{\"type\":\"image\",\"data\":\"".to_vec();
    while body.len() < BODY_BYTES - 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.push(B64[(x % 64) as usize]);
    }
    body.extend_from_slice(b"\"}");
    body
}

/// One `POST` of `body` through `proxy` to the sink on a fresh connection; its latency.
async fn post(proxy: SocketAddr, sink: SocketAddr, body: &[u8]) -> Duration {
    let port = sink.port();
    let head = format!(
        "POST http://{HOST}:{port}/v1/messages HTTP/1.1\r\nHost: {HOST}:{port}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::with_capacity(128);
    stream.read_to_end(&mut response).await.unwrap();
    let elapsed = started.elapsed();
    assert!(
        response.starts_with(b"HTTP/1.1 200") && response.ends_with(b"ok"),
        "the proxy did not pass the request: {}",
        String::from_utf8_lossy(&response)
    );
    elapsed
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("SECRETS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let sink = sink().await;
    let plain = proxy(SecretMode::Off).await;
    let scanning = proxy(SecretMode::Block).await;
    println!(
        "egress secret scanning: {runs} paired POSTs of 1 MiB per body, fresh connections, medians"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8} {:>8}",
        "body", "off", "block", "ratio", "target"
    );
    let mut worst: f64 = 0.0;
    for (label, body) in [
        ("API request (source text)", api_body()),
        ("base64 image", image_body()),
    ] {
        // Warm both paths (connections, allocator), then interleave the pairs.
        for _ in 0..3 {
            post(plain, sink, &body).await;
            post(scanning, sink, &body).await;
        }
        let (mut off, mut on) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for i in 0..runs {
            if i % 2 == 0 {
                off.push(post(plain, sink, &body).await);
                on.push(post(scanning, sink, &body).await);
            } else {
                on.push(post(scanning, sink, &body).await);
                off.push(post(plain, sink, &body).await);
            }
        }
        let (off, on) = (median(&mut off), median(&mut on));
        let ratio = on.as_secs_f64() / off.as_secs_f64();
        worst = worst.max(ratio);
        println!(
            "{label:<28} {:>9.2} ms {:>9.2} ms {ratio:>7.2}x {:>7}",
            off.as_secs_f64() * 1e3,
            on.as_secs_f64() * 1e3,
            format!("<= {TARGET}x")
        );
    }
    // The scanner alone, on the same bodies.
    println!(
        "scanner alone: {:.0} MiB/s on the API request, {:.0} MiB/s on the image",
        bottle_scan_rate(&api_body()),
        bottle_scan_rate(&image_body())
    );
    println!(
        "worst ratio {worst:.2}x: {}",
        if worst <= TARGET {
            "meets the target"
        } else {
            "MISSES the target"
        }
    );
    for mode in ["off", "block"] {
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!(
            "bot-bottle-secrets-bench-{}-{mode}.jsonl",
            std::process::id()
        )));
    }
}

/// MiB/s of the proxy's scanner over `body` (best of 5).
fn bottle_scan_rate(body: &[u8]) -> f64 {
    let scanner = bottle_scan::Scanner::new(Vec::new())
        .with_max_entropy_run(bot_bottle::bundle::egress::secrets::MAX_ENTROPY_RUN)
        .with_values(&[("h", "Bearer sk-ant-oat01-0123456789abcdefghijABCDEFGHIJ")]);
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        std::hint::black_box(scanner.scan_spans(body));
        best = best.min(started.elapsed());
    }
    body.len() as f64 / (1024.0 * 1024.0) / best.as_secs_f64()
}
