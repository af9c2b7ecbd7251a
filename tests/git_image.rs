//! The git bottle of `tests/common/git_image.rs`: its agent image, built from the host's own git
//! and libraries, runs git and loads `git-remote-http` (the helper behind `git push http://`).

mod common;

use common::git_image::write_git_bottle;
use common::{docker_available, stderr, stdout, Sandbox};

/// Git works in the agent: a commit in a fresh repository, then an HTTP remote that nothing
/// serves (127.0.0.1 is in the agent's NO_PROXY, so curl connects directly and is refused).
const SCRIPT: &str = "git --version && git init -q /tmp/r && cd /tmp/r && \
    git -c user.email=a@b -c user.name=a commit -q --allow-empty -m x && \
    echo \"commits: $(git log --oneline | wc -l)\" && \
    echo \"remote: $(git ls-remote http://127.0.0.1:1/x 2>&1 | head -1)\" && \
    echo \"https: $(git ls-remote https://127.0.0.1:1/x 2>&1 | head -1)\"";

#[test]
fn git_bottle_commits_and_loads_git_remote_http() {
    if !docker_available("git_bottle_commits_and_loads_git_remote_http") {
        return;
    }
    let sb = Sandbox::new("250-250");
    write_git_bottle(&sb.dir.path().join("config"), "git").unwrap();
    let out = sb.run(&[
        "start",
        "git",
        "--backend",
        "docker",
        "--",
        "sh",
        "-c",
        SCRIPT,
    ]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(
        out.status.success(),
        "start failed:\nstdout:\n{text}\nstderr:\n{err}"
    );

    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{text}\nstderr:\n{err}"))
            .trim()
            .to_owned()
    };
    assert!(
        text.lines().any(|l| l.starts_with("git version 2.")),
        "no git version:\n{text}\nstderr:\n{err}"
    );
    assert_eq!(line("commits:"), "1", "{text}");
    assert!(
        !text.contains("templates not found") && !err.contains("templates not found"),
        "{text}{err}"
    );

    // `git-remote-http` itself, and `git-remote-https` (a link to it, as on the host).
    for remote in [line("remote:"), line("https:")] {
        for broken in [
            "is not a git command",
            "error while loading shared libraries",
            "not found",
        ] {
            assert!(
                !remote.contains(broken),
                "git-remote-http did not run: {remote}"
            );
        }
        assert!(
            remote.contains("Failed to connect") || remote.contains("Connection refused"),
            "expected a connection error from git-remote-http (curl), got: {remote}"
        );
        assert!(remote.contains("127.0.0.1"), "{remote}");
    }
}
