//! The microVM's root image from the agent's Docker image: a created (never started)
//! container's files exported as a tar stream straight into the squashfs builder
//! ([`crate::image::rootfs`]), cached by image id and bottle-init; and the image's accounts
//! (`/etc/passwd`, `/etc/group`) for the guest user's ids.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bollard::container::{Config, CreateContainerOptions, DownloadFromContainerOptions};
use bollard::Docker;
use futures_util::StreamExt;

use crate::host::docker::{remove_container, DockerError};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("cannot read {path} from the agent image")]
    ImageFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the root image failed")]
    Rootfs {
        #[source]
        source: crate::image::rootfs::RootfsError,
    },
}

/// Files read out of the agent image (for the user's ids).
pub struct ImageAccounts {
    pub passwd: String,
    pub group: String,
}

async fn read_file(docker: &Docker, container: &str, path: &str) -> Result<String, ExportError> {
    let mut stream = docker.download_from_container(
        container,
        Some(DownloadFromContainerOptions {
            path: path.to_owned(),
        }),
    );
    let mut tar_bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => tar_bytes.extend_from_slice(&b),
            // A missing file (scratch images have none) reads as empty.
            Err(_) => return Ok(String::new()),
        }
    }
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut text = String::new();
    let entries = archive.entries().map_err(|source| ExportError::ImageFile {
        path: path.to_owned(),
        source,
    })?;
    if let Some(entry) = entries.flatten().next() {
        let mut entry = entry;
        entry
            .read_to_string(&mut text)
            .map_err(|source| ExportError::ImageFile {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(text)
}

/// A blocking reader over the chunks an async task sends (the image export, read by the
/// image builder on a blocking thread).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
}

impl ChannelReader {
    fn new(rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>) -> Self {
        ChannelReader {
            rx,
            chunk: bytes::Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = self.chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        bytes::Buf::advance(&mut self.chunk, n);
        Ok(n)
    }
}

/// The root image for `image` (cached by image id and bottle-init), and its accounts.
pub async fn prepare_rootfs(
    docker: &Docker,
    image: &str,
    init: &Path,
    cache: &Path,
    labels: &std::collections::BTreeMap<String, String>,
    scratch_name: &str,
) -> Result<(PathBuf, ImageAccounts), ExportError> {
    let inspected = docker
        .inspect_image(image)
        .await
        .map_err(|source| DockerError::Inspect {
            what: "image",
            name: image.to_owned(),
            source,
        })?;
    let image_size = inspected
        .size
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0);
    let image_id = inspected.id.unwrap_or_else(|| image.to_owned());
    // A created (never started) container gives access to the image's files.
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: scratch_name.to_owned(),
                platform: None,
            }),
            Config {
                image: Some(image.to_owned()),
                cmd: Some(vec!["/nonexistent".to_owned()]),
                labels: Some(labels.clone().into_iter().collect()),
                network_disabled: Some(true),
                ..Default::default()
            },
        )
        .await
        .map_err(|source| DockerError::CreateContainer {
            name: scratch_name.to_owned(),
            source,
        })?;
    let result = async {
        let accounts = ImageAccounts {
            passwd: read_file(docker, scratch_name, "/etc/passwd").await?,
            group: read_file(docker, scratch_name, "/etc/group").await?,
        };
        let target = crate::image::rootfs::rootfs_path(cache, &image_id, init)
            .map_err(|source| ExportError::Rootfs { source })?;
        if target.is_file() {
            return Ok((target, accounts));
        }
        eprintln!("bot-bottle: building the root image from {image} (once per image)");
        let started = Instant::now();
        std::fs::create_dir_all(cache.join("rootfs")).map_err(|source| ExportError::Write {
            path: cache.join("rootfs"),
            source,
        })?;
        // The export streams straight into the image builder (no copy of the tar on disk).
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(16);
        let (path, init) = (target.clone(), init.to_path_buf());
        let building = tokio::task::spawn_blocking(move || {
            crate::image::rootfs::cached_rootfs_at(&path, &init, || Ok(ChannelReader::new(rx)))
        });
        let mut export = docker.export_container(scratch_name);
        let mut progress = crate::image::squashfs::progress_on_stderr("exporting the image");
        let mut exported = 0u64;
        let mut export_error = None;
        while let Some(chunk) = export.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    export_error = Some(e);
                    break;
                }
            };
            exported += chunk.len() as u64;
            if tx.send(Ok(chunk)).await.is_err() {
                break; // the builder stopped: its error says why
            }
            // The tar is a little larger than the image: hold at 99% until it ends.
            if image_size > 0 {
                progress(exported.min(image_size * 99 / 100), image_size);
            }
        }
        drop(tx);
        // The export is done (before the compression that follows it, on the next line).
        if export_error.is_none() && image_size > 0 {
            progress(image_size, image_size);
        }
        let built = building.await.map_err(|e| ExportError::Write {
            path: cache.join("rootfs"),
            source: std::io::Error::other(e.to_string()),
        })?;
        if let Some(source) = export_error {
            return Err(DockerError::Inspect {
                what: "container export",
                name: scratch_name.to_owned(),
                source,
            }
            .into());
        }
        let image = built.map_err(|source| ExportError::Rootfs { source })?;
        let size = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "bot-bottle: root image ready in {:.1} s ({:.1} MiB, cached for this image)",
            started.elapsed().as_secs_f64(),
            size as f64 / (1024.0 * 1024.0)
        );
        Ok((image, accounts))
    }
    .await;
    if let Err(e) = remove_container(docker, scratch_name).await {
        tracing::warn!(error = %e, "cannot remove the export container; `bot-bottle cleanup` will");
    }
    result
}
