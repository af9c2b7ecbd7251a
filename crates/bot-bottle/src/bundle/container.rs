//! The bundle's container: made from the sidecar image with the bottle's configuration, its
//! ports published on the bottle's alias only, the run directory bind-mounted for its logs, the
//! CA and the supervisor token; started and waited for until its proxy accepts connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::container::Config;
use bollard::models::{HostConfig, PortBinding};
use bollard::Docker;

use crate::bundle::runtime::{SidecarConfig, SidecarCredential, CONFIG_ENV};
use crate::host::docker::{self, DockerError};
use crate::host::run_dir::RunDir;
use crate::plan::BottlePlan;

/// How long the bundle has to accept connections on its published proxy port.
const BUNDLE_READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
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
}

/// The run directory, ready for the bundle (which runs as this user) to write its logs in.
pub fn prepare_run_dir(run: &RunDir) -> Result<(), BundleError> {
    run.prepare().map_err(|source| BundleError::LogDir {
        path: run.path().to_path_buf(),
        source,
    })
}

/// The bundle's pids limit: its runtime's workers and blocking pool with room to spare.
pub const BUNDLE_PIDS_LIMIT: i64 = 1024;
/// The bundle's memory limit: the proxy at its connection cap (512 tunnels with their
/// buffers), the bounded certificate cache and the supervisor, with room to spare; an agent
/// that finds a way to grow the bundle's memory meets the limit, not the host's (issue 15).
pub const BUNDLE_MEMORY_BYTES: i64 = 256 * 1024 * 1024;

/// Create the bundle container (not started), with `run` (prepared) for its logs.
pub async fn create_bundle(
    docker: &Docker,
    plan: &BottlePlan,
    image: &str,
    run: &RunDir,
    credentials: &[SidecarCredential],
) -> Result<(), BundleError> {
    // A bottle with credentials gets its own CA (made in the bundle); its certificate lands
    // beside the logs for the agent to trust.
    let intercepting = !plan.egress.credential_hosts.is_empty();
    // The supervisor's token: for the host's `bot-bottle allow` and the bundle, never the agent.
    write_token(&run.supervisor_token())?;
    let inside = RunDir::in_bundle();
    let sidecar = SidecarConfig {
        bottle_id: plan.id.clone(),
        allow: plan.egress.allow.clone(),
        deny: plan.egress.deny.clone(),
        deny_message: plan.egress.deny_message.clone(),
        allow_private: plan.egress.allow_private.clone(),
        request_rules: plan.egress.request_rules.clone(),
        event_log: Some(inside.egress_log()),
        credentials: credentials.to_vec(),
        ca_cert: intercepting.then(|| inside.ca_cert()),
        supervisor_token_file: Some(inside.supervisor_token()),
        approval_hold_secs: plan.egress.approval_hold_secs,
        secrets: plan.egress.secrets,
        secret_hold_secs: plan.egress.secret_hold_secs,
        // The host's trust store, for the real hosts of intercepted connections.
        trust_store: match credentials.is_empty() {
            true => None,
            false => crate::host::trust_store::stage(run)?.then(|| inside.trust_store()),
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
        labels: Some(docker::labels(&plan.labels)),
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
                "{}:{}:rw",
                run.path().display(),
                RunDir::IN_BUNDLE
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
    docker::create_container(docker, &plan.bundle.container, config).await?;
    if let Some(internal) = &plan.network.internal {
        docker
            .connect_network(
                &internal.name,
                bollard::network::ConnectNetworkOptions {
                    container: plan.bundle.container.clone(),
                    endpoint_config: docker::static_ip_endpoint(internal.bundle_ip),
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
pub async fn start_bundle(docker: &Docker, plan: &BottlePlan) -> Result<(), BundleError> {
    docker::start_container(docker, &plan.bundle.container).await?;
    let addr = SocketAddr::from((plan.alias, crate::plan::PROXY_PORT));
    let deadline = Instant::now() + BUNDLE_READY_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BundleError::BundleNotReady {
                name: plan.bundle.container.clone(),
                addr,
                log: docker::container_log(docker, &plan.bundle.container).await,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bottle CA's certificate, once the bundle has written it to the run directory (a published port
/// may accept connections before the bundle's process runs, so it is waited for).
pub async fn bottle_ca(run: &RunDir) -> Result<String, BundleError> {
    let path = run.ca_cert();
    let deadline = tokio::time::Instant::now() + BUNDLE_READY_TIMEOUT;
    loop {
        match std::fs::read_to_string(&path) {
            Ok(pem) if pem.contains("-----END CERTIFICATE-----") => return Ok(pem),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BundleError::CaCert { path, source: e })
            }
            _ if tokio::time::Instant::now() > deadline => {
                return Err(BundleError::CaCert {
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

/// A new supervisor token at `path`, readable by this user only.
fn write_token(path: &Path) -> Result<(), BundleError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let token = crate::bundle::supervisor::new_token().map_err(|e| BundleError::LogDir {
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
        .map_err(|source| BundleError::LogDir {
            path: path.to_path_buf(),
            source,
        })
}
