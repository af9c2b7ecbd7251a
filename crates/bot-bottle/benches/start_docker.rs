//! `bot-bottle start test --backend docker -- true` against `docker run --rm` of the same agent
//! image with the same runtime, measured in one run and printed as ratios (issue 14's first
//! row): the whole process, from spawn to exit, including the bundle, the networks, the alias
//! lease and the teardown until every object is gone.
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

    fn start(&self, runtime: &str) -> Result<Duration, String> {
        let t = Instant::now();
        let out = self
            .cmd(runtime)
            .args(["start", "test", "--backend", "docker", "--", "true"])
            .output()
            .map_err(|e| format!("running {BIN}: {e}"))?;
        let took = t.elapsed();
        if !out.status.success() {
            return Err(format!(
                "start failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(took)
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
        "{:<8} {:>14} {:>14} {:>7}  (target ≤ 2.0×)",
        "runtime", "start (p50)", "docker run", "ratio"
    );
    for runtime in runtimes {
        home.start(runtime)?;
        docker_run(&image, runtime)?;
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for i in 0..runs {
            if i % 2 == 0 {
                ours.push(home.start(runtime)?);
                base.push(docker_run(&image, runtime)?);
            } else {
                base.push(docker_run(&image, runtime)?);
                ours.push(home.start(runtime)?);
            }
        }
        let (o, b) = (median(ours), median(base));
        println!(
            "{runtime:<8} {:>12.0}ms {:>12.0}ms {:>6.2}×",
            o.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            o.as_secs_f64() / b.as_secs_f64()
        );
    }
    leftovers(home.dir.path())
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
