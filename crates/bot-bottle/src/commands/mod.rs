//! One file per subcommand; `anyhow` with context at this edge only.

mod allow;
mod approvals;
mod approve;
pub mod cleanup;
mod cp;
mod deny;
mod diff;
mod doctor;
mod exec;
mod gate;
mod git_hook;
mod kernel;
pub mod list;
mod logs;
mod plan;
mod pull;
mod reaper;
mod sidecar;
mod start;
pub mod stop;
pub mod vmm;

use clap::{Parser, Subcommand};

use bot_bottle::config::manifest::ManifestSource;
use bot_bottle::host::paths::Dirs;

/// Run AI coding agents (Claude Code, Codex) inside a sandbox they cannot talk their way out of.
#[derive(Debug, Parser)]
#[command(name = "bot-bottle", version, about, propagate_version = true)]
pub struct Cli {
    /// More logging (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build what is missing, start the bottle and attach to its agent.
    Start(start::StartArgs),
    /// Run a command in a running bottle (its exit code passes through).
    Exec(exec::ExecArgs),
    /// Copy files out of (BOTTLE:/path DIR) or into (PATH BOTTLE:/dir) a running bottle.
    Cp(cp::CpArgs),
    /// Start a bottle again on the writable layer its last microVM run kept.
    Resume(start::StartArgs),
    /// Let a running bottle reach more hosts until it stops (egress rules).
    Allow(allow::AllowArgs),
    /// Requests waiting for approval (`[egress] unknown = "ask"`): answer them in a terminal UI.
    Approvals(approvals::ApprovalsArgs),
    /// Let a request waiting for approval through (once, for the session, or saved).
    Approve(approve::ApproveArgs),
    /// Refuse a request waiting for approval (and its host:port until the bottle stops).
    Deny(deny::DenyArgs),
    /// List running bottles.
    List(list::ListArgs),
    /// Stop a running bottle (its `start` tears everything down).
    Stop(stop::StopArgs),
    /// Remove everything a killed run left behind (state rows, Docker objects, leases).
    Cleanup(cleanup::CleanupArgs),
    /// Check the host: Docker, KVM, state directory; each problem with its fix.
    Doctor(doctor::DoctorArgs),
    /// Print the resolved plan of a bottle without touching anything.
    Plan(plan::PlanArgs),
    /// Build the guest kernel for the microVM backend.
    Kernel(kernel::KernelArgs),
    /// Show a bottle's logs (egress decisions).
    Logs(logs::LogsArgs),
    /// Show what the agent changed in a running bottle's workspaces (against the host).
    Diff(diff::DiffArgs),
    /// Fetch what the agent pushed to the bottle's git gate into refs/remotes/bottle/*.
    Pull(pull::PullArgs),
    /// Run the sidecar bundle (inside its container; started by `start`).
    #[command(hide = true)]
    Sidecar,
    /// Run a microVM (the VMM child process of `start`).
    #[command(hide = true, name = "__vmm")]
    Vmm(vmm::VmmArgs),
    /// Watch a `start` and remove what its bottle left when it dies (spawned by `start`).
    #[command(hide = true, name = "__reaper")]
    Reaper(reaper::ReaperArgs),
    /// The git gate's hooks (run by git on the host for a push to a bottle's gate).
    #[command(hide = true, name = "__git-hook")]
    GitHook(git_hook::GitHookArgs),
    /// The git gate's server for one bottle run (spawned by `start`).
    #[command(hide = true, name = "__gate")]
    Gate(gate::GateArgs),
}

/// What every command needs: where things live, where manifests come from.
pub struct Context {
    pub dirs: Dirs,
    pub manifests: ManifestSource,
}

impl Context {
    fn from_env() -> anyhow::Result<Self> {
        let dirs = Dirs::from_env()?;
        let manifests = ManifestSource::new(dirs.bottles_dir());
        Ok(Self { dirs, manifests })
    }
}

/// Run a command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    // The sidecar (inside a FROM scratch container) and the VMM child have no HOME or XDG
    // dirs to resolve: they get everything from their launch configuration.
    let ctx = Context::from_env;
    match cli.command {
        Command::Sidecar => sidecar::run().await,
        Command::Vmm(args) => vmm::run(args).await,
        Command::Start(args) => start::run(&ctx()?, args).await,
        Command::Resume(mut args) => {
            args.resume = true;
            start::run(&ctx()?, args).await
        }
        Command::Allow(args) => allow::run(&ctx()?, args).await,
        Command::Approvals(args) => approvals::run(&ctx()?, args).await,
        Command::Approve(args) => approve::run(&ctx()?, args).await,
        Command::Deny(args) => deny::run(&ctx()?, args).await,
        Command::List(args) => list::run(&ctx()?, args).await,
        Command::Exec(args) => exec::run(&ctx()?, args).await,
        Command::Cp(args) => cp::run(&ctx()?, args).await,
        Command::Stop(args) => stop::run(&ctx()?, args).await,
        Command::Cleanup(args) => cleanup::run(&ctx()?, args).await,
        Command::Doctor(args) => doctor::run(&ctx()?, args).await,
        Command::Plan(args) => plan::run(&ctx()?, args).await,
        Command::Logs(args) => logs::run(&ctx()?, args).await,
        Command::Kernel(args) => kernel::run(&ctx()?, args).await,
        Command::Reaper(args) => reaper::run(&ctx()?, args).await,
        Command::Pull(args) => pull::run(&ctx()?, args).await,
        Command::Diff(args) => diff::run(&ctx()?, args).await,
        Command::GitHook(args) => git_hook::run(args).await,
        Command::Gate(args) => gate::run(args).await,
    }
}

/// A bottle resolved from the command line: manifest, backend, checked mounts.
pub struct Resolved {
    pub manifest: bot_bottle::config::manifest::Manifest,
    pub backend: bot_bottle::config::manifest::Backend,
    pub mounts: Vec<bot_bottle::plan::HostMount>,
}

/// Load the manifest, pick the backend (flag, else `$BOT_BOTTLE_BACKEND`, else manifest, else
/// microvm) and check mounts.
pub fn resolve(
    ctx: &Context,
    bottle: &str,
    backend: Option<bot_bottle::config::manifest::Backend>,
    mount_args: &[String],
) -> anyhow::Result<Resolved> {
    use anyhow::Context as _;
    let manifest = ctx.manifests.load(bottle)?;
    let backend = match backend {
        Some(chosen) => Some(chosen),
        None => bot_bottle::config::manifest::backend_from_env()?,
    };
    let backend = backend
        .or(manifest.backend)
        .unwrap_or(bot_bottle::config::manifest::Backend::Microvm);
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut mounts = Vec::new();
    for m in &manifest.mounts {
        mounts.push(bot_bottle::config::mounts::check_host(
            m,
            &ctx.dirs.home,
            &cwd,
        )?);
    }
    for arg in mount_args {
        let m = bot_bottle::config::mounts::parse_arg(arg)?;
        mounts.push(bot_bottle::config::mounts::check_host(
            &m,
            &ctx.dirs.home,
            &cwd,
        )?);
    }
    Ok(Resolved {
        manifest,
        backend,
        mounts,
    })
}

/// A new bottle id: `<name>-<6 hex digits>` from the kernel's random source.
pub fn new_bottle_id(name: &str) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 3];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| anyhow::anyhow!("cannot read /dev/urandom for a bottle id: {e}"))?;
    Ok(format!("{name}-{}", hex::encode(bytes)))
}
