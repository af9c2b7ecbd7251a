//! Preflight checks: what `bot-bottle doctor` prints and what `start` requires.

use std::path::PathBuf;

use serde::Serialize;

use crate::host::paths::Dirs;

/// Overrides the KVM device path (tests point it at missing or forbidden paths).
pub const KVM_PATH_ENV: &str = "BOT_BOTTLE_KVM_PATH";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the doctor report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when fine).
    pub fix: String,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: String::new(),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

pub fn kvm_path() -> PathBuf {
    std::env::var_os(KVM_PATH_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(bottle_vmm::checks::kvm::DEFAULT_KVM_PATH))
}

/// The KVM check as a doctor line.
pub fn check_kvm() -> Check {
    let path = kvm_path();
    match bottle_vmm::checks::kvm::check_kvm(&path) {
        Ok(report) => Check::ok(
            "kvm",
            format!(
                "{} usable (API version {}, up to {} vCPUs)",
                report.path.display(),
                report.api_version,
                report.max_vcpus
            ),
        ),
        Err(err) => {
            let msg = err.to_string();
            // The error text carries the fix after the first ':'.
            let (detail, fix) = msg.split_once(": ").unwrap_or((&msg, ""));
            Check::fail("kvm", detail, fix)
        }
    }
}

/// Skips the "can this KVM run Linux" check in `start`: only for running our VMM on test guests
/// (the probe guest) on a host whose KVM cannot run Linux.
pub const SKIP_LINUX_CHECK_ENV: &str = "BOT_BOTTLE_SKIP_LINUX_CHECK";

/// Whether this KVM can run the microVM's Linux guest, as a doctor line (`None` when KVM
/// itself is unusable: the kvm line already says why).
pub fn check_linux_guest() -> Option<Check> {
    let path = kvm_path();
    bottle_vmm::checks::kvm::check_kvm(&path).ok()?;
    Some(match bottle_vmm::checks::linux::check_linux_guest(&path) {
        Ok(report) if report.ran.is_empty() => Check::ok(
            "linux-guest",
            "a test VM ran and halted (this CPU announces none of the checked instructions)",
        ),
        Ok(report) => Check::ok(
            "linux-guest",
            format!("a test VM ran {}", report.ran.join(", ")),
        ),
        Err(err) => Check::fail("linux-guest", err.to_string(), err.fix()),
    })
}

/// Why `start` refuses to run the microVM here.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The check's error is the message, followed by its fix; not a cause to repeat.
    #[error("{check}.\n  fix: {}", .check.fix())]
    LinuxGuest {
        check: bottle_vmm::checks::linux::LinuxCheckError,
    },
}

/// `start`'s refusal when this KVM cannot run the microVM's Linux guest, with the fix; runs
/// in a few milliseconds. Skipped for a stand-in VMM, which does not run on this KVM.
pub fn require_linux_guest() -> Result<(), PreflightError> {
    if std::env::var_os(crate::backend::microvm::launch::VMM_ENV).is_some()
        || std::env::var_os(SKIP_LINUX_CHECK_ENV).is_some_and(|v| v == "1")
    {
        return Ok(());
    }
    bottle_vmm::checks::linux::check_linux_guest(&kvm_path())
        .map(|_| ())
        .map_err(|check| PreflightError::LinuxGuest { check })
}

/// The Docker check as a doctor line, plus whether runsc is registered.
pub async fn check_docker() -> (Check, Option<Check>) {
    match crate::host::docker::connect().await {
        Ok(docker) => {
            let version = crate::host::docker::version(&docker)
                .await
                .unwrap_or_else(|_| "unknown".into());
            let endpoint = std::env::var("DOCKER_HOST")
                .unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
            let runsc = match crate::host::docker::runsc_registered(&docker).await {
                Ok(true) => Check::ok(
                    "gvisor",
                    "runsc is registered: docker-backend agents run under gVisor",
                ),
                Ok(false) => Check::warn(
                    "gvisor",
                    "runsc is not registered: docker-backend agents run under runc",
                    "install gVisor (Debian: `apt-get install runsc`) and register it in /etc/docker/daemon.json: \
                     {\"runtimes\":{\"runsc\":{\"path\":\"/usr/bin/runsc\",\"runtimeArgs\":[\"--network=host\"]}}}",
                ),
                Err(e) => Check::warn("gvisor", format!("cannot query runtimes: {e}"), ""),
            };
            (
                Check::ok("docker", format!("engine {version} at {endpoint}")),
                Some(runsc),
            )
        }
        Err(err) => {
            let msg = err.to_string();
            let (detail, fix) = msg.split_once(": ").unwrap_or((&msg, ""));
            (Check::fail("docker", detail, fix), None)
        }
    }
}

/// Where state lives, and whether it is writable.
pub fn check_state_dir(dirs: &Dirs) -> Check {
    match dirs.ensure_state() {
        Ok(()) => {
            let probe = dirs.state.join(".doctor-probe");
            match std::fs::write(&probe, b"") {
                Ok(()) => {
                    let _ = std::fs::remove_file(&probe);
                    Check::ok(
                        "state",
                        format!(
                            "{} (database {})",
                            dirs.state.display(),
                            dirs.db_path().display()
                        ),
                    )
                }
                Err(e) => Check::fail(
                    "state",
                    format!("{} is not writable: {e}", dirs.state.display()),
                    "fix its ownership, or set BOT_BOTTLE_STATE_DIR / XDG_STATE_HOME",
                ),
            }
        }
        Err(e) => Check::fail(
            "state",
            format!("{}: {e}", dirs.state.display()),
            "set BOT_BOTTLE_STATE_DIR or XDG_STATE_HOME to a writable directory",
        ),
    }
}

/// The user's bottle directory.
pub fn check_bottles_dir(dirs: &Dirs) -> Check {
    let dir = dirs.bottles_dir();
    let count = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
                .count()
        })
        .unwrap_or(0);
    Check::ok(
        "bottles",
        format!(
            "bundled: claude, codex, test; {count} of your own in {}",
            dir.display()
        ),
    )
}

/// The alias pool setting.
pub fn check_alias_pool() -> Check {
    match crate::state::alias::pool_from_env() {
        Ok(pool) => Check::ok(
            "alias-pool",
            format!("127.0.0.{}..=127.0.0.{}", pool.start(), pool.end()),
        ),
        Err(e) => {
            let msg = e.to_string();
            let (d, f) = msg.split_once(": ").unwrap_or((&msg, ""));
            Check::fail("alias-pool", d, f)
        }
    }
}

/// The guest kernel for the microVM backend.
pub fn check_kernel(dirs: &Dirs) -> Check {
    let cache = crate::image::kernel::kernel_cache_dir(dirs);
    match crate::image::kernel::cached_kernel_in(&cache, crate::image::kernel::FRAGMENT) {
        Some(path) => Check::ok("kernel", format!("guest kernel {}", path.display())),
        None => {
            let source = std::path::Path::new(crate::image::kernel::DEFAULT_SOURCE);
            let fix = if source.exists() {
                "run `bot-bottle kernel build` (about 4 minutes on 2 cores)".to_owned()
            } else {
                format!(
                    "install the kernel source (Debian/Ubuntu: `apt-get install {}`) and run `bot-bottle kernel build`, or pass --source DIR",
                    crate::image::kernel::SOURCE_PACKAGE
                )
            };
            Check::warn(
                "kernel",
                format!(
                    "no guest kernel built for this bot-bottle in {}",
                    cache.display()
                ),
                fix,
            )
        }
    }
}
