//! Attaching to the agent: with a terminal (a real pty made by `script`) the agent gets a TTY of
//! the terminal's size and its exit code passes through; without one, plain streams.

mod common;

use common::{docker_available, stderr, Sandbox};
use std::process::Command;

#[test]
fn agent_gets_a_tty_of_the_terminal_size_and_its_exit_code_passes_through() {
    if !docker_available("agent_gets_a_tty") {
        return;
    }
    let sb = Sandbox::new("80-80");
    // `script` runs bot-bottle on a fresh pty; `stty` sets that pty's size first. The agent's
    // `sleep` lets the resize that follows the container's start land (Docker 20.10 cannot set
    // a console size at creation). runc: the Debian 12 runsc does not allocate TTYs.
    let inner = format!(
        "stty rows 33 cols 111; {} start test -- sh -c 'tty; sleep 1; stty size; exit 3'",
        common::bin().display()
    );
    let mut script = Command::new("script");
    script.args(["-qec", &inner, "/dev/null"]);
    for (k, v) in sb.cmd().get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let out = script
        .env("BOT_BOTTLE_DOCKER_RUNTIME", "runc")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}\n{}", stderr(&out));
    assert!(text.contains("/dev/pts/"), "no TTY in the agent:\n{text}");
    assert!(
        text.contains("33 111"),
        "terminal size not forwarded:\n{text}"
    );
    assert!(sb.rows().is_empty());
}

#[test]
fn agent_without_a_terminal_reads_piped_stdin() {
    if !docker_available("agent_without_a_terminal_reads_piped_stdin") {
        return;
    }
    let sb = Sandbox::new("81-81");
    let mut child = sb
        .cmd()
        .args(["start", "test", "--", "sh", "-c", "tty || true; wc -c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&[b'x'; 100_000]).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.contains("not a tty"), "{text}");
    assert!(text.contains("100000"), "{text}");
}

#[test]
fn exec_runs_in_the_running_bottle_and_passes_its_exit_code() {
    if !docker_available("exec_runs_in_the_running_bottle") {
        return;
    }
    let sb = Sandbox::new("82-82");
    let run = sb.start_script("test", "echo ready > /tmp/state; sleep 600");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let id = sb.wait_running(std::time::Duration::from_secs(180));
    // The agent may still be starting its shell: wait for the file it writes.
    let mut out = sb.run(&["exec", &id, "--", "cat", "/tmp/state"]);
    while !common::stdout(&out).contains("ready") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        out = sb.run(&["exec", &id, "--", "cat", "/tmp/state"]);
    }
    assert_eq!(common::stdout(&out), "ready\n");

    let out = sb.run(&[
        "exec",
        "test",
        "--",
        "sh",
        "-c",
        "id -u; echo oops >&2; exit 5",
    ]);

    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(common::stdout(&out), "1000\n");
    assert!(stderr(&out).contains("oops"));
    let gone = sb.run(&["exec", "test", "--", "true"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        stderr(&gone).contains("no running bottle"),
        "{}",
        stderr(&gone)
    );
}

#[test]
fn cp_copies_a_tree_into_a_running_bottle_and_the_agents_output_back_out() {
    if !docker_available("cp_copies_a_tree_into_a_running_bottle") {
        return;
    }
    let sb = Sandbox::new("83-83");
    // Under runsc /tmp is the sandbox's own tmpfs, out of Docker's reach: use the home dir.
    let mut cmd = sb.cmd();
    cmd.args(["start", "test", "--", "sleep", "600"]);
    let run = common::Running::spawn(cmd);
    sb.wait_running(std::time::Duration::from_secs(180));
    let local = sb.dir.path().join("proj");
    std::fs::create_dir_all(local.join("src")).unwrap();
    std::fs::write(local.join("src/input.txt"), "from the host\n").unwrap();

    let copied_in = sb.run(&["cp", local.to_str().unwrap(), "test:/home/agent"]);
    let worked = sb.run(&[
        "exec",
        "test",
        "--",
        "sh",
        "-c",
        "mkdir -p ~/result && tr a-z A-Z < ~/proj/src/input.txt > ~/result/out.txt",
    ]);
    let got = sb.dir.path().join("got");
    let copied_out = sb.run(&["cp", "test:/home/agent/result", got.to_str().unwrap()]);
    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait();

    assert!(copied_in.status.success(), "{}", stderr(&copied_in));
    assert!(worked.status.success(), "{}", stderr(&worked));
    assert!(copied_out.status.success(), "{}", stderr(&copied_out));
    assert_eq!(
        std::fs::read_to_string(got.join("result/out.txt")).unwrap(),
        "FROM THE HOST\n"
    );
}

/// An agent that offers more than `cp` accepts: the copy stops at the bound (named in the
/// error, with how to raise it) instead of taking all the host gives it; a copy under the
/// bound still works (the positive control).
#[test]
fn cp_out_of_a_bottle_stops_at_its_bound_and_names_it() {
    if !docker_available("cp_out_of_a_bottle_stops_at_its_bound") {
        return;
    }
    let sb = Sandbox::new("78-78");
    let mut cmd = sb.cmd();
    cmd.args(["start", "test", "--", "sleep", "600"]);
    let run = common::Running::spawn(cmd);
    sb.wait_running(std::time::Duration::from_secs(180));
    let made = sb.run(&[
        "exec",
        "test",
        "--",
        "sh",
        "-c",
        "mkdir -p ~/big ~/small && head -c 3000000 /dev/zero > ~/big/blob && echo hi > ~/small/note",
    ]);
    let bounded = |from: &str, to: &str| {
        let mut cmd = sb.cmd();
        cmd.env("BOT_BOTTLE_CP_MAX_BYTES", "1000000").args([
            "cp",
            from,
            sb.dir.path().join(to).to_str().unwrap(),
        ]);
        cmd.output().unwrap()
    };

    let small = bounded("test:/home/agent/small", "got-small");
    let big = bounded("test:/home/agent/big", "got-big");
    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait();

    assert!(made.status.success(), "{}", stderr(&made));
    assert!(small.status.success(), "{}", stderr(&small));
    assert_eq!(
        std::fs::read_to_string(sb.dir.path().join("got-small/small/note")).unwrap(),
        "hi\n"
    );
    assert_eq!(big.status.code(), Some(1));
    assert!(
        stderr(&big).contains("larger than 1000000 bytes")
            && stderr(&big).contains("BOT_BOTTLE_CP_MAX_BYTES"),
        "{}",
        stderr(&big)
    );
}

#[test]
fn docker_backend_mount_is_a_writable_copy_and_the_host_file_is_kept() {
    if !docker_available("docker_backend_mount_is_a_writable_copy_and_the_host_file_is_kept") {
        return;
    }
    let sb = Sandbox::new("87-87");
    // A manifest mount whose host path holds a ':' (which a `binds` string could not carry).
    let host = sb.dir.path().join("my:project");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("notes.txt"), "keep me\n").unwrap();
    sb.add_bottle(
        "mounted",
        &format!(
            "extends = \"test\"\n[[mount]]\nhost = \"{}\"\nguest = \"/workspace\"\n",
            host.display()
        ),
    );
    let out = sb.run(&[
        "start",
        "mounted",
        "--",
        "sh",
        "-c",
        "cat /workspace/notes.txt; echo changed > /workspace/notes.txt && cat /workspace/notes.txt",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = common::stdout(&out);
    // The agent writes its copy; the host file is never modified.
    assert_eq!(text, "keep me\nchanged\n");
    assert_eq!(
        std::fs::read_to_string(host.join("notes.txt")).unwrap(),
        "keep me\n"
    );
}

const CREDS_BOTTLE: &str = "extends = \"test\"\n\
[egress]\nallow = [\"api.example.test:*\"]\nhosts = { \"api.example.test\" = \"host-gateway\" }\nallow_private = [\"api.example.test\"]\n\
[credentials.\"api.example.test\"]\nenv = \"BB_TEST_TOKEN\"\nscheme = \"Bearer\"\n";

#[test]
fn start_without_the_credentials_value_says_how_to_provide_it() {
    if !docker_available("start_without_the_credentials_value_says_how_to_provide_it") {
        return;
    }
    let sb = Sandbox::new("89-89");
    sb.add_bottle("creds", CREDS_BOTTLE);

    let out = sb
        .cmd()
        .env_remove("BB_TEST_TOKEN")
        .args(["start", "creds", "--", "true"])
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "BB_TEST_TOKEN is not set: export it to give api.example.test its credential"
        ),
        "{}",
        stderr(&out)
    );
}

/// The agent trusts the bottle's CA and never holds the secret; the bundle's proxy, reached
/// the way the agent reaches it, answers TLS for the credential host with a certificate from
/// that CA (the interception that injects the credential; the injection itself is tested over
/// real sockets in `egress::intercept`).
#[test]
fn credential_hosts_are_intercepted_with_the_bottles_ca_and_the_secret_stays_out() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::io::{Read, Write};
    if !docker_available("credential_hosts_are_intercepted_with_the_bottles_ca") {
        return;
    }
    let sb = Sandbox::new("90-90");
    sb.add_bottle("creds", CREDS_BOTTLE);
    // Something listening where api.example.test leads (plain TCP: the proxy's own TLS to it
    // fails after the agent's handshake, which is what is checked here).
    let upstream = common::http_server("not TLS");
    let mut cmd = sb.cmd();
    cmd.env("BB_TEST_TOKEN", "secret-value-123").args([
        "start",
        "creds",
        "--",
        "sh",
        "-c",
        "cat $NODE_EXTRA_CA_CERTS; env | grep -c secret-value-123; sleep 60",
    ]);
    let mut run = common::Running::spawn(cmd);
    // The agent is stopped only after it has printed what is checked below (the bottle row
    // says "running" before the agent's shell has run).
    let out_rx = run.stdout_lines();
    let id = sb.wait_running(std::time::Duration::from_secs(180));
    let ca = std::fs::read(sb.state().join("bottles").join(&id).join("ca.pem")).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = std::net::TcpStream::connect("127.0.0.90:3128").unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        tcp,
        "CONNECT api.example.test:{upstream} HTTP/1.1\r\nHost: api.example.test:{upstream}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    let mut tls = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::try_from("api.example.test").unwrap(),
    )
    .unwrap();
    let handshake = tls.complete_io(&mut tcp);
    // The agent's last line before its sleep is the count of secret copies it holds.
    let mut agent_output = common::lines_until(
        &out_rx,
        |l| l.trim().parse::<u32>().is_ok(),
        std::time::Duration::from_secs(60),
    )
    .join("\n");
    agent_output.push('\n');
    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait();

    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert!(
        handshake.is_ok(),
        "the proxy did not answer with the bottle CA: {handshake:?}"
    );
    // The agent holds the CA's certificate at NODE_EXTRA_CA_CERTS, and not the secret.
    assert!(
        agent_output.starts_with(&String::from_utf8_lossy(&ca).into_owned()),
        "{agent_output}"
    );
    assert!(agent_output.ends_with("0\n"), "{agent_output}");
    assert_eq!(agent_output.lines().last(), Some("0"), "{agent_output}");
}

/// `logs --follow` shows the decisions of a running bottle as they happen, one readable line
/// each, and ends when the bottle does.
#[test]
fn logs_follow_shows_decisions_as_they_happen_and_ends_with_the_bottle() {
    if !docker_available("logs_follow_shows_decisions_as_they_happen") {
        return;
    }
    let sb = Sandbox::new("94-94");
    // The agent makes its request a little after --follow starts, then stays up: the line
    // must arrive while the bottle still runs.
    let run = sb.start_script(
        "test",
        "sleep 3; P=${HTTP_PROXY#http://}; \
         printf 'GET http://example.com/ HTTP/1.1\\r\\nHost: example.com\\r\\nConnection: close\\r\\n\\r\\n' \
         | nc -w 5 ${P%:*} ${P#*:} >/dev/null; sleep 600",
    );
    sb.wait_running(std::time::Duration::from_secs(180));
    let mut follow = common::Running::spawn({
        let mut c = sb.cmd();
        c.args(["logs", "test", "--follow"]);
        c
    });
    let lines = follow.stdout_lines();
    let shown = common::lines_until(
        &lines,
        |l| l.contains("example.com:80"),
        std::time::Duration::from_secs(60),
    );
    // Still running when the line came; now the bottle stops, and --follow ends on its own.
    let still_running = !sb.rows().is_empty();
    let stopped = sb.run(&["stop", "test"]);
    run.wait();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(follow.wait());
    });
    let ended = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("logs --follow did not end with the bottle");

    assert!(still_running);
    assert!(stopped.status.success(), "{}", stderr(&stopped));
    assert!(ended.success());
    let line = shown.last().unwrap();
    assert!(
        line.contains("  deny   GET      example.com:80  not_allowed"),
        "{line}"
    );
    assert!(!line.starts_with('{'), "{line}");
}

/// `bot-bottle allow` lets a running bottle reach a host its manifest did not list, and the
/// agent cannot do the same for itself through the supervisor (it never holds the token).
#[test]
fn the_host_allows_more_while_the_bottle_runs_and_the_agent_cannot_allow_itself() {
    if !docker_available("the_host_allows_more_while_the_bottle_runs") {
        return;
    }
    let sb = Sandbox::new("95-95");
    sb.add_bottle(
        "later",
        "extends = \"test\"\n[egress]\nhosts = { \"later.test\" = \"host-gateway\", \"allowed.test\" = \"host-gateway\" }\nallow_private = [\"later.test\"]\n",
    );
    let port = common::http_server("later-says-hello");
    // The agent tries to allow itself (no token, a guessed one), reports what it got, then
    // waits until the host has allowed later.test.
    let script = format!(
        "P=${{HTTP_PROXY#http://}}; \
         get() {{ printf 'GET http://later.test:{port}/ HTTP/1.1\\r\\nHost: later.test:{port}\\r\\nConnection: close\\r\\n\\r\\n' | nc -w 5 ${{P%:*}} ${{P#*:}}; }}; \
         S=${{BOT_BOTTLE_SUPERVISOR_URL#http://}}; \
         sup() {{ printf \"POST /allow HTTP/1.1\\r\\n$1Content-Length: 10\\r\\nConnection: close\\r\\n\\r\\nlater.test\" | nc -w 5 ${{S%:*}} ${{S#*:}} | head -1; }}; \
         echo \"SELF-NOTOKEN: $(sup '')\"; \
         echo \"SELF-GUESS: $(sup 'Authorization: Bearer guess\\r\\n')\"; \
         echo \"BEFORE: $(get | head -1)\"; \
         i=0; while [ $i -lt 240 ]; do if get | grep -q later-says-hello; then echo AFTER: allowed; exit 0; fi; sleep 0.5; i=$((i+1)); done; \
         echo AFTER: still denied; exit 1"
    );
    let mut run = sb.start_script("later", &script);
    let rx = run.stdout_lines();
    let mut seen = common::lines_until(
        &rx,
        |l| l.starts_with("BEFORE:"),
        std::time::Duration::from_secs(180),
    );
    // `:*`: the test's server is on a port of its own (a rule without a port opens 443 only).
    let allowed = sb.run(&["allow", "later", "later.test:*"]);
    let listed = sb.run(&["allow", "later", "--list"]);
    let status = run.wait();
    seen.extend(rx.try_iter());

    let text = seen.join("\n");
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    assert!(common::stdout(&allowed).contains("now allows later.test:*"));
    let rules: serde_json::Value = serde_json::from_str(&common::stdout(&listed)).unwrap();
    assert_eq!(
        rules["allow"],
        serde_json::json!(["allowed.test:*", "later.test:*"]),
        "{rules}"
    );
    assert!(text.contains("SELF-NOTOKEN: HTTP/1.1 401"), "{text}");
    assert!(text.contains("SELF-GUESS: HTTP/1.1 401"), "{text}");
    assert!(text.contains("BEFORE: HTTP/1.1 403"), "{text}");
    assert!(text.contains("AFTER: allowed"), "{text}");
    assert!(status.success(), "{text}");
    // The change and the agent's attempts are in the bottle's log.
    let log = common::stdout(&sb.run(&["logs", "later", "--json"]));
    assert!(log.contains("\"reason\":\"supervisor_rule\""), "{log}");
    assert_eq!(log.matches("supervisor_unauthorized").count(), 2, "{log}");
}
