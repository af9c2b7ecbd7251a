//! Shared helpers for the integration tests: run the real `bot-bottle` binary against a real
//! Docker engine, with state, config and cache in a private temporary directory.
#![allow(dead_code)]

pub mod approvals;
pub mod floor;
pub mod git_image;
pub mod secrets;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bot-bottle"))
}

/// Under CI (`CI=true` or `CI=1`) a test that cannot run fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when a Docker engine answers. In CI a missing engine fails the test; elsewhere the
/// test prints why it is skipped.
pub fn docker_available(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !in_ci(),
            "{test}: CI=true but no Docker engine is reachable"
        );
        eprintln!("SKIPPED {test}: no Docker engine reachable (start dockerd)");
    }
    ok
}

/// A private bot-bottle home: state, config (user bottles) and cache dirs, and an alias pool
/// range of its own so tests running in parallel never compete for addresses.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub pool: String,
}

impl Sandbox {
    pub fn new(pool: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["state", "config/bottles", "cache"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Self {
            dir,
            pool: pool.to_owned(),
        }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn bottles(&self) -> PathBuf {
        self.dir.path().join("config/bottles")
    }

    pub fn add_bottle(&self, name: &str, toml: &str) {
        std::fs::write(self.bottles().join(format!("{name}.toml")), toml).unwrap();
    }

    /// `start <bottle> -- sh -c <script>` running in the background.
    pub fn start_script(&self, bottle: &str, script: &str) -> Running {
        let mut cmd = self.cmd();
        cmd.args(["start", bottle, "--", "sh", "-c", script]);
        Running::spawn(cmd)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("BOT_BOTTLE_STATE_DIR", self.state())
            .env("BOT_BOTTLE_CONFIG_DIR", self.dir.path().join("config"))
            .env("BOT_BOTTLE_CACHE_DIR", self.dir.path().join("cache"))
            .env("BOT_BOTTLE_ALIAS_POOL", &self.pool)
            .env_remove("BOT_BOTTLE_PAUSE_AT")
            .env_remove("RUST_LOG")
            // Choices a developer may have exported: each test sets what it needs.
            .env_remove("BOT_BOTTLE_BACKEND")
            .env_remove("BOT_BOTTLE_SKIP_LINUX_CHECK")
            .env_remove("BOT_BOTTLE_KERNEL")
            .env_remove("BOT_BOTTLE_KERNEL_SOURCE")
            .env_remove("BOT_BOTTLE_VMM")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run bot-bottle")
    }

    /// `list --all --json` parsed.
    pub fn rows(&self) -> Vec<serde_json::Value> {
        let out = self.run(&["list", "--all", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("list --json is JSON")
    }

    /// Lease rows of the state DB (alias, bottle id), live or not.
    pub fn leases(&self) -> Vec<(String, String)> {
        let path = self.state().join("state.db");
        if !path.is_file() {
            return Vec::new();
        }
        bot_bottle::state::StateDb::open_existing(&path)
            .unwrap()
            .leases()
            .unwrap()
            .into_iter()
            .map(|(alias, id, _)| (alias, id))
            .collect()
    }

    /// Processes started for this sandbox (`start`, its reaper, a VMM child): every process
    /// whose environment names this sandbox's state directory, as "pid cmdline".
    pub fn processes(&self) -> Vec<String> {
        let needle = format!("BOT_BOTTLE_STATE_DIR={}", self.state().display());
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            let ours = environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes());
            let zombie = std::fs::read_to_string(entry.path().join("stat"))
                .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|r| r.starts_with(" Z")));
            if ours && !zombie {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                found.push(format!(
                    "{pid} {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
        found
    }

    /// Names of Docker containers and networks carrying this sandbox's state label.
    pub fn docker_leftovers(&self) -> Vec<String> {
        let tag = state_tag(&self.state());
        let filter = format!("label=bot-bottle.state={tag}");
        let mut names = Vec::new();
        for args in [
            vec!["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"],
            vec![
                "network",
                "ls",
                "--filter",
                &filter,
                "--format",
                "{{.Name}}",
            ],
        ] {
            let out = Command::new("docker").args(&args).output().unwrap();
            names.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_owned)
                    .filter(|l| !l.is_empty()),
            );
        }
        names
    }
}

/// Mirror of `Dirs::state_tag` (sha256 of the canonical state path, first 6 bytes, hex).
pub fn state_tag(state: &Path) -> String {
    use sha2::Digest;
    let canonical = state.canonicalize().unwrap();
    hex::encode(&sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes())[..6])
}

/// A started `bot-bottle start` whose stderr is watched for `paused at STEP`.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub stderr_seen: Vec<String>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bot-bottle");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines: rx,
            stderr_seen: Vec::new(),
        }
    }

    /// Wait for a stderr line containing `needle`; panics with everything seen on timeout.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.stderr_seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "did not see `{needle}` within {timeout:?}; stderr:\n{}",
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    /// The agent's stdout, line by line, from a reader thread (call once).
    pub fn stdout_lines(&mut self) -> mpsc::Receiver<String> {
        let stdout = self.child.stdout.take().expect("stdout taken once");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub fn wait(mut self) -> std::process::ExitStatus {
        let status = self.child.wait().unwrap();
        // Drain the rest of stderr for diagnostics.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
            self.stderr_seen.push(line);
        }
        status
    }
}

/// A test that fails midway must not leave its `start` running (its alias would stay taken,
/// its agent would run on): SIGKILL it, so its reaper removes what it made.
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Lines from `lines` up to and including the first for which `done` holds; panics with what
/// came when none does within `timeout`.
pub fn lines_until(
    lines: &mpsc::Receiver<String>,
    done: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let last = done(&line);
                seen.push(line);
                if last {
                    return seen;
                }
            }
            Err(_) => panic!("the awaited line never came within {timeout:?}: {seen:?}"),
        }
    }
}

/// A tiny HTTP server on 0.0.0.0 (reachable from containers through the Docker host gateway)
/// that answers every request with `body`. Returns its port; serves until the process ends.
pub fn http_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.read(&mut buf);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    port
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

impl Sandbox {
    /// Wait until a bottle of this sandbox is `running`; returns its id.
    pub fn wait_running(&self, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let rows = self.rows();
            if let Some(row) = rows.iter().find(|r| r["status"] == "running") {
                return row["id"].as_str().unwrap().to_owned();
            }
            assert!(std::time::Instant::now() < deadline, "bottle never ran");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Every file below `dir` (recursively; directories themselves are not listed).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A small seeded generator (xorshift64*): the chaos tests' kill points are reproducible from
/// the printed seed.
pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// How many times a chaos test kills `start` (`BOT_BOTTLE_CHAOS_RUNS` overrides).
pub const CHAOS_RUNS: usize = 20;

/// The chaos test (PRD 0007): `CHAOS_RUNS` times, spawn `start()` and SIGKILL it at a seeded
/// random point within `window_ms` (the seed is printed; `BOT_BOTTLE_CHAOS_SEED` repeats it).
/// Until its reaper is done, every bottle `list` shows is `orphaned` and every object that
/// exists both before and after a `list` is listed (an object appearing only after, from a
/// create sent just before the kill, is caught by the next round); the reaper is done within
/// `reap_timeout`; then `cleanup` leaves no container, network, row, lease or process.
pub fn sigkill_chaos(
    sb: &Sandbox,
    window_ms: u64,
    reap_timeout: Duration,
    start: impl Fn() -> Command,
) {
    let seed = std::env::var("BOT_BOTTLE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let runs = std::env::var("BOT_BOTTLE_CHAOS_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CHAOS_RUNS);
    eprintln!("chaos: seed {seed} (BOT_BOTTLE_CHAOS_SEED={seed} repeats it), {runs} runs");
    let mut rng = Xorshift(seed);
    for i in 0..runs {
        let delay = Duration::from_millis(rng.next() % window_ms);
        let run = Running::spawn(start());
        std::thread::sleep(delay);
        run.signal(nix::sys::signal::Signal::SIGKILL);
        let status = run.wait();
        let what = format!("run {i} (seed {seed}), killed after {delay:?} ({status})");

        let deadline = std::time::Instant::now() + reap_timeout;
        loop {
            let before = sb.docker_leftovers();
            let rows = sb.rows();
            let after = sb.docker_leftovers();
            assert!(
                rows.iter().all(|r| r["status"] == "orphaned"),
                "{what}: {rows:?}"
            );
            let ids: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
            for object in before.iter().filter(|o| after.contains(o)) {
                assert!(
                    ids.iter().any(|id| object.contains(id)),
                    "{what}: {object} exists but `list` shows only {ids:?}"
                );
            }
            if sb.processes().is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: still running {:?}",
                sb.processes()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = sb.run(&["cleanup"]);
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        assert!(sb.rows().is_empty(), "{what}: rows {:?}", sb.rows());
        assert!(
            sb.docker_leftovers().is_empty(),
            "{what}: objects {:?}",
            sb.docker_leftovers()
        );
        assert!(sb.leases().is_empty(), "{what}: leases {:?}", sb.leases());
        assert!(
            sb.processes().is_empty(),
            "{what}: processes {:?}",
            sb.processes()
        );
    }
}

/// Checks an attack script's verdicts (lines `ATTACK <name>: ESCAPED|BLOCKED`): each positive
/// control in `controls` got through (so a broken network cannot pass for a defence), each of
/// `attacks` was blocked.
pub fn assert_attack_verdicts(text: &str, controls: &[&str], attacks: &[&str]) {
    for control in controls {
        assert!(
            text.contains(&format!("ATTACK {control}: ESCAPED")),
            "positive control {control} broken:\n{text}"
        );
    }
    for attack in attacks {
        assert!(
            text.contains(&format!("ATTACK {attack}: BLOCKED")),
            "{attack} was not blocked:\n{text}"
        );
    }
}
