//! The approval flow end to end on the Docker backend: a bottle whose manifest says
//! `[egress] unknown = "ask"`, an agent asking for a host its allowlist does not name (served
//! by the test on the Docker host), and the human answering from the host with `bot-bottle
//! approvals --json` and `approve`, or in the terminal UI driven in a real terminal (tmux).
//! The agent's own attempts to approve itself, through the supervisor port it can reach, get
//! 401.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{lines_until, Sandbox};

const STEP: Duration = Duration::from_secs(60);

/// A bottle like `test` that asks for unlisted hosts; `later.test` is served on the Docker host
/// (below the address floor, so named in `allow_private`) but allowed by no rule.
fn asking_bottle(sb: &Sandbox) {
    sb.add_bottle(
        "ask",
        "# the user's own bottle\nextends = \"test\"\n\n[egress]\nunknown = \"ask\"\n\
         hosts = { \"later.test\" = \"host-gateway\" }\nallow_private = [\"later.test\"]\n",
    );
}

/// `approvals --json` until a request other than `seen` waits; returns (bottle id, request).
fn next_waiting(sb: &Sandbox, seen: &[u64]) -> (String, serde_json::Value) {
    let deadline = Instant::now() + STEP;
    loop {
        let out = sb.run(&["approvals", "--json"]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(w) = list
            .into_iter()
            .find(|w| !seen.contains(&w["id"].as_u64().unwrap()))
        {
            return (w["bottle_id"].as_str().unwrap().to_owned(), w);
        }
        assert!(Instant::now() < deadline, "no request ever waited");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn a_held_request_is_listed_at_once_and_approving_lets_it_through_once_then_saved() {
    if !common::docker_available("approvals") {
        return;
    }
    let sb = Sandbox::new("170-170");
    asking_bottle(&sb);
    let port = common::http_server("approved-body");
    let url = format!("http://later.test:{port}/");
    let script = format!(
        "wget -q -O- {url} >/tmp/first 2>&1 & held=$!; sleep 2; \
         for i in 1 2 3; do (unset http_proxy HTTP_PROXY; wget -q -O- --post-data \"{{\\\"id\\\":$i,\\\"answer\\\":\\\"session\\\"}}\" \
         \"$BOT_BOTTLE_SUPERVISOR_URL/decide\" 2>&1) | sed 's/^/SELF: /'; done; echo SELF-DONE; \
         wait $held; echo FIRST=$? $(cat /tmp/first); \
         wget -q -O /dev/null {url}; echo SECOND=$?; wget -q -O /dev/null {url}; echo THIRD=$?"
    );
    let mut running = sb.start_script("ask", &script);
    let lines = running.stdout_lines();

    // Listed within a second of the agent's request (the bundle's own timestamp).
    let (bottle, first) = next_waiting(&sb, &[]);
    let seen_at = now_ms();
    let first_seen = first["first_seen"].as_str().unwrap();
    let a_second_ago = bot_bottle::bundle::egress::events::rfc3339_utc_ms(seen_at - 1000);
    assert!(
        first_seen >= a_second_ago.as_str(),
        "first seen {first_seen}, listed only at {}",
        bot_bottle::bundle::egress::events::rfc3339_utc_ms(seen_at)
    );
    assert_eq!(first["host"], "later.test");
    assert_eq!(first["port"], port);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/");

    // The agent tried to approve itself: refused, and its request still waits.
    let agent_tries = lines_until(&lines, |l| l == "SELF-DONE", STEP);
    let refusals = agent_tries.iter().filter(|l| l.contains("401")).count();
    assert_eq!(refusals, 3, "{agent_tries:?}");
    let id = first["id"].as_u64().unwrap();
    let (_, still) = next_waiting(&sb, &[]);
    assert_eq!(still["id"], id, "the agent's attempt changed the queue");

    let out = sb.run(&["approve", &bottle, &id.to_string()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::stdout(&out).contains("once"),
        "{}",
        common::stdout(&out)
    );
    let got = lines_until(&lines, |l| l.starts_with("FIRST="), STEP);
    assert_eq!(got.last().unwrap(), "FIRST=0 approved-body", "{got:?}");

    // Once: the next request asks again; approved and saved, the third passes unasked.
    let (_, second) = next_waiting(&sb, &[id]);
    let second_id = second["id"].as_u64().unwrap().to_string();
    let out = sb.run(&["approve", &bottle, &second_id, "--save"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let rest = lines_until(&lines, |l| l.starts_with("THIRD="), STEP);
    assert!(rest.contains(&"SECOND=0".to_owned()), "{rest:?}");
    assert_eq!(rest.last().unwrap(), "THIRD=0", "{rest:?}");
    assert!(running.wait().success());

    // Saved into the user's manifest (its comment kept): the next start allows it.
    let manifest = std::fs::read_to_string(sb.bottles().join("ask.toml")).unwrap();
    assert!(
        manifest.starts_with("# the user's own bottle"),
        "{manifest}"
    );
    let out = sb.run(&["plan", "ask", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rule = format!("later.test:{port}");
    assert!(
        plan["egress"]["allow"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == rule.as_str()),
        "{}",
        plan["egress"]
    );
    assert!(
        sb.docker_leftovers().is_empty(),
        "{:?}",
        sb.docker_leftovers()
    );
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
