//! Workspace mounts on the Docker backend: the agent gets a writable copy of each host
//! directory, owned by its user, and the host files are never modified (what the microVM's
//! snapshot gives). Needs Docker: skipped without it, failed under CI.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{docker_available, stderr, stdout, Sandbox};
use sha2::Digest;

/// Every entry below `dir` (recursively, not following links) with its type, mode, owner,
/// size, modification time and a hash of its content (a link: of its target), sorted.
fn listing(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let kind = m.file_type();
            let content = if kind.is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if kind.is_file() {
                std::fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            out.push(format!(
                "{} {:o} {}:{} {} {}.{} {}",
                path.strip_prefix(root).unwrap().display(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                hex::encode(sha2::Sha256::digest(&content))
            ));
            if kind.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// `start test --backend docker --mount HOST -- sh -c SCRIPT` (the agent runs as 1000:1000).
fn start_with_mount(sb: &Sandbox, bottle: &str, host: &Path, script: &str) -> std::process::Output {
    sb.run(&[
        "start",
        bottle,
        "--backend",
        "docker",
        "--mount",
        host.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ])
}

#[test]
fn docker_workspace_is_a_writable_copy_owned_by_the_agent_and_the_host_is_untouched() {
    if !docker_available("docker_workspace_is_a_writable_copy_owned_by_the_agent") {
        return;
    }
    let sb = Sandbox::new("245-245");
    let host = sb.dir.path().join("project");
    std::fs::create_dir_all(host.join("src/deep")).unwrap();
    std::fs::write(host.join("README"), "hello\n").unwrap();
    std::fs::write(host.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(host.join("src/deep/gone.txt"), "delete me\n").unwrap();
    std::fs::hard_link(host.join("README"), host.join("README.again")).unwrap();
    std::os::unix::fs::symlink("../README", host.join("src/readme")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(host.join("agent.sock")).unwrap();
    let before = listing(&host);

    let out = start_with_mount(
        &sb,
        "test",
        &host,
        "set -e; \
         stat -c 'owner %u:%g' /workspace/README /workspace/src/deep /workspace; \
         stat -c 'links %h' /workspace/README.again; \
         cat /workspace/src/readme; \
         [ ! -e /workspace/agent.sock ] && echo no-socket; \
         echo added > /workspace/src/new.txt; \
         echo more >> /workspace/README; \
         rm /workspace/src/deep/gone.txt; \
         rmdir /workspace/src/deep; \
         mkdir /workspace/build && echo out > /workspace/build/a.o; \
         cat /workspace/README; ls /workspace/src",
    );

    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("owner "))
            .collect::<Vec<_>>(),
        ["owner 1000:1000"; 3],
        "{text}"
    );
    assert!(text.contains("links 2\n"), "hard link not kept: {text}");
    assert!(text.contains("no-socket\n"), "{text}");
    assert!(text.contains("hello\nmore\n"), "{text}");
    assert!(
        text.contains("main.rs\nnew.txt\nreadme\n"),
        "the agent's changes: {text}"
    );
    assert!(
        stderr(&out).contains(&format!(
            "bot-bottle: copying {} into /workspace",
            host.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(listing(&host), before, "the host directory changed");
    assert!(
        sb.docker_leftovers().is_empty(),
        "{:?}",
        sb.docker_leftovers()
    );
}

#[test]
fn docker_workspace_symlink_out_of_the_tree_stays_a_link_the_agent_cannot_write_through() {
    if !docker_available("docker_workspace_symlink_out_of_the_tree_stays_a_link") {
        return;
    }
    let sb = Sandbox::new("246-246");
    // The agent named by user name, resolved against the image's /etc/passwd.
    sb.add_bottle("named", "extends = \"test\"\n[agent]\nuser = \"agent\"\n");
    let host = sb.dir.path().join("project");
    let outside = sb.dir.path().join("outside");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("target.txt"), "host secret\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", host.join("passwd")).unwrap();
    std::os::unix::fs::symlink(outside.join("target.txt"), host.join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside/target.txt", host.join("rel")).unwrap();
    let before = listing(&host);
    let outside_before = listing(&outside);
    let passwd_before = std::fs::read("/etc/passwd").unwrap();

    let out = start_with_mount(
        &sb,
        "named",
        &host,
        "for l in passwd abs rel; do \
           [ -L /workspace/$l ] && echo \"link $l -> $(readlink /workspace/$l)\"; \
           cat /workspace/$l 2>/dev/null | grep -q 'host secret' && echo \"read $l\"; \
           echo pwned >> /workspace/$l 2>/dev/null && echo \"wrote $l\"; \
         done; \
         stat -c 'owner %u:%g' /workspace/passwd /workspace; true",
    );

    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("link passwd -> /etc/passwd\n"), "{text}");
    assert!(
        text.contains(&format!(
            "link abs -> {}\n",
            outside.join("target.txt").display()
        )),
        "{text}"
    );
    assert!(
        text.contains("link rel -> ../outside/target.txt\n"),
        "{text}"
    );
    assert!(
        !text.contains("read "),
        "host content reached the agent: {text}"
    );
    assert!(!text.contains("wrote "), "{text}");
    assert!(
        text.lines().filter(|l| *l == "owner 1000:1000").count() == 2,
        "{text}"
    );
    // Whatever the agent wrote through a link landed in its container, never on the host.
    assert_eq!(listing(&host), before, "the host directory changed");
    assert_eq!(listing(&outside), outside_before, "a file outside changed");
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
}

#[test]
fn docker_workspace_at_a_path_whose_parents_are_missing_is_made() {
    if !docker_available("docker_workspace_at_a_path_whose_parents_are_missing_is_made") {
        return;
    }
    let sb = Sandbox::new("247-247");
    let host = sb.dir.path().join("app");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("f"), "x\n").unwrap();
    let mount = format!("{}:/srv/deep/app", host.display());

    let out = sb.run(&[
        "start",
        "test",
        "--backend",
        "docker",
        "--mount",
        &mount,
        "--",
        "sh",
        "-c",
        "cat /srv/deep/app/f && echo y > /srv/deep/app/g && stat -c '%u:%g %n' /srv/deep /srv/deep/app",
    ]);

    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "x\n0:0 /srv/deep\n1000:1000 /srv/deep/app\n",
        "{}",
        stderr(&out)
    );
    assert!(!host.join("g").exists());
}

/// The agent's work in its workspace outlives the container: `resume` continues from the copy
/// the last run kept (the host files still untouched), and with nothing kept it says how to
/// start first.
#[test]
fn docker_resume_continues_the_workspace_the_last_run_left() {
    if !docker_available("docker_resume_continues_the_workspace") {
        return;
    }
    let sb = Sandbox::new("248-248");
    let host = sb.dir.path().join("project");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("notes.txt"), "host\n").unwrap();

    let resume = |script: &str| {
        sb.run(&[
            "resume",
            "test",
            "--backend",
            "docker",
            "--mount",
            host.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ])
    };
    let out = resume("true");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no kept workspace of bottle `test` to resume"),
        "{}",
        stderr(&out)
    );

    let out = start_with_mount(
        &sb,
        "test",
        &host,
        "echo agent >> /workspace/notes.txt && echo new > /workspace/made.txt",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out =
        resume("cat /workspace/notes.txt /workspace/made.txt; echo more >> /workspace/notes.txt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "host\nagent\nnew\n");
    // Each resume continues the newest kept copy.
    let out = resume("cat /workspace/notes.txt");
    assert_eq!(stdout(&out), "host\nagent\nmore\n", "{}", stderr(&out));
    // A plain `start` begins again from the host, which never changed.
    let out = start_with_mount(&sb, "test", &host, "cat /workspace/notes.txt");
    assert_eq!(stdout(&out), "host\n", "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(host.join("notes.txt")).unwrap(),
        "host\n"
    );
    assert!(!host.join("made.txt").exists());
}
