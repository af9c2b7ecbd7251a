//! The approval flow (`[egress] unknown = "ask"`), shared by the Docker backend's test
//! (`tests/approvals.rs`) and the microVM backend's (`tests/microvm_start.rs`): the agent
//! asks for a host its allowlist does not name (served by the test on the Docker host) and
//! the human answers from the host with `bot-bottle approvals --json` and `approve`.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{lines_until, Running, Sandbox};

const STEP: Duration = Duration::from_secs(120);

/// A bottle like `test` that asks for unlisted hosts; `later.test` is served on the Docker host
/// (below the address floor, so named in `allow_private`) but allowed by no rule.
pub fn asking_bottle(sb: &Sandbox) {
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
        assert!(out.status.success(), "{}", super::stderr(&out));
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

/// The flow from the agent's side (a script run by `start`: `start` is the command up to
/// the bottle and its backend) and the host's: listed within a second, the agent's own three
/// attempts to approve refused with 401, approved once, then approved and saved, the third
/// request passing unasked; the saved rule in the user's manifest for the next start.
pub fn held_listed_approved_once_then_saved(sb: &Sandbox, mut start: Command) {
    asking_bottle(sb);
    let port = super::http_server("approved-body");
    let url = format!("http://later.test:{port}/");
    let script = format!(
        "wget -q -O- {url} >/tmp/first 2>&1 & held=$!; sleep 2; \
         for i in 1 2 3; do (unset http_proxy HTTP_PROXY; wget -q -O- --post-data \"{{\\\"id\\\":$i,\\\"answer\\\":\\\"session\\\"}}\" \
         \"$BOT_BOTTLE_SUPERVISOR_URL/decide\" 2>&1) | sed 's/^/SELF: /'; done; echo SELF-DONE; \
         wait $held; echo FIRST=$? $(cat /tmp/first); \
         wget -q -O /dev/null {url}; echo SECOND=$?; wget -q -O /dev/null {url}; echo THIRD=$?; \
         wget -q -O /dev/null http://other.test/ 2>/tmp/fourth; echo FOURTH=$? $(cat /tmp/fourth)"
    );
    start.args(["--", "sh", "-c", &script]);
    let mut running = Running::spawn(start);
    let lines = running.stdout_lines();

    // Listed within a second of the agent's request (the bundle's own timestamp).
    let (bottle, first) = next_waiting(sb, &[]);
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
    let (_, still) = next_waiting(sb, &[]);
    assert_eq!(still["id"], id, "the agent's attempt changed the queue");

    let out = sb.run(&["approve", &bottle, &id.to_string()]);
    assert!(out.status.success(), "{}", super::stderr(&out));
    assert!(
        super::stdout(&out).contains("once"),
        "{}",
        super::stdout(&out)
    );
    let got = lines_until(&lines, |l| l.starts_with("FIRST="), STEP);
    assert_eq!(got.last().unwrap(), "FIRST=0 approved-body", "{got:?}");

    // Once: the next request asks again; approved and saved, the third passes unasked.
    let (_, second) = next_waiting(sb, &[id]);
    let second_id = second["id"].as_u64().unwrap().to_string();
    let out = sb.run(&["approve", &bottle, &second_id, "--save"]);
    assert!(out.status.success(), "{}", super::stderr(&out));
    let rest = lines_until(&lines, |l| l.starts_with("THIRD="), STEP);
    assert!(rest.contains(&"SECOND=0".to_owned()), "{rest:?}");
    assert_eq!(rest.last().unwrap(), "THIRD=0", "{rest:?}");

    // The next to wait is another host (the third asked nothing); denied, it is refused.
    let second_id: u64 = second_id.parse().unwrap();
    let (_, fourth) = next_waiting(sb, &[id, second_id]);
    assert_eq!(
        (&fourth["host"], &fourth["port"]),
        (&"other.test".into(), &80.into())
    );
    let out = sb.run(&["deny", &bottle, &fourth["id"].to_string()]);
    assert!(out.status.success(), "{}", super::stderr(&out));
    assert!(
        super::stdout(&out).contains("denied other.test:80"),
        "{}",
        super::stdout(&out)
    );
    let denied = lines_until(&lines, |l| l.starts_with("FOURTH="), STEP);
    let denied = denied.last().unwrap();
    assert!(
        denied.starts_with("FOURTH=1 ") && denied.contains("403"),
        "{denied}"
    );
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
