//! Allocation and teardown with real processes, a real SQLite file and a real Docker engine:
//! concurrent starts get distinct aliases, exhaustion is a clear error, and whatever way a
//! `start` dies (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, a closed terminal, SIGKILL) nothing
//! of it is left, and what a dead `start` leaves is listed as orphaned until it is gone.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{docker_available, stderr, Running, Sandbox};
use nix::sys::signal::Signal;

const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the reaper may take to remove what a SIGKILLed `start` left (PRD 0007: "within a
/// few seconds"; its passes take about 2 s, the rest is slack for a loaded 2-core machine).
const REAP_TIMEOUT: Duration = Duration::from_secs(15);

fn paused_start(sb: &Sandbox, step: &str, extra: &[&str]) -> Running {
    let mut cmd = sb.cmd();
    cmd.env("BOT_BOTTLE_PAUSE_AT", step)
        .args(["start", "test", "--backend", "docker"])
        .args(extra);
    let mut run = Running::spawn(cmd);
    run.wait_for(&format!("paused at {step}"), STEP_TIMEOUT);
    run
}

fn assert_nothing_left(sb: &Sandbox) {
    assert!(sb.rows().is_empty(), "state rows left: {:?}", sb.rows());
    assert!(
        sb.docker_leftovers().is_empty(),
        "docker objects left: {:?}",
        sb.docker_leftovers()
    );
    assert!(sb.leases().is_empty(), "leases left: {:?}", sb.leases());
    assert!(
        sb.processes().is_empty(),
        "processes left: {:?}",
        sb.processes()
    );
}

/// Waits until nothing of the sandbox's bottles is left (the reaper's work), or panics with
/// what is still there.
fn wait_nothing_left(sb: &Sandbox, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while !(sb.rows().is_empty() && sb.docker_leftovers().is_empty() && sb.processes().is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "still there after {timeout:?}: rows {:?}, objects {:?}, processes {:?}",
            sb.rows(),
            sb.docker_leftovers(),
            sb.processes()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_nothing_left(sb);
}

#[test]
fn concurrent_starts_get_distinct_aliases_and_the_next_one_is_refused() {
    if !docker_available("concurrent_starts_get_distinct_aliases") {
        return;
    }
    const N: usize = 4;
    let sb = Sandbox::new("50-53");
    // All N processes race for the pool at once.
    let mut runs: Vec<Running> = (0..N)
        .map(|_| {
            let mut cmd = sb.cmd();
            cmd.env("BOT_BOTTLE_PAUSE_AT", "allocated").args([
                "start",
                "test",
                "--backend",
                "docker",
            ]);
            Running::spawn(cmd)
        })
        .collect();
    for r in &mut runs {
        r.wait_for("paused at allocated", STEP_TIMEOUT);
    }
    let rows = sb.rows();
    let aliases: BTreeSet<String> = rows
        .iter()
        .map(|r| r["alias"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(aliases.len(), N, "aliases not distinct: {rows:?}");

    let extra = sb.run(&["start", "test", "--backend", "docker", "--", "true"]);
    assert_eq!(extra.status.code(), Some(1));
    let err = stderr(&extra);
    assert!(err.contains("127.0.0.50..=127.0.0.53 are in use"), "{err}");
    assert!(err.contains("127.0.0.50 by test-"), "{err}");

    for r in &runs {
        r.signal(Signal::SIGTERM);
    }
    for r in runs {
        assert_eq!(r.wait().code(), Some(128 + Signal::SIGTERM as i32));
    }
    assert_nothing_left(&sb);
}

fn kill_at(step: &str, sig: Signal, pool: &str) {
    let sb = Sandbox::new(pool);
    let run = paused_start(&sb, step, &["--", "sleep", "600"]);
    assert_eq!(sb.rows().len(), 1);
    run.signal(sig);
    let status = run.wait();
    if sig == Signal::SIGKILL {
        // Nothing could run in `start`: its reaper removes what it left, within seconds.
        assert!(status.code().is_none());
        wait_nothing_left(&sb, REAP_TIMEOUT);
        let out = sb.run(&["cleanup"]);
        assert!(common::stdout(&out).contains("nothing to clean up"));
    } else {
        // The exit code says which signal: 128 + its number, after the teardown.
        assert_eq!(status.code(), Some(128 + sig as i32));
    }
    assert_nothing_left(&sb);
    // The alias is free again: a new start gets the pool's first address.
    let again = paused_start(&sb, "allocated", &[]);
    assert_eq!(
        sb.rows()[0]["alias"],
        format!("127.0.0.{}", pool.split('-').next().unwrap())
    );
    again.signal(Signal::SIGTERM);
    again.wait();
}

#[test]
fn sigkill_after_allocation_then_cleanup_leaves_nothing() {
    if docker_available("sigkill_after_allocation") {
        kill_at("allocated", Signal::SIGKILL, "54-54");
    }
}

#[test]
fn sigkill_after_networks_then_cleanup_leaves_nothing() {
    if docker_available("sigkill_after_networks") {
        kill_at("network", Signal::SIGKILL, "55-55");
    }
}

#[test]
fn sigkill_with_bundle_running_then_cleanup_leaves_nothing() {
    if docker_available("sigkill_with_bundle_running") {
        kill_at("bundle", Signal::SIGKILL, "56-56");
    }
}

#[test]
fn sigkill_with_agent_created_then_cleanup_leaves_nothing() {
    if docker_available("sigkill_with_agent_created") {
        kill_at("agent", Signal::SIGKILL, "57-57");
    }
}

#[test]
fn sigterm_with_bundle_running_unwinds_everything() {
    if docker_available("sigterm_with_bundle_running") {
        kill_at("bundle", Signal::SIGTERM, "58-58");
    }
}

#[test]
fn ctrl_c_with_agent_created_unwinds_everything() {
    if docker_available("ctrl_c_with_agent_created") {
        kill_at("agent", Signal::SIGINT, "59-59");
    }
}

#[test]
fn stop_command_tears_down_a_running_bottle() {
    if !docker_available("stop_command_tears_down") {
        return;
    }
    let sb = Sandbox::new("60-60");
    let mut cmd = sb.cmd();
    cmd.args(["start", "test", "--", "sleep", "600"]);
    let run = Running::spawn(cmd);
    // Wait until the agent is up (row status running and agent container present).
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while sb.docker_leftovers().iter().all(|n| !n.ends_with("-agent")) {
        assert!(std::time::Instant::now() < deadline, "agent never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    let id = sb.rows()[0]["id"].as_str().unwrap().to_owned();
    let out = sb.run(&["stop", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(run.wait().code(), Some(128 + Signal::SIGTERM as i32));
    assert_nothing_left(&sb);
}

#[test]
fn cleanup_leaves_other_state_dirs_bottles_alone() {
    if !docker_available("cleanup_leaves_other_state_dirs_bottles_alone") {
        return;
    }
    let mine = Sandbox::new("61-61");
    let theirs = Sandbox::new("62-62");
    let run = paused_start(&theirs, "network", &[]);
    let out = mine.run(&["cleanup"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        theirs.docker_leftovers().len(),
        2,
        "{:?}",
        theirs.docker_leftovers()
    );
    run.signal(Signal::SIGTERM);
    run.wait();
    assert_nothing_left(&theirs);
}

#[test]
fn cleanup_images_removes_other_builds_sidecar_images_and_keeps_this_ones() {
    if !docker_available("cleanup_images_removes_other_builds_sidecar_images") {
        return;
    }
    let sb = Sandbox::new("63-63");
    // This build's sidecar image exists after a start.
    let out = sb.run(&["start", "test", "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let build_id = bot_bottle::image::build::elf_info(&common::bin())
        .unwrap()
        .build_id
        .unwrap();
    let this_build = format!("bot-bottle-sidecar:b{}", &build_id[..16]);
    // An old build's image: any tag under the sidecar repository.
    let stale = "bot-bottle-sidecar:b0000000000000000";
    assert!(std::process::Command::new("docker")
        .args(["tag", &this_build, stale])
        .status()
        .unwrap()
        .success());
    let out = sb.run(&["cleanup", "--images"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        common::stdout(&out).contains(stale),
        "{}",
        common::stdout(&out)
    );
    let left = std::process::Command::new("docker")
        .args([
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "bot-bottle-sidecar",
        ])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout).into_owned();
    assert!(!left.contains(stale), "{left}");
    assert!(
        left.contains(&this_build),
        "this build's image was removed: {left}"
    );
}

/// Fake directories of ended runs of `test`, oldest first (ages in minutes).
fn old_runs(sb: &Sandbox, count: usize) -> Vec<String> {
    let root = sb.state().join("bottles");
    (0..count)
        .map(|i| {
            let id = format!("test-old{i:02}");
            let dir = root.join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("egress.jsonl"), "{}\n").unwrap();
            let age = Duration::from_secs(60 * (100 - i as u64));
            std::fs::File::open(&dir)
                .unwrap()
                .set_modified(std::time::SystemTime::now() - age)
                .unwrap();
            id
        })
        .collect()
}

fn runs_left(sb: &Sandbox) -> BTreeSet<String> {
    std::fs::read_dir(sb.state().join("bottles"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn start_keeps_the_newest_ten_ended_runs_logs_and_cleanup_logs_removes_them_all() {
    if !docker_available("start_keeps_the_newest_ten_ended_runs_logs") {
        return;
    }
    let sb = Sandbox::new("91-91");
    let old = old_runs(&sb, 12);
    let other = sb.state().join("bottles").join("other-bottle-1");
    std::fs::create_dir_all(&other).unwrap();

    let out = sb.run(&["start", "test", "--backend", "docker", "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let left = runs_left(&sb);
    // The two oldest runs of `test` went; the ten newest, this run's own directory (with its
    // egress log) and another bottle's run stayed.
    for id in &old[..2] {
        assert!(!left.contains(id), "{id} kept: {left:?}");
    }
    for id in &old[2..] {
        assert!(left.contains(id), "{id} removed: {left:?}");
    }
    assert!(left.contains("other-bottle-1"), "{left:?}");
    let new: Vec<_> = left
        .iter()
        .filter(|id| id.starts_with("test-") && !old.contains(id))
        .collect();
    assert_eq!(new.len(), 1, "{left:?}");
    assert!(sb
        .state()
        .join("bottles")
        .join(new[0])
        .join("egress.jsonl")
        .is_file());

    // `cleanup --dry-run --logs` lists, `cleanup --logs` removes every ended run's logs.
    let dry = sb.run(&["cleanup", "--dry-run", "--logs"]);
    assert!(common::stdout(&dry).contains("would remove the logs of test-old11"));
    assert_eq!(runs_left(&sb), left);
    let out = sb.run(&["cleanup", "--logs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(common::stdout(&out).contains("removed the logs of other-bottle-1"));
    assert!(runs_left(&sb).is_empty(), "{:?}", runs_left(&sb));
}

/// The agent container's embedded DNS forwards nowhere: Docker releases affected by
/// CVE-2024-29018 forward an internal network's queries from the host (the escape tests show
/// the attack where that happens; this engine does not forward, so here the setting is read
/// back from the engine).
#[test]
fn the_agents_dns_forwards_to_a_black_hole_and_its_pids_are_limited() {
    if !docker_available("the_agents_dns_forwards_to_a_black_hole") {
        return;
    }
    let sb = Sandbox::new("92-92");
    let run = paused_start(&sb, "agent", &["--", "true"]);
    let id = sb.rows()[0]["id"].as_str().unwrap().to_owned();
    let out = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{json .HostConfig.Dns}} {{.HostConfig.PidsLimit}}",
            &format!("bot-bottle-{id}-agent"),
        ])
        .output()
        .unwrap();
    run.signal(Signal::SIGTERM);
    run.wait();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        // And the default pids limit of the manifest.
        format!(
            "[\"{}\"] 4096",
            bot_bottle::backend::docker::AGENT_DNS_BLACK_HOLE
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(&sb);
}

#[test]
fn sighup_with_bundle_running_unwinds_everything_and_exits_129() {
    if docker_available("sighup_with_bundle_running") {
        kill_at("bundle", Signal::SIGHUP, "64-64");
    }
}

#[test]
fn sigquit_with_agent_created_unwinds_everything_and_exits_131() {
    if docker_available("sigquit_with_agent_created") {
        kill_at("agent", Signal::SIGQUIT, "65-65");
    }
}

#[test]
fn sigpipe_after_networks_unwinds_everything_and_exits_141() {
    if docker_available("sigpipe_after_networks") {
        kill_at("network", Signal::SIGPIPE, "66-66");
    }
}

/// `start` attached to a running agent, as a user would have it.
fn running_start(sb: &Sandbox) -> (Running, String) {
    let mut cmd = sb.cmd();
    cmd.args(["start", "test", "--backend", "docker", "--", "sleep", "600"]);
    let run = Running::spawn(cmd);
    let id = sb.wait_running(STEP_TIMEOUT);
    (run, id)
}

/// The reaper of a bottle: the process whose command line is `__reaper <id>`.
fn reaper_pid(sb: &Sandbox, id: &str) -> i32 {
    let procs = sb.processes();
    let line = procs
        .iter()
        .find(|p| p.contains(&format!("__reaper {id}")))
        .unwrap_or_else(|| panic!("no reaper of {id} among {procs:?}"));
    line.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn sigkill_of_an_attached_start_ends_the_agent_within_seconds() {
    if !docker_available("sigkill_of_an_attached_start_ends_the_agent") {
        return;
    }
    let sb = Sandbox::new("67-67");
    let (run, _id) = running_start(&sb);
    assert!(sb.docker_leftovers().iter().any(|n| n.ends_with("-agent")));

    run.signal(Signal::SIGKILL);
    assert!(run.wait().code().is_none());

    // The agent, the bundle, the networks, the row, the lease and the reaper itself: gone.
    wait_nothing_left(&sb, REAP_TIMEOUT);
}

/// When `start` and its reaper both die (SIGKILL to both, the OOM killer): the agent runs on
/// with nobody to stop it, and `list` must show it.
fn orphan(sb: &Sandbox) -> String {
    let (run, id) = running_start(sb);
    let reaper = reaper_pid(sb, &id);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(reaper), Signal::SIGKILL).unwrap();
    run.signal(Signal::SIGKILL);
    run.wait();
    while sb
        .processes()
        .iter()
        .any(|p| p.starts_with(&format!("{reaper} ")))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    id
}

#[test]
fn list_shows_a_bottle_whose_start_and_reaper_died_as_orphaned_and_stop_removes_it() {
    if !docker_available("list_shows_an_orphaned_bottle") {
        return;
    }
    let sb = Sandbox::new("68-68");
    let id = orphan(&sb);

    let text = common::stdout(&sb.run(&["list"]));
    let json: Vec<serde_json::Value> =
        serde_json::from_slice(&sb.run(&["list", "--json"]).stdout).unwrap();

    assert!(text.contains(&id) && text.contains("orphaned"), "{text}");
    assert!(text.contains("bot-bottle cleanup"), "{text}");
    assert!(text.contains(&format!("bot-bottle-{id}-agent")), "{text}");
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["id"], id.as_str());
    assert_eq!(json[0]["status"], "orphaned");
    assert!(json[0]["hint"].as_str().unwrap().contains("cleanup"));
    // `stop` works on it: nobody else can.
    let out = sb.run(&["stop", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_nothing_left(&sb);
}

#[test]
fn cleanup_of_one_orphaned_bottle_removes_it_and_refuses_a_running_one() {
    if !docker_available("cleanup_of_one_orphaned_bottle") {
        return;
    }
    let sb = Sandbox::new("69-70");
    let dead = orphan(&sb);
    let (run, live) = running_start(&sb);

    let refused = sb.run(&["cleanup", &live]);
    let out = sb.run(&["cleanup", &dead]);

    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains(&format!("bot-bottle stop {live}")),
        "{}",
        stderr(&refused)
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(common::stdout(&out).contains(&format!("removed {dead}")));
    let ids: Vec<String> = sb
        .rows()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec![live.clone()]);
    assert!(sb.docker_leftovers().iter().all(|n| n.contains(&live)));
    run.signal(Signal::SIGTERM);
    run.wait();
    assert_nothing_left(&sb);
}

/// The real thing: `start` attached to a terminal (a pty, the controlling terminal of its
/// session, as a shell in a terminal window gives it) whose other end goes away.
#[test]
fn closing_the_terminal_of_an_attached_start_tears_everything_down() {
    use std::os::fd::AsRawFd as _;
    if !docker_available("closing_the_terminal_of_an_attached_start") {
        return;
    }
    let sb = Sandbox::new("71-71");
    let pty = nix::pty::openpty(None, None).unwrap();
    // Not inherited: the terminal goes away only when every master descriptor closes.
    for fd in [pty.master.as_raw_fd(), pty.slave.as_raw_fd()] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    let base = sb.cmd();
    // `setsid --ctty`: a new session whose controlling terminal is the pty (stdin).
    let mut cmd = std::process::Command::new("setsid");
    cmd.arg("--ctty").arg(base.get_program());
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.args(["start", "test", "--backend", "docker", "--", "sleep", "600"])
        .stdin(pty.slave.try_clone().unwrap())
        .stdout(pty.slave.try_clone().unwrap())
        .stderr(pty.slave.try_clone().unwrap());
    let mut child = cmd.spawn().unwrap();
    drop(pty.slave);
    let master = pty.master;
    nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut seen = Vec::new();
    let drain = |seen: &mut Vec<u8>| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = nix::unistd::read(master.as_raw_fd(), &mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    };
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while !sb.rows().iter().any(|r| r["status"] == "running") {
        drain(&mut seen);
        assert!(
            std::time::Instant::now() < deadline,
            "never ran: {}",
            String::from_utf8_lossy(&seen)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drain(&mut seen);

    drop(master);
    let status = child.wait().unwrap();

    assert_eq!(
        status.code(),
        Some(128 + Signal::SIGHUP as i32),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert_nothing_left(&sb);
}

/// Kills land uniformly in this window after `start` began: from before the reaper exists to
/// an agent running for a while (here `start` reaches a running agent in about 2-3 s).
const CHAOS_WINDOW_MS: u64 = 4000;

#[test]
fn chaos_sigkill_at_random_points_leaves_an_orphan_or_nothing_and_cleanup_leaves_zero() {
    if !docker_available("chaos_sigkill_at_random_points") {
        return;
    }
    let sb = Sandbox::new("77-77");
    common::sigkill_chaos(&sb, CHAOS_WINDOW_MS, REAP_TIMEOUT, || {
        let mut cmd = sb.cmd();
        cmd.args(["start", "test", "--backend", "docker", "--", "sleep", "600"]);
        cmd
    });
}

/// `__vmm` blocked opening its launch file (a FIFO nobody writes) under a parent `sh` that
/// passed its pid the way `start` does; returns (parent, VMM pid).
fn vmm_under_parent(dir: &std::path::Path, parent_env: bool) -> (std::process::Child, i32) {
    let fifo = dir.join("launch.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let script = if parent_env {
        r#"BOT_BOTTLE_PARENT_PID=$$ "$0" __vmm --config "$1" & echo $!; wait"#
    } else {
        r#""$0" __vmm --config "$1" & echo $!; wait"#
    };
    let mut parent = std::process::Command::new("sh")
        .args(["-c", script])
        .arg(common::bin())
        .arg(&fifo)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(parent.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    (parent, line.trim().parse().unwrap())
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").starts_with(" Z"))
}

fn alive_after(pid: i32, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    alive(pid)
}

#[test]
fn the_vmm_child_ends_when_its_start_is_sigkilled() {
    let dir = tempfile::tempdir().unwrap();
    let (mut parent, vmm) = vmm_under_parent(dir.path(), true);
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(vmm), "the VMM did not wait on its launch file");

    parent.kill().unwrap();
    parent.wait().unwrap();

    assert!(
        !alive_after(vmm, Duration::from_secs(5)),
        "the VMM {vmm} outlived its parent"
    );
}

/// The positive control: without the parent's pid (a VMM stand-in run by hand) nothing asks
/// for the death signal, and the same VMM outlives its parent, blocked where it was.
#[test]
fn without_the_parent_pid_the_vmm_child_outlives_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (mut parent, vmm) = vmm_under_parent(dir.path(), false);

    parent.kill().unwrap();
    parent.wait().unwrap();

    let survived = alive_after(vmm, Duration::from_secs(1));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm), Signal::SIGKILL).unwrap();
    assert!(survived);
}

#[test]
fn a_vmm_child_whose_start_is_already_gone_refuses_to_boot() {
    let out = std::process::Command::new(common::bin())
        .args(["__vmm", "--config", "/nonexistent/launch.json"])
        .env("BOT_BOTTLE_PARENT_PID", "1")
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(bottle_vmm::EXIT_CODE_VMM_ERROR));
    assert!(
        stderr(&out).contains("ended before the VMM began"),
        "{}",
        stderr(&out)
    );
}
