//! A bottle whose agent image holds a working git, `git-remote-http` included (so `git push
//! http://...` works), assembled from this host's own files: nothing is pulled. The file list
//! follows the host: the git binary, its HTTP helper, the dynamic loader and every library
//! `ldd` names for them, plus the static busybox of `Dockerfile.test` for a shell.
//!
//! The build context directive only carries files under flat names (no `/`, no directories), so
//! each file is named by its basename (a numbered name on a clash) and copied back to the path it
//! has on the host; the names the host gives the same binaries (the builtins' dashed names such
//! as `git-upload-pack`, the `git-remote-https`/`ftp` aliases of `git-remote-http`) become
//! symbolic links to them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The bottle manifest: the test bottle's settings (see `bottles/test.toml`) on the git image.
const MANIFEST: &str = r#"# Written by tests/common/git_image.rs: the test bottle's settings, with git in the agent.
description = "busybox agent with the host's git, for the test suite"
backend = "docker"

[agent]
dockerfile = "$DOCKERFILE"
command = ["/bin/sh"]
user = "1000:1000"
workdir = "/workspace"

[egress]
allow = ["allowed.test:*"]
deny = ["denied.allowed.test"]
deny_message = "bot-bottle test bottle: egress to this host is denied"
hosts = { "allowed.test" = "host-gateway" }
allow_private = ["allowed.test"]

[resources]
vcpus = 1
memory_mib = 256
"#;

/// The busybox base of `dockerfiles/Dockerfile.test`: a shell, an `agent` user, `/workspace`.
const BASE: &str = r#"FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "mkdir", "-p", "/usr/bin", "/sbin", "/usr/sbin", "/tmp", "/etc", "/workspace", "/home/agent"]
RUN ["/bin/busybox", "--install", "-s"]
RUN echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd && \
    echo 'agent:x:1000:1000:agent:/home/agent:/bin/sh' >> /etc/passwd && \
    echo 'root:x:0:' > /etc/group && echo 'agent:x:1000:' >> /etc/group && \
    chmod 1777 /tmp && chown 1000:1000 /home/agent /workspace
"#;

const BUSYBOX: &str = "/bin/busybox";

/// Write `<config_dir>/bottles/<name>.toml` and its Dockerfile (`Dockerfile.<name>`, beside it).
/// Panics, naming what is missing, when the host has no git, no `git-remote-http`, no `ldd`,
/// no busybox, or a library `ldd` cannot find.
pub fn write_git_bottle(config_dir: &Path, name: &str) -> std::io::Result<()> {
    let bottles = config_dir.join("bottles");
    std::fs::create_dir_all(&bottles)?;
    let dockerfile_name = format!("Dockerfile.{name}");
    std::fs::write(bottles.join(&dockerfile_name), git_dockerfile())?;
    std::fs::write(
        bottles.join(format!("{name}.toml")),
        MANIFEST.replace("$DOCKERFILE", &dockerfile_name),
    )
}

/// The host's git install: the binary on `PATH` and its exec-path (`git --exec-path`).
struct HostGit {
    git: PathBuf,
    exec_path: PathBuf,
    remote_http: PathBuf,
}

fn host_git() -> HostGit {
    let out = match Command::new("git").arg("--exec-path").output() {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!(
            "git_image: `git --exec-path` failed on this host: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "git_image: git is not installed on this host (`git --exec-path`: {e}); the git \
             bottle's image is built from the host's git: install it (Debian/Ubuntu: \
             `apt-get install git`)"
        ),
    };
    let exec_path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let git = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("git"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| exec_path.join("git"));
    assert!(
        git.is_absolute() && git.is_file(),
        "git_image: cannot locate the host's git binary (looked on PATH and in {})",
        exec_path.display()
    );
    let remote_http = exec_path.join("git-remote-http");
    assert!(
        remote_http.is_file(),
        "git_image: the host's git ({}) has no {}: it was built without libcurl; install a git \
         with HTTP support (Debian/Ubuntu: `apt-get install git`)",
        git.display(),
        remote_http.display()
    );
    HostGit {
        git,
        exec_path,
        remote_http,
    }
}

/// The shared objects `binary` loads, the dynamic loader included, as `ldd` reports them.
fn ldd(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| {
            panic!(
            "git_image: ldd is not installed on this host ({e}); it lists the libraries the git \
             image needs (Debian/Ubuntu: `apt-get install libc-bin`)"
        )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Vec::new(); // Static: nothing to add.
        }
        panic!("git_image: `ldd {}` failed: {err}{text}", binary.display());
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)`, `/lib64/ld-linux-x86-64.so.2
        // (0x...)`, `linux-vdso.so.1 (0x...)` (in the kernel: no file), `libx.so => not found`.
        let target = line.split_once(" => ").map_or(line, |(_, t)| t);
        if target.starts_with("not found") {
            panic!(
                "git_image: {} needs a library the host lacks: `{line}` (from `ldd {}`)",
                binary.display(),
                binary.display()
            );
        }
        let path = target.split(" (0x").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    libs
}

/// Names in `dir` that are the same file as `target` (hard links, or symlinks to it).
fn aliases_in(dir: &Path, target: &Path) -> Vec<String> {
    let Ok(want) = std::fs::metadata(target) else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::metadata(e.path())
                .is_ok_and(|m| m.is_file() && m.dev() == want.dev() && m.ino() == want.ino())
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
        })
        .collect();
    names.sort();
    names
}

/// The Dockerfile text: the context directive (computed from the host now) and the COPY lines.
pub fn git_dockerfile() -> String {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "git_image: {BUSYBOX} is missing: the git image's shell is the host's static busybox \
         (Debian/Ubuntu: `apt-get install busybox-static`)"
    );
    let host = host_git();

    // Path in the image (= the host path) -> host file. `BTreeSet` keeps it stable.
    let mut wanted = BTreeSet::new();
    wanted.insert(host.git.clone());
    wanted.insert(host.remote_http.clone());
    for binary in [&host.git, &host.remote_http] {
        wanted.extend(ldd(binary));
    }

    // A flat context name per file; files of one directory share one COPY.
    let mut names = BTreeMap::new(); // context name -> host path
    let mut by_dir: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    let mut single = Vec::new(); // (context name, destination) for renamed files
    names.insert("busybox".to_owned(), PathBuf::from(BUSYBOX));
    for path in &wanted {
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_else(|| panic!("git_image: odd library path {}", path.display()))
            .to_owned();
        let dir = path.parent().unwrap().to_path_buf();
        if names.contains_key(&base) {
            let renamed = (1..)
                .map(|i| format!("{base}.{i}"))
                .find(|n| !names.contains_key(n))
                .unwrap();
            names.insert(renamed.clone(), path.clone());
            single.push((renamed, path.clone()));
        } else {
            names.insert(base.clone(), path.clone());
            by_dir.entry(dir).or_default().push(base);
        }
    }

    let mut text = String::from(
        "# The host's git with its HTTP helper and libraries (tests/common/git_image.rs).\n",
    );
    for (name, path) in &names {
        writeln!(text, "# bot-bottle: context {name}={}", path.display()).unwrap();
    }
    text.push_str(BASE);
    for (dir, files) in &by_dir {
        writeln!(text, "COPY {} {}/", files.join(" "), dir.display()).unwrap();
    }
    for (name, dest) in &single {
        writeln!(text, "COPY {name} {}", dest.display()).unwrap();
    }

    // `git init` copies templates from <prefix>/share/git-core/templates and warns when the
    // directory is missing: an empty one will do.
    let mut dirs = vec![host.exec_path.clone()];
    dirs.extend(
        host.exec_path
            .ancestors()
            .nth(2)
            .map(|prefix| prefix.join("share/git-core/templates")),
    );
    let mut setup = vec![format!(
        "mkdir -p {}",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    )];

    // The dashed names of builtins and of the remote helper (hard links on the host): symbolic
    // links here, which git treats the same (it goes by argv[0]) and which, unlike hard links
    // made in a later layer, do not copy the binaries into the image a second time.
    let git_dir = host.git.parent().unwrap();
    for (dir, target) in [
        (git_dir, &host.git),
        (host.exec_path.as_path(), &host.git),
        (host.exec_path.as_path(), &host.remote_http),
    ] {
        let aliases: Vec<String> = aliases_in(dir, target)
            .into_iter()
            .filter(|alias| !wanted.contains(&dir.join(alias)))
            .collect();
        if !aliases.is_empty() {
            setup.push(format!(
                "cd {} && for n in {}; do ln -s {} \"$n\"; done",
                dir.display(),
                aliases.join(" "),
                target.display()
            ));
        }
    }
    writeln!(text, "RUN {}", setup.join(" && \\\n    ")).unwrap();

    let mut path = vec![git_dir.display().to_string()];
    for dir in ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        if !path.iter().any(|p| p == dir) {
            path.push(dir.to_owned());
        }
    }
    writeln!(text, "ENV HOME=/home/agent PATH={}", path.join(":")).unwrap();
    text
}
