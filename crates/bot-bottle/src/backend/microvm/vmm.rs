//! The VMM child process (`bot-bottle __vmm`), owned: spawned with its launch file, watched,
//! stopped on unwind, reaped exactly once.

use std::time::Duration;

use super::control::MicrovmRunError;

/// How long a killed VMM child has to be reaped (SIGKILL cannot be caught: it ends at once
/// unless stuck in the kernel) before `stop` reports it.
pub(super) const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a VMM child's end is checked while waiting for it.
const REAP_POLL: Duration = Duration::from_millis(50);

/// The VMM child process, owned. Clones share it: the session watches and waits for it, the
/// guard stack's undo stops it when the session ends early. Whoever sees it end reaps it and
/// keeps only how it ended, so a child is never signalled after it was reaped (its pid may
/// belong to another process by then). Dropping the last clone of a running child kills it
/// (tokio reaps it in the background).
#[derive(Clone)]
pub struct VmmChild {
    state: std::sync::Arc<std::sync::Mutex<VmmState>>,
}

enum VmmState {
    Running(tokio::process::Child),
    Ended(std::process::ExitStatus),
}

/// How [`VmmChild::stop`] found the VMM child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmEnd {
    /// It had ended by itself: nothing was signalled.
    Ended(std::process::ExitStatus),
    /// It was running: killed now, and reaped.
    Killed(std::process::ExitStatus),
}

impl VmmChild {
    /// Start the VMM child (`cmd`'s stdin, stdout and stderr as the caller set them).
    pub fn spawn(cmd: &mut tokio::process::Command) -> Result<VmmChild, MicrovmRunError> {
        let child = cmd
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| MicrovmRunError::Spawn { source })?;
        Ok(VmmChild {
            state: std::sync::Arc::new(std::sync::Mutex::new(VmmState::Running(child))),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VmmState> {
        // The state is replaced whole: a panic elsewhere cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The child's pid while it runs; `None` once it was reaped.
    pub fn pid(&self) -> Option<u32> {
        match &*self.lock() {
            VmmState::Running(child) => child.id(),
            VmmState::Ended(_) => None,
        }
    }

    /// How the child ended, once it has (reaping it); `None` while it runs.
    pub fn try_ended(&self) -> Option<std::process::ExitStatus> {
        let mut state = self.lock();
        let status = match &mut *state {
            VmmState::Ended(status) => return Some(*status),
            // An error here means it cannot be waited for: it is not known to have ended.
            VmmState::Running(child) => child.try_wait().ok().flatten()?,
        };
        *state = VmmState::Ended(status);
        Some(status)
    }

    /// Wait up to `timeout` for the child to end by itself; `None` if it still runs.
    pub async fn wait_timeout(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_ended() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(REAP_POLL).await;
        }
    }

    /// Kill the child if it still runs, and reap it; a child that already ended is left
    /// alone. Says which it was.
    pub async fn stop(&self) -> Result<VmmEnd, MicrovmRunError> {
        if let Some(status) = self.try_ended() {
            return Ok(VmmEnd::Ended(status));
        }
        let pid = {
            let mut state = self.lock();
            match &mut *state {
                VmmState::Ended(status) => return Ok(VmmEnd::Ended(*status)),
                VmmState::Running(child) => {
                    let pid = child.id().unwrap_or_default();
                    // Not reaped (we hold it, and checked under this lock): the pid is ours.
                    child
                        .start_kill()
                        .map_err(|source| MicrovmRunError::Kill { pid, source })?;
                    pid
                }
            }
        };
        match self.wait_timeout(KILL_REAP_TIMEOUT).await {
            Some(status) => Ok(VmmEnd::Killed(status)),
            None => Err(MicrovmRunError::NotReaped { pid }),
        }
    }

    /// Give the child `timeout` to end by itself (the guest powering off), then [`stop`] it.
    ///
    /// [`stop`]: VmmChild::stop
    pub async fn stop_after(&self, timeout: Duration) -> Result<VmmEnd, MicrovmRunError> {
        self.wait_timeout(timeout).await;
        self.stop().await
    }

    /// Register the undo that stops this child (through this owner, never by pid).
    pub fn stop_on_unwind(&self, stack: &mut crate::session::guard::GuardStack) {
        let vmm = self.clone();
        stack.push("stop the VMM", move || async move {
            match vmm.stop().await? {
                VmmEnd::Killed(_) => tracing::info!("killed the VMM child"),
                VmmEnd::Ended(status) => {
                    tracing::debug!(status = %describe_vmm_exit(status), "the VMM had ended")
                }
            }
            Ok::<(), MicrovmRunError>(())
        });
    }
}

/// A VMM child whose end can be checked without blocking (to report a VM that ended before
/// its control agent answered).
pub trait VmmStatus {
    /// How the child ended, once it has; `None` while it runs.
    fn ended(&mut self) -> Option<std::process::ExitStatus>;
}

impl VmmStatus for VmmChild {
    fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.try_ended()
    }
}

impl VmmStatus for tokio::process::Child {
    fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.try_wait().ok().flatten()
    }
}

/// How the VMM child ended, in words.
pub fn describe_vmm_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(bottle_vmm::EXIT_CODE_VMM_ERROR), _) => "the VMM refused or failed; see above".into(),
        (Some(bottle_vmm::EXIT_CODE_STOPPED), _) => "the VMM was stopped".into(),
        (Some(code), _) => match bottle_vmm::GuestExit::from_exit_code(code) {
            Some(bottle_vmm::GuestExit::PowerOff) => "the guest powered off".into(),
            Some(bottle_vmm::GuestExit::Reset) => "the guest rebooted".into(),
            Some(bottle_vmm::GuestExit::Panic) => "the guest kernel panicked".into(),
            Some(bottle_vmm::GuestExit::Crash(_)) => "the VM crashed".into(),
            None => format!("exit code {code}"),
        },
        (None, Some(sig)) => format!("the VMM was killed by signal {sig}"),
        (None, None) => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    fn spawn_sh(script: &str) -> VmmChild {
        VmmChild::spawn(tokio::process::Command::new("sh").args(["-c", script])).unwrap()
    }

    #[tokio::test]
    async fn the_unwind_never_signals_a_vmm_child_that_was_already_reaped() {
        let vmm = spawn_sh("exit 3");
        let reaped = vmm.wait_timeout(Duration::from_secs(10)).await;
        let mut stack = crate::session::guard::GuardStack::new("b");
        vmm.stop_on_unwind(&mut stack);

        let errors = stack.unwind().await;

        assert_eq!(reaped.and_then(|s| s.code()), Some(3));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(vmm.pid(), None, "a reaped child has no pid left to signal");
        assert_eq!(
            vmm.stop().await.unwrap(),
            VmmEnd::Ended(reaped.unwrap()),
            "stop reports the end it saw instead of killing"
        );
    }

    #[tokio::test]
    async fn the_unwind_kills_and_reaps_a_vmm_child_that_still_runs() {
        let vmm = spawn_sh("exec sleep 60");
        let running = vmm.pid();
        let mut stack = crate::session::guard::GuardStack::new("b");
        vmm.stop_on_unwind(&mut stack);

        let errors = stack.unwind().await;

        assert!(running.is_some());
        assert!(errors.is_empty(), "{errors:?}");
        let status = vmm.try_ended().expect("reaped by the undo");
        assert_eq!(status.signal(), Some(9), "{status:?}");
        assert_eq!(vmm.pid(), None);
    }

    #[tokio::test]
    async fn a_vmm_child_that_ends_within_the_power_off_time_is_not_killed() {
        let vmm = spawn_sh("sleep 0.3; exit 4");

        let end = vmm.stop_after(Duration::from_secs(10)).await.unwrap();

        assert!(
            matches!(end, VmmEnd::Ended(s) if s.code() == Some(4)),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_vmm_child_that_outlives_the_power_off_time_is_killed() {
        let vmm = spawn_sh("exec sleep 60");

        let end = vmm.stop_after(Duration::from_millis(200)).await.unwrap();

        assert!(
            matches!(end, VmmEnd::Killed(s) if s.signal() == Some(9)),
            "{end:?}"
        );
    }
}
