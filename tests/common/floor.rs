//! The address-floor and rule-port attack, shared by the Docker backend (`escape_egress`) and
//! the microVM backend (`microvm_start`): the same bottle and the same agent script, since the
//! path through the egress proxy is the same.

use super::{stderr, stdout, Sandbox};

pub const SECRET_BODY: &str = "upstream-says-hello-e9b1";

/// `gateway.test` and `portless.test` lead to the Docker host (where the test's server
/// runs); only `portless.test` is opened below the floor, and its rule has no port.
/// `bundle.test` leads to this bottle's own bundle, `metadata.test` to the cloud metadata
/// service.
pub const FLOOR_BOTTLE: &str = "extends = \"test\"\n\
[egress]\n\
allow = [\"gateway.test:*\", \"bundle.test:*\", \"metadata.test:*\", \"portless.test\"]\n\
hosts = { \"gateway.test\" = \"host-gateway\", \"portless.test\" = \"host-gateway\", \"bundle.test\" = \"$BUNDLE\", \"metadata.test\" = \"169.254.169.254\" }\n\
allow_private = [\"portless.test\"]\n";

/// `$PORT` is the test server's port on the Docker host.
pub const ATTACKS: &str = r#"
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

/// Adds the `floor` bottle to `sb` (`bundle` is where its own bundle is reached from the
/// proxy), runs the attack script as its agent with `start` (`args` before `--`), and asserts
/// each attack was blocked, the controls got through, the refusals were logged and nothing was
/// left behind.
pub fn attack_and_assert(sb: &Sandbox, bundle: &str, start: std::process::Command) {
    sb.add_bottle("floor", &FLOOR_BOTTLE.replace("$BUNDLE", bundle));
    let port = super::http_server(SECRET_BODY);
    let script = ATTACKS
        .replace("$SECRET", SECRET_BODY)
        .replace("$PORT", &port.to_string());
    let mut start = start;
    let out = start.args(["--", "sh", "-c", &script]).output().unwrap();
    let text = stdout(&out);
    let log = stdout(&sb.run(&["logs", "floor", "--egress", "--json"]));

    assert!(
        out.status.success(),
        "agent script failed:\n{text}\n{}",
        stderr(&out)
    );
    super::assert_attack_verdicts(
        &text,
        &["allowed-host", "allowed-host-other-spelling"],
        &[
            "gateway-name",
            "gateway-name-connect",
            "bundle-supervisor",
            "bundle-git-gate",
            "metadata",
            "portless-rule-other-port",
        ],
    );
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
