//! A Docker-backend session: the bundle started while the agent container is created (its
//! addresses are planned; it needs nothing of the running bundle until it starts) and the
//! workspaces copied into it meanwhile, the bottle CA given to the agent, then the agent
//! attached until it exits.

use crate::bundle::container::{self as bundle, BundleError};
use crate::host::docker::DockerError;
use crate::session::guard::GuardStack;
use crate::session::start::{pause_point, push_remove_container, start_bundle, Session};

/// Overrides the Docker-backend runtime: `runc`, `runsc`, or `auto` (runsc when registered).
pub const RUNTIME_ENV: &str = "BOT_BOTTLE_DOCKER_RUNTIME";

#[derive(Debug, thiserror::Error)]
pub enum DockerRunError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Agent(#[from] super::BackendError),
    #[error("{RUNTIME_ENV}=runsc but gVisor's runsc is not registered with Docker: see `bot-bottle doctor`")]
    RunscMissing,
    #[error("{RUNTIME_ENV}={value} is not one of runc, runsc, auto")]
    BadRuntime { value: String },
    #[error(
        "--fresh and --tmpfs are about the microVM's writable layer: the docker backend's \
         container layer is always new (`resume` continues its kept workspace)"
    )]
    LayerFlags,
}

/// The Docker backend, with its runtime chosen.
pub struct DockerRunner {
    pub runsc: bool,
}

impl DockerRunner {
    /// Choose the runtime: runsc when registered, unless [`RUNTIME_ENV`] says otherwise.
    pub async fn prepare(docker: &bollard::Docker) -> Result<Self, DockerRunError> {
        let registered = crate::host::docker::runsc_registered(docker).await?;
        let runsc = match std::env::var(RUNTIME_ENV).as_deref() {
            Ok("runc") => false,
            Ok("runsc") if registered => true,
            Ok("runsc") => return Err(DockerRunError::RunscMissing),
            Ok("auto") | Ok("") | Err(_) => registered,
            Ok(other) => {
                return Err(DockerRunError::BadRuntime {
                    value: other.to_owned(),
                })
            }
        };
        Ok(Self { runsc })
    }

    pub async fn run(
        &self,
        session: &Session<'_>,
        stack: &mut GuardStack,
    ) -> Result<i32, DockerRunError> {
        let (docker, plan) = (session.docker, session.plan);
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
        let run = session.dirs.run_dir(&plan.id);
        bundle::prepare_run_dir(&run)?;
        push_remove_container(stack, &plan.bundle.container, false);
        push_remove_container(stack, &plan.agent.name, true);
        // The workspaces are copied into the created agent while the bundle starts: from the
        // host, or for `resume` from what the last run kept.
        let resume = session.layer == crate::backend::microvm::layer::LayerRequest::Resume;
        let sources = super::workspace::workspace_sources(session.dirs, plan, resume)?;
        let (started, created) = tokio::join!(start_bundle(session, &run), async {
            super::create_agent(docker, plan, &session.images.agent, &session.command, tty).await?;
            super::workspace::copy_workspaces(docker, plan, &sources).await
        });
        started?;
        created?;
        if !plan.egress.credential_hosts.is_empty() {
            super::install_ca(docker, plan, &run).await?;
        }
        pause_point("agent").await;
        let code =
            super::run_agent(docker, &plan.agent.name, tty, || session.mark_running()).await?;
        tracing::info!(code, "agent exited");
        if !plan.mounts.is_empty() {
            if let Err(e) = super::workspace::keep_workspaces(docker, plan, &run).await {
                crate::host::logging::say(format_args!(
                    "warning: the workspace was not kept for `resume`: {e}"
                ));
            }
        }
        Ok(code)
    }
}
