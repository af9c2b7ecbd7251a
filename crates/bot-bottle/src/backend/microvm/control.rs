//! The control connection to the guest's agent (bottle-init, over the VMM's vsock socket):
//! waiting for it at boot, running a command, attaching the user's terminal to a guest PTY.

use std::path::Path;
use std::time::{Duration, Instant};

use bottle_proto::client::{connect_vsock, Client};
use bottle_proto::config::CONTROL_VSOCK_PORT;
use bottle_proto::message::{ExecRequest, ExitStatus};

use super::vmm::{describe_vmm_exit, VmmStatus, KILL_REAP_TIMEOUT};

/// How long the guest has from VMM start to its control agent answering `health`.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a powered-off request waits for the VMM child to end before killing it.
pub const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MicrovmRunError {
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
    use crate::backend::microvm::vmm::VmmChild;

    fn spawn_sh(script: &str) -> VmmChild {
        VmmChild::spawn(tokio::process::Command::new("sh").args(["-c", script])).unwrap()
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
