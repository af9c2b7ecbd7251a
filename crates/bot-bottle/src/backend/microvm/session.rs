//! A microVM session: the root image exported while the bundle starts on the alias (where the
//! VMM dials it for the guest), the workspaces snapshotted, the writable layer held, the VMM
//! child spawned with a launch file that carries no allowlist, the guest's control agent
//! reached, the command attached; then the VMM stopped.

use std::path::{Path, PathBuf};

use super::control::{self, MicrovmRunError};
use super::launch::{self, MicrovmError};
use super::layer::{self, LayerRequest, UpperError};
use super::vmm::{describe_vmm_exit, VmmChild, VmmEnd};
use crate::bundle::container::{self as bundle, BundleError};
use crate::host::docker::DockerError;
use crate::host::paths::Dirs;
use crate::host::run_dir::RunDir;
use crate::plan::BottlePlan;
use crate::session::guard::GuardStack;
use crate::session::start::{
    pause_point, push_remove_container, push_remove_file, start_bundle, Session,
};

#[derive(Debug, thiserror::Error)]
pub enum MicrovmSessionError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Launch(#[from] MicrovmError),
    #[error(transparent)]
    Run(#[from] MicrovmRunError),
    #[error(transparent)]
    Export(#[from] crate::image::export::ExportError),
    #[error(transparent)]
    Layer(#[from] UpperError),
    #[error(transparent)]
    Workspace(#[from] crate::image::workspace::WorkspaceError),
    #[error("the microvm backend needs KVM (or choose --backend docker)")]
    Kvm(#[source] bottle_vmm::checks::kvm::KvmCheckError),
    #[error(transparent)]
    LinuxGuest(#[from] crate::host::preflight::PreflightError),
    #[error("building the guest kernel for the microvm backend (or choose --backend docker)")]
    Kernel(#[source] crate::image::kernel::KernelError),
    #[error("reading /dev/urandom")]
    Random(#[source] std::io::Error),
    #[error("locating the bot-bottle executable")]
    Exe(#[source] std::io::Error),
    #[error("{0} panicked")]
    Thread(&'static str),
}

/// The microVM backend, its host checked and its kernel found (or built).
pub struct MicrovmRunner {
    pub kernel: PathBuf,
}

impl MicrovmRunner {
    /// KVM, a KVM that runs Linux, and the guest kernel (built now, with its progress, when
    /// there is none yet: minutes, once per bot-bottle version).
    pub async fn prepare(dirs: &Dirs) -> Result<Self, MicrovmSessionError> {
        bottle_vmm::checks::kvm::check_kvm(&crate::host::preflight::kvm_path())
            .map_err(MicrovmSessionError::Kvm)?;
        tokio::task::spawn_blocking(crate::host::preflight::require_linux_guest)
            .await
            .map_err(|_| MicrovmSessionError::Thread("the KVM check"))??;
        Ok(Self {
            kernel: ensure_kernel(dirs).await?,
        })
    }

    pub async fn run(
        &self,
        session: &Session<'_>,
        stack: &mut GuardStack,
    ) -> Result<i32, MicrovmSessionError> {
        let (docker, plan) = (session.docker, session.plan);
        let init = launch::find_init()?;

        // The agent's root image for the guest (cached; an export of the agent image when
        // not), while the bundle starts on the alias, where the VMM dials it for the guest.
        let run = session.dirs.run_dir(&plan.id);
        bundle::prepare_run_dir(&run)?;
        push_remove_container(stack, &plan.bundle.container, false);
        let export = format!("bot-bottle-{}-export", plan.id);
        // A session ended while exporting leaves no export container behind.
        push_remove_container(stack, &export, true);
        let (rootfs, started) = tokio::join!(
            crate::image::export::prepare_rootfs(
                docker,
                &session.images.agent,
                &init,
                &session.dirs.cache,
                &plan.labels,
                &export,
            ),
            start_bundle(session, &run)
        );
        let (rootfs, accounts) = rootfs?;
        started?;
        let (ids, home) =
            launch::resolve_user(&plan.agent.user, &accounts.passwd, &accounts.group)?;

        // Workspaces: each host directory snapshotted read-only; the guest overlays it.
        let workspaces = snapshot_workspaces(plan, &run, (ids.uid, ids.gid), stack).await?;

        // The writable layer: the bottle's kept disk (locked while in use), or tmpfs.
        let held = layer::acquire(
            &layer::disk_path(session.dirs, &plan.bottle),
            &plan.bottle,
            session.layer,
            layer::DEFAULT_SIZE_GIB,
        )?;
        let writable = held.layer.clone();
        stack.push_sync("unlock the writable layer", move || {
            drop(held);
            Ok::<(), std::io::Error>(())
        });

        // The VMM child, with a launch file that carries no allowlist.
        let token = hex::encode(random_bytes::<16>()?);
        let mut guest = launch::guest_config(plan, &token, ids, &home, &writable);
        if !plan.egress.credential_hosts.is_empty() {
            // The bundle made the bottle's CA: the guest trusts its certificate.
            guest.ca_cert = Some(bundle::bottle_ca(&run).await?);
        }
        let launched = launch::launch(
            plan,
            &guest,
            &self.kernel,
            launch::Disks {
                rootfs: &rootfs,
                workspaces: &workspaces,
                layer: &writable,
            },
            &run,
            &session.dirs.db_path(),
        )?;
        if let Some(bytes) = &launched.config_disk {
            launch::write_private(&run.config_disk(), bytes)?;
            push_remove_file(stack, "remove the config disk".into(), run.config_disk());
        }
        launched.write(&run.launch_file())?;
        let _ = std::fs::remove_file(run.control_socket());
        // After the VMM is stopped (undone before this): its sockets, whether or not it
        // removed them itself (a VMM killed, or one that does not, leaves them).
        {
            let run = run.clone();
            stack.push_sync("remove the VMM's sockets", move || {
                run.remove_sockets();
                Ok::<(), std::io::Error>(())
            });
        }
        let mut vmm = spawn_vmm(&run.launch_file())?;
        // Normally the guest powers off and the child is reaped below; this undo stops it
        // when the session ends early. Both go through the owner: a reaped child is never
        // signalled.
        vmm.stop_on_unwind(stack);
        eprintln!(
            "bot-bottle: booting {} (console: {})",
            plan.agent.name,
            run.console_log().display()
        );
        let client =
            control::connect_control(&mut vmm, &run.control_socket(), &token, &run.console_log())
                .await?;
        session.mark_running();
        pause_point("vm").await;

        let argv = session.command.clone();
        let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
        let code = if interactive {
            // The guest powers itself off when the attached command exits.
            control::attach_pty(client, argv, plan.agent.workdir.clone()).await?
        } else {
            let (code, mut client) =
                control::exec(client, argv, plan.agent.workdir.clone()).await?;
            let _ = tokio::task::spawn_blocking(move || client.shutdown()).await;
            code
        };
        match vmm.stop_after(control::POWER_OFF_TIMEOUT).await {
            Ok(VmmEnd::Ended(status)) => {
                tracing::info!(status = %describe_vmm_exit(status), "the VMM ended")
            }
            Ok(VmmEnd::Killed(_)) => {
                tracing::warn!("the guest did not power off in time: killed the VMM")
            }
            // The undo tries again and reports it as a failed teardown step.
            Err(e) => tracing::warn!(error = %e, "cannot stop the VMM"),
        }
        Ok(code)
    }
}

/// The VMM child (`bot-bottle __vmm`, or the stand-in [`launch::VMM_ENV`] names), ending with
/// this process however it ends (PR_SET_PDEATHSIG).
fn spawn_vmm(launch_file: &Path) -> Result<VmmChild, MicrovmSessionError> {
    let exe = match std::env::var_os(launch::VMM_ENV) {
        Some(stand_in) => {
            eprintln!(
                "bot-bottle: the VMM is {} ({})",
                Path::new(&stand_in).display(),
                launch::VMM_ENV
            );
            PathBuf::from(stand_in)
        }
        None => std::env::current_exe().map_err(MicrovmSessionError::Exe)?,
    };
    Ok(VmmChild::spawn(
        tokio::process::Command::new(exe)
            .arg("__vmm")
            .arg("--config")
            .arg(launch_file)
            .env(
                crate::session::orphans::PARENT_PID_ENV,
                std::process::id().to_string(),
            )
            .stdin(std::process::Stdio::null()),
    )?)
}

/// The guest kernel: the configured or cached one, else built now from the kernel source
/// (what `bot-bottle kernel build` does, with its progress), once per bot-bottle version.
async fn ensure_kernel(dirs: &Dirs) -> Result<PathBuf, MicrovmSessionError> {
    use crate::image::kernel::{self, KernelBuildOptions};
    match launch::find_kernel(dirs) {
        Ok(kernel) => return Ok(kernel),
        Err(MicrovmError::NoKernel) => {}
        Err(e) => return Err(e.into()),
    }
    eprintln!(
        "bot-bottle: no guest kernel built yet: building it now (about 4 minutes on 2 cores, \
         once per bot-bottle version; `bot-bottle kernel build` does the same)"
    );
    let opts = KernelBuildOptions::new(dirs);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tokio::task::spawn_blocking(move || {
        kernel::build_kernel(&opts, &mut |p| kernel::show_on_stderr(p, tty))
    })
    .await
    .map_err(|_| MicrovmSessionError::Thread("the kernel build thread"))?
    .map_err(MicrovmSessionError::Kernel)
}

/// Snapshot every mount into the run directory (removed at teardown), owned by the agent.
async fn snapshot_workspaces(
    plan: &BottlePlan,
    run: &RunDir,
    owner: (u32, u32),
    stack: &mut GuardStack,
) -> Result<Vec<PathBuf>, MicrovmSessionError> {
    let mut images = Vec::new();
    for (i, mount) in plan.mounts.iter().enumerate() {
        let image = run.workspace_snapshot(i);
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
                crate::image::squashfs::progress_on_stderr("snapshotting the workspace");
            crate::image::workspace::snapshot_owned(&host, &out, Some(owner), &mut progress)
        })
        .await
        .map_err(|_| MicrovmSessionError::Thread("the snapshot thread"))??;
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

/// Which writable layer a run asks for.
pub fn layer_request(resume: bool, fresh: bool, tmpfs: bool) -> LayerRequest {
    match (resume, fresh, tmpfs) {
        (true, _, _) => LayerRequest::Resume,
        (_, true, _) => LayerRequest::Fresh,
        (_, _, true) => LayerRequest::Tmpfs,
        _ => LayerRequest::Start,
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], MicrovmSessionError> {
    use std::io::Read as _;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(MicrovmSessionError::Random)?;
    Ok(bytes)
}
