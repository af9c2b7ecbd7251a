//! The start sequence, in the order it runs: the backend's preflight, the loopback alias
//! (under the pool lock), the state rows, the plan, the credentials read on the host, the
//! networks while the images are checked, then the backend's own run ([`crate::backend`]):
//! bundle, agent, attach. Every step that acquires something pushes its undo on the caller's
//! guard stack; the caller unwinds it however the session ends.

use std::collections::BTreeMap;

use crate::backend::{Runner, RunnerError};
use crate::bundle::runtime::SidecarCredential;
use crate::config::manifest::{Backend, Manifest};
use crate::host::docker::{self, DockerError};
use crate::host::logging::say;
use crate::host::paths::Dirs;
use crate::plan::{self, BottlePlan, HostFacts, HostMount};
use crate::session::guard::GuardStack;
use crate::state::{alias, retention, Owner, StateDb, StateError};

/// Test hook: pause after the named step until a signal arrives (used by the kill tests).
const PAUSE_ENV: &str = "BOT_BOTTLE_PAUSE_AT";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Alias(#[from] alias::AliasError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    Image(#[from] crate::image::build::ImageError),
    #[error("verifying the machine allowlist")]
    VerifyAllowlist(#[source] StateError),
    #[error("cannot record the plan")]
    PlanJson(#[source] serde_json::Error),
    #[error("the alias allocation thread panicked")]
    AllocationThread,
    #[error(transparent)]
    GateRepo(#[from] crate::bundle::gate::repo::RepoError),
    #[error(transparent)]
    GateServer(#[from] crate::bundle::gate::server::ServerError),
    #[error("locating the bot-bottle executable (for the git gate's hooks)")]
    Exe(#[source] std::io::Error),
    #[error("the git gate's preparation thread panicked")]
    GateThread,
    #[error(transparent)]
    Bundle(#[from] crate::bundle::container::BundleError),
}

/// What `start` was asked for, resolved from the command line and the manifest.
pub struct StartRequest<'a> {
    pub dirs: &'a Dirs,
    pub id: &'a str,
    pub manifest: Manifest,
    pub backend: Backend,
    pub mounts: Vec<HostMount>,
    /// The command to run instead of the agent's (empty: the agent's).
    pub command: Vec<String>,
    /// microVM: which writable layer (Docker refuses anything but a fresh container layer).
    pub layer: crate::backend::microvm::layer::LayerRequest,
}

/// The two images every backend needs.
pub struct Images {
    pub sidecar: String,
    pub agent: String,
}

/// What the backends' runs start from.
pub struct Session<'a> {
    pub dirs: &'a Dirs,
    pub docker: &'a bollard::Docker,
    pub plan: &'a BottlePlan,
    pub images: Images,
    /// Read on the host for the bundle's proxy only.
    pub credentials: &'a [SidecarCredential],
    /// The command the agent runs (the request's, else the plan's).
    pub command: Vec<String>,
    pub layer: crate::backend::microvm::layer::LayerRequest,
}

impl Session<'_> {
    /// The agent is up: `list` shows it running and `exec`/`cp` may reach it.
    pub fn mark_running(&self) {
        let result = StateDb::open(&self.dirs.db_path())
            .and_then(|db| db.set_status(&self.plan.id, crate::state::Status::Running));
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot record the bottle as running");
        }
    }
}

/// Run the whole session of bottle `req.id`; returns the agent's exit code.
pub async fn run(req: StartRequest<'_>, stack: &mut GuardStack) -> Result<i32, SessionError> {
    let docker = docker::connect().await?;
    // The backend's own preflight (KVM and the kernel, or the runtime), before anything is
    // allocated.
    let runner = Runner::prepare(req.backend, req.dirs, &docker, req.layer).await?;
    req.dirs.ensure_state().map_err(RunnerError::from)?;
    let db_path = req.dirs.db_path();
    let db = StateDb::open(&db_path)?;

    // Allocate: the loopback alias under the pool lock.
    let pool = alias::pool_from_env()?;
    let published = docker::published_aliases(&docker).await?;
    let lease = {
        let (db_path, lock, id) = (
            db_path.clone(),
            req.dirs.alias_lock_path(),
            req.id.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            let ports = [plan::PROXY_PORT, plan::GIT_GATE_PORT, plan::SUPERVISOR_PORT];
            alias::allocate(&db_path, &lock, &pool, &published, &ports, &id)
        })
        .await
        .map_err(|_| SessionError::AllocationThread)??
    };
    let alias_addr = lease.addr();
    stack.push_sync("release loopback alias", move || lease.release());
    tracing::info!(alias = %alias_addr, "alias leased");

    // The bottle row (owned by this process) and the backend's own row (the machine's CID).
    db.insert_bottle(
        req.id,
        &req.manifest.name,
        &req.backend.to_string(),
        Some(alias_addr),
        Owner::current(),
        "{}",
    )?;
    {
        let (db_path, id) = (db_path.clone(), req.id.to_owned());
        stack.push_sync("remove state row", move || {
            StateDb::open(&db_path).and_then(|db| db.delete_bottle(&id))
        });
    }
    prune_old_runs(req.dirs, &db).await;
    let guest_cid = runner.allocate(&db, req.id)?;
    let facts = HostFacts {
        bottle_id: req.id.to_owned(),
        alias: alias_addr,
        guest_cid,
        backend: req.backend,
        mounts: req.mounts.clone(),
        runsc: runner.runsc(),
        state_tag: req.dirs.state_tag(),
    };
    let plan = plan::plan(&req.manifest, &facts)?;
    db.set_plan(
        req.id,
        &serde_json::to_string(&plan).map_err(SessionError::PlanJson)?,
    )?;
    // Credentials: read on the host now, handed to the bundle's proxy only.
    let (credentials, warnings) =
        crate::bundle::runtime::resolve_credentials(&req.manifest.credentials, |var| {
            std::env::var(var).ok()
        });
    for w in warnings {
        say(format_args!("warning: {w}"));
    }
    runner
        .verify(&db, &plan)
        .map_err(SessionError::VerifyAllowlist)?;
    // The git gate, served here on the host before the bundle that relays to it starts.
    if req.manifest.git.enabled {
        let server = start_gate(req.dirs, &plan, &req.manifest.git, &credentials).await?;
        stack.push_sync("stop the git gate", move || {
            drop(server);
            Ok::<(), std::io::Error>(())
        });
    }
    // `unknown = "ask"`: the terminal's title counts the requests waiting for approval.
    let _announcer = plan.egress.approval_hold_secs.map(|_| {
        AbortOnDrop(tokio::spawn(crate::host::supervise::announce(
            req.dirs.clone(),
            plan.id.clone(),
            req.manifest.name.clone(),
            plan.alias,
        )))
    });
    pause_point("allocated").await;

    // Docker objects: the networks, while the images are checked (built when missing).
    let (networks, images) = tokio::join!(
        create_networks(&docker, &plan, stack),
        build_images(req.dirs, &docker, &plan)
    );
    networks?;
    pause_point("network").await;
    let images = images?;
    pause_point("images").await;

    let command = match req.command.is_empty() {
        true => plan.agent.command.clone(),
        false => req.command,
    };
    let session = Session {
        dirs: req.dirs,
        docker: &docker,
        plan: &plan,
        images,
        credentials: &credentials,
        command,
        layer: req.layer,
    };
    Ok(runner.run(&session, stack).await?)
}

/// The bundle: egress proxy, git gate and supervisor ports published on the alias only, its
/// logs in the (prepared) run directory. The caller pushed its undo.
pub async fn start_bundle(
    session: &Session<'_>,
    run: &crate::host::run_dir::RunDir,
) -> Result<(), crate::bundle::container::BundleError> {
    let (docker, plan) = (session.docker, session.plan);
    crate::bundle::container::create_bundle(
        docker,
        plan,
        &session.images.sidecar,
        run,
        session.credentials,
    )
    .await?;
    crate::bundle::container::start_bundle(docker, plan).await?;
    pause_point("bundle").await;
    Ok(())
}

/// The git gate of this run: its repository (the first mounted git checkout's branches
/// offered), its policy with the credentials' fingerprints, and its server on the run
/// directory's socket.
async fn start_gate(
    dirs: &Dirs,
    plan: &BottlePlan,
    git: &crate::config::manifest::Git,
    credentials: &[SidecarCredential],
) -> Result<crate::bundle::gate::server::GateProcess, SessionError> {
    use crate::bundle::gate::{policy::GatePolicy, repo, server};
    let run = dirs.run_dir(&plan.id);
    crate::bundle::container::prepare_run_dir(&run)?;
    let mut fingerprints = Vec::new();
    for c in credentials {
        fingerprints.push(bottle_scan::Fingerprint::of(&c.host, &c.value));
        // `Bearer <token>`: the token alone too.
        if let Some((_, token)) = c.value.rsplit_once(' ') {
            fingerprints.push(bottle_scan::Fingerprint::of(&c.host, token));
        }
    }
    let policy = GatePolicy {
        bottle_id: plan.id.clone(),
        push: git.push.clone(),
        force: git.force,
        delete: git.delete,
        fingerprints,
        log: run.gate_log(),
    };
    let host = plan
        .mounts
        .iter()
        .map(|m| m.host.clone())
        .find(|h| repo::host_repository(h).is_some());
    let (settings, prepared_run) = (git.clone(), run.clone());
    let info = tokio::task::spawn_blocking(move || {
        repo::prepare(&prepared_run, host.as_deref(), &settings, &policy)
    })
    .await
    .map_err(|_| SessionError::GateThread)??;
    tracing::info!(host_repo = ?info.host_repo, "git gate ready");
    // Forwarding upstream, with the credential of the upstream's host: here on the host,
    // handed to the gate's server on its stdin.
    let upstream = git.upstream.as_ref().map(|url| {
        let host = crate::bundle::gate::upstream::host_of(url);
        let header = credentials
            .iter()
            .find(|c| Some(c.host.to_ascii_lowercase()) == host)
            .map(|c| (c.header.clone(), c.value.clone()));
        crate::bundle::gate::upstream::Upstream {
            url: url.clone(),
            header,
            force: git.force,
        }
    });
    let config = server::GateConfig {
        bottle_id: plan.id.clone(),
        upstream,
    };
    let exe = std::env::current_exe().map_err(SessionError::Exe)?;
    Ok(server::spawn_process(&run, &exe, &config).await?)
}

/// A task that ends with the scope that spawned it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pause here when [`PAUSE_ENV`] names `step` (the kill tests' hook).
pub async fn pause_point(step: &str) {
    if std::env::var(PAUSE_ENV).is_ok_and(|v| v == step) {
        say(format_args!("paused at {step}"));
        std::future::pending::<()>().await;
    }
}

async fn create_networks(
    docker: &bollard::Docker,
    plan: &BottlePlan,
    stack: &mut GuardStack,
) -> Result<(), DockerError> {
    // Both at once; each one created gets its undo, and both undos run together.
    let internal = async {
        match &plan.network.internal {
            Some(net) => docker::create_network(docker, &net.name, Some(&net.subnet), &plan.labels)
                .await
                .map(|()| Some(net.name.as_str())),
            None => Ok(None),
        }
    };
    let (egress, internal) = tokio::join!(
        docker::create_network(docker, &plan.network.egress, None, &plan.labels),
        internal
    );
    let mut beside = false;
    if egress.is_ok() {
        push_remove_network(stack, &plan.network.egress, false);
        beside = true;
    }
    if let Ok(Some(name)) = internal {
        push_remove_network(stack, name, beside);
    }
    egress?;
    internal?;
    Ok(())
}

/// A Docker object a run made.
#[derive(Clone, Copy)]
enum Object {
    Network,
    Container,
}

/// Undo: remove `object` `name` (gone already is fine); `beside` the undo pushed before it
/// (both run at once).
fn push_remove(stack: &mut GuardStack, object: Object, name: &str, beside: bool) {
    let name = name.to_owned();
    let step = match object {
        Object::Network => format!("remove network {name}"),
        Object::Container => format!("remove container {name}"),
    };
    let undo = move || async move {
        let docker = docker::connect().await?;
        match object {
            Object::Network => docker::remove_network(&docker, &name).await,
            Object::Container => docker::remove_container(&docker, &name).await,
        }
    };
    if beside {
        stack.push_beside(step, undo);
    } else {
        stack.push(step, undo);
    }
}

fn push_remove_network(stack: &mut GuardStack, name: &str, beside: bool) {
    push_remove(stack, Object::Network, name, beside);
}

/// Undo: remove container `name` (gone already is fine); `beside` the undo pushed before.
pub fn push_remove_container(stack: &mut GuardStack, name: &str, beside: bool) {
    push_remove(stack, Object::Container, name, beside);
}

/// Undo: remove a file this run made (gone already is fine).
pub fn push_remove_file(stack: &mut GuardStack, what: String, path: std::path::PathBuf) {
    stack.push_sync(what, move || match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    });
}

/// The sidecar (this binary) and the agent image, each built once per content hash.
async fn build_images(
    dirs: &Dirs,
    docker: &bollard::Docker,
    plan: &BottlePlan,
) -> Result<Images, crate::image::build::ImageError> {
    use crate::image::build;
    let spec = build::load_dockerfile(&plan.agent.dockerfile, &dirs.bottles_dir())?;
    let image_labels = BTreeMap::from([(plan::LABEL_MANAGED.to_owned(), "true".to_owned())]);
    // Both at once: usually two cache checks, a build of either when its content changed.
    let (sidecar, agent) = tokio::join!(
        build::ensure_sidecar_image(docker, &plan.labels),
        build::ensure_image(docker, &plan.agent.image_repo, &spec, &image_labels)
    );
    Ok(Images {
        sidecar: sidecar?,
        agent: agent?,
    })
}

/// Removes the directories of ended runs beyond the newest few of each bottle (their logs);
/// a failure is only a warning: it must not stop the session.
async fn prune_old_runs(dirs: &Dirs, db: &StateDb) {
    // Listed before the rows are read (see `retention`).
    let root = dirs.runs_dir();
    let runs = match retention::list_runs(&root) {
        Ok(runs) => runs,
        Err(e) => {
            say(format_args!("warning: {e}"));
            return;
        }
    };
    let known = match db.bottles() {
        Ok(rows) => rows.into_iter().map(|r| r.id).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "not pruning old runs: cannot list the state rows");
            return;
        }
    };
    let pruned = tokio::task::spawn_blocking(move || {
        retention::prune(&root, &runs, &known, retention::KEEP_RUNS_PER_BOTTLE)
    })
    .await;
    match pruned {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(count = removed.len(), "removed the directories of old runs")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => say(format_args!("warning: {e}")),
        Err(e) => say(format_args!("warning: pruning old runs failed: {e}")),
    }
}
