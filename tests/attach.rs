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
