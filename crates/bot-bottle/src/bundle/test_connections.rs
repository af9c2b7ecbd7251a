//! Test support for the bundle ports' connection limits: an agent holding connections open.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Opens `count` connections to `addr`, sending nothing, and returns them with how many the
/// server closed (end of stream or reset) within half a second.
pub(crate) async fn hold(addr: SocketAddr, count: usize) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::new();
    for _ in 0..count {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let reads = held.iter_mut().map(|sock| async move {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(500), sock.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    });
    let closed = futures_util::future::join_all(reads)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count();
    (held, closed)
}
