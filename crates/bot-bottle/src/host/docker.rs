//! The host's Docker engine through bollard: the objects a bottle owns (networks, containers,
//! images), made, found and removed by their labels.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use bollard::container::{ListContainersOptions, RemoveContainerOptions};
use bollard::network::ListNetworksOptions;
use bollard::Docker;

use crate::plan::{LABEL_ALIAS, LABEL_BOTTLE, LABEL_ID, LABEL_MANAGED, LABEL_STATE};

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot reach the Docker engine: start it (`sudo systemctl start docker`), \
         make sure this user may use it (`sudo usermod -aG docker $USER`, then log in again), \
         or set DOCKER_HOST"
    )]
    Connect {
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot list {what}")]
    List {
        what: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot remove container {name}")]
    RemoveContainer {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot remove network {name}")]
    RemoveNetwork {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot create network {name}")]
    CreateNetwork {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot create container {name}")]
    CreateContainer {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot start container {name}")]
    StartContainer {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot inspect {what} {name}")]
    Inspect {
        what: &'static str,
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot build image {tag}")]
    Build {
        tag: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("building image {tag} failed: {message}")]
    BuildFailed { tag: String, message: String },
    #[error("cannot prepare the build context for {tag}")]
    BuildContext {
        tag: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run a command in container {name}")]
    Exec {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
}

/// Connect to the engine named by DOCKER_HOST, or the local socket, and check it answers.
pub async fn connect() -> Result<Docker, DockerError> {
    let docker =
        Docker::connect_with_local_defaults().map_err(|source| DockerError::Connect { source })?;
    docker
        .ping()
        .await
        .map_err(|source| DockerError::Connect { source })?;
    Ok(docker)
}

/// Engine version string.
pub async fn version(docker: &Docker) -> Result<String, DockerError> {
    let v = docker
        .version()
        .await
        .map_err(|source| DockerError::Connect { source })?;
    Ok(v.version.unwrap_or_else(|| "unknown".to_owned()))
}

/// Whether gVisor's `runsc` runtime is registered with the engine.
pub async fn runsc_registered(docker: &Docker) -> Result<bool, DockerError> {
    let info = docker
        .info()
        .await
        .map_err(|source| DockerError::Connect { source })?;
    Ok(info.runtimes.is_some_and(|r| r.contains_key("runsc")))
}

/// Which of our objects to list: all of them, one state directory's, or one bottle's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope<'a> {
    pub state_tag: Option<&'a str>,
    pub bottle_id: Option<&'a str>,
}

impl<'a> Scope<'a> {
    pub fn all() -> Self {
        Self::default()
    }
    pub fn state(tag: &'a str) -> Self {
        Self {
            state_tag: Some(tag),
            bottle_id: None,
        }
    }
    pub fn bottle(id: &'a str) -> Self {
        Self {
            state_tag: None,
            bottle_id: Some(id),
        }
    }
}

fn label_filter(scope: Scope<'_>) -> HashMap<String, Vec<String>> {
    let mut labels = vec![format!("{LABEL_MANAGED}=true")];
    if let Some(tag) = scope.state_tag {
        labels.push(format!("{LABEL_STATE}={tag}"));
    }
    if let Some(id) = scope.bottle_id {
        labels.push(format!("{LABEL_ID}={id}"));
    }
    HashMap::from([("label".to_owned(), labels)])
}

/// A container we manage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    pub name: String,
    pub bottle_id: String,
    /// The bottle's name (`bot-bottle.bottle`).
    pub bottle: String,
    pub alias: Option<Ipv4Addr>,
    pub running: bool,
}

/// Every container carrying our labels (optionally only one bottle's).
pub async fn managed_containers(
    docker: &Docker,
    scope: Scope<'_>,
) -> Result<Vec<ManagedContainer>, DockerError> {
    let list = docker
        .list_containers(Some(ListContainersOptions::<String> {
            all: true,
            filters: label_filter(scope),
            ..Default::default()
        }))
        .await
        .map_err(|source| DockerError::List {
            what: "containers",
            source,
        })?;
    Ok(list
        .into_iter()
        .map(|c| {
            let labels = c.labels.unwrap_or_default();
            ManagedContainer {
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .or(c.id)
                    .unwrap_or_default(),
                bottle_id: labels.get(LABEL_ID).cloned().unwrap_or_default(),
                bottle: labels.get(LABEL_BOTTLE).cloned().unwrap_or_default(),
                alias: labels.get(LABEL_ALIAS).and_then(|a| a.parse().ok()),
                running: c.state.as_deref() == Some("running"),
            }
        })
        .collect())
}

/// Aliases published by running containers of ours: (address, bottle id).
pub async fn published_aliases(docker: &Docker) -> Result<Vec<(Ipv4Addr, String)>, DockerError> {
    Ok(managed_containers(docker, Scope::all())
        .await?
        .into_iter()
        .filter(|c| c.running)
        .filter_map(|c| c.alias.map(|a| (a, c.bottle_id)))
        .collect())
}

/// Networks we manage: (name, bottle id).
pub async fn managed_networks(
    docker: &Docker,
    scope: Scope<'_>,
) -> Result<Vec<(String, String)>, DockerError> {
    let list = docker
        .list_networks(Some(ListNetworksOptions::<String> {
            filters: label_filter(scope),
        }))
        .await
        .map_err(|source| DockerError::List {
            what: "networks",
            source,
        })?;
    Ok(list
        .into_iter()
        .map(|n| {
            let id = n
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ID).cloned())
                .unwrap_or_default();
            (n.name.unwrap_or_default(), id)
        })
        .collect())
}

fn is_not_found(err: &bollard::errors::Error) -> bool {
    matches!(
        err,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Remove a container (and its anonymous volumes); absent is success.
pub async fn remove_container(docker: &Docker, name: &str) -> Result<(), DockerError> {
    match docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(err) if is_not_found(&err) => Ok(()),
        Err(source) => Err(DockerError::RemoveContainer {
            name: name.to_owned(),
            source,
        }),
    }
}

/// Remove a network; absent is success.
pub async fn remove_network(docker: &Docker, name: &str) -> Result<(), DockerError> {
    match docker.remove_network(name).await {
        Ok(()) => Ok(()),
        Err(err) if is_not_found(&err) => Ok(()),
        Err(source) => Err(DockerError::RemoveNetwork {
            name: name.to_owned(),
            source,
        }),
    }
}

/// Remove every container, then every network, labelled with `bottle_id`. Keeps going past
/// failures and returns them all.
pub async fn remove_bottle_objects(docker: &Docker, bottle_id: &str) -> Vec<DockerError> {
    let mut errors = Vec::new();
    match managed_containers(docker, Scope::bottle(bottle_id)).await {
        Ok(containers) => {
            for c in containers {
                if let Err(e) = remove_container(docker, &c.name).await {
                    errors.push(e);
                }
            }
        }
        Err(e) => errors.push(e),
    }
    match managed_networks(docker, Scope::bottle(bottle_id)).await {
        Ok(networks) => {
            for (name, _) in networks {
                if let Err(e) = remove_network(docker, &name).await {
                    errors.push(e);
                }
            }
        }
        Err(e) => errors.push(e),
    }
    errors
}

/// Create a bridge network with our labels. With `internal_subnet`, the network is internal
/// (no route out, no masquerading) on that subnet, so addresses can be planned.
pub async fn create_network(
    docker: &Docker,
    name: &str,
    internal_subnet: Option<&str>,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), DockerError> {
    use bollard::models::{Ipam, IpamConfig};
    use bollard::network::CreateNetworkOptions;
    let mut options: HashMap<String, String> = HashMap::new();
    let ipam = match internal_subnet {
        Some(subnet) => {
            options.insert(
                "com.docker.network.bridge.enable_ip_masquerade".into(),
                "false".into(),
            );
            // No address on the host side of the bridge: otherwise the agent could reach
            // host services listening on 0.0.0.0 through the gateway address.
            options.insert(
                "com.docker.network.bridge.inhibit_ipv4".into(),
                "true".into(),
            );
            Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(subnet.to_owned()),
                    ..Default::default()
                }]),
                ..Default::default()
            }
        }
        None => Ipam::default(),
    };
    docker
        .create_network(CreateNetworkOptions::<String> {
            name: name.to_owned(),
            check_duplicate: true,
            driver: "bridge".to_owned(),
            internal: internal_subnet.is_some(),
            ipam,
            options,
            labels: labels.clone().into_iter().collect(),
            ..Default::default()
        })
        .await
        .map_err(|source| DockerError::CreateNetwork {
            name: name.to_owned(),
            source,
        })?;
    Ok(())
}

/// A plan's labels as bollard takes them.
pub fn labels(labels: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    labels.clone().into_iter().collect()
}

/// A network endpoint with a fixed (planned) address.
pub fn static_ip_endpoint(ip: std::net::Ipv4Addr) -> bollard::models::EndpointSettings {
    bollard::models::EndpointSettings {
        ipam_config: Some(bollard::models::EndpointIpamConfig {
            ipv4_address: Some(ip.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Create container `name` (not started).
pub async fn create_container(
    docker: &Docker,
    name: &str,
    config: bollard::container::Config<String>,
) -> Result<(), DockerError> {
    docker
        .create_container(
            Some(bollard::container::CreateContainerOptions {
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

/// Start container `name`.
pub async fn start_container(docker: &Docker, name: &str) -> Result<(), DockerError> {
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
        Some(bollard::container::LogsOptions {
            stdout: true,
            stderr: true,
            tail: "20".into(),
            ..Default::default()
        }),
    );
    while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut logs).await {
        out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    out
}
