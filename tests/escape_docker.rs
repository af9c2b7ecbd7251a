//! Escape attempts from inside a Docker-backend agent, against a real Docker engine. Each
//! attack prints `ATTACK <name>: ESCAPED` if it got through and `BLOCKED` otherwise; the test
//! asserts every line. One allowed request proves the network path itself works, so a
//! blanket failure cannot pass for isolation.

mod common;

use common::{docker_available, stderr, stdout, Running, Sandbox};
use nix::sys::signal::Signal;
use std::time::Duration;

const SECRET_BODY: &str = "upstream-says-hello-7f3a";

/// The attacks, as a busybox shell script. `$1` is the host port of the local upstream.
const ATTACKS: &str = r#"
P=${HTTP_PROXY#http://}; PH=${P%:*}; PP=${P#*:}
GW=$(ip route | awk '/default/ {print $3}')
try() { name=$1; shift; if "$@" 2>/dev/null | grep -q "$SECRET"; then echo "ATTACK $name: ESCAPED"; else echo "ATTACK $name: BLOCKED"; fi; }
raw() { printf "$1" | nc -w 5 $PH $PP; }
# HTTP through the proxy with nc: busybox wget cannot read responses under the runsc in
# Debian 12 (gVisor 20221219 returns EAGAIN on its sockets), nc works under both runtimes.
get() { raw "GET http://$1/ HTTP/1.1\r\nHost: $1\r\nConnection: close\r\n\r\n"; }
# The allowed path (must work: proves the test can see an escape).
try allowed-host get allowed.test:$PORT
# Through the proxy to hosts the manifest does not allow.
try other-host get example.com
try denied-subdomain get denied.allowed.test:$PORT
try ip-literal get 172.17.0.1:$PORT
try spoofed-host raw "GET http://172.17.0.1:$PORT/ HTTP/1.1\r\nHost: allowed.test:$PORT\r\nConnection: close\r\n\r\n"
try connect-ip-literal raw "CONNECT 172.17.0.1:$PORT HTTP/1.1\r\nHost: allowed.test:$PORT\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
# Around the proxy: direct TCP to a public-looking address, to the host, to the gateway.
try direct-public nc -w 3 203.0.113.10 80
try direct-host-docker0 sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 172.17.0.1 $PORT"
try direct-gateway sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 ${GW:-198.18.0.1} $PORT"
try direct-host-alias sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 127.0.0.1 $PORT"
# DNS to outside resolvers over UDP 53.
if nslookup example.com 203.0.113.53 >/dev/null 2>&1; then echo "ATTACK dns-outside: ESCAPED"; else echo "ATTACK dns-outside: BLOCKED"; fi
# DNS through Docker's embedded resolver (a name the host itself can resolve): a carrier for
# data in query names if the resolver forwards for an internal network.
if timeout 8 nslookup $HOSTNAME_RESOLVABLE 127.0.0.11 2>/dev/null | grep -q "^Name:"; then echo "ATTACK dns-docker-resolver: ESCAPED"; else echo "ATTACK dns-docker-resolver: BLOCKED"; fi
# What a denied request shows the agent.
raw "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
"#;

/// A name this host resolves through its own DNS (so a forwarding resolver would answer it
/// for the agent too); `localhost.invalid` (never resolvable) when the host has no DNS, which
/// leaves the DNS attack unable to show anything and says so.
fn host_resolvable_name() -> String {
    use std::net::ToSocketAddrs;
    for name in [
        "deb.debian.org",
        "crates.io",
        "registry.npmjs.org",
        "example.com",
    ] {
        if (name, 80)
            .to_socket_addrs()
            .is_ok_and(|mut a| a.next().is_some())
        {
            return name.to_owned();
        }
    }
    assert!(
        !common::in_ci(),
        "CI=true but this host resolves no public name: the dns-docker-resolver attack would prove nothing"
    );
    eprintln!("NOTE: this host resolves no public name: the dns-docker-resolver attack proves nothing here");
    "localhost.invalid".to_owned()
}

fn run_attacks(runtime: &str, pool: &str) -> String {
    let sb = Sandbox::new(pool);
    let port = common::http_server(SECRET_BODY);
    let script = ATTACKS
        .replace("$SECRET", SECRET_BODY)
        .replace("$PORT", &port.to_string())
        .replace("$HOSTNAME_RESOLVABLE", &host_resolvable_name());
    let out = sb
        .cmd()
        .env("BOT_BOTTLE_DOCKER_RUNTIME", runtime)
        .args([
            "start",
            "test",
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
    assert!(
        out.status.success(),
        "agent script failed:\n{text}\n{}",
        stderr(&out)
    );
    assert!(sb.rows().is_empty());
    assert!(
        sb.docker_leftovers().is_empty(),
        "{:?}",
        sb.docker_leftovers()
    );
    // The decisions were logged, with the bottle id.
    let log = stdout(&sb.run(&["logs", "test", "--egress", "--json"]));
    assert!(log.contains("\"verdict\":\"deny\""), "{log}");
    assert!(log.contains("\"host\":\"example.com\""), "{log}");
    text
}

fn assert_attacks(text: &str) {
    common::assert_attack_verdicts(
        text,
        &["allowed-host"],
        &[
            "other-host",
            "denied-subdomain",
            "ip-literal",
            "spoofed-host",
            "connect-ip-literal",
            "direct-public",
            "direct-host-docker0",
            "direct-gateway",
            "direct-host-alias",
            "dns-outside",
            "dns-docker-resolver",
        ],
    );
    assert!(text.contains("403"), "{text}");
    assert!(
        text.contains("bot-bottle test bottle: egress to this host is denied"),
        "deny message not shown to the agent:\n{text}"
    );
}

#[test]
fn agent_under_runc_cannot_escape() {
    if !docker_available("agent_under_runc_cannot_escape") {
        return;
    }
    assert_attacks(&run_attacks("runc", "70-70"));
}

#[test]
fn agent_under_runsc_cannot_escape() {
    if !docker_available("agent_under_runsc_cannot_escape") {
        return;
    }
    let registered = std::process::Command::new("docker")
        .args(["info", "--format", "{{json .Runtimes}}"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("runsc"))
        .unwrap_or(false);
    if !registered {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but runsc is not registered with dockerd (.ci/run registers it)"
        );
        eprintln!("SKIPPED agent_under_runsc_cannot_escape: runsc not registered with Docker");
        return;
    }
    assert_attacks(&run_attacks("runsc", "71-71"));
}

#[test]
fn agent_cannot_reach_another_bottles_bundle() {
    if !docker_available("agent_cannot_reach_another_bottles_bundle") {
        return;
    }
    let port = common::http_server(SECRET_BODY);
    // Bottle A runs; its bundle proxy would let allowed.test through.
    let a = Sandbox::new("72-72");
    let mut cmd = a.cmd();
    cmd.env("BOT_BOTTLE_PAUSE_AT", "agent").args([
        "start",
        "test",
        "--backend",
        "docker",
        "--",
        "sleep",
        "600",
    ]);
    let mut run_a = Running::spawn(cmd);
    run_a.wait_for("paused at agent", Duration::from_secs(180));
    // From bottle B, use A's bundle (its internal address and its alias) as a proxy.
    let b = Sandbox::new("73-73");
    let req = format!(
        "GET http://allowed.test:{port}/ HTTP/1.1\\r\\nHost: allowed.test:{port}\\r\\nConnection: close\\r\\n\\r\\n"
    );
    let script = format!(
        "OWN=${{HTTP_PROXY#http://}}; \
         for p in 198.18.72.2:3128 127.0.0.72:3128; do \
           if printf '{req}' | nc -w 3 ${{p%:*}} ${{p#*:}} 2>/dev/null | grep -q {SECRET_BODY}; \
           then echo \"ATTACK via $p: ESCAPED\"; else echo \"ATTACK via $p: BLOCKED\"; fi; \
           if nc -w 3 ${{p%:*}} ${{p#*:}} </dev/null; then echo \"CONNECT $p: OPEN\"; else echo \"CONNECT $p: CLOSED\"; fi; \
         done; printf '{req}' | nc -w 5 ${{OWN%:*}} ${{OWN#*:}}"
    );
    let out = b
        .cmd()
        .args([
            "start",
            "test",
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
    run_a.signal(Signal::SIGTERM);
    run_a.wait();
    assert!(
        text.contains("ATTACK via 198.18.72.2:3128: BLOCKED"),
        "{text}"
    );
    assert!(
        text.contains("ATTACK via 127.0.0.72:3128: BLOCKED"),
        "{text}"
    );
    assert!(text.contains("CONNECT 198.18.72.2:3128: CLOSED"), "{text}");
    // B's own path works, so the blocks above are isolation, not a broken network.
    assert!(text.contains(SECRET_BODY), "{text}\n{}", stderr(&out));
}

#[test]
fn allowed_host_succeeds_and_denied_host_fails_with_the_deny_message() {
    if !docker_available("allowed_host_succeeds_and_denied_host_fails") {
        return;
    }
    let sb = Sandbox::new("74-74");
    let port = common::http_server(SECRET_BODY);
    // busybox wget needs runc (see ATTACKS); the runsc path is covered with nc above.
    let sb_cmd = |args: &[&str]| {
        sb.cmd()
            .env("BOT_BOTTLE_DOCKER_RUNTIME", "runc")
            .args(args)
            .output()
            .unwrap()
    };
    let ok = sb_cmd(&[
        "start",
        "test",
        "--backend",
        "docker",
        "--",
        "wget",
        "-qO-",
        &format!("http://allowed.test:{port}/"),
    ]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert_eq!(stdout(&ok), SECRET_BODY);
    let denied = sb_cmd(&["start", "test", "--", "wget", "-qO-", "http://example.com/"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        stderr(&denied).contains("egress to this host is denied"),
        "{}",
        stderr(&denied)
    );
}

#[test]
fn agent_exit_code_passes_through() {
    if !docker_available("agent_exit_code_passes_through") {
        return;
    }
    let sb = Sandbox::new("75-75");
    let out = sb.run(&[
        "start",
        "test",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "out\n");
    assert!(stderr(&out).contains("err"));
    assert!(sb.rows().is_empty());
}

#[test]
fn agent_runs_as_the_manifest_user_with_proxy_env() {
    if !docker_available("agent_runs_as_the_manifest_user") {
        return;
    }
    let sb = Sandbox::new("76-76");
    let out = sb.run(&[
        "start",
        "test",
        "--",
        "sh",
        "-c",
        "id -u; echo $HTTPS_PROXY; echo $NO_PROXY; \
         for p in 9418 7070; do printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 198.18.76.2 $p; done",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "http://198.18.76.2:3128");
    assert!(lines[2].contains("198.18.76.2"));
    // The git gate serves git's smart protocol on its repository and nothing else; the
    // supervisor wants the bottle's token, which the agent does not have.
    assert!(
        text.contains("HTTP/1.1 404 Not Found")
            && text.contains("only git's smart HTTP protocol on /workspace.git is served here"),
        "{text}"
    );
    assert!(text.contains("HTTP/1.1 401 Unauthorized"), "{text}");
    assert!(text.contains("this needs the bottle's token"), "{text}");
}

/// A fork bomb in the agent stops at the bottle's pids limit instead of exhausting the host's.
/// (Under Debian 12's runsc the limit holds too, but the agent's shell dies with the bomb, so
/// there is nothing left to count: the limit is read back from the engine in `lifecycle`.)
fn fork_bomb_is_contained(runtime: &str, pool: &str) {
    let sb = Sandbox::new(pool);
    sb.add_bottle("forky", "extends = \"test\"\n[resources]\npids = 64\n");
    // A child shell spawns up to 300 sleepers (dying when it can fork no more); the agent then
    // counts the container's processes with shell builtins only (nothing is left to fork).
    let script = "sh -c 'i=0; while [ $i -lt 300 ]; do sleep 60 & i=$((i+1)); done' 2>/dev/null; \
                  n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo $n";
    let out = sb
        .cmd()
        .env("BOT_BOTTLE_DOCKER_RUNTIME", runtime)
        .args([
            "start",
            "forky",
            "--backend",
            "docker",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap();
    let text = stdout(&out);
    let count: usize = text
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process count:\n{text}\n{}", stderr(&out)));
    // Many sleepers started (the loop ran), and no more than the limit exist.
    assert!(
        count > 32 && count <= 64,
        "{count} processes under a limit of 64"
    );
    assert!(sb.rows().is_empty());
}

#[test]
fn a_fork_bomb_under_runc_stops_at_the_pids_limit() {
    if docker_available("a_fork_bomb_under_runc_stops_at_the_pids_limit") {
        fork_bomb_is_contained("runc", "93-93");
    }
}
