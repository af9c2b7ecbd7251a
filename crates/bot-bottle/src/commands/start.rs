//! `bot-bottle start`: preflight, plan, allocate, build, run, attach; tear down on the way out.

use anyhow::{bail, Context as _};
use bot_bottle::config::manifest::Backend;
use bot_bottle::host::logging::say;
use bot_bottle::host::{docker, preflight};
use bot_bottle::plan::{self, BottlePlan, HostFacts};
use bot_bottle::session::guard::GuardStack;
use bot_bottle::state::alias;
use bot_bottle::state::{Owner, StateDb};
use tokio::signal::unix::{signal, SignalKind};
use tracing::Instrument as _;

use super::Context;

/// Test hook: pause after the named step until a signal arrives (used by the kill tests).
const PAUSE_ENV: &str = "BOT_BOTTLE_PAUSE_AT";

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Bottle name (bundled: claude, codex, test; or your own).
    bottle: String,
    /// Isolation backend (default: $BOT_BOTTLE_BACKEND, else the manifest's, else microvm).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Host directory shown read-only with a writable overlay, HOST[:GUEST] (repeatable).
    #[arg(long = "mount", value_name = "HOST[:GUEST]")]
    mounts: Vec<String>,
    /// microVM: keep the writable layer in guest memory (gone at power-off) instead of the
    /// bottle's kept disk.
    #[arg(long, conflicts_with = "fresh")]
    tmpfs: bool,
    /// microVM: discard the bottle's kept writable layer and start a new one.
    #[arg(long)]
    fresh: bool,
    /// Set by `bot-bottle resume`: continue the kept writable layer.
    #[arg(skip)]
    pub resume: bool,
    /// Run this command in the bottle instead of the agent, then tear down; exit code passes through.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Why the session ended early: the signal that ended it.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {name}: tearing down")]
struct Interrupted {
    name: &'static str,
    signal: i32,
}

impl Interrupted {
    /// The shell's convention: 128 + the signal's number.
    fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

/// Every signal whose default action would end `start` without its teardown (SIGKILL and
/// SIGSTOP cannot be caught: the reaper covers SIGKILL). SIGHUP is also what a closed terminal
/// or a lost SSH session sends; SIGPIPE what writing to a closed pipe does once handled.
const ENDING_SIGNALS: &[(&str, nix::sys::signal::Signal)] = &[
    ("Ctrl-C", nix::sys::signal::Signal::SIGINT),
    ("SIGTERM", nix::sys::signal::Signal::SIGTERM),
    ("SIGHUP", nix::sys::signal::Signal::SIGHUP),
    ("SIGQUIT", nix::sys::signal::Signal::SIGQUIT),
    ("SIGPIPE", nix::sys::signal::Signal::SIGPIPE),
];

/// Resolves with the first of [`ENDING_SIGNALS`] that arrives.
struct EndingSignals(Vec<(&'static str, i32, tokio::signal::unix::Signal)>);

impl EndingSignals {
    fn install() -> anyhow::Result<Self> {
        let mut streams = Vec::new();
        for &(name, sig) in ENDING_SIGNALS {
            let stream = signal(SignalKind::from_raw(sig as i32))
                .with_context(|| format!("installing the {name} handler"))?;
            streams.push((name, sig as i32, stream));
        }
        Ok(Self(streams))
    }

    async fn recv(&mut self) -> Interrupted {
        let waits = self.0.iter_mut().map(|(name, signal, stream)| {
            Box::pin(async move {
                stream.recv().await;
                Interrupted {
                    name,
                    signal: *signal,
                }
            })
        });
        futures_util::future::select_all(waits).await.0
    }
}

pub async fn run(ctx: &Context, args: StartArgs) -> anyhow::Result<i32> {
    let resolved = super::resolve(ctx, &args.bottle, args.backend, &args.mounts)?;
    let id = super::new_bottle_id(&resolved.manifest.name)?;
    let span = tracing::info_span!("bottle", bottle_id = %id);
    let mut signals = EndingSignals::install()?;
    // Before anything is acquired: the reaper outlives this process and removes what the
    // bottle left if it dies without its teardown (SIGKILL).
    ctx.dirs.ensure_state()?;
    let exe = std::env::current_exe().context("locating the bot-bottle executable")?;
    let reaper = bot_bottle::session::orphans::Reaper::spawn(&exe, &id)?;
    tracing::debug!(parent: &span, reaper = reaper.pid(), "reaper started");
    let mut stack = GuardStack::new(id.clone());
    let outcome = tokio::select! {
        r = session(ctx, &args, resolved, &id, &mut stack).instrument(span.clone()) => r,
        interrupted = signals.recv() => Err(interrupted.into()),
    };
    let errors = stack.unwind().instrument(span).await;
    for e in &errors {
        say(format_args!("teardown: {e}: {}", e.source));
    }
    if errors.is_empty() {
        reaper.dismiss();
    } else {
        // The reaper tries again once this process is gone.
        drop(reaper);
    }
    match outcome {
        Ok(code) if errors.is_empty() => Ok(code),
        Ok(_) => bail!(
            "{} teardown step(s) failed: run `bot-bottle cleanup`",
            errors.len()
        ),
        Err(err) => match err.downcast::<Interrupted>() {
            Ok(interrupted) => {
                say(format_args!("{interrupted}"));
                Ok(interrupted.exit_code())
            }
            Err(err) => Err(err),
        },
    }
}

/// Overrides the Docker-backend runtime: `runc`, `runsc`, or `auto` (runsc when registered).
const RUNTIME_ENV: &str = "BOT_BOTTLE_DOCKER_RUNTIME";

async fn choose_runsc(docker: &bollard::Docker) -> anyhow::Result<bool> {
    let registered = docker::runsc_registered(docker).await?;
    match std::env::var(RUNTIME_ENV).as_deref() {
        Ok("runc") => Ok(false),
        Ok("runsc") if registered => Ok(true),
        Ok("runsc") => bail!(
            "{RUNTIME_ENV}=runsc but gVisor's runsc is not registered with Docker: see `bot-bottle doctor`"
        ),
        Ok("auto") | Ok("") | Err(_) => Ok(registered),
        Ok(other) => bail!("{RUNTIME_ENV}={other} is not one of runc, runsc, auto"),
    }
}

async fn pause_point(step: &str) {
    if std::env::var(PAUSE_ENV).is_ok_and(|v| v == step) {
        say(format_args!("paused at {step}"));
        std::future::pending::<()>().await;
    }
}

async fn session(
    ctx: &Context,
    args: &StartArgs,
    resolved: super::Resolved,
    id: &str,
    stack: &mut GuardStack,
) -> anyhow::Result<i32> {
    if resolved.backend == Backend::Docker && (args.resume || args.fresh || args.tmpfs) {
        bail!(
            "resume, --fresh and --tmpfs are about the microVM's writable layer: the docker \
             backend's container layer is always new"
        );
    }
    // Preflight: Docker always (the sidecar bundle runs there), KVM for the microVM.
    let docker = docker::connect().await?;
    // The guest kernel, for the microVM (and only for it).
    let kernel = match resolved.backend {
        Backend::Microvm => {
            bottle_vmm::kvm_check::check_kvm(&preflight::kvm_path())
                .context("the microvm backend needs KVM (or choose --backend docker)")?;
            tokio::task::spawn_blocking(preflight::require_linux_guest)
                .await?
                .map_err(anyhow::Error::msg)?;
            // Before anything is allocated: the first microVM start builds it (minutes).
            Some(ensure_kernel(ctx).await?)
        }
        Backend::Docker => None,
    };
    let runsc = resolved.backend == Backend::Docker && choose_runsc(&docker).await?;
    ctx.dirs.ensure_state()?;
    let db_path = ctx.dirs.db_path();
    let db = StateDb::open(&db_path)?;

    // Allocate: the loopback alias under the pool lock.
    let pool = alias::pool_from_env()?;
    let published = docker::published_aliases(&docker).await?;
    let lease = {
        let (db_path, lock, pool, id) = (
            db_path.clone(),
            ctx.dirs.alias_lock_path(),
            pool.clone(),
            id.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            let ports = [plan::PROXY_PORT, plan::GIT_GATE_PORT, plan::SUPERVISOR_PORT];
            alias::allocate(&db_path, &lock, &pool, &published, &ports, &id)
        })
        .await??
    };
    let alias_addr = lease.addr();
    stack.push_sync("release loopback alias", move || lease.release());
    tracing::info!(alias = %alias_addr, "alias leased");

    // The bottle row (owned by this process) and, for the microVM, the machine row with its CID.
    db.insert_bottle(
        id,
        &resolved.manifest.name,
        &resolved.backend.to_string(),
        Some(alias_addr),
        Owner::current(),
        "{}",
    )?;
    {
        let (db_path, id) = (db_path.clone(), id.to_owned());
        stack.push_sync("remove state row", move || {
            StateDb::open(&db_path).and_then(|db| db.delete_bottle(&id))
        });
    }
    prune_old_runs(ctx, &db).await;
    let machine = format!("bot-bottle-{id}-vm");
    let guest_cid = match resolved.backend {
        Backend::Microvm => db.create_machine(&machine, id)?,
        Backend::Docker => 0,
    };
    let facts = HostFacts {
        bottle_id: id.to_owned(),
        alias: alias_addr,
        guest_cid,
        backend: resolved.backend,
        mounts: resolved.mounts.clone(),
        runsc,
        state_tag: ctx.dirs.state_tag(),
    };
    let plan = plan::plan(&resolved.manifest, &facts)?;
    db.set_plan(id, &serde_json::to_string(&plan)?)?;
    // Credentials: read on the host now, handed to the bundle's proxy only.
    let (credentials, warnings) =
        bot_bottle::bundle::runtime::resolve_credentials(&resolved.manifest.credentials, |var| {
            std::env::var(var).ok()
        });
    for w in warnings {
        say(format_args!("warning: {w}"));
    }
    if resolved.backend == Backend::Microvm {
        db.verify_allowlist(&machine, &plan.allowlist)
            .context("verifying the machine allowlist")?;
    }
    pause_point("allocated").await;

    // Docker objects: the networks, while the images are checked (built when missing).
    let (networks, images) = tokio::join!(
        create_networks(&docker, &plan, stack),
        build_images(ctx, &docker, &plan)
    );
    networks?;
    pause_point("network").await;
    let images = images?;
    pause_point("images").await;

    let inputs = Inputs {
        images,
        credentials: &credentials,
    };
    match kernel {
        Some(kernel) => run_microvm(ctx, &docker, &plan, args, &kernel, &inputs, stack).await,
        None => run_docker(ctx, &docker, &plan, args, &inputs, stack).await,
    }
}

async fn create_networks(
    docker: &bollard::Docker,
    plan: &BottlePlan,
    stack: &mut GuardStack,
) -> anyhow::Result<()> {
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

fn push_remove_network(stack: &mut GuardStack, name: &str, beside: bool) {
    let name = name.to_owned();
    let step = format!("remove network {name}");
    let undo = move || async move {
        let docker = docker::connect().await?;
        docker::remove_network(&docker, &name).await
    };
    if beside {
        stack.push_beside(step, undo);
    } else {
        stack.push(step, undo);
    }
}

async fn run_docker(
    ctx: &Context,
    docker: &bollard::Docker,
    plan: &BottlePlan,
    args: &StartArgs,
    inputs: &Inputs<'_>,
    stack: &mut GuardStack,
) -> anyhow::Result<i32> {
    use bot_bottle::backend::docker as docker_backend;
    let (images, credentials) = (&inputs.images, inputs.credentials);
    // The agent (on the internal network only) is created while the bundle starts: its
    // addresses are planned, it needs nothing of the running bundle until it starts.
    let command = if args.command.is_empty() {
        plan.agent.command.clone()
    } else {
        args.command.clone()
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let bottle_dir = ctx.dirs.bottle_dir(&plan.id);
    docker_backend::prepare_log_dir(&bottle_dir)?;
    push_remove_container(stack, &plan.bundle.container, false);
    push_remove_container(stack, &plan.agent.name, true);
    let (bundle, agent) = tokio::join!(
        start_bundle(docker, plan, &images.sidecar, &bottle_dir, credentials),
        docker_backend::create_agent(docker, plan, &images.agent, &command, tty)
    );
    bundle?;
    agent?;
    if !plan.egress.credential_hosts.is_empty() {
        docker_backend::install_ca(docker, plan, &bottle_dir).await?;
    }
    pause_point("agent").await;
    let code = docker_backend::run_agent(docker, &plan.agent.name, tty, || {
        mark_running(ctx, &plan.id)
    })
    .await?;
    tracing::info!(code, "agent exited");
    Ok(code)
}

/// The agent is up: `list` shows it running and `exec`/`cp` may reach it.
fn mark_running(ctx: &Context, id: &str) {
    let result = StateDb::open(&ctx.dirs.db_path()).and_then(|db| db.set_status(id, "running"));
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot record the bottle as running");
    }
}

/// The two images every backend needs.
struct Images {
    sidecar: String,
    agent: String,
}

/// What both backends' runs start from: the images, and the credentials read on the host for
/// the bundle's proxy only.
struct Inputs<'a> {
    images: Images,
    credentials: &'a [bot_bottle::bundle::runtime::SidecarCredential],
}

/// The sidecar (this binary) and the agent image, each built once per content hash.
async fn build_images(
    ctx: &Context,
    docker: &bollard::Docker,
    plan: &BottlePlan,
) -> anyhow::Result<Images> {
    use bot_bottle::image::build as images;
    let spec = images::load_dockerfile(&plan.agent.dockerfile, &ctx.dirs.bottles_dir())?;
    let image_labels = std::collections::BTreeMap::from([(
        bot_bottle::plan::LABEL_MANAGED.to_owned(),
        "true".to_owned(),
    )]);
    // Both at once: usually two cache checks, a build of either when its content changed.
    let (sidecar, agent) = tokio::join!(
        images::ensure_sidecar_image(docker, &plan.labels),
        images::ensure_image(docker, &plan.agent.image_repo, &spec, &image_labels)
    );
    Ok(Images {
        sidecar: sidecar?,
        agent: agent?,
    })
}

/// The guest kernel: the configured or cached one, else built now from the kernel source
/// (what `bot-bottle kernel build` does, with its progress), once per bot-bottle version.
async fn ensure_kernel(ctx: &Context) -> anyhow::Result<std::path::PathBuf> {
    use bot_bottle::backend::microvm::launch::{self as microvm, MicrovmError};
    use bot_bottle::image::kernel::{self, KernelBuildOptions};
    match microvm::find_kernel(&ctx.dirs) {
        Ok(kernel) => return Ok(kernel),
        Err(MicrovmError::NoKernel) => {}
        Err(e) => return Err(e.into()),
    }
    eprintln!(
        "bot-bottle: no guest kernel built yet: building it now (about 4 minutes on 2 cores, \
         once per bot-bottle version; `bot-bottle kernel build` does the same)"
    );
    let opts = KernelBuildOptions::new(&ctx.dirs);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tokio::task::spawn_blocking(move || {
        kernel::build_kernel(&opts, &mut |p| super::kernel::show(p, tty))
    })
    .await
    .context("the kernel build thread panicked")?
    .context("building the guest kernel for the microvm backend (or choose --backend docker)")
}

/// The bundle: egress proxy, git gate and supervisor ports published on the alias only, in
/// `bottle_dir` (logs, sockets), which the caller prepared. The caller pushed its undo.
async fn start_bundle(
    docker: &bollard::Docker,
    plan: &BottlePlan,
    sidecar_image: &str,
    bottle_dir: &std::path::Path,
    credentials: &[bot_bottle::bundle::runtime::SidecarCredential],
) -> anyhow::Result<()> {
    use bot_bottle::backend::docker as docker_backend;
    docker_backend::create_bundle(docker, plan, sidecar_image, bottle_dir, credentials).await?;
    docker_backend::start_bundle(docker, plan).await?;
    pause_point("bundle").await;
    Ok(())
}

/// Removes the directories of ended runs beyond the newest few of each bottle (their logs);
/// a failure is only a warning: it must not stop the session.
async fn prune_old_runs(ctx: &Context, db: &StateDb) {
    use bot_bottle::state::retention;
    // Listed before the rows are read (see `retention`).
    let root = ctx.dirs.runs_dir();
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

/// Undo: remove a file this run made (gone already is fine).
fn push_remove_file(stack: &mut GuardStack, what: String, path: std::path::PathBuf) {
    stack.push_sync(what, move || match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    });
}

fn push_remove_container(stack: &mut GuardStack, name: &str, beside: bool) {
    let name = name.to_owned();
    let step = format!("remove container {name}");
    let undo = move || async move {
        let docker = docker::connect().await?;
        docker::remove_container(&docker, &name).await
    };
    if beside {
        stack.push_beside(step, undo);
    } else {
        stack.push(step, undo);
    }
}

async fn run_microvm(
    ctx: &Context,
    docker: &bollard::Docker,
    plan: &BottlePlan,
    args: &StartArgs,
    kernel: &std::path::Path,
    inputs: &Inputs<'_>,
    stack: &mut GuardStack,
) -> anyhow::Result<i32> {
    let (images, credentials) = (&inputs.images, inputs.credentials);
    use bot_bottle::backend::docker as docker_backend;
    use bot_bottle::backend::microvm::launch as microvm;
    use bot_bottle::backend::microvm::run as microvm_run;
    let init = microvm::find_init()?;

    // The agent's root image for the guest (cached; an export of the agent image when not),
    // while the bundle starts on the alias, where the VMM dials it for the guest.
    let bottle_dir = ctx.dirs.bottle_dir(&plan.id);
    docker_backend::prepare_log_dir(&bottle_dir)?;
    push_remove_container(stack, &plan.bundle.container, false);
    let export = format!("bot-bottle-{}-export", plan.id);
    let (rootfs, bundle) = tokio::join!(
        microvm_run::prepare_rootfs(
            docker,
            &images.agent,
            &init,
            &ctx.dirs.cache,
            &plan.labels,
            &export,
        ),
        start_bundle(docker, plan, &images.sidecar, &bottle_dir, credentials)
    );
    let (rootfs, accounts) = rootfs?;
    bundle?;
    let (ids, home) = microvm::resolve_user(&plan.agent.user, &accounts.passwd, &accounts.group)?;

    // Workspaces: each host directory snapshotted read-only; the guest overlays it.
    let workspaces = snapshot_workspaces(plan, &bottle_dir, stack).await?;

    // The writable layer: the bottle's kept disk (locked while in use), or tmpfs.
    let request = match (args.resume, args.fresh, args.tmpfs) {
        (true, _, _) => bot_bottle::backend::microvm::layer::LayerRequest::Resume,
        (_, true, _) => bot_bottle::backend::microvm::layer::LayerRequest::Fresh,
        (_, _, true) => bot_bottle::backend::microvm::layer::LayerRequest::Tmpfs,
        _ => bot_bottle::backend::microvm::layer::LayerRequest::Start,
    };
    let held = bot_bottle::backend::microvm::layer::acquire(
        &bot_bottle::backend::microvm::layer::disk_path(&ctx.dirs, &plan.bottle),
        &plan.bottle,
        request,
        bot_bottle::backend::microvm::layer::DEFAULT_SIZE_GIB,
    )?;
    let layer = held.layer.clone();
    stack.push_sync("unlock the writable layer", move || {
        drop(held);
        Ok::<(), std::io::Error>(())
    });

    // The VMM child, with a launch file that carries no allowlist.
    let token = hex::encode(random_bytes::<16>()?);
    let mut guest = microvm::guest_config(plan, &token, ids, &home, &layer);
    if !plan.egress.credential_hosts.is_empty() {
        // The bundle made the bottle's CA: the guest trusts its certificate.
        guest.ca_cert = Some(bot_bottle::backend::docker::bottle_ca(&bottle_dir).await?);
    }
    let launch = microvm::launch(
        plan,
        &guest,
        kernel,
        microvm::Disks {
            rootfs: &rootfs,
            workspaces: &workspaces,
            layer: &layer,
        },
        &bottle_dir,
        &ctx.dirs.db_path(),
    )?;
    if let Some(bytes) = &launch.config_disk {
        let disk = bottle_dir.join(microvm::CONFIG_DISK);
        microvm::write_private(&disk, bytes)?;
        push_remove_file(stack, "remove the config disk".into(), disk);
    }
    let launch_path = microvm::launch_file(&bottle_dir);
    launch.write(&launch_path)?;
    let uds = microvm::control_socket(&bottle_dir);
    let console = microvm::console_log(&bottle_dir);
    let _ = std::fs::remove_file(&uds);
    // After the VMM is stopped (undone before this): its sockets, whether or not it removed
    // them itself (a VMM killed, or one that does not, leaves them).
    {
        let bottle_dir = bottle_dir.clone();
        stack.push_sync("remove the VMM's sockets", move || {
            bot_bottle::session::orphans::remove_sockets(&bottle_dir);
            Ok::<(), std::io::Error>(())
        });
    }
    let exe = match std::env::var_os(microvm::VMM_ENV) {
        Some(stand_in) => {
            eprintln!(
                "bot-bottle: the VMM is {} ({})",
                std::path::Path::new(&stand_in).display(),
                microvm::VMM_ENV
            );
            std::path::PathBuf::from(stand_in)
        }
        None => std::env::current_exe().context("locating the bot-bottle executable")?,
    };
    let mut vmm = microvm_run::VmmChild::spawn(
        tokio::process::Command::new(exe)
            .arg("__vmm")
            .arg("--config")
            .arg(&launch_path)
            // The VMM ends with this process, however it ends (PR_SET_PDEATHSIG).
            .env(
                bot_bottle::session::orphans::PARENT_PID_ENV,
                std::process::id().to_string(),
            )
            .stdin(std::process::Stdio::null()),
    )?;
    // Normally the guest powers off and the child is reaped below; this undo stops it when
    // the session ends early. Both go through the owner: a reaped child is never signalled.
    vmm.stop_on_unwind(stack);
    eprintln!(
        "bot-bottle: booting {} (console: {})",
        plan.agent.name,
        console.display()
    );
    let client = microvm_run::connect_control(&mut vmm, &uds, &token, &console).await?;
    mark_running(ctx, &plan.id);
    pause_point("vm").await;

    let argv = if args.command.is_empty() {
        plan.agent.command.clone()
    } else {
        args.command.clone()
    };
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let code = if interactive {
        // The guest powers itself off when the attached command exits.
        microvm_run::attach_pty(client, argv, plan.agent.workdir.clone()).await?
    } else {
        let (code, mut client) =
            microvm_run::exec(client, argv, plan.agent.workdir.clone()).await?;
        let _ = tokio::task::spawn_blocking(move || client.shutdown()).await;
        code
    };
    match vmm.stop_after(microvm_run::POWER_OFF_TIMEOUT).await {
        Ok(microvm_run::VmmEnd::Ended(status)) => {
            tracing::info!(status = %microvm_run::describe_vmm_exit(status), "the VMM ended")
        }
        Ok(microvm_run::VmmEnd::Killed(_)) => {
            tracing::warn!("the guest did not power off in time: killed the VMM")
        }
        // The undo tries again and reports it as a failed teardown step.
        Err(e) => tracing::warn!(error = %e, "cannot stop the VMM"),
    }
    Ok(code)
}

/// Snapshot every mount into `bottle_dir/workspace-N.sqfs` (removed at teardown).
async fn snapshot_workspaces(
    plan: &BottlePlan,
    bottle_dir: &std::path::Path,
    stack: &mut GuardStack,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut images = Vec::new();
    for (i, mount) in plan.mounts.iter().enumerate() {
        let image = bottle_dir.join(format!("workspace-{i}.sqfs"));
        push_remove_file(
            stack,
            format!("remove workspace snapshot {i}"),
            image.clone(),
        );
        eprintln!(
            "bot-bottle: snapshotting {} for {}",
            mount.host.display(),
            mount.guest.display()
        );
        let (host, out) = (mount.host.clone(), image.clone());
        let stats = tokio::task::spawn_blocking(move || {
            let mut progress =
                bot_bottle::image::squashfs::progress_on_stderr("snapshotting the workspace");
            bot_bottle::image::workspace::snapshot(&host, &out, &mut progress)
        })
        .await
        .context("the snapshot thread panicked")??;
        tracing::info!(
            files = stats.files,
            dirs = stats.dirs,
            symlinks = stats.symlinks,
            hardlinks = stats.hardlinks,
            skipped = stats.skipped,
            bytes = stats.bytes,
            image_bytes = stats.image.image_bytes,
            "workspace snapshot"
        );
        images.push(image);
    }
    Ok(images)
}

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    use std::io::Read as _;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}
