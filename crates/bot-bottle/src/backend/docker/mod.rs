//! The Docker backend: the agent in a container on the bottle's internal network (no route
//! out but the bundle), runc or gVisor's runsc; attached, exec'd into, given the bottle CA.

use std::collections::HashMap;
use std::io::IsTerminal;

use bollard::container::{
    AttachContainerOptions, AttachContainerResults, Config, LogOutput, NetworkingConfig,
    ResizeContainerTtyOptions, WaitContainerOptions,
};
use bollard::models::HostConfig;
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::host::docker::{self, DockerError};
use crate::host::run_dir::RunDir;
use crate::host::terminal::{terminal_size, RawMode};
use crate::plan::BottlePlan;
use bottle_proto::config::CA_CERT_PATH;

pub mod copy;
pub mod session;
pub mod workspace;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("cannot give the agent the bottle CA's certificate ({path})")]
    CaCert {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bundle(#[from] crate::bundle::container::BundleError),
    #[error(transparent)]
    Transfer(#[from] crate::backend::transfer::TransferError),
    #[error("reading {path} from the bottle")]
    CopyOut {
        path: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("copying into {path} (it must be an existing directory)")]
    CopyIn {
        path: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error(transparent)]
    AgentUser(crate::backend::microvm::launch::MicrovmError),
    #[error("copying the workspace {host} into the bottle at {guest} failed")]
    Workspace {
        host: std::path::PathBuf,
        guest: std::path::PathBuf,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("{0} panicked")]
    Thread(&'static str),
    #[error(
        "no kept workspace of bottle `{bottle}` to resume (the Docker backend keeps each run's \
         workspace as the agent left it): `bot-bottle start {bottle}` first"
    )]
    NothingToResume { bottle: String },
    #[error("terminal I/O failed")]
    Terminal {
        #[source]
        source: std::io::Error,
    },
}

/// The upstream resolver Docker's embedded DNS (127.0.0.11 in every container on a user-defined
/// network) is given for the agent: TEST-NET-1, never routed. The agent needs no DNS (its proxy
/// address is planned), and Docker releases before 26.0.0 / 25.0.5 / 23.0.11
/// (CVE-2024-29018) forward an internal network's queries from the host's namespace, which
/// would carry data out in query names to any resolver the host can reach.
pub const AGENT_DNS_BLACK_HOLE: &str = "192.0.2.1";

/// Create the agent container on the internal network. Its workspaces are not mounts: they
/// are copied in before it starts ([`workspace::copy_workspaces`]).
pub async fn create_agent(
    docker: &Docker,
    plan: &BottlePlan,
    image: &str,
    command: &[String],
    tty: bool,
) -> Result<(), BackendError> {
    let internal = plan
        .network
        .internal
        .as_ref()
        .expect("docker backend plans an internal network");
    let env: Vec<String> = plan
        .agent
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let config = Config {
        image: Some(image.to_owned()),
        cmd: Some(command.to_vec()),
        env: Some(env),
        user: Some(plan.agent.user.clone()),
        working_dir: Some(plan.agent.workdir.clone()),
        labels: Some(docker::labels(&plan.labels)),
        tty: Some(tty),
        open_stdin: Some(true),
        stdin_once: Some(true),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        host_config: Some(HostConfig {
            network_mode: Some(internal.name.clone()),
            runtime: plan.agent.runtime.clone(),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            memory: Some(i64::from(plan.agent.memory_mib) * 1024 * 1024),
            nano_cpus: Some(i64::from(plan.agent.vcpus) * 1_000_000_000),
            init: Some(true),
            dns: Some(vec![AGENT_DNS_BLACK_HOLE.into()]),
            pids_limit: Some(i64::from(plan.agent.pids)),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: HashMap::from([(
                internal.name.clone(),
                docker::static_ip_endpoint(internal.agent_ip),
            )]),
        }),
        ..Default::default()
    };
    docker::create_container(docker, &plan.agent.name, config).await?;
    Ok(())
}

async fn resize(docker: &Docker, name: &str) {
    if let Some((rows, cols)) = terminal_size() {
        let _ = docker
            .resize_container_tty(
                name,
                ResizeContainerTtyOptions {
                    height: rows,
                    width: cols,
                },
            )
            .await;
    }
}

/// Start the agent, stream its I/O (a TTY when stdin is a terminal), and return its exit code.
/// `on_started` runs once the container is running (the bottle is then usable by `exec`).
pub async fn run_agent(
    docker: &Docker,
    name: &str,
    tty: bool,
    on_started: impl FnOnce(),
) -> Result<i32, BackendError> {
    let AttachContainerResults {
        mut output,
        mut input,
    } = docker
        .attach_container(
            name,
            Some(AttachContainerOptions::<String> {
                stdin: Some(true),
                stdout: Some(true),
                stderr: Some(true),
                stream: Some(true),
                logs: Some(true),
                detach_keys: Some("ctrl-^,ctrl-^".into()),
            }),
        )
        .await
        .map_err(|source| DockerError::Exec {
            name: name.to_owned(),
            source,
        })?;
    let _raw = if tty && std::io::stdin().is_terminal() {
        Some(RawMode::enter().map_err(|source| BackendError::Terminal { source })?)
    } else {
        None
    };
    docker::start_container(docker, name).await?;
    on_started();
    if tty {
        resize(docker, name).await;
    }
    // Host stdin -> container. Ends at EOF (closing the container's stdin).
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 8192];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let _ = input.flush().await;
                }
            }
        }
        let _ = input.shutdown().await;
    });
    let mut winch = tty
        .then(|| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok())
        .flatten();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        let next = async {
            match winch.as_mut() {
                Some(w) => tokio::select! {
                    o = output.next() => Some(o),
                    _ = w.recv() => None,
                },
                None => Some(output.next().await),
            }
        };
        match next.await {
            None => resize(docker, name).await,
            Some(None) => break,
            Some(Some(Err(e))) => {
                tracing::debug!(error = %e, "attach stream ended");
                break;
            }
            Some(Some(Ok(chunk))) => {
                forward(chunk, &mut stdout, &mut stderr).await?;
                let _ = stdout.flush().await;
            }
        }
    }
    stdin_task.abort();
    let mut wait = docker.wait_container(name, None::<WaitContainerOptions<String>>);
    let code = match wait.next().await {
        Some(Ok(r)) => r.status_code as i32,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code as i32,
        Some(Err(source)) => {
            return Err(DockerError::Exec {
                name: name.to_owned(),
                source,
            }
            .into())
        }
        None => 1,
    };
    Ok(code)
}

/// Give the (created, not started) agent the bottle CA's certificate from the run directory at
/// [`CA_CERT_PATH`], where `NODE_EXTRA_CA_CERTS` points.
pub async fn install_ca(
    docker: &Docker,
    plan: &BottlePlan,
    run: &RunDir,
) -> Result<(), BackendError> {
    let source = run.ca_cert();
    let pem = crate::bundle::container::bottle_ca(run).await?.into_bytes();
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(pem.len() as u64);
    header.set_cksum();
    let inside = CA_CERT_PATH.trim_start_matches('/');
    tar.append_data(&mut header, inside, pem.as_slice())
        .and_then(|()| tar.finish())
        .map_err(|e| BackendError::CaCert {
            path: source.clone(),
            source: e,
        })?;
    let bytes = tar.into_inner().map_err(|e| BackendError::CaCert {
        path: source.clone(),
        source: e,
    })?;
    docker
        .upload_to_container(
            &plan.agent.name,
            Some(bollard::container::UploadToContainerOptions {
                path: "/".to_owned(),
                ..Default::default()
            }),
            bytes.into(),
        )
        .await
        .map_err(|e| BackendError::CaCert {
            path: source,
            source: std::io::Error::other(e),
        })
}

/// Copy one chunk of a container's output to our stdout or stderr.
async fn forward(
    chunk: LogOutput,
    stdout: &mut tokio::io::Stdout,
    stderr: &mut tokio::io::Stderr,
) -> Result<(), BackendError> {
    let result = match chunk {
        LogOutput::StdErr { message } => stderr.write_all(&message).await,
        LogOutput::StdOut { message } | LogOutput::Console { message } => {
            stdout.write_all(&message).await
        }
        LogOutput::StdIn { .. } => Ok(()),
    };
    result.map_err(|source| BackendError::Terminal { source })
}

/// Run `argv` in the running agent container (non-interactive: stdin, stdout and stderr
/// streamed); returns its exit code.
pub async fn exec_in_agent(
    docker: &Docker,
    container: &str,
    argv: &[String],
) -> Result<i32, BackendError> {
    use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
    let exec_err = |source| DockerError::Exec {
        name: container.to_owned(),
        source,
    };
    let created = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(argv.to_vec()),
                ..Default::default()
            },
        )
        .await
        .map_err(exec_err)?;
    let started = docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: None,
            }),
        )
        .await
        .map_err(exec_err)?;
    if let StartExecResults::Attached {
        mut output,
        mut input,
    } = started
    {
        let stdin_task = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut input).await;
            let _ = input.shutdown().await;
        });
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        while let Some(chunk) = output.next().await {
            forward(chunk.map_err(exec_err)?, &mut stdout, &mut stderr).await?;
        }
        let _ = stdout.flush().await;
        stdin_task.abort();
    }
    let inspected = docker.inspect_exec(&created.id).await.map_err(exec_err)?;
    Ok(inspected.exit_code.map_or(1, |c| c as i32))
}
