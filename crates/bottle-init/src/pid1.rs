//! PID 1 of the bot-bottle guest: mount, assemble the root, start the forwarders and the
//! control agent, reap children, power off. Configuration comes only from the kernel command
//! line (`bottle.config=`, see `bottle_proto::config`).
//!
//! A library function so that another binary (a multi-call `bot-bottle`) can be PID 1 too.

use std::fs::File;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use nix::sys::reboot::{reboot, RebootMode};

use crate::agent::AgentContext;
use crate::{boot, chain, net, reaper};
use bottle_proto::config::GuestConfig;

#[derive(Debug, thiserror::Error)]
enum Pid1Error {
    #[error("boot failed")]
    Boot(#[from] boot::BootError),
    #[error("network setup failed")]
    Net(#[from] net::NetError),
    #[error("cannot start the agent command {argv0}")]
    Agent {
        argv0: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why the guest powers off.
enum Stop {
    Requested,
    AgentExited(bottle_proto::ExitStatus),
}

/// Runs the guest's PID 1; never returns (the machine powers off).
pub fn pid1_main() -> ! {
    if std::process::id() != 1 {
        eprintln!("bottle-init: must run as PID 1 inside a bot-bottle guest; it mounts filesystems and powers the machine off");
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        eprintln!("bottle-init: internal error: {info}");
        power_off();
    }));
    match run() {
        Ok(Stop::Requested) => eprintln!("bottle-init: shutdown requested, powering off"),
        Ok(Stop::AgentExited(status)) => {
            eprintln!(
                "bottle-init: agent exited ({}), powering off",
                status.shell_code()
            )
        }
        Err(e) => eprintln!("bottle-init: {}", chain(&e)),
    }
    power_off();
}

fn run() -> Result<Stop, Pid1Error> {
    reaper::start();
    boot::mount_early()?;
    let cfg = boot::read_config()?;
    boot::assemble_root(&cfg)?;
    boot::finish_root(&cfg)?;
    boot::set_hostname(&cfg.hostname)?;
    net::loopback_up()?;
    net::start_forwarders(&cfg.egress, Arc::new(net::VsockUpstream))?;
    let (stop_tx, stop_rx) = mpsc::channel();
    let ctx = context(&cfg, stop_tx.clone());
    net::start_control(&cfg.control, Arc::new(ctx))?;
    if let Some(agent) = &cfg.agent {
        start_agent(&cfg, agent, stop_tx)?;
    }
    eprintln!("bottle-init: ready after {} ms", uptime_ms());
    Ok(stop_rx.recv().unwrap_or(Stop::Requested))
}

fn context(cfg: &GuestConfig, stop: mpsc::Sender<Stop>) -> AgentContext {
    AgentContext {
        token: cfg.token.clone(),
        env: cfg.env.clone(),
        user: cfg.user.ids,
        home: cfg.user.home.clone(),
        on_shutdown: Box::new(move || {
            let _ = stop.send(Stop::Requested);
        }),
    }
}

/// Runs the bottle's own command on the console; its exit powers the guest off.
fn start_agent(
    cfg: &GuestConfig,
    agent: &bottle_proto::config::AgentCommand,
    stop: mpsc::Sender<Stop>,
) -> Result<(), Pid1Error> {
    use std::os::unix::process::CommandExt;
    let argv0 = agent.argv.first().cloned().unwrap_or_default();
    let console = |_: ()| {
        File::options()
            .read(true)
            .write(true)
            .open("/dev/console")
            .map(Stdio::from)
    };
    let spawn_err = |source| Pid1Error::Agent {
        argv0: argv0.clone(),
        source,
    };
    let mut cmd = Command::new(&argv0);
    cmd.args(agent.argv.iter().skip(1))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", &cfg.user.home)
        .envs(&cfg.env)
        .current_dir(agent.cwd.as_deref().unwrap_or(&cfg.user.home))
        .uid(cfg.user.ids.uid)
        .gid(cfg.user.ids.gid)
        .stdin(console(()).map_err(spawn_err)?)
        .stdout(console(()).map_err(spawn_err)?)
        .stderr(console(()).map_err(spawn_err)?);
    let (_child, exit) = reaper::spawn(&mut cmd).map_err(spawn_err)?;
    thread::spawn(move || {
        if let Ok(status) = exit.recv() {
            let _ = stop.send(Stop::AgentExited(status));
        }
    });
    Ok(())
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// Flushes the disks and resets the machine (`reboot=k`/`reboot=t` on the command line turn
/// the reset into an exit the VMM sees). Never returns.
fn power_off() -> ! {
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // reboot(2) only fails without CAP_SYS_BOOT, which PID 1 has; halt the CPU as a fallback.
    loop {
        thread::park();
    }
}
