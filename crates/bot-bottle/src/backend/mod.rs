//! Where the agent runs: a Docker container (`docker/`, gVisor's runsc when registered) or a
//! microVM under our own VMM (`microvm/`). [`Runner`] is the one place `start` tells them
//! apart; once running, both are reached the same way through [`handle::BottleHandle`]: exec,
//! copy in and out (`transfer`).

pub mod docker;
pub mod handle;
pub mod microvm;
pub mod transfer;

use crate::config::manifest::Backend;
use crate::host::paths::Dirs;
use crate::plan::BottlePlan;
use crate::session::guard::GuardStack;
use crate::session::start::Session;
use crate::state::{StateDb, StateError};
use docker::session::{DockerRunError, DockerRunner};
use microvm::layer::LayerRequest;
use microvm::session::{MicrovmRunner, MicrovmSessionError};

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Docker(#[from] DockerRunError),
    #[error(transparent)]
    Microvm(#[from] MicrovmSessionError),
    #[error(transparent)]
    Paths(#[from] crate::host::paths::PathsError),
}

/// A backend, prepared for one session.
pub enum Runner {
    Docker(DockerRunner),
    Microvm(MicrovmRunner),
}

impl Runner {
    /// The backend's preflight, before anything is allocated: the runtime for Docker; KVM
    /// and the guest kernel (built when missing) for the microVM.
    pub async fn prepare(
        backend: Backend,
        dirs: &Dirs,
        docker: &bollard::Docker,
        layer: LayerRequest,
    ) -> Result<Self, RunnerError> {
        Ok(match backend {
            Backend::Docker if !matches!(layer, LayerRequest::Start | LayerRequest::Resume) => {
                return Err(DockerRunError::LayerFlags.into())
            }
            Backend::Docker => Runner::Docker(DockerRunner::prepare(docker).await?),
            Backend::Microvm => Runner::Microvm(MicrovmRunner::prepare(dirs).await?),
        })
    }

    /// Whether the agent runs under gVisor (a fact the plan records).
    pub fn runsc(&self) -> bool {
        matches!(self, Runner::Docker(DockerRunner { runsc: true }))
    }

    /// The backend's own state row: the microVM's machine row with its guest CID (0 for a
    /// container, which has none).
    pub fn allocate(&self, db: &StateDb, bottle_id: &str) -> Result<u32, StateError> {
        match self {
            Runner::Docker(_) => Ok(0),
            Runner::Microvm(_) => {
                db.create_machine(&crate::plan::machine_name(bottle_id), bottle_id)
            }
        }
    }

    /// The microVM's allowlist, verified in its machine row before the VMM may take it.
    pub fn verify(&self, db: &StateDb, plan: &BottlePlan) -> Result<(), StateError> {
        match self {
            Runner::Docker(_) => Ok(()),
            Runner::Microvm(_) => db
                .verify_allowlist(&plan.agent.name, &plan.allowlist)
                .map(drop),
        }
    }

    /// Start the agent beside its bundle and attach to it; returns its exit code.
    pub async fn run(
        &self,
        session: &Session<'_>,
        stack: &mut GuardStack,
    ) -> Result<i32, RunnerError> {
        Ok(match self {
            Runner::Docker(docker) => docker.run(session, stack).await?,
            Runner::Microvm(microvm) => microvm.run(session, stack).await?,
        })
    }
}
