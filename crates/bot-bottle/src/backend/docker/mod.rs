//! The sidecar bundle container and the legacy Docker-backend agent container.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::container::{
    AttachContainerOptions, AttachContainerResults, Config, CreateContainerOptions, LogOutput,
    LogsOptions, NetworkingConfig, ResizeContainerTtyOptions, WaitContainerOptions,
};
use bollard::models::{
    EndpointIpamConfig, EndpointSettings, HostConfig, Mount, MountTypeEnum, PortBinding,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bundle::runtime::{
    SidecarConfig, SidecarCredential, CA_CERT, CONFIG_ENV, EGRESS_LOG, LOG_DIR_IN_BUNDLE,
};
use crate::host::docker::DockerError;
use crate::host::terminal::{terminal_size, RawMode};
use crate::plan::BottlePlan;
use bottle_proto::config::CA_CERT_PATH;

/// How long the bundle has to accept connections on its published proxy port.
const BUNDLE_READY_TIMEOUT: Duration = Duration::from_secs(20);

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
    #[error("the sidecar bundle {name} did not become ready on {addr} within {}s; its log:\n{log}", BUNDLE_READY_TIMEOUT.as_secs())]
    BundleNotReady {
        name: String,
        addr: SocketAddr,
        log: String,
    },
    #[error(transparent)]
    TrustStore(#[from] crate::host::trust_store::TrustStoreError),
    #[error("cannot prepare the log directory {path}")]
    LogDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("terminal I/O failed")]
    Terminal {
        #[source]
        source: std::io::Error,
    },
}

fn labels_map(plan: &BottlePlan) -> HashMap<String, String> {
    plan.labels.clone().into_iter().collect()
}

fn static_ip_endpoint(ip: std::net::Ipv4Addr) -> EndpointSettings {
    EndpointSettings {
        ipam_config: Some(EndpointIpamConfig {
            ipv4_address: Some(ip.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn create(docker: &Docker, name: &str, config: Config<String>) -> Result<(), DockerError> {
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: name.to_owned(),
                platform: None,
            }),
            config,
        )
        .await
        .map_err(|source| DockerError::CreateContainer {
            name: name.to_owned(),
            source,
        })?;
    Ok(())
}

async fn start(docker: &Docker, name: &str) -> Result<(), DockerError> {
    docker
        .start_container::<String>(name, None)
        .await
        .map_err(|source| DockerError::StartContainer {
            name: name.to_owned(),
            source,
        })
}

/// The last lines a container printed (for error messages).
pub async fn container_log(docker: &Docker, name: &str) -> String {
    let mut out = String::new();
    let mut logs = docker.logs::<String>(
        name,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: "20".into(),
            ..Default::default()
        }),
    );
    while let Some(Ok(chunk)) = logs.next().await {
        out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    out
}

/// Create the bundle container (not started). `log_dir` is the host directory for its logs.
pub async fn create_bundle(
    docker: &Docker,
    plan: &BottlePlan,
    image: &str,
    log_dir: &Path,
    credentials: &[SidecarCredential],
) -> Result<(), BackendError> {
    // A bottle with credentials gets its own CA (made in the bundle); its certificate lands
    // beside the logs for the agent to trust.
    let intercepting = !plan.egress.credential_hosts.is_empty();
    // The supervisor's token: for the host's `bot-bottle allow` and the bundle, never the agent.
    write_token(&log_dir.join(crate::bundle::supervisor::TOKEN_FILE))?;
    let sidecar = SidecarConfig {
        bottle_id: plan.id.clone(),
        allow: plan.egress.allow.clone(),
        deny: plan.egress.deny.clone(),
        deny_message: plan.egress.deny_message.clone(),
        allow_private: plan.egress.allow_private.clone(),
        event_log: Some(Path::new(LOG_DIR_IN_BUNDLE).join(EGRESS_LOG)),
        credentials: credentials.to_vec(),
        ca_cert: intercepting.then(|| Path::new(LOG_DIR_IN_BUNDLE).join(CA_CERT)),
        supervisor_token_file: Some(
            Path::new(LOG_DIR_IN_BUNDLE).join(crate::bundle::supervisor::TOKEN_FILE),
        ),
        // The host's trust store, for the real hosts of intercepted connections.
        trust_store: match credentials.is_empty() {
            true => None,
            false => crate::host::trust_store::stage(log_dir)?.then(|| {
                Path::new(LOG_DIR_IN_BUNDLE).join(crate::host::trust_store::TRUST_STORE_FILE)
            }),
        },
    };
    let sidecar_json = serde_json::to_string(&sidecar).expect("sidecar config serialises");
    let mut exposed = HashMap::new();
    let mut bindings = HashMap::new();
    for port in &plan.bundle.ports {
        let key = format!("{}/tcp", port.container_port);
        exposed.insert(key.clone(), HashMap::new());
        bindings.insert(
            key,
            Some(vec![PortBinding {
                host_ip: Some(port.host_ip.to_string()),
                host_port: Some(port.host_port.to_string()),
            }]),
        );
    }
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let config = Config {
        image: Some(image.to_owned()),
        env: Some(vec![format!("{CONFIG_ENV}={sidecar_json}")]),
        labels: Some(labels_map(plan)),
        exposed_ports: Some(exposed),
        user: Some(format!("{uid}:{gid}")),
        host_config: Some(HostConfig {
            network_mode: Some(plan.network.egress.clone()),
            port_bindings: Some(bindings),
            extra_hosts: Some(
                plan.bundle
                    .hosts
                    .iter()
                    .map(|(h, a)| format!("{h}:{a}"))
                    .collect(),
            ),
            binds: Some(vec![format!(
                "{}:{LOG_DIR_IN_BUNDLE}:rw",
                log_dir.display()
            )]),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            pids_limit: Some(BUNDLE_PIDS_LIMIT),
            memory: Some(BUNDLE_MEMORY_BYTES),
            // No swap beyond it: the limit is the bundle's whole footprint.
            memory_swap: Some(BUNDLE_MEMORY_BYTES),
            ..Default::default()
        }),
        ..Default::default()
    };
    create(docker, &plan.bundle.container, config).await?;
    if let Some(internal) = &plan.network.internal {
        docker
            .connect_network(
                &internal.name,
                bollard::network::ConnectNetworkOptions {
                    container: plan.bundle.container.clone(),
                    endpoint_config: static_ip_endpoint(internal.bundle_ip),
                },
            )
            .await
            .map_err(|source| DockerError::CreateNetwork {
                name: internal.name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Start the bundle and wait until its proxy accepts connections on the alias.
pub async fn start_bundle(docker: &Docker, plan: &BottlePlan) -> Result<(), BackendError> {
    start(docker, &plan.bundle.container).await?;
    let addr = SocketAddr::from((plan.alias, crate::plan::PROXY_PORT));
    let deadline = Instant::now() + BUNDLE_READY_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BackendError::BundleNotReady {
                name: plan.bundle.container.clone(),
                addr,
                log: container_log(docker, &plan.bundle.container).await,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bottle CA's certificate, once the bundle has written it to `log_dir` (a published port
/// may accept connections before the bundle's process runs, so it is waited for).
pub async fn bottle_ca(log_dir: &Path) -> Result<String, BackendError> {
    let path = log_dir.join(CA_CERT);
    let deadline = tokio::time::Instant::now() + BUNDLE_READY_TIMEOUT;
    loop {
        match std::fs::read_to_string(&path) {
            Ok(pem) if pem.contains("-----END CERTIFICATE-----") => return Ok(pem),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BackendError::CaCert { path, source: e })
            }
            _ if tokio::time::Instant::now() > deadline => {
                return Err(BackendError::CaCert {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the bundle did not write it (see its log in the same directory)",
                    ),
                })
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Give the (created, not started) agent the bottle CA's certificate from `log_dir` at
/// [`CA_CERT_PATH`], where `NODE_EXTRA_CA_CERTS` points.
pub async fn install_ca(
    docker: &Docker,
    plan: &BottlePlan,
    log_dir: &Path,
) -> Result<(), BackendError> {
    let source = log_dir.join(CA_CERT);
    let pem = bottle_ca(log_dir).await?.into_bytes();
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

/// The bundle's pids limit: its runtime's workers and blocking pool with room to spare.
pub const BUNDLE_PIDS_LIMIT: i64 = 1024;
/// The bundle's memory limit: the proxy at its connection cap (512 tunnels with their
/// buffers), the bounded certificate cache and the supervisor, with room to spare; an agent
/// that finds a way to grow the bundle's memory meets the limit, not the host's (issue 15).
pub const BUNDLE_MEMORY_BYTES: i64 = 256 * 1024 * 1024;

/// The upstream resolver Docker's embedded DNS (127.0.0.11 in every container on a user-defined
/// network) is given for the agent: TEST-NET-1, never routed. The agent needs no DNS (its proxy
/// address is planned), and Docker releases before 26.0.0 / 25.0.5 / 23.0.11
/// (CVE-2024-29018) forward an internal network's queries from the host's namespace, which
/// would carry data out in query names to any resolver the host can reach.
pub const AGENT_DNS_BLACK_HOLE: &str = "192.0.2.1";

/// Create the agent container on the internal network.
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
    // The Mounts API, not `binds`: a host path may contain ':'.
    let mounts: Vec<Mount> = plan
        .mounts
        .iter()
        .map(|m| Mount {
            source: Some(m.host.display().to_string()),
            target: Some(m.guest.display().to_string()),
            typ: Some(MountTypeEnum::BIND),
            read_only: Some(true),
            ..Default::default()
        })
        .collect();
    let config = Config {
        image: Some(image.to_owned()),
        cmd: Some(command.to_vec()),
        env: Some(env),
        user: Some(plan.agent.user.clone()),
        working_dir: Some(plan.agent.workdir.clone()),
        labels: Some(labels_map(plan)),
        tty: Some(tty),
        open_stdin: Some(true),
        stdin_once: Some(true),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        host_config: Some(HostConfig {
            network_mode: Some(internal.name.clone()),
            runtime: plan.agent.runtime.clone(),
            mounts: Some(mounts),
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
                static_ip_endpoint(internal.agent_ip),
            )]),
        }),
        ..Default::default()
    };
    create(docker, &plan.agent.name, config).await?;
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
    start(docker, name).await?;
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

/// A new supervisor token at `path`, readable by this user only.
fn write_token(path: &Path) -> Result<(), BackendError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let token = crate::bundle::supervisor::new_token().map_err(|e| BackendError::LogDir {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(token.as_bytes()))
        .map_err(|source| BackendError::LogDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Host directory for a bottle's logs, writable by the bundle (which runs as this user).
pub fn prepare_log_dir(dir: &Path) -> Result<(), BackendError> {
    std::fs::create_dir_all(dir).map_err(|source| BackendError::LogDir {
        path: dir.to_path_buf(),
        source,
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
