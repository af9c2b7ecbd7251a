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
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

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

fn reap_forever() {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) => deliver(
                pid,
                ExitStatus {
                    code: Some(code),
                    signal: None,
                    timed_out: false,
                },
            ),
            Ok(WaitStatus::Signaled(pid, sig, _)) => deliver(
                pid,
                ExitStatus {
                    code: None,
                    signal: Some(sig as i32),
                    timed_out: false,
                },
            ),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => thread::sleep(IDLE_POLL),
        }
    }
}

fn deliver(pid: Pid, status: ExitStatus) {
    let mut t = lock();
    // An orphan we inherited is not in the table: reaping it was the point.
    if let Some(tx) = t.waiting.remove(&pid.as_raw()) {
        let _ = tx.send(status);
    }
}
