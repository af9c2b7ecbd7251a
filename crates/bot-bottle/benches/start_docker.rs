//! `bot-bottle start test --backend docker -- echo go` against `docker run --rm` of the same
//! agent image with the same runtime and command, measured in one run and printed as ratios
//! (issue 14's Docker rows):
//!
//! - `start`: the whole process, from spawn to exit, including the bundle, the networks, the
//!   alias lease and the teardown until every object is gone (also shown against `docker run
//!   --network none`, which skips the default bridge's endpoint);
//! - `first`: from spawn to the agent's first instruction (its `go` line on stdout);
//! - `teardown`: from the agent's exit to `start`'s, every object removed, against one
//!   `docker rm -f` of a running container;
//! - `16 at once` (runc): the whole pool of 16 aliases started together, against one start in
//!   the same home: every start succeeds, 16 distinct aliases, no object left;
//! - `bundle RSS` (runc): the resident memory of the bundle's processes, idle and with 100 open
//!   CONNECT tunnels each having carried 1 MiB to a sink on this host (`allowed.test`).
//!
//! `cargo bench -p bot-bottle --bench start_docker`. Needs Docker (and gVisor's `runsc`
//! registered for its row; without it only runc is measured, said so). The images are built
//! once before timing (warm images, as a user's second start). `START_BENCH_RUNS` (paired
//! runs per runtime, default 7) changes the count; the runs of a pair alternate which goes
//! first, so drift on the machine falls on both sides.

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bot-bottle");

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("start_docker bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A private bot-bottle home (state, config, cache) and an alias pool of its own.
struct Home {
    dir: tempfile::TempDir,
    pool: &'static str,
}

/// One whole `start`, as [`Home::start`] timed it.
struct Run {
    /// Spawn to exit.
    whole: Duration,
    /// Spawn to the agent's first line on stdout.
    first: Duration,
    /// The `agent exited` log line to exit.
    teardown: Duration,
    /// The loopback alias it leased (`alias leased` log line).
    alias: String,
}

impl Home {
    fn new(pool: &'static str) -> Result<Self, String> {
        let home = Home {
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            pool,
        };
        for sub in ["state", "config/bottles", "cache"] {
            std::fs::create_dir_all(home.dir.path().join(sub)).map_err(|e| e.to_string())?;
        }
        Ok(home)
    }

    fn cmd(&self, runtime: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env("BOT_BOTTLE_STATE_DIR", self.dir.path().join("state"))
            .env("BOT_BOTTLE_CONFIG_DIR", self.dir.path().join("config"))
            .env("BOT_BOTTLE_CACHE_DIR", self.dir.path().join("cache"))
            .env("BOT_BOTTLE_ALIAS_POOL", self.pool)
            .env("BOT_BOTTLE_DOCKER_RUNTIME", runtime)
            .env_remove("RUST_LOG")
            .env_remove("BOT_BOTTLE_PAUSE_AT")
            .stdin(Stdio::null());
        c
    }

    fn spawn(&self, runtime: &str, agent: &[&str]) -> Result<Child, String> {
        self.cmd(runtime)
            .args(["-v", "start", "test", "--backend", "docker", "--"])
            .args(agent)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {BIN}: {e}"))
    }

    /// One whole `start test -- echo go`, timed from spawn: its first stdout line, the agent's
    /// exit (`-v`'s `agent exited` line) and its own exit, by which every object it made is
    /// gone (the guard stack runs before `start` returns; [`leftovers`] checks at the end).
    fn start(&self, runtime: &str) -> Result<Run, String> {
        let t = Instant::now();
        let mut child = self.spawn(runtime, &["echo", "go"])?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let first_line = std::thread::spawn(move || {
            let mut line = String::new();
            let read = std::io::BufReader::new(stdout).read_line(&mut line);
            (Instant::now(), read.map(|_| line))
        });
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut exited_at = None;
        let mut alias = None;
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if exited_at.is_none() && line.contains("agent exited") {
                exited_at = Some(Instant::now());
            }
            if alias.is_none() && line.contains("alias leased") {
                alias = strip_ansi(&line)
                    .rsplit_once("alias=")
                    .map(|(_, a)| a.trim().to_owned());
            }
            log.push_str(&line);
            log.push('\n');
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        let end = Instant::now();
        if !status.success() {
            return Err(format!("start failed ({status}): {log}"));
        }
        let (first_at, first) = first_line.join().map_err(|_| "stdout reader panicked")?;
        if first.map_err(|e| e.to_string())?.trim() != "go" {
            return Err(format!("the agent's first line was not `go`: {log}"));
        }
        let exited_at = exited_at.ok_or_else(|| format!("no `agent exited` line in: {log}"))?;
        let alias = alias.ok_or_else(|| format!("no `alias leased` line in: {log}"))?;
        Ok(Run {
            whole: end - t,
            first: first_at - t,
            teardown: end - exited_at,
            alias,
        })
    }

    /// `bot-bottle.state`, the label on every Docker object this home's starts make.
    fn state_tag(&self) -> Result<String, String> {
        use sha2::Digest as _;
        let state = self
            .dir
            .path()
            .join("state")
            .canonicalize()
            .map_err(|e| e.to_string())?;
        let digest = sha2::Sha256::digest(state.as_os_str().as_encoded_bytes());
        Ok(hex::encode(&digest[..6]))
    }
}

/// `-v`'s log lines carry colour codes around field values.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// One `docker rm -f` of a running container of `image` (teardown's baseline).
fn docker_rm(image: &str, runtime: &str) -> Result<Duration, String> {
    let id = docker(&["run", "-d", "--runtime", runtime, image, "sleep", "60"])?;
    let t = Instant::now();
    docker(&["rm", "-f", &id])?;
    Ok(t.elapsed())
}

/// `docker run --rm` of `image` running `echo go` (with `network`, if any): the whole
/// process and the time to its first line.
fn docker_run(
    image: &str,
    runtime: &str,
    network: Option<&str>,
) -> Result<(Duration, Duration), String> {
    let t = Instant::now();
    let mut c = Command::new("docker");
    c.args(["run", "--rm", "--runtime", runtime]);
    if let Some(network) = network {
        c.args(["--network", network]);
    }
    let mut child = c
        .args([image, "echo", "go"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("docker: {e}"))?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let first = t.elapsed();
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() || line.trim() != "go" {
        return Err(format!(
            "docker run {image}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((t.elapsed(), first))
}

/// The agent image `start` built for the `test` bottle (its repository from `plan`).
fn agent_image(home: &Home) -> Result<String, String> {
    let out = home
        .cmd("runc")
        .args(["plan", "test", "--backend", "docker", "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    let plan: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("plan --json: {e}"))?;
    let repo = plan["agent"]["image_repo"]
        .as_str()
        .ok_or("plan --json has no agent.image_repo")?;
    let tags = docker(&[
        "images",
        repo,
        "--format",
        "{{.Repository}}:{{.Tag}} {{.CreatedAt}}",
    ])?;
    tags.lines()
        .next()
        .and_then(|l| l.split(' ').next())
        .map(str::to_owned)
        .ok_or_else(|| format!("no image of {repo}: the warm-up start did not build it"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run() -> Result<(), String> {
    let runs: usize = std::env::var("START_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let home = Home::new("240-240")?;
    let runtimes_json = docker(&["info", "--format", "{{json .Runtimes}}"])?;
    let mut runtimes = vec!["runc"];
    if runtimes_json.contains("\"runsc\"") {
        runtimes.push("runsc");
    } else {
        println!("runsc is not registered with Docker: measuring runc only");
    }
    // Warm images (and the first start's one-time work) outside the timing.
    home.start("runc")?;
    let image = agent_image(&home)?;
    println!("start_docker: {runs} paired runs per runtime, agent image {image}");
    println!(
        "{:<8} {:<16} {:>12} {:>12} {:>7}  target",
        "runtime", "row", "bot-bottle", "baseline", "ratio"
    );
    let mut one_runc = None;
    for runtime in runtimes {
        home.start(runtime)?;
        docker_run(&image, runtime, None)?;
        let (mut ours, mut base, mut isolated) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let mut pair = || -> Result<(), String> {
                let (whole, first) = docker_run(&image, runtime, None)?;
                base.push((whole, first, docker_rm(&image, runtime)?));
                isolated.push(docker_run(&image, runtime, Some("none"))?.0);
                Ok(())
            };
            if i % 2 == 0 {
                ours.push(home.start(runtime)?);
                pair()?;
            } else {
                pair()?;
                ours.push(home.start(runtime)?);
            }
        }
        let whole = median(ours.iter().map(|r| r.whole).collect());
        let base_whole = median(base.iter().map(|b| b.0).collect());
        row(runtime, "start", whole, base_whole, 2.0, "docker run --rm");
        row(
            runtime,
            "start",
            whole,
            median(isolated),
            f64::INFINITY,
            "(vs docker run --rm --network none: for scale)",
        );
        row(
            runtime,
            "first",
            median(ours.iter().map(|r| r.first).collect()),
            median(base.iter().map(|b| b.1).collect()),
            1.5,
            "docker run to the same line",
        );
        row(
            runtime,
            "teardown",
            median(ours.iter().map(|r| r.teardown).collect()),
            median(base.iter().map(|b| b.2).collect()),
            2.0,
            "one docker rm -f",
        );
        if runtime == "runc" {
            one_runc = Some(whole);
        }
    }
    leftovers(&home)?;
    let pool = Home::new("239-254")?;
    pool.start("runc")?;
    let one = one_runc.ok_or("runc was not measured")?;
    concurrent(&pool, 16, one)?;
    bundle_rss(&pool)?;
    leftovers(&pool)
}

/// `n` starts at once (the whole pool): the total against one start (`one`, the runc median
/// above), every start successful, every alias distinct.
fn concurrent(home: &Home, n: usize, one: Duration) -> Result<(), String> {
    let t = Instant::now();
    let runs: Vec<Result<Run, String>> = std::thread::scope(|s| {
        let started: Vec<_> = (0..n).map(|_| s.spawn(|| home.start("runc"))).collect();
        started
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a start thread panicked".into()))
            })
            .collect()
    });
    let total = t.elapsed();
    let ok: Vec<&Run> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    let mut aliases: Vec<&str> = ok.iter().map(|r| r.alias.as_str()).collect();
    aliases.sort_unstable();
    aliases.dedup();
    row(
        "runc",
        "16 at once",
        total,
        one,
        8.0,
        "one start, whole process",
    );
    println!(
        "{:<8} {:<16} {}/{n} started, {} distinct aliases",
        "runc",
        "",
        ok.len(),
        aliases.len()
    );
    if let Some(Err(e)) = runs.iter().find(|r| r.is_err()) {
        return Err(format!("a concurrent start failed: {e}"));
    }
    if aliases.len() != n {
        return Err(format!("{n} concurrent starts shared aliases: {aliases:?}"));
    }
    Ok(())
}

/// The bundle's resident memory, idle and with 100 open tunnels each having carried 1 MiB to
/// a sink on this host (the test bottle's `allowed.test` is the Docker host).
fn bundle_rss(home: &Home) -> Result<(), String> {
    const TUNNELS: usize = 100;
    let sink = TcpListener::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    let port = sink.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        for conn in sink.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64 * 1024];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    let mut child = home.spawn("runc", &["sleep", "120"])?;
    let tag = home.state_tag()?;
    let label = format!("label=bot-bottle.state={tag}");
    let found = wait_for(Duration::from_secs(30), || {
        let ids = docker(&["ps", "-q", "--filter", &label, "--filter", "name=-bundle$"]).ok()?;
        let id = ids.lines().next()?.to_owned();
        let agent = docker(&["ps", "-q", "--filter", &label, "--filter", "name=-agent$"]).ok()?;
        (!agent.trim().is_empty()).then_some((id, agent.trim().to_owned()))
    });
    let measured = (|| {
        let (bundle, agent) = found.ok_or("the bottle's bundle and agent never ran")?;
        let proxy = published(&bundle, "3128/tcp")?;
        // Let the bundle settle after start.
        std::thread::sleep(Duration::from_millis(500));
        let idle = rss_kib(&bundle)?;
        let mut tunnels = Vec::with_capacity(TUNNELS);
        let chunk = vec![0x5au8; 1024 * 1024];
        for _ in 0..TUNNELS {
            let mut t = TcpStream::connect(&proxy).map_err(|e| format!("{proxy}: {e}"))?;
            write!(
                t,
                "CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
            )
            .map_err(|e| e.to_string())?;
            let head = response_head(&mut t)?;
            if !head.starts_with("HTTP/1.1 200") {
                return Err(format!("CONNECT refused: {head}"));
            }
            t.write_all(&chunk).map_err(|e| e.to_string())?;
            tunnels.push(t);
        }
        std::thread::sleep(Duration::from_millis(500));
        let busy = rss_kib(&bundle)?;
        drop(tunnels);
        let _ = docker(&["kill", &agent]);
        Ok((idle, busy))
    })();
    if measured.is_err() {
        let _ = child.kill();
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let _ = child.wait();
    let (idle, busy) = measured.map_err(|e| format!("{e}\n{stderr}"))?;
    for (name, kib, limit) in [("bundle RSS idle", idle, 20), ("bundle RSS busy", busy, 64)] {
        let mib = kib as f64 / 1024.0;
        println!(
            "{:<8} {name:<16} {mib:>10.1}MiB {:>12} {:>7}  ≤ {limit} MiB: {}",
            "runc",
            "",
            "",
            verdict(mib <= f64::from(limit))
        );
    }
    Ok(())
}

/// A response's head, read a byte at a time up to its blank line (nothing of the tunnel after).
fn response_head(t: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match t.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => break,
            Err(e) => return Err(format!("reading the CONNECT answer: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Polls `f` every 50 ms until it yields or `limit` passes.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The host address a container's `port` is published on.
fn published(container: &str, port: &str) -> Result<String, String> {
    let out = docker(&["port", container, port])?;
    out.lines()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| format!("{container} publishes no {port}"))
}

/// The summed `VmRSS` of a container's processes, in KiB.
fn rss_kib(container: &str) -> Result<u64, String> {
    let pids = docker(&["top", container, "-o", "pid"])?;
    let mut total = 0;
    for pid in pids.lines().skip(1) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
            .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        total += rss;
    }
    Ok(total)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "over"
    }
}

/// One row: ours, the baseline, their ratio and the target (a ratio; infinite for none).
fn row(runtime: &str, name: &str, ours: Duration, base: Duration, target: f64, against: &str) {
    let ratio = ours.as_secs_f64() / base.as_secs_f64();
    let goal = if target.is_finite() {
        format!("≤ {target:.1}× {against}: {}", verdict(ratio <= target))
    } else {
        against.to_owned()
    };
    println!(
        "{runtime:<8} {name:<16} {:>10.0}ms {:>10.0}ms {:>6.2}×  {goal}",
        ours.as_secs_f64() * 1e3,
        base.as_secs_f64() * 1e3,
        ratio
    );
}

/// Nothing of the runs may be left: a bench that leaks would flatter every run after it. No
/// bottle listed, no container or network with the home's label.
fn leftovers(home: &Home) -> Result<(), String> {
    let out = home
        .cmd("runc")
        .args(["list", "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    let listed = String::from_utf8_lossy(&out.stdout);
    if listed.trim() != "[]" {
        return Err(format!("bottles left after the bench: {listed}"));
    }
    let label = format!("label=bot-bottle.state={}", home.state_tag()?);
    let containers = docker(&["ps", "-aq", "--filter", &label])?;
    let networks = docker(&["network", "ls", "-q", "--filter", &label])?;
    if !containers.is_empty() || !networks.is_empty() {
        return Err(format!(
            "objects left after the bench: containers [{containers}] networks [{networks}]"
        ));
    }
    Ok(())
}
