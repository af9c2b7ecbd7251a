//! The microVM backend's effects: the root image from the agent image, the VMM child process,
//! the control connection and the attached session.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::container::{Config, CreateContainerOptions, DownloadFromContainerOptions};
use bollard::Docker;
use bottle_proto::client::{connect_vsock, Client};
use bottle_proto::config::CONTROL_VSOCK_PORT;
use bottle_proto::message::{ExecRequest, ExitStatus};
use futures_util::StreamExt;

use crate::host::docker::{remove_container, DockerError};

/// How long the guest has from VMM start to its control agent answering `health`.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a powered-off request waits for the VMM child to end before killing it.
pub const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed VMM child has to be reaped (SIGKILL cannot be caught: it ends at once
/// unless stuck in the kernel) before `stop` reports it.
const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a VMM child's end is checked while waiting for it.
const REAP_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum MicrovmRunError {
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
    #[error("the VM ended ({status}) before its control agent answered; the end of its console:\n{console}")]
    EndedBeforeReady { status: String, console: String },
    #[error("the guest's control agent did not answer within {}s; the end of its console:\n{console}", BOOT_TIMEOUT.as_secs())]
    BootTimeout { console: String },
    #[error("cannot start the VMM child process")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot kill the VMM child process (pid {pid}): kill it, then run `bot-bottle cleanup`"
    )]
    Kill {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the VMM child process (pid {pid}) did not end within {}s of SIGKILL: kill it, then \
         run `bot-bottle cleanup`",
        KILL_REAP_TIMEOUT.as_secs()
    )]
    NotReaped { pid: u32 },
    #[error("the control channel to the guest failed")]
    Control {
        #[source]
        source: bottle_proto::ClientError,
    },
}

/// The last `lines` lines of a console log.
pub fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Files read out of the agent image (for the user's ids).
pub struct ImageAccounts {
    pub passwd: String,
    pub group: String,
}

async fn read_file(
    docker: &Docker,
    container: &str,
    path: &str,
) -> Result<String, MicrovmRunError> {
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
    let entries = archive
        .entries()
        .map_err(|source| MicrovmRunError::ImageFile {
            path: path.to_owned(),
            source,
        })?;
    if let Some(entry) = entries.flatten().next() {
        let mut entry = entry;
        entry
            .read_to_string(&mut text)
            .map_err(|source| MicrovmRunError::ImageFile {
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
) -> Result<(PathBuf, ImageAccounts), MicrovmRunError> {
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
            .map_err(|source| MicrovmRunError::Rootfs { source })?;
        if target.is_file() {
            return Ok((target, accounts));
        }
        eprintln!("bot-bottle: building the root image from {image} (once per image)");
        let started = Instant::now();
        std::fs::create_dir_all(cache.join("rootfs")).map_err(|source| MicrovmRunError::Write {
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
        let built = building.await.map_err(|e| MicrovmRunError::Write {
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
        let image = built.map_err(|source| MicrovmRunError::Rootfs { source })?;
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

/// The VMM child process, owned. Clones share it: the session watches and waits for it, the
/// guard stack's undo stops it when the session ends early. Whoever sees it end reaps it and
/// keeps only how it ended, so a child is never signalled after it was reaped (its pid may
/// belong to another process by then). Dropping the last clone of a running child kills it
/// (tokio reaps it in the background).
#[derive(Clone)]
pub struct VmmChild {
    state: std::sync::Arc<std::sync::Mutex<VmmState>>,
}

enum VmmState {
    Running(tokio::process::Child),
    Ended(std::process::ExitStatus),
}

/// How [`VmmChild::stop`] found the VMM child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmEnd {
    /// It had ended by itself: nothing was signalled.
    Ended(std::process::ExitStatus),
    /// It was running: killed now, and reaped.
    Killed(std::process::ExitStatus),
}

impl VmmChild {
    /// Start the VMM child (`cmd`'s stdin, stdout and stderr as the caller set them).
    pub fn spawn(cmd: &mut tokio::process::Command) -> Result<VmmChild, MicrovmRunError> {
        let child = cmd
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| MicrovmRunError::Spawn { source })?;
        Ok(VmmChild {
            state: std::sync::Arc::new(std::sync::Mutex::new(VmmState::Running(child))),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VmmState> {
        // The state is replaced whole: a panic elsewhere cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The child's pid while it runs; `None` once it was reaped.
    pub fn pid(&self) -> Option<u32> {
        match &*self.lock() {
            VmmState::Running(child) => child.id(),
            VmmState::Ended(_) => None,
        }
    }

    /// How the child ended, once it has (reaping it); `None` while it runs.
    pub fn try_ended(&self) -> Option<std::process::ExitStatus> {
        let mut state = self.lock();
        let status = match &mut *state {
            VmmState::Ended(status) => return Some(*status),
            // An error here means it cannot be waited for: it is not known to have ended.
            VmmState::Running(child) => child.try_wait().ok().flatten()?,
        };
        *state = VmmState::Ended(status);
        Some(status)
    }

    /// Wait up to `timeout` for the child to end by itself; `None` if it still runs.
    pub async fn wait_timeout(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_ended() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(REAP_POLL).await;
        }
    }

    /// Kill the child if it still runs, and reap it; a child that already ended is left
    /// alone. Says which it was.
    pub async fn stop(&self) -> Result<VmmEnd, MicrovmRunError> {
        if let Some(status) = self.try_ended() {
            return Ok(VmmEnd::Ended(status));
        }
        let pid = {
            let mut state = self.lock();
            match &mut *state {
                VmmState::Ended(status) => return Ok(VmmEnd::Ended(*status)),
                VmmState::Running(child) => {
                    let pid = child.id().unwrap_or_default();
                    // Not reaped (we hold it, and checked under this lock): the pid is ours.
                    child
                        .start_kill()
                        .map_err(|source| MicrovmRunError::Kill { pid, source })?;
                    pid
                }
            }
        };
        match self.wait_timeout(KILL_REAP_TIMEOUT).await {
            Some(status) => Ok(VmmEnd::Killed(status)),
            None => Err(MicrovmRunError::NotReaped { pid }),
        }
    }

    /// Give the child `timeout` to end by itself (the guest powering off), then [`stop`] it.
    ///
    /// [`stop`]: VmmChild::stop
    pub async fn stop_after(&self, timeout: Duration) -> Result<VmmEnd, MicrovmRunError> {
        self.wait_timeout(timeout).await;
        self.stop().await
    }

    /// Register the undo that stops this child (through this owner, never by pid).
    pub fn stop_on_unwind(&self, stack: &mut crate::session::guard::GuardStack) {
        let vmm = self.clone();
        stack.push("stop the VMM", move || async move {
            match vmm.stop().await? {
                VmmEnd::Killed(_) => tracing::info!("killed the VMM child"),
                VmmEnd::Ended(status) => {
                    tracing::debug!(status = %describe_vmm_exit(status), "the VMM had ended")
                }
            }
            Ok::<(), MicrovmRunError>(())
        });
    }
}

/// A VMM child whose end can be checked without blocking (to report a VM that ended before
/// its control agent answered).
pub trait VmmStatus {
    /// How the child ended, once it has; `None` while it runs.
    fn ended(&mut self) -> Option<std::process::ExitStatus>;
}

impl VmmStatus for VmmChild {
    fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.try_ended()
    }
}

impl VmmStatus for tokio::process::Child {
    fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.try_wait().ok().flatten()
    }
}

/// Wait until the guest's control agent answers, or the VMM child ends, or time runs out.
pub async fn connect_control(
    child: &mut impl VmmStatus,
    uds: &Path,
    token: &str,
    console: &Path,
) -> Result<Client<std::os::unix::net::UnixStream>, MicrovmRunError> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Some(status) = child.ended() {
            return Err(MicrovmRunError::EndedBeforeReady {
                status: describe_vmm_exit(status),
                console: console_tail(console, 30),
            });
        }
        if uds.exists() {
            let (uds, token) = (uds.to_path_buf(), token.to_owned());
            let attempt = tokio::task::spawn_blocking(move || {
                let stream = connect_vsock(&uds, CONTROL_VSOCK_PORT)?;
                let mut client = Client::new(stream, token);
                client.health().map(|_| client)
            })
            .await;
            if let Ok(Ok(client)) = attempt {
                return Ok(client);
            }
        }
        if Instant::now() > deadline {
            return Err(MicrovmRunError::BootTimeout {
                console: console_tail(console, 30),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Run `argv` in the guest with the host's stdin/stdout/stderr; returns the exit code.
pub async fn exec(
    mut client: Client<std::os::unix::net::UnixStream>,
    argv: Vec<String>,
    cwd: String,
) -> Result<(i32, Client<std::os::unix::net::UnixStream>), MicrovmRunError> {
    tokio::task::spawn_blocking(move || {
        let mut req = ExecRequest::new(argv);
        req.cwd = Some(cwd);
        let status = client.exec_streaming(
            &req,
            std::io::stdin(),
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )?;
        Ok((exit_code(&status), client))
    })
    .await
    .map_err(|e| MicrovmRunError::Control {
        source: bottle_proto::ClientError::Input(std::io::Error::other(e.to_string())),
    })?
    .map_err(|source| MicrovmRunError::Control { source })
}

/// How the VMM child ended, in words.
pub fn describe_vmm_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(bottle_vmm::EXIT_CODE_VMM_ERROR), _) => "the VMM refused or failed; see above".into(),
        (Some(bottle_vmm::EXIT_CODE_STOPPED), _) => "the VMM was stopped".into(),
        (Some(code), _) => match bottle_vmm::GuestExit::from_exit_code(code) {
            Some(bottle_vmm::GuestExit::PowerOff) => "the guest powered off".into(),
            Some(bottle_vmm::GuestExit::Reset) => "the guest rebooted".into(),
            Some(bottle_vmm::GuestExit::Panic) => "the guest kernel panicked".into(),
            Some(bottle_vmm::GuestExit::Crash(_)) => "the VM crashed".into(),
            None => format!("exit code {code}"),
        },
        (None, Some(sig)) => format!("the VMM was killed by signal {sig}"),
        (None, None) => "unknown".into(),
    }
}

/// Attach the user's terminal to `argv` in a guest PTY (raw mode, window size forwarded on
/// SIGWINCH). The guest powers off when the command exits. Returns the exit code.
pub async fn attach_pty(
    client: Client<std::os::unix::net::UnixStream>,
    argv: Vec<String>,
    cwd: String,
) -> Result<i32, MicrovmRunError> {
    use bottle_proto::message::{PtyRequest, WindowSize};
    use std::io::Read as _;
    let control = |source| MicrovmRunError::Control { source };
    let (rows, cols) = crate::host::terminal::terminal_size().unwrap_or((24, 80));
    let req = PtyRequest {
        argv,
        env: Default::default(),
        cwd: Some(cwd),
        size: WindowSize { rows, cols },
        user: None,
        power_off_on_exit: true,
    };
    let session = tokio::task::spawn_blocking(move || client.pty(&req))
        .await
        .map_err(|e| {
            control(bottle_proto::ClientError::Input(std::io::Error::other(
                e.to_string(),
            )))
        })?
        .map_err(control)?;
    let input = session.input();
    let _raw = crate::host::terminal::RawMode::enter().ok();
    // Keyboard -> guest. A thread: stdin reads block and cannot be cancelled.
    let keys = input.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || keys.write(&buf[..n]).is_err() {
                break;
            }
        }
    });
    // Window size changes -> guest.
    let resizer = tokio::spawn(async move {
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return;
        };
        while winch.recv().await.is_some() {
            if let Some((rows, cols)) = crate::host::terminal::terminal_size() {
                let _ = input.resize(WindowSize { rows, cols });
            }
        }
    });
    let result = tokio::task::spawn_blocking(move || session.run(&mut std::io::stdout())).await;
    resizer.abort();
    let (status, _client) = result
        .map_err(|e| {
            control(bottle_proto::ClientError::Input(std::io::Error::other(
                e.to_string(),
            )))
        })?
        .map_err(control)?;
    Ok(exit_code(&status))
}

/// A shell-style exit code: the code, or 128 + signal.
pub fn exit_code(status: &ExitStatus) -> i32 {
    match (status.code, status.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    fn spawn_sh(script: &str) -> VmmChild {
        VmmChild::spawn(tokio::process::Command::new("sh").args(["-c", script])).unwrap()
    }

    #[tokio::test]
    async fn the_unwind_never_signals_a_vmm_child_that_was_already_reaped() {
        let vmm = spawn_sh("exit 3");
        let reaped = vmm.wait_timeout(Duration::from_secs(10)).await;
        let mut stack = crate::session::guard::GuardStack::new("b");
        vmm.stop_on_unwind(&mut stack);

        let errors = stack.unwind().await;

        assert_eq!(reaped.and_then(|s| s.code()), Some(3));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(vmm.pid(), None, "a reaped child has no pid left to signal");
        assert_eq!(
            vmm.stop().await.unwrap(),
            VmmEnd::Ended(reaped.unwrap()),
            "stop reports the end it saw instead of killing"
        );
    }

    #[tokio::test]
    async fn the_unwind_kills_and_reaps_a_vmm_child_that_still_runs() {
        let vmm = spawn_sh("exec sleep 60");
        let running = vmm.pid();
        let mut stack = crate::session::guard::GuardStack::new("b");
        vmm.stop_on_unwind(&mut stack);

        let errors = stack.unwind().await;

        assert!(running.is_some());
        assert!(errors.is_empty(), "{errors:?}");
        let status = vmm.try_ended().expect("reaped by the undo");
        assert_eq!(status.signal(), Some(9), "{status:?}");
        assert_eq!(vmm.pid(), None);
    }

    #[tokio::test]
    async fn a_vmm_child_that_ends_within_the_power_off_time_is_not_killed() {
        let vmm = spawn_sh("sleep 0.3; exit 4");

        let end = vmm.stop_after(Duration::from_secs(10)).await.unwrap();

        assert!(
            matches!(end, VmmEnd::Ended(s) if s.code() == Some(4)),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_vmm_child_that_outlives_the_power_off_time_is_killed() {
        let vmm = spawn_sh("exec sleep 60");

        let end = vmm.stop_after(Duration::from_millis(200)).await.unwrap();

        assert!(
            matches!(end, VmmEnd::Killed(s) if s.signal() == Some(9)),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn connect_control_reports_a_vmm_child_that_ended_before_its_guest_answered() {
        let dir = tempfile::tempdir().unwrap();
        let mut vmm = spawn_sh("exit 1");

        let err = connect_control(
            &mut vmm,
            &dir.path().join("vsock.sock"),
            "tok",
            &dir.path().join("serial.log"),
        )
        .await
        .err()
        .expect("no guest ever answers here");

        assert!(
            matches!(err, MicrovmRunError::EndedBeforeReady { .. }),
            "{err}"
        );
        assert_eq!(
            vmm.pid(),
            None,
            "connect_control reaped it through the owner"
        );
    }
}
