//! The gate port in the bundle: each connection on it is relayed, bytes as they are, to the
//! gate socket in the run directory, which `start` serves on the host ([`super::server`]).
//! When nothing serves it (a bottle without a gate, or `start` gone), the agent gets a 503
//! that says so.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixStream};

/// Most connections relayed at once.
const MAX_CONNECTIONS: usize = 16;

/// Relay every connection accepted on `listener` to the Unix socket `socket`.
pub async fn serve(listener: TcpListener, socket: PathBuf) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let socket = socket.clone();
        tokio::spawn(async move {
            match UnixStream::connect(&socket).await {
                Ok(mut unix) => {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
                Err(_) => {
                    let body = "bot-bottle: the git gate is not running for this bottle\n";
                    let reply =
                        crate::bundle::egress::http::response(503, "Service Unavailable", body);
                    let _ = tcp.write_all(&reply).await;
                    let _ = tcp.shutdown().await;
                }
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once_and_the_rest_relayed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("git.sock");
        // The gate on the host: accepts and holds every connection, sends nothing.
        let gate = UnixListener::bind(&socket).unwrap();
        let relayed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = relayed.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((unix, _)) = gate.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(unix);
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, socket));

        // The agent opens many connections and sends nothing.
        let (_held, closed) =
            crate::bundle::test_connections::hold(addr, MAX_CONNECTIONS + 10).await;

        assert_eq!(closed, 10, "connections beyond {MAX_CONNECTIONS} stay open");
        let relayed = relayed.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            relayed, MAX_CONNECTIONS,
            "the gate got {relayed} connections"
        );
    }
}
