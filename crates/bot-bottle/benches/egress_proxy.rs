//! Egress proxy cost on loopback: throughput through a CONNECT tunnel and added latency of
//! small round trips, each measured through the proxy and directly in the same run, printed
//! as ratios against the issue-14 targets. Bounded: some seconds in release mode. `cargo bench
//! -p bot-bottle --bench egress_proxy`.
//!
//! The client, the servers and the proxy each run on threads of their own (three runtimes),
//! as the agent, the upstream and the bundle are three processes: sharing one runtime made
//! the direct baseline swing between runs (2.5× when client and server happened to land on
//! the same worker) and let the proxy's tasks steal the client's thread. The proxy's runtime
//! is the bundle's (two workers). Both paths use the same client (256 KiB writes,
//! `TCP_NODELAY`) and the same servers.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bot_bottle::bundle::egress::{EgressPolicy, EgressProxy, ProxyConfig, Resolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes pushed through each throughput run.
const BULK_BYTES: usize = 256 * 1024 * 1024;
/// Throughput runs per path; the best is reported (least disturbed by other load).
const BULK_RUNS: usize = 10;
/// Size of one request and one reply in the round-trip benchmarks.
const SMALL: usize = 64;
/// Round trips on one established connection.
const ROUND_TRIPS: usize = 5_000;
/// Fresh connections (connect + optional CONNECT handshake + one round trip).
const FRESH_CONNECTIONS: usize = 500;

const HOST: &str = "bench.test";

/// Reads everything until EOF, then answers with the byte count (8 bytes, big endian).
async fn sink_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = stream.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

/// Echoes every byte back.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Answers one HTTP request per connection with a tiny `200` and closes.
async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 512];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Latencies of one plain-HTTP GET on a fresh connection, direct or through the proxy.
async fn http_gets(target: SocketAddr, proxy: Option<SocketAddr>) -> Vec<Duration> {
    let port = target.port();
    let (dial, request) = match proxy {
        Some(proxy) => (
            proxy,
            format!("GET http://{HOST}:{port}/ HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
        ),
        None => (
            target,
            format!("GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
        ),
    };
    let mut times = Vec::with_capacity(FRESH_CONNECTIONS);
    let mut response = Vec::with_capacity(256);
    for _ in 0..FRESH_CONNECTIONS {
        let started = Instant::now();
        let mut stream = TcpStream::connect(dial).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        response.clear();
        stream.read_to_end(&mut response).await.unwrap();
        times.push(started.elapsed());
        assert!(response.ends_with(b"\r\n\r\nok"), "bad response");
    }
    times
}

/// The proxy writes its events here (as in production), removed at the end.
fn event_log_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "bot-bottle-egress-bench-{}.jsonl",
        std::process::id()
    ))
}

async fn start_proxy() -> SocketAddr {
    // `:*`: the bench servers listen on ports of their own (a portless rule opens 443 only).
    let policy = EgressPolicy::new(&[format!("{HOST}:*")], &[], "denied").unwrap();
    let mut config = ProxyConfig::new("bench", "127.0.0.1:0".parse().unwrap(), policy);
    config.resolver = Resolver::fixed([(HOST, IpAddr::V4(Ipv4Addr::LOCALHOST))]);
    config.allow_loopback_upstream = true;
    config.event_log = Some(event_log_path());
    let proxy = EgressProxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    addr
}

/// Connects to `target`, directly or through a CONNECT tunnel of `proxy`.
async fn open(target: SocketAddr, proxy: Option<SocketAddr>) -> TcpStream {
    let Some(proxy) = proxy else {
        let stream = TcpStream::connect(target).await.unwrap();
        stream.set_nodelay(true).unwrap();
        return stream;
    };
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let request = format!("CONNECT {HOST}:{} HTTP/1.1\r\n\r\n", target.port());
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 39]; // "HTTP/1.1 200 Connection Established\r\n\r\n"
    stream.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "tunnel refused");
    stream
}

/// MiB/s of one upload of `BULK_BYTES`, confirmed by the server's byte count.
async fn bulk(target: SocketAddr, proxy: Option<SocketAddr>) -> f64 {
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut stream = open(target, proxy).await;
    for _ in 0..BULK_BYTES / chunk.len() {
        stream.write_all(&chunk).await.unwrap();
    }
    stream.shutdown().await.unwrap();
    let count = stream.read_u64().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(count, BULK_BYTES as u64);
    BULK_BYTES as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

/// Latencies of `ROUND_TRIPS` small round trips over one connection.
async fn round_trips(target: SocketAddr, proxy: Option<SocketAddr>) -> Vec<Duration> {
    let mut stream = open(target, proxy).await;
    let request = [7u8; SMALL];
    let mut reply = [0u8; SMALL];
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        stream.write_all(&request).await.unwrap();
        stream.read_exact(&mut reply).await.unwrap();
        times.push(started.elapsed());
    }
    times
}

/// Latencies of connect (+ CONNECT) + one small round trip, a fresh connection each time.
async fn fresh_connections(target: SocketAddr, proxy: Option<SocketAddr>) -> Vec<Duration> {
    let request = [7u8; SMALL];
    let mut reply = [0u8; SMALL];
    let mut times = Vec::with_capacity(FRESH_CONNECTIONS);
    for _ in 0..FRESH_CONNECTIONS {
        let started = Instant::now();
        let mut stream = open(target, proxy).await;
        stream.write_all(&request).await.unwrap();
        stream.read_exact(&mut reply).await.unwrap();
        times.push(started.elapsed());
    }
    times
}

fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort_unstable();
    let index = ((times.len() - 1) as f64 * p).round() as usize;
    times[index]
}

/// Prints one latency row; returns the p50 ratio.
fn report_latency(name: &str, mut direct: Vec<Duration>, mut proxied: Vec<Duration>) -> f64 {
    let (d50, d99) = (percentile(&mut direct, 0.5), percentile(&mut direct, 0.99));
    let (p50, p99) = (
        percentile(&mut proxied, 0.5),
        percentile(&mut proxied, 0.99),
    );
    println!(
        "{name:<28} direct p50 {:>7.1} µs p99 {:>7.1} µs | proxy p50 {:>7.1} µs p99 {:>7.1} µs | \
         added p50 {:>6.1} µs | ratio p50 {:.2}x",
        d50.as_secs_f64() * 1e6,
        d99.as_secs_f64() * 1e6,
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        (p50.as_secs_f64() - d50.as_secs_f64()) * 1e6,
        p50.as_secs_f64() / d50.as_secs_f64(),
    );
    p50.as_secs_f64() / d50.as_secs_f64()
}

/// A relay with nothing but `copy_bidirectional` (no policy, no log, no tracking): the least
/// any user-space proxy adds per hop, printed beside the proxy's round trip for scale.
async fn bare_relay(target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// Round trips through the bare relay (it answers no CONNECT: bytes go straight through).
async fn relayed_round_trips(relay: SocketAddr) -> Vec<Duration> {
    round_trips(relay, None).await
}

/// A runtime whose workers run the tasks spawned on it (nothing needs to block on it).
fn runtime(name: &str, workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "over"
    }
}

fn main() {
    let servers = runtime("servers", 1);
    let (sink, echo, web) = servers.block_on(async {
        (
            sink_server().await,
            echo_server().await,
            http_server().await,
        )
    });
    // The bundle's runtime: two workers (`main.rs`).
    let proxies = runtime("proxy", 2);
    let (proxy, relay) = proxies.block_on(async { (start_proxy().await, bare_relay(echo).await) });
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client.block_on(async {
        let mut direct_bulk = 0f64;
        let mut proxied_bulk = 0f64;
        for _ in 0..BULK_RUNS {
            let d = bulk(sink, None).await;
            let p = bulk(sink, Some(proxy)).await;
            direct_bulk = direct_bulk.max(d);
            proxied_bulk = proxied_bulk.max(p);
        }
        let ratio = proxied_bulk / direct_bulk;
        println!(
            "throughput {} MiB upload (best of {BULK_RUNS}): direct {direct_bulk:.0} MiB/s | \
             proxy {proxied_bulk:.0} MiB/s | ratio {ratio:.2}x (target >= 0.80x: {})",
            BULK_BYTES / (1024 * 1024),
            verdict(ratio >= 0.8),
        );

        let direct = round_trips(echo, None).await;
        let proxied = round_trips(echo, Some(proxy)).await;
        let bare = relayed_round_trips(relay).await;
        let ratio = report_latency("round trip, open tunnel", direct.clone(), proxied);
        println!("{:<28} target p50 <= 1.20x: {}", "", verdict(ratio <= 1.2));
        report_latency("round trip, bare relay", direct, bare);

        let direct = fresh_connections(echo, None).await;
        let proxied = fresh_connections(echo, Some(proxy)).await;
        report_latency("new connection + round trip", direct, proxied);

        let direct = http_gets(web, None).await;
        let proxied = http_gets(web, Some(proxy)).await;
        report_latency("plain HTTP GET (new conn)", direct, proxied);
    });
    let _ = std::fs::remove_file(event_log_path());
}
