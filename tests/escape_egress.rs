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

const SECRET_BODY: &str = "upstream-says-hello-e9b1";
/// This test's alias pool octet: its bundle is 198.18.200.2 on the bottle's internal network.
const POOL: &str = "200-200";
const OWN_BUNDLE: &str = "198.18.200.2";

/// `gateway.test` and `portless.test` lead to the Docker host (where the test's server
/// runs); only `portless.test` is opened below the floor, and its rule has no port.
/// `bundle.test` leads to this bottle's own bundle, `metadata.test` to the cloud metadata
/// service.
const FLOOR_BOTTLE: &str = "extends = \"test\"\n\
[egress]\n\
allow = [\"gateway.test:*\", \"bundle.test:*\", \"metadata.test:*\", \"portless.test\"]\n\
hosts = { \"gateway.test\" = \"host-gateway\", \"portless.test\" = \"host-gateway\", \"bundle.test\" = \"$BUNDLE\", \"metadata.test\" = \"169.254.169.254\" }\n\
allow_private = [\"portless.test\"]\n";

/// `$PORT` is the test server's port on the Docker host.
const ATTACKS: &str = r#"
P=${HTTP_PROXY#http://}; PH=${P%:*}; PP=${P#*:}
try() { name=$1; marker=$2; shift 2; if "$@" 2>/dev/null | grep -q "$marker"; then echo "ATTACK $name: ESCAPED"; else echo "ATTACK $name: BLOCKED"; fi; }
raw() { printf "$1" | nc -w 5 $PH $PP; }
get() { raw "GET http://$1/ HTTP/1.1\r\nHost: $1\r\nConnection: close\r\n\r\n"; }
# Positive controls: the allowed host, and the same host spelled another way through CONNECT.
try allowed-host "$SECRET" get allowed.test:$PORT
try allowed-host-other-spelling "$SECRET" raw "CONNECT ALLOWED.Test.:$PORT HTTP/1.1\r\nHost: ALLOWED.Test.:$PORT\r\n\r\nGET / HTTP/1.1\r\nHost: allowed.test:$PORT\r\nConnection: close\r\n\r\n"
# An allowed name that leads to the Docker host, without the manifest opening it.
try gateway-name "$SECRET" get gateway.test:$PORT
try gateway-name-connect "$SECRET" raw "CONNECT gateway.test:$PORT HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n"
# An allowed name that leads back into this bottle's own bundle (supervisor, git gate).
try bundle-supervisor "token" get bundle.test:7070
try bundle-git-gate "git gate" get bundle.test:9418
# The cloud metadata service.
try metadata "HTTP/1.1 200" get metadata.test
# A rule without a port: 443 only, not the port the server listens on.
try portless-rule-other-port "$SECRET" get portless.test:$PORT
"#;

#[test]
fn names_below_the_address_floor_and_ports_a_rule_does_not_name_are_refused() {
    if !docker_available("names_below_the_address_floor_are_refused") {
        return;
    }
    let sb = Sandbox::new(POOL);
    sb.add_bottle("floor", &FLOOR_BOTTLE.replace("$BUNDLE", OWN_BUNDLE));
    let port = common::http_server(SECRET_BODY);
    let script = ATTACKS
        .replace("$SECRET", SECRET_BODY)
        .replace("$PORT", &port.to_string());

    let out = sb
        .cmd()
        .args([
            "start",
            "floor",
            "--backend",
            "docker",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let text = stdout(&out);
    let log = stdout(&sb.run(&["logs", "floor", "--egress", "--json"]));

    assert!(
        out.status.success(),
        "agent script failed:\n{text}\n{}",
        stderr(&out)
    );
    for control in ["allowed-host", "allowed-host-other-spelling"] {
        assert!(
            text.contains(&format!("ATTACK {control}: ESCAPED")),
            "positive control {control} broken:\n{text}"
        );
    }
    for attack in [
        "gateway-name",
        "gateway-name-connect",
        "bundle-supervisor",
        "bundle-git-gate",
        "metadata",
        "portless-rule-other-port",
    ] {
        assert!(
            text.contains(&format!("ATTACK {attack}: BLOCKED")),
            "{attack} was not blocked:\n{text}"
        );
    }
    // The refusals were logged as such, and the other spelling under the one name.
    assert!(log.contains("\"reason\":\"blocked_address\""), "{log}");
    assert!(log.contains("\"host\":\"gateway.test\""), "{log}");
    assert!(
        log.contains(&format!(
            "\"method\":\"CONNECT\",\"host\":\"allowed.test\",\"port\":{port}"
        )),
        "{log}"
    );
    assert!(!log.contains("ALLOWED"), "{log}");
    assert!(
        sb.docker_leftovers().is_empty(),
        "{:?}",
        sb.docker_leftovers()
    );
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
