//! Attacks on the egress proxy's address floor and rule ports, from inside a Docker-backend
//! agent, against the real bundle in a real Docker engine. The bottle allows names that lead
//! to the Docker host, to its own bundle and to the cloud metadata address, and one name
//! without a port; only the name the manifest opens with `allow_private` may be reached, and
//! only on the port its rule names. Each attack prints `ATTACK <name>: ESCAPED` if it got
//! through and `BLOCKED` otherwise. Positive controls (the test bottle's own allowed host,
//! also spelled in capitals with a trailing dot) prove the network path works, so a blanket
//! failure cannot pass for the floor.
//!
//! The binding of an intercepted tunnel to its credential host is attacked over real sockets
//! in `egress::tests_binding` (it needs a TLS upstream the public roots trust, which no test
//! here can have).

mod common;

use common::{docker_available, stderr, stdout, Sandbox};

/// The attack under `runtime` (`auto`: runsc where registered, as in CI) from the alias pool
/// `127.0.0.<octet>`: its bundle is 198.18.<octet>.2 on the bottle's internal network.
fn floor_attack(runtime: &str, octet: u8) {
    let sb = Sandbox::new(&format!("{octet}-{octet}"));
    let mut start = sb.cmd();
    start
        .env("BOT_BOTTLE_DOCKER_RUNTIME", runtime)
        .args(["start", "floor", "--backend", "docker"]);
    common::floor::attack_and_assert(&sb, &format!("198.18.{octet}.2"), start);
}

#[test]
fn names_below_the_address_floor_and_ports_a_rule_does_not_name_are_refused() {
    if !docker_available("names_below_the_address_floor_are_refused") {
        return;
    }
    floor_attack("auto", 200);
}

#[test]
fn names_below_the_address_floor_are_refused_under_runc_too() {
    if !docker_available("names_below_the_address_floor_are_refused_under_runc_too") {
        return;
    }
    floor_attack("runc", 202);
}

/// The bundle holds the allowlist and the credentials: an agent that finds a way to grow its
/// memory or its processes meets the bundle container's own limits, not the host's.
#[test]
fn the_bundle_container_has_memory_without_swap_and_pids_limits() {
    if !docker_available("the_bundle_container_has_limits") {
        return;
    }
    let sb = Sandbox::new("201-201");
    let mut cmd = sb.cmd();
    cmd.args(["start", "test", "--backend", "docker", "--", "sleep", "60"]);
    let running = common::Running::spawn(cmd);
    let id = sb.wait_running(std::time::Duration::from_secs(120));
    let bundle = sb
        .docker_leftovers()
        .into_iter()
        .find(|n| n.contains(&id) && n.contains("bundle"))
        .expect("the bundle container");

    let out = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}} {{.HostConfig.PidsLimit}}",
            &bundle,
        ])
        .output()
        .unwrap();
    let stop = sb.run(&["stop", &id]);
    running.wait();

    assert_eq!(
        stdout(&out).trim(),
        format!(
            "{m} {m} {p}",
            m = bot_bottle::bundle::container::BUNDLE_MEMORY_BYTES,
            p = bot_bottle::bundle::container::BUNDLE_PIDS_LIMIT
        ),
        "{}",
        stderr(&out)
    );
    assert!(stop.status.success(), "{}", stderr(&stop));
    assert!(
        sb.docker_leftovers().is_empty(),
        "{:?}",
        sb.docker_leftovers()
    );
}

/// Outbound secret scanning in the real bundle: the agent's GitHub-format token in a POST body
/// and in a URL to an allowed plain-HTTP host are refused before they go up (`common::secrets`).
#[test]
fn a_token_the_agent_posts_to_an_allowed_host_is_refused_and_never_arrives() {
    if !docker_available("a_token_the_agent_posts_to_an_allowed_host_is_refused") {
        return;
    }
    let sb = Sandbox::new("203-203");
    let mut start = sb.cmd();
    start.args(["start", "leaky", "--backend", "docker"]);
    common::secrets::leaks_are_refused(&sb, start);
}
