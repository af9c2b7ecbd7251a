//! The git gate, end to end on the Docker backend with a real git: pushes go through the
//! bundle's gate port at the bottle's address to `git http-backend` under `start` on the
//! host; `[git]` decides which refs may move, every pushed commit is scanned for secrets,
//! and `bot-bottle pull` brings the accepted refs into the host repository as
//! `refs/remotes/bottle/*`. The attacks an agent could try on the gate are here too:
//! malformed pkt-lines, a pack over the size limit, bad ref names, `.git` paths in trees,
//! symlinks, concurrent pushes.
//!
//! Most tests push with the host's git to the gate's published address (the same port the
//! agent reaches, through the same bundle relay); the last ones push with git from inside
//! the bottle (`common::git_image`).

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{docker_available, stderr, stdout, Running, Sandbox};

/// A test bottle that idles (the host pushes to its gate meanwhile), with a workspace.
fn start_idle(sb: &Sandbox, bottle: &str, repo: &Path, extra_env: &[(&str, &str)]) -> Running {
    let mut cmd = sb.cmd();
    cmd.args(["start", bottle, "--backend", "docker", "--mount"])
        .arg(repo)
        .args(["--", "sh", "-c", "sleep 600"]);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    Running::spawn(cmd)
}

/// git on the host with no user or system configuration.
fn git(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=t@example.com", "-c", "user.name=t"])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .expect("run git")
}

fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = git(dir, args);
    assert!(
        out.status.success(),
        "git {args:?} failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out).trim().to_owned()
}

/// A host repository with two commits on `master`.
fn host_repo(root: &Path) -> PathBuf {
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git_ok(&repo, &["init", "-q", "-b", "master"]);
    std::fs::write(repo.join("README"), "hello\n").unwrap();
    git_ok(&repo, &["add", "README"]);
    git_ok(&repo, &["commit", "-qm", "first"]);
    std::fs::write(repo.join("README"), "hello again\n").unwrap();
    git_ok(&repo, &["commit", "-qam", "second"]);
    repo
}

/// A clone of the gate (what the agent sees), to commit and push from.
fn clone_gate(gate: &str, into: &Path) {
    let out = Command::new("git")
        .args(["clone", "-q", gate])
        .arg(into)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "clone: {}", stderr(&out));
}

fn commit_file(repo: &Path, name: &str, content: &[u8], message: &str) -> String {
    let path = repo.join(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, content).unwrap();
    git_ok(repo, &["add", name]);
    git_ok(repo, &["commit", "-qm", message]);
    git_ok(repo, &["rev-parse", "HEAD"])
}

fn push(repo: &Path, refspec: &str) -> Output {
    git(repo, &["push", "origin", refspec])
}

fn remote_refs(gate: &str) -> String {
    let out = Command::new("git")
        .args(["ls-remote", gate])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(out.status.success(), "ls-remote: {}", stderr(&out));
    stdout(&out)
}

fn refused(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "the push went through:\n{}{}",
        stdout(out),
        stderr(out)
    );
    stderr(out)
}

fn gate_url(sb: &Sandbox) -> String {
    let n = sb.pool.split('-').next().unwrap();
    format!("http://127.0.0.{n}:9418/workspace.git")
}

/// `bot-bottle stop`, then the session's end.
fn stop(sb: &Sandbox, id: &str, running: Running) {
    let out = sb.run(&["stop", id]);
    assert!(out.status.success(), "stop: {}", stderr(&out));
    let status = running.wait();
    assert!(status.code().is_some(), "start ended by a signal");
}

#[test]
fn the_gate_takes_allowed_pushes_and_refuses_other_refs_force_deletes_and_secrets() {
    if !docker_available("the_gate_takes_allowed_pushes") {
        return;
    }
    let sb = Sandbox::new("160-160");
    let repo = host_repo(sb.dir.path());
    let host_head = git_ok(&repo, &["rev-parse", "HEAD"]);
    // The bottle's credential: the scan knows it by fingerprint only.
    let token = format!("tok-{}", "5f3a9c".repeat(6));
    // The real remote the gate forwards accepted pushes to (a repository path here).
    let upstream = sb.dir.path().join("upstream.git");
    git_ok(
        sb.dir.path(),
        &["init", "-q", "--bare", upstream.to_str().unwrap()],
    );
    sb.add_bottle(
        "gate",
        &format!(
            "extends = \"test\"\n[egress]\nallow = [\"api.test:*\"]\n\
             [credentials.\"api.test\"]\nenv = \"GATE_TEST_TOKEN\"\n\
             [git]\nupstream = \"{}\"\n",
            upstream.display()
        ),
    );
    let running = start_idle(&sb, "gate", &repo, &[("GATE_TEST_TOKEN", &token)]);
    let id = sb.wait_running(Duration::from_secs(120));
    let gate = gate_url(&sb);

    // The host's branches are offered: the agent can fetch them without any network.
    let refs = remote_refs(&gate);
    assert!(
        refs.contains(&format!("{host_head}\trefs/heads/master")),
        "{refs}"
    );

    let work = sb.dir.path().join("work");
    clone_gate(&gate, &work);
    let first = commit_file(&work, "src/lib.rs", b"pub fn f() {}\n", "agent work");
    let ok = push(&work, "HEAD:refs/heads/bot/x");
    assert!(ok.status.success(), "allowed push refused: {}", stderr(&ok));
    assert!(remote_refs(&gate).contains(&format!("{first}\trefs/heads/bot/x")));
    // `list` counts what landed in the gate.
    let rows = sb.rows();
    let row = rows.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(row["pushes"], 1, "{row}");
    // Forwarded upstream once accepted.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while git(
        &upstream,
        &["rev-parse", "-q", "--verify", "refs/heads/bot/x"],
    )
    .stdout
    .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "bot/x never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(git_ok(&upstream, &["rev-parse", "refs/heads/bot/x"]), first);

    // Outside `[git] push`: refused, with the reason in git's own `remote:` line.
    let err = refused(&push(&work, "HEAD:refs/heads/master"));
    assert!(err.contains("remote: bot-bottle: push refused: refs/heads/master: this bottle may push only to refs/heads/bot/*"), "{err}");

    // A force-push (not a fast-forward) and a deletion: refused.
    git_ok(&work, &["reset", "-q", "--hard", "HEAD~1"]);
    commit_file(&work, "other.txt", b"x\n", "rewritten");
    let err = refused(&git(
        &work,
        &["push", "-f", "origin", "HEAD:refs/heads/bot/x"],
    ));
    assert!(
        err.contains("force-pushing is not allowed") || err.contains("non-fast-forward"),
        "{err}"
    );
    let err = refused(&push(&work, ":refs/heads/bot/x"));
    assert!(
        err.contains("deleting a ref is not allowed") || err.contains("deletion prohibited"),
        "{err}"
    );
    assert!(
        remote_refs(&gate).contains(&format!("{first}\trefs/heads/bot/x")),
        "bot/x moved"
    );

    // Secrets: the bottle's own credential, a token format, a private key. Each refusal names
    // the file, line and rule, never the value.
    git_ok(&work, &["reset", "-q", "--hard", &first]);
    let aws = format!("AKIA{}", "QWERTYUIOPASDFGH");
    let key = format!("-----BEGIN {} PRIVATE KEY-----\nMIIB\n", "OPENSSH");
    for (file, content, rule) in [
        (
            "config.env",
            format!("X=1\nAPI_TOKEN={token}\n"),
            "credential api.test",
        ),
        (
            "deploy.sh",
            format!("# key\nexport AWS_KEY={aws}\n"),
            "aws-access-key-id",
        ),
        ("id_ed25519", key.clone(), "private-key"),
    ] {
        commit_file(&work, file, content.as_bytes(), "oops");
        let err = refused(&push(&work, "HEAD:refs/heads/bot/secret"));
        let line = if file == "id_ed25519" { 1 } else { 2 };
        assert!(
            err.contains(&format!("{file}:{line} ({rule}")),
            "{file}: {err}"
        );
        assert!(
            !err.contains(&token) && !err.contains(&aws),
            "a value was printed: {err}"
        );
        git_ok(&work, &["reset", "-q", "--hard", &first]);
    }
    assert!(!remote_refs(&gate).contains("refs/heads/bot/secret"));
    // Nothing refused went upstream.
    let upstream_refs = git_ok(&upstream, &["for-each-ref", "--format=%(refname)"]);
    assert_eq!(upstream_refs, "refs/heads/bot/x", "{upstream_refs}");

    // The log has each decision; the value is in none of them.
    let log =
        std::fs::read_to_string(sb.state().join("bottles").join(&id).join("gate.jsonl")).unwrap();
    assert!(
        log.contains("\"event\":\"pushed\"") && log.contains("\"reason\":\"secret\""),
        "{log}"
    );
    assert!(!log.contains(&token) && !log.contains(&aws));

    // `diff`: what the agent changed in its workspace, against the host directory.
    let out = sb.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo 'agent edit' >> /workspace/README && echo new > /workspace/NEW",
    ]);
    assert!(out.status.success(), "exec: {}", stderr(&out));
    let out = sb.run(&["diff", &id]);
    let shown = stdout(&out);
    assert!(out.status.success(), "diff: {shown}{}", stderr(&out));
    assert!(
        shown.contains("+agent edit") && shown.contains("+new"),
        "{shown}"
    );
    assert!(!shown.contains(".git/"), "{shown}");
    assert_eq!(
        std::fs::read_to_string(repo.join("README")).unwrap(),
        "hello again\n"
    );

    // A later allowed push still works: nothing above broke the gate.
    let second = commit_file(&work, "src/more.rs", b"pub fn g() {}\n", "more");
    assert!(push(&work, "HEAD:refs/heads/bot/x").status.success());

    stop(&sb, &id, running);

    // `pull` after the bottle stopped: the pushed branch under refs/remotes/bottle/, the host's
    // working tree, index and own branches untouched.
    std::fs::write(repo.join("uncommitted.txt"), "mine\n").unwrap();
    let status_before = git_ok(&repo, &["status", "--porcelain"]);
    let out = sb.run(&["pull", "gate"]);
    assert!(
        out.status.success(),
        "pull: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        git_ok(&repo, &["rev-parse", "refs/remotes/bottle/bot/x"]),
        second
    );
    assert_eq!(git_ok(&repo, &["rev-parse", "master"]), host_head);
    assert_eq!(git_ok(&repo, &["status", "--porcelain"]), status_before);
    assert!(
        !repo.join("src/more.rs").exists(),
        "pull touched the working tree"
    );
}

/// Raw HTTP to the gate port (what an agent can send without git).
fn http(addr: &str, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn pkt(line: &str) -> String {
    format!("{:04x}{line}", line.len() + 4)
}

#[test]
fn the_gate_holds_against_malformed_requests_bad_refs_dotgit_trees_big_packs_and_races() {
    if !docker_available("the_gate_holds_against_malformed_requests") {
        return;
    }
    let sb = Sandbox::new("161-161");
    let repo = host_repo(sb.dir.path());
    sb.add_bottle("gate", "extends = \"test\"\n[git]\nmax_pack_mib = 1\n");
    let running = start_idle(&sb, "gate", &repo, &[]);
    let id = sb.wait_running(Duration::from_secs(120));
    let gate = gate_url(&sb);
    let addr = gate
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let head = git_ok(&repo, &["rev-parse", "HEAD"]);

    // Not the smart protocol: nothing of the repository's files is served.
    for target in [
        "/workspace.git/config",
        "/workspace.git/objects/info/alternates",
        "/workspace.git/../policy.json",
        "/other.git/info/refs?service=git-upload-pack",
    ] {
        let reply = http(
            &addr,
            format!("GET {target} HTTP/1.1\r\nHost: g\r\n\r\n").as_bytes(),
        );
        assert!(reply.starts_with("HTTP/1.1 404"), "{target}: {reply}");
    }
    // Malformed pkt-lines: git refuses them; the gate answers and goes on.
    let garbage = "zzzzthis is not a pkt-line\n";
    let reply = http(
        &addr,
        format!(
            "POST /workspace.git/git-receive-pack HTTP/1.1\r\nHost: g\r\nContent-Type: application/x-git-receive-pack-request\r\nContent-Length: {}\r\n\r\n{garbage}",
            garbage.len()
        )
        .as_bytes(),
    );
    assert!(reply.starts_with("HTTP/1.1 "), "{reply}");
    // A bad chunked body is refused before git sees it.
    let reply = http(
        &addr,
        b"POST /workspace.git/git-receive-pack HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 "), "{reply}");

    // A ref name git forbids (`..`, a control character), sent by hand with an empty pack.
    let mut empty_pack = b"PACK\0\0\0\x02\0\0\0\0".to_vec();
    empty_pack.extend_from_slice(&sha1(&empty_pack));
    for bad in ["refs/heads/bot/a..b", "refs/heads/bot/a\u{1}b"] {
        let mut body =
            pkt(&format!("{} {head} {bad}\0report-status\n", "0".repeat(40))).into_bytes();
        body.extend_from_slice(b"0000");
        body.extend_from_slice(&empty_pack);
        let mut request = format!(
            "POST /workspace.git/git-receive-pack HTTP/1.1\r\nHost: g\r\nContent-Type: application/x-git-receive-pack-request\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let reply = http(&addr, &request);
        assert!(reply.contains("ng "), "{bad:?} not refused: {reply}");
    }
    assert!(!remote_refs(&gate).contains("bot/a"));

    let work = sb.dir.path().join("work");
    clone_gate(&gate, &work);

    // A tree with a `.git` entry: refused by fsck on receipt.
    let blob = git_ok(&work, &["hash-object", "-w", "--stdin"]); // empty blob
    let inner = write_tree(&work, &[("100644", "config", &blob)]);
    let outer = write_tree(&work, &[("40000", ".git", &inner)]);
    let commit = git_ok(&work, &["commit-tree", &outer, "-m", "dotgit"]);
    let err = refused(&push(&work, &format!("{commit}:refs/heads/bot/dotgit")));
    assert!(
        err.to_lowercase().contains("dotgit") || err.contains(".git"),
        "{err}"
    );

    // A pack over `[git] max_pack_mib = 1`: refused.
    let mut noise = vec![0u8; 3 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    commit_file(&work, "blob.bin", &noise, "big");
    let err = refused(&push(&work, "HEAD:refs/heads/bot/big"));
    assert!(
        err.contains("maximum allowed size") || err.contains("pack exceeds"),
        "{err}"
    );
    git_ok(&work, &["reset", "-q", "--hard", "HEAD~1"]);

    // A symlink out of the tree is stored as a link object; pulling it never writes through it.
    std::os::unix::fs::symlink("/etc/passwd", work.join("link")).unwrap();
    git_ok(&work, &["add", "link"]);
    git_ok(&work, &["commit", "-qm", "link"]);
    let out = push(&work, "HEAD:refs/heads/bot/link");
    assert!(out.status.success(), "symlink push: {}", stderr(&out));

    // Two pushes at once to the same ref: one wins, the other is refused; both answered.
    let (a, b) = (sb.dir.path().join("a"), sb.dir.path().join("b"));
    clone_gate(&gate, &a);
    clone_gate(&gate, &b);
    let ca = commit_file(&a, "a.txt", b"a\n", "a");
    let cb = commit_file(&b, "b.txt", b"b\n", "b");
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| push(&a, "HEAD:refs/heads/bot/race"));
        let tb = s.spawn(|| push(&b, "HEAD:refs/heads/bot/race"));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let landed = remote_refs(&gate);
    let wins = [(&ra, &ca), (&rb, &cb)]
        .iter()
        .filter(|(r, c)| {
            r.status.success() && landed.contains(&format!("{c}\trefs/heads/bot/race"))
        })
        .count();
    assert_eq!(wins, 1, "a: {}\nb: {}\n{landed}", stderr(&ra), stderr(&rb));

    stop(&sb, &id, running);
    let out = sb.run(&["pull", "gate"]);
    assert!(out.status.success(), "pull: {}", stderr(&out));
    git_ok(&repo, &["rev-parse", "refs/remotes/bottle/bot/link"]);
    assert!(
        !repo.join("link").exists(),
        "pull wrote a file in the working tree"
    );
    assert!(std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .contains("root"));
}

/// A tree object with exactly these entries (no validation: what a hostile agent can make).
fn write_tree(repo: &Path, entries: &[(&str, &str, &str)]) -> String {
    let mut bytes = Vec::new();
    for (mode, name, oid) in entries {
        bytes.extend_from_slice(format!("{mode} {name}\0").as_bytes());
        bytes.extend_from_slice(&hex(oid));
    }
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["hash-object", "-t", "tree", "-w", "--literally", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn sha1(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("sha1sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    hex(String::from_utf8(out.stdout)
        .unwrap()
        .split(' ')
        .next()
        .unwrap())
}

/// The CI-runner flow of the README, with a stock git inside the bottle: the agent commits in
/// its (writable, agent-owned) workspace and pushes to the `bottle` remote; a commit with a
/// secret is refused from inside too; `pull` brings the accepted branch to the host
/// repository, whose working tree is untouched.
#[test]
fn the_agent_pushes_with_stock_git_from_inside_and_pull_brings_it_home_as_in_ci() {
    if !docker_available("the_agent_pushes_with_stock_git_from_inside") {
        return;
    }
    let sb = Sandbox::new("162-162");
    let repo = host_repo(sb.dir.path());
    let readme_before = std::fs::read(repo.join("README")).unwrap();
    common::git_image::write_git_bottle(&sb.dir.path().join("config"), "gitagent").unwrap();
    let aws = format!("AKIA{}", "ZXCVBNMASDFGHJKL");
    let script = format!(
        "cd /workspace && echo 'agent line' >> README && git add -A && \
         git -c user.email=a@b -c user.name=agent commit -qm 'agent: change' && \
         git push bottle HEAD:bot/ci 2>&1 && \
         echo 'key={aws}' > leak.txt && git add leak.txt && \
         git -c user.email=a@b -c user.name=agent commit -qm leak && \
         (git push bottle HEAD:bot/leak 2>&1 || echo PUSH-REFUSED)"
    );
    let out = sb.run(&[
        "start",
        "gitagent",
        "--backend",
        "docker",
        "--mount",
        repo.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "start failed:\n{text}\n{err}");
    assert!(text.contains("HEAD -> bot/ci"), "{text}");
    assert!(text.contains("PUSH-REFUSED"), "{text}");
    assert!(text.contains("leak.txt:1 (aws-access-key-id"), "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("remote:") && l.contains(&aws)),
        "the value was printed: {text}"
    );

    let out = sb.run(&["pull", "gitagent"]);
    assert!(
        out.status.success(),
        "pull: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let shown = git_ok(&repo, &["show", "refs/remotes/bottle/bot/ci:README"]);
    assert!(shown.ends_with("agent line"), "{shown}");
    assert!(git(
        &repo,
        &[
            "rev-parse",
            "--verify",
            "-q",
            "refs/remotes/bottle/bot/leak"
        ]
    )
    .stdout
    .is_empty());
    assert_eq!(std::fs::read(repo.join("README")).unwrap(), readme_before);
}
