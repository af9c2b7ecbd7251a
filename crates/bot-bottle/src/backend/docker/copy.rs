//! `cp` on the Docker backend: the engine's archive API, streamed both ways and bounded.
//! What comes out is unpacked as it arrives, by [`transfer::unpack_safely`].

use std::path::Path;

use bollard::Docker;
use futures_util::StreamExt;

use super::BackendError;
use crate::backend::transfer;

/// How many archive chunks may wait between the Docker stream and the unpacking thread (or
/// the packing thread and the upload): the most `cp` holds in memory at once.
const CHUNKS_IN_FLIGHT: usize = 16;
/// Bytes per chunk read from the packing thread when copying in.
const PACK_CHUNK_BYTES: usize = 64 * 1024;

/// Copy `guest` out of container `name` into the local directory `local`, at most `limit`
/// bytes of archive; returns the number of entries unpacked.
pub async fn copy_out(
    docker: &Docker,
    name: &str,
    guest: &str,
    local: &Path,
    limit: u64,
) -> Result<usize, BackendError> {
    let mut stream = docker.download_from_container(
        name,
        Some(bollard::container::DownloadFromContainerOptions {
            path: guest.to_owned(),
        }),
    );
    // Unpacked as it arrives: never held whole, and bounded.
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let dst = local.to_path_buf();
    let unpack = tokio::task::spawn_blocking(move || {
        transfer::unpack_safely(transfer::ChunkReader::new(rx), &dst)
    });
    let mut bound = transfer::Bounded::new(std::io::sink(), limit);
    let mut produced: Result<(), BackendError> = Ok(());
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(source) => {
                produced = Err(BackendError::CopyOut {
                    path: guest.to_owned(),
                    source,
                });
                break;
            }
        };
        if let Err(e) = bound.admit(chunk.len()) {
            produced = Err(e.into());
            break;
        }
        if tx.send(chunk).await.is_err() {
            // The unpacking stopped: its error is reported below.
            break;
        }
    }
    drop(tx);
    let unpacked = unpack
        .await
        .map_err(|_| BackendError::Thread("the unpacking thread"))?;
    produced?;
    Ok(unpacked?)
}

/// Copy the local path `local` into the existing directory `guest` of container `name`.
pub async fn copy_in(
    docker: &Docker,
    name: &str,
    local: &Path,
    guest: &str,
) -> Result<(), BackendError> {
    let (reader, packer) = transfer::pack_stream(local)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(CHUNKS_IN_FLIGHT);
    let feeder = tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut reader = reader;
        loop {
            let mut buf = vec![0u8; PACK_CHUNK_BYTES];
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(buf.into()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let uploaded = docker
        .upload_to_container_streaming(
            name,
            Some(bollard::container::UploadToContainerOptions {
                path: guest.to_owned(),
                ..Default::default()
            }),
            body,
        )
        .await;
    let _ = feeder.await;
    packer
        .join()
        .map_err(|_| BackendError::Thread("the packing thread"))??;
    uploaded.map_err(|source| BackendError::CopyIn {
        path: guest.to_owned(),
        source,
    })
}

/// The text of the small file `path` in container `name` (created or running), read through
/// the archive API; a file that is not there reads as empty (a scratch image has no
/// `/etc/passwd`).
pub async fn read_text(docker: &Docker, name: &str, path: &str) -> Result<String, BackendError> {
    /// More than any account database: what is read is held whole.
    const MAX_BYTES: u64 = 16 << 20;
    let mut stream = docker.download_from_container(
        name,
        Some(bollard::container::DownloadFromContainerOptions {
            path: path.to_owned(),
        }),
    );
    let mut tar = Vec::new();
    let mut bound = transfer::Bounded::new(std::io::sink(), MAX_BYTES);
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                bound.admit(chunk.len())?;
                tar.extend_from_slice(&chunk);
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(String::new()),
            Err(source) => {
                return Err(BackendError::CopyOut {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    let unreadable = |source| {
        BackendError::Transfer(transfer::TransferError::Unpack {
            path: path.into(),
            source,
        })
    };
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut text = String::new();
    if let Some(entry) = archive.entries().map_err(unreadable)?.next() {
        use std::io::Read as _;
        entry
            .map_err(unreadable)?
            .read_to_string(&mut text)
            .map_err(unreadable)?;
    }
    Ok(text)
}
