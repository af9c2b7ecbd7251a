//! The approval flow end to end on the Docker backend: a bottle whose manifest says
//! `[egress] unknown = "ask"`, an agent asking for a host its allowlist does not name (served
//! by the test on the Docker host), and the human answering from the host with `bot-bottle
//! approvals --json` and `approve`, or in the terminal UI driven in a real terminal (tmux).
//! The agent's own attempts to approve itself, through the supervisor port it can reach, get
//! 401.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::approvals::asking_bottle;
use common::Sandbox;

const STEP: Duration = Duration::from_secs(60);

#[test]
fn a_held_request_is_listed_at_once_and_approving_lets_it_through_once_then_saved() {
    if !common::docker_available("approvals") {
        return;
    }
    let sb = Sandbox::new("170-170");
    // A stand-in for the desktop's notifier (no desktop session exists here): a `notify-send`
    // on PATH that records what it was asked to show.
    let bin = sb.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let shown = sb.dir.path().join("notified");
    let notify_send = bin.join("notify-send");
    std::fs::write(
        &notify_send,
        format!(
            "#!/bin/sh\nprintf '%s|' \"$@\" >> {}\necho >> {}\n",
            shown.display(),
            shown.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &notify_send,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut start = sb.cmd();
    start
        .env("PATH", path)
        .env("DISPLAY", ":99")
        .args(["start", "ask", "--backend", "docker"]);
    common::approvals::held_listed_approved_once_then_saved(&sb, start);

    // The first request (held for seconds) was announced once, naming the host and how to
    // answer; the later ones, answered within `start`'s one-second poll, may never have been.
    let notified = std::fs::read_to_string(&shown).unwrap_or_default();
    let lines: Vec<&str> = notified.lines().collect();
    assert!((1..=3).contains(&lines.len()), "{notified}");
    assert!(lines[0].contains("GET later.test:"), "{notified}");
    for line in lines {
        assert!(
            line.starts_with(
                "--app-name=bot-bottle|bot-bottle ask: a request waits for approval|GET "
            ),
            "{line}"
        );
        assert!(line.contains("run `bot-bottle approvals`"), "{line}");
    }
}

/// Runs `tmux` with `args`; its stdout.
fn tmux(socket: &str, args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .output()
        .expect("tmux (apt-get install tmux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `pane`'s screen (or, with `title`, its title) contains `needle`; returns it.
fn wait_pane(socket: &str, pane: &str, needle: &str, title: bool) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        let text = match title {
            true => tmux(
                socket,
                &["display-message", "-p", "-t", pane, "#{pane_title}"],
            ),
            false => tmux(socket, &["capture-pane", "-p", "-t", pane]),
        };
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{pane} never showed {needle:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The session's terminal (its title counts the waiting requests) and the approvals UI, each
/// in a real terminal: tmux windows `agent` and `ui`.
#[test]
fn the_terminal_ui_shows_a_waiting_request_and_approves_it_and_the_title_counts_it() {
    if !common::docker_available("approvals") {
        return;
    }
    let sb = Sandbox::new("171-171");
    asking_bottle(&sb);
    let port = common::http_server("ui-approved");
    let socket = format!("bot-bottle-approvals-{}", std::process::id());
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["-L", &self.0, "kill-server"])
                .status();
        }
    }
    let _kill = Kill(socket.clone());
    let env = format!(
        "env BOT_BOTTLE_STATE_DIR={} BOT_BOTTLE_CONFIG_DIR={} BOT_BOTTLE_CACHE_DIR={} BOT_BOTTLE_ALIAS_POOL=171-171 {}",
        sb.state().display(),
        sb.dir.path().join("config").display(),
        sb.dir.path().join("cache").display(),
        common::bin().display(),
    );
    let agent = format!(
        "{env} start ask -- sh -c 'wget -q -O /tmp/o http://later.test:{port}/; r=$?; echo $(cat /tmp/o); echo GOT=$r; sleep 5'"
    );
    let size = ["-x", "160", "-y", "30"];
    tmux(
        &socket,
        &[
            &["new-session", "-d", "-s", "t", "-n", "agent"][..],
            &size,
            &[&agent],
        ]
        .concat(),
    );
    tmux(
        &socket,
        &[
            "new-window",
            "-t",
            "t",
            "-n",
            "ui",
            &format!("{env} approvals"),
        ],
    );

    let screen = wait_pane(&socket, "t:ui", &format!("later.test:{port}"), false);
    assert!(screen.contains("1 waiting"), "{screen}");
    assert!(screen.contains("GET /"), "{screen}");
    // The session's own terminal says a request waits, in its title (not on its screen).
    wait_pane(&socket, "t:agent", "1 request waiting for approval", true);
    let agent_screen = tmux(&socket, &["capture-pane", "-p", "-t", "t:agent"]);
    assert!(!agent_screen.contains("approval"), "{agent_screen}");

    tmux(&socket, &["send-keys", "-t", "t:ui", "o"]);
    wait_pane(&socket, "t:agent", "GOT=0", false);
    let agent_screen = tmux(&socket, &["capture-pane", "-p", "-t", "t:agent"]);
    assert!(agent_screen.contains("ui-approved"), "{agent_screen}");
    // The UI says what it did, the list is empty again, and so is the title's count.
    let screen = wait_pane(&socket, "t:ui", "0 waiting", false);
    assert!(screen.contains("allowed later.test"), "{screen}");
    let deadline = Instant::now() + STEP;
    loop {
        let title = tmux(
            &socket,
            &["display-message", "-p", "-t", "t:agent", "#{pane_title}"],
        );
        if !title.contains("waiting") {
            break;
        }
        assert!(Instant::now() < deadline, "the title still counts: {title}");
        std::thread::sleep(Duration::from_millis(100));
    }
    tmux(&socket, &["send-keys", "-t", "t:ui", "q"]);
}
