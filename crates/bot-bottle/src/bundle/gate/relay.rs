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
