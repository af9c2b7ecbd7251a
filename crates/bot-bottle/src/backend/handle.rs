//! A running bottle, found by id or name and reached without its caller knowing the backend:
//! `exec` and `cp` (and `allow`, `stop` for the row) go through [`BottleHandle`]. The one
//! place that tells a container from a machine once a bottle runs.

use std::path::Path;

use crate::backend::microvm::launch::{ControlEndpoint, Launch, MicrovmError};
use crate::backend::transfer::{self, StreamError, TransferError};
use crate::config::manifest::Backend;
use crate::host::docker::DockerError;
use crate::host::paths::Dirs;
use crate::plan::BottlePlan;
use crate::state::{BottleRow, StateDb, StateError};

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("no bottles are running")]
    NoState(#[source] StateError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no running bottle `{target}`: see `bot-bottle list`")]
    NotFound { target: String },
    #[error("`{target}` matches {} bottles ({}): give the id", ids.len(), ids.join(", "))]
    Ambiguous { target: String, ids: Vec<String> },
    #[error("bottle {id} has no plan")]
    NoPlan { id: String },
    #[error("reading the plan of bottle {id}")]
    BadPlan {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("bottle {id} is {status}, not running yet: try again in a moment")]
    NotRunning {
        id: String,
        status: crate::state::Status,
    },
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Container(#[from] crate::backend::docker::BackendError),
    #[error("reaching the guest of bottle {id}")]
    Launch {
        id: String,
        #[source]
        source: MicrovmError,
    },
    #[error("connecting to the guest of bottle {id} on {}", socket.display())]
    Connect {
        id: String,
        socket: std::path::PathBuf,
        #[source]
        source: bottle_proto::ClientError,
    },
    #[error(transparent)]
    Guest(#[from] crate::backend::microvm::control::MicrovmRunError),
    #[error("the control channel to the guest failed")]
    Control(#[from] bottle_proto::ClientError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Stream(#[from] StreamError<bottle_proto::ClientError>),
    #[error("{0} panicked")]
    Thread(&'static str),
}

/// The one live bottle `target` names (an id, or a name only one live bottle has).
pub fn find_live(db: &StateDb, target: &str) -> Result<BottleRow, HandleError> {
    let mut rows: Vec<BottleRow> = db
        .bottles()?
        .into_iter()
        .filter(|r| r.live && (r.id == target || r.bottle == target))
        .collect();
    match rows.len() {
        1 => Ok(rows.remove(0)),
        0 => Err(HandleError::NotFound {
            target: target.to_owned(),
        }),
        _ => Err(HandleError::Ambiguous {
            target: target.to_owned(),
            ids: rows.into_iter().map(|r| r.id).collect(),
        }),
    }
}

/// Where a running bottle's agent is.
enum Agent {
    /// The Docker backend's agent container.
    Container { name: String },
    /// The microVM's control agent, through the VMM's vsock socket.
    Machine { control: ControlEndpoint },
}

/// A running bottle: its row, its plan, and how to reach its agent.
pub struct BottleHandle {
    pub row: BottleRow,
    pub plan: BottlePlan,
    agent: Agent,
}

impl BottleHandle {
    /// The running bottle `target` names (see [`find_live`]); a bottle still starting is
    /// refused with a hint to wait.
    pub fn find(dirs: &Dirs, target: &str) -> Result<Self, HandleError> {
        let db = StateDb::open_existing(&dirs.db_path()).map_err(HandleError::NoState)?;
        let row = find_live(&db, target)?;
        let json = db
            .plan_json(&row.id)?
            .ok_or_else(|| HandleError::NoPlan { id: row.id.clone() })?;
        let plan: BottlePlan =
            serde_json::from_str(&json).map_err(|source| HandleError::BadPlan {
                id: row.id.clone(),
                source,
            })?;
        if row.status != crate::state::Status::Running {
            return Err(HandleError::NotRunning {
                id: row.id,
                status: row.status,
            });
        }
        let agent = match plan.backend {
            Backend::Docker => Agent::Container {
                name: plan.agent.name.clone(),
            },
            Backend::Microvm => Agent::Machine {
                control: Launch::read_control(&dirs.run_dir(&row.id)).map_err(|source| {
                    HandleError::Launch {
                        id: row.id.clone(),
                        source,
                    }
                })?,
            },
        };
        Ok(Self { row, plan, agent })
    }

    /// Run `argv` in the bottle (in the agent's working directory on the microVM) with this
    /// process's stdin, stdout and stderr; returns its exit code.
    pub async fn exec(&self, argv: Vec<String>) -> Result<i32, HandleError> {
        match &self.agent {
            Agent::Container { name } => {
                let docker = crate::host::docker::connect().await?;
                Ok(crate::backend::docker::exec_in_agent(&docker, name, &argv).await?)
            }
            Agent::Machine { control } => {
                let client = self.control_client(control).await?;
                let workdir = self.plan.agent.workdir.clone();
                let (code, _) =
                    crate::backend::microvm::control::exec(client, argv, workdir).await?;
                Ok(code)
            }
        }
    }

    /// Copy `guest` out of the bottle into the local directory `local` (unpacked safely,
    /// bounded by [`transfer::max_copy_bytes`]); returns the number of entries.
    pub async fn copy_out(&self, guest: &str, local: &Path) -> Result<usize, HandleError> {
        let limit = transfer::max_copy_bytes()?;
        match &self.agent {
            Agent::Container { name } => {
                let docker = crate::host::docker::connect().await?;
                Ok(
                    crate::backend::docker::copy::copy_out(&docker, name, guest, local, limit)
                        .await?,
                )
            }
            Agent::Machine { control } => {
                let mut client = self.control_client(control).await?;
                let (guest, local) = (guest.to_owned(), local.to_path_buf());
                // Unpacked as it arrives from the guest: never held whole, and bounded.
                tokio::task::spawn_blocking(move || {
                    transfer::stream_out(move |out| client.copy_out(&guest, out), &local, limit)
                })
                .await
                .map_err(|_| HandleError::Thread("the copying thread"))?
                .map_err(HandleError::from)
            }
        }
    }

    /// Copy the local path `local` into the existing directory `guest` of the bottle.
    pub async fn copy_in(&self, local: &Path, guest: &str) -> Result<(), HandleError> {
        match &self.agent {
            Agent::Container { name } => {
                let docker = crate::host::docker::connect().await?;
                Ok(crate::backend::docker::copy::copy_in(&docker, name, local, guest).await?)
            }
            Agent::Machine { control } => {
                let mut client = self.control_client(control).await?;
                let (reader, packer) = transfer::pack_stream(local)?;
                let guest = guest.to_owned();
                tokio::task::spawn_blocking(move || -> Result<(), HandleError> {
                    let sent = client.copy_in(&guest, reader);
                    packer
                        .join()
                        .map_err(|_| HandleError::Thread("the packing thread"))??;
                    Ok(sent?)
                })
                .await
                .map_err(|_| HandleError::Thread("the copying thread"))?
            }
        }
    }

    /// A control connection to the guest: the socket, port and per-boot token from the
    /// bottle's launch file.
    async fn control_client(
        &self,
        control: &ControlEndpoint,
    ) -> Result<bottle_proto::Client<std::os::unix::net::UnixStream>, HandleError> {
        let (socket, port) = (control.socket.clone(), control.port);
        let stream =
            tokio::task::spawn_blocking(move || bottle_proto::client::connect_vsock(&socket, port))
                .await
                .map_err(|_| HandleError::Thread("the connecting thread"))?
                .map_err(|source| HandleError::Connect {
                    id: self.row.id.clone(),
                    socket: control.socket.clone(),
                    source,
                })?;
        Ok(bottle_proto::Client::new(stream, control.token.clone()))
    }
}
