//! The one place that calls `waitpid`: PID 1 inherits every orphan and must reap it, so no
//! other code may wait for a child itself (it would race with this). Children we spawn are
//! registered here and their exit status is handed over on a channel.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};

use bottle_proto::ExitStatus;

/// How long the reaper sleeps when there is no child at all (nothing to block on).
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Children whose exit someone waits for. `spawn` registers under the lock that `deliver`
/// takes, so a child cannot be reaped before it is registered.
#[derive(Default)]
struct Table {
    waiting: HashMap<i32, Sender<ExitStatus>>,
}

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| {
        thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_forever)
            .expect("spawning the reaper thread");
        Mutex::new(Table::default())
    })
}

fn lock() -> std::sync::MutexGuard<'static, Table> {
    table().lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the reaper thread now (PID 1 calls this first); `spawn` would start it otherwise.
pub fn start() {
    let _ = table();
}

/// Spawns `cmd` and returns the child with a channel that yields its exit status exactly once.
/// `std::process::Child::wait` must not be called on the result.
pub fn spawn(cmd: &mut Command) -> std::io::Result<(Child, Receiver<ExitStatus>)> {
    let mut t = lock();
    let child = cmd.spawn()?;
    let (tx, rx) = mpsc::channel();
    t.waiting.insert(child.id() as i32, tx);
    Ok((child, rx))
}

/// Waits for any child to exit *without* reaping it, then reaps that one pid under the table
/// lock. `spawn` holds the same lock while `Command::spawn` runs, and std reaps a child whose
/// exec failed inside `spawn`: reaping only under the lock means we never take that child
/// from std (which would make its `spawn` fail or panic).
fn reap_forever() {
    loop {
        let pid = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(status) => status.pid(),
            Err(Errno::EINTR) => continue,
            Err(_) => {
                thread::sleep(IDLE_POLL);
                continue;
            }
        };
        let Some(pid) = pid else { continue };
        let mut t = lock();
        let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => ExitStatus {
                code: Some(code),
                signal: None,
                timed_out: false,
            },
            Ok(WaitStatus::Signaled(_, sig, _)) => ExitStatus {
                code: None,
                signal: Some(sig as i32),
                timed_out: false,
            },
            // Already reaped by std (failed exec inside `spawn`), or not ours to report.
            _ => continue,
        };
        // An orphan we inherited is not in the table: reaping it was the point.
        if let Some(tx) = t.waiting.remove(&pid.as_raw()) {
            let _ = tx.send(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn failed_execs_stay_errors_while_the_reaper_runs() {
        let (_sleeper, sleeper_exit) = spawn(Command::new("/bin/sleep").arg("2")).unwrap();

        // Setting the uid makes std fork and reap the failed child itself (not posix_spawn).
        let uid = nix::unistd::getuid().as_raw();
        let failures = (0..200)
            .filter(|_| spawn(Command::new("/no/such/program").uid(uid)).is_err())
            .count();

        assert_eq!(failures, 200);
        assert_eq!(sleeper_exit.recv().unwrap().code, Some(0));
    }
}
