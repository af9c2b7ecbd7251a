//! `bot-bottle start test --backend docker -- true` against `docker run --rm` of the same agent
//! image with the same runtime, measured in one run and printed as ratios (issue 14's first
//! row): the whole process, from spawn to exit, including the bundle, the networks, the alias
//! lease and the teardown until every object is gone; and the teardown alone (from the agent's
//! exit to `start`'s, every object removed) against one `docker rm -f` of a running container.
//!
//! `cargo bench -p bot-bottle --bench start_docker`. Needs Docker (and gVisor's `runsc`
//! registered for its row; without it only runc is measured, said so). The images are built
//! once before timing (warm images, as a user's second start). `START_BENCH_RUNS` (paired
//! runs per runtime, default 7) changes the count; the runs of a pair alternate which goes
//! first, so drift on the machine falls on both sides.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
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
}

impl Home {
    fn cmd(&self, runtime: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env("BOT_BOTTLE_STATE_DIR", self.dir.path().join("state"))
            .env("BOT_BOTTLE_CONFIG_DIR", self.dir.path().join("config"))
            .env("BOT_BOTTLE_CACHE_DIR", self.dir.path().join("cache"))
            .env("BOT_BOTTLE_ALIAS_POOL", "240-240")
            .env("BOT_BOTTLE_DOCKER_RUNTIME", runtime)
            .env_remove("RUST_LOG")
            .env_remove("BOT_BOTTLE_PAUSE_AT")
            .stdin(Stdio::null());
        c
    }

    /// One whole `start` (spawn to exit), and its teardown: from its `agent exited` log line
    /// (`-v`) to its exit, by which every object it made is gone (the guard stack runs before
    /// `start` returns; [`leftovers`] checks at the end).
    fn start(&self, runtime: &str) -> Result<(Duration, Duration), String> {
        use std::io::BufRead as _;
        let t = Instant::now();
        let mut child = self
            .cmd(runtime)
            .args(["-v", "start", "test", "--backend", "docker", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {BIN}: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut exited_at = None;
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if exited_at.is_none() && line.contains("agent exited") {
                exited_at = Some(Instant::now());
            }
            log.push_str(&line);
            log.push('\n');
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        let end = Instant::now();
        if !status.success() {
            return Err(format!("start failed ({status}): {log}"));
        }
        let exited_at = exited_at.ok_or_else(|| format!("no `agent exited` line in: {log}"))?;
        Ok((end - t, end - exited_at))
    }
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
    let id = docker(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        "--network",
        "none",
        image,
        "sleep",
        "60",
    ])?;
    let t = Instant::now();
    docker(&["rm", "-f", &id])?;
    Ok(t.elapsed())
}

fn docker_run(image: &str, runtime: &str) -> Result<Duration, String> {
    let t = Instant::now();
    docker(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        "--network",
        "none",
        image,
        "true",
    ])?;
    Ok(t.elapsed())
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
    let home = Home {
        dir: tempfile::tempdir().map_err(|e| e.to_string())?,
    };
    for sub in ["state", "config/bottles", "cache"] {
        std::fs::create_dir_all(home.dir.path().join(sub)).map_err(|e| e.to_string())?;
    }
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
        "{:<8} {:<9} {:>14} {:>14} {:>7}  target",
        "runtime", "row", "bot-bottle", "baseline", "ratio"
    );
    for runtime in runtimes {
        home.start(runtime)?;
        docker_run(&image, runtime)?;
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        let (mut teardown, mut rm) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let one = |ours: &mut Vec<Duration>, teardown: &mut Vec<Duration>| {
                home.start(runtime).map(|(whole, down)| {
                    ours.push(whole);
                    teardown.push(down);
                })
            };
            if i % 2 == 0 {
                one(&mut ours, &mut teardown)?;
                base.push(docker_run(&image, runtime)?);
            } else {
                base.push(docker_run(&image, runtime)?);
                one(&mut ours, &mut teardown)?;
            }
            rm.push(docker_rm(&image, runtime)?);
        }
        row(
            runtime,
            "start",
            median(ours),
            median(base),
            "≤ 2.0× docker run --rm",
        );
        row(
            runtime,
            "teardown",
            median(teardown),
            median(rm),
            "≤ 2× docker rm -f",
        );
    }
    leftovers(home.dir.path())
}

/// One row: medians and their ratio.
fn row(runtime: &str, name: &str, ours: Duration, base: Duration, target: &str) {
    println!(
        "{runtime:<8} {name:<9} {:>12.0}ms {:>12.0}ms {:>6.2}×  {target}",
        ours.as_secs_f64() * 1e3,
        base.as_secs_f64() * 1e3,
        ours.as_secs_f64() / base.as_secs_f64()
    );
}

/// Nothing of the runs may be left: a bench that leaks would flatter every run after it.
fn leftovers(home: &Path) -> Result<(), String> {
    let state: PathBuf = home.join("state");
    let out = Command::new(BIN)
        .env("BOT_BOTTLE_STATE_DIR", &state)
        .env("BOT_BOTTLE_CONFIG_DIR", home.join("config"))
        .env("BOT_BOTTLE_CACHE_DIR", home.join("cache"))
        .args(["list", "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    let listed = String::from_utf8_lossy(&out.stdout);
    if listed.trim() != "[]" {
        return Err(format!("bottles left after the bench: {listed}"));
    }
    Ok(())
}
