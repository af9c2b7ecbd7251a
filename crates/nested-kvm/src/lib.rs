//! The nested-KVM harness: runs what needs a KVM that can run Linux inside an emulated machine
//! ("L1") when the host's KVM cannot (this project's machines have a nested `kvm_pvm` that runs
//! small guests but not Linux; see shared/docs/FINDINGS.md).
//!
//! L1 is QEMU's software emulation (TCG) with emulated AMD SVM, booting Debian's stock kernel
//! (unpacked by `.ci/setup-l1`, never installed) from an initramfs this crate writes: busybox,
//! the virtio, 9p, virtio-net and kvm/kvm-amd modules, and an `/init` that mounts the shares and
//! runs the job. Inside L1, `/dev/kvm` is a real (nested SVM) KVM on which our VMM boots Linux.
//! Host directories are shared over 9p, mounted at paths the caller chooses — usually their own,
//! so test binaries and launch files find everything where the host has it.
//!
//! Every run is bounded by a timeout; QEMU dies with its parent. L1 has no toolchain: what runs
//! there is built on the host (the workspace's binaries are static).

mod initramfs;
mod machine;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use initramfs::{LOG_FILE, MODULES, RC_FILE};
pub use machine::{
    same_path_shares, which, Assets, Forward, Machine, Outcome, Running, Share, DEFAULT_L1_DIR,
    JOB_MOUNT, L1_CPU, L1_DIR_ENV, L1_MEM_MIB,
};

/// Set inside L1 for everything the job runs: a test that would hand itself to L1 runs here.
pub const IN_L1_ENV: &str = "BOT_BOTTLE_IN_L1";
/// Longest a test binary's run in L1 may take: L1's boot (about 5 s) plus the test's own time
/// under nested virtualisation on an emulated CPU, on a loaded 2-core machine.
pub const TEST_RUN_TIMEOUT: Duration = Duration::from_secs(240);

#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    #[error(
        "the nested-KVM harness's L1 kernel is not in {dir}: run `.ci/setup-l1` as root \
         (it downloads Debian's linux-image package and unpacks it there; set {L1_DIR_ENV} \
         to use another directory)"
    )]
    NoL1Kernel { dir: PathBuf },
    #[error("{program} not found: install Debian's {package} package")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start QEMU for L1 (is util-linux's setpriv installed?)")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("L1 did not power off within {}s and was killed; the end of its console:\n{console}", limit.as_secs())]
    Timeout { limit: Duration, console: String },
    #[error("L1 was already waited for")]
    Gone,
}

/// Whether this process runs inside L1.
pub fn in_l1() -> bool {
    std::env::var_os(IN_L1_ENV).is_some()
}

/// Whether this is CI (`CI=true`), where a test that cannot run fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The harness's assets, or `None` after printing why `test` skips; under `CI=true` a missing
/// harness fails the test instead.
pub fn assets_or_skip(test: &str) -> Option<Assets> {
    match Assets::locate() {
        Ok(a) => Some(a),
        Err(why) => {
            assert!(
                !in_ci(),
                "{test}: CI=true but the nested-KVM harness cannot run: {why}"
            );
            eprintln!("SKIPPED {test}: the nested-KVM harness cannot run: {why}");
            None
        }
    }
}

/// `s` quoted for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A test binary (or any static program) to run in L1 with `args` and `env`, its directory and
/// `dirs` shared at their own paths (`true`: read-only).
#[derive(Debug, Clone)]
pub struct ProgramRun {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dirs: Vec<(PathBuf, bool)>,
    pub timeout: Duration,
}

impl ProgramRun {
    pub fn new(program: &Path) -> ProgramRun {
        ProgramRun {
            program: program.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            dirs: Vec::new(),
            timeout: TEST_RUN_TIMEOUT,
        }
    }

    /// The shell lines that run it: [`IN_L1_ENV`] and `CI` (as on the host) set.
    pub fn script(&self) -> String {
        let mut s = format!("export {IN_L1_ENV}=1\n");
        if in_ci() {
            s.push_str("export CI=true\n");
        }
        for (k, v) in &self.env {
            s.push_str(&format!("export {k}={}\n", sh_quote(v)));
        }
        s.push_str(&sh_quote(&self.program.display().to_string()));
        for a in &self.args {
            s.push(' ');
            s.push_str(&sh_quote(a));
        }
        s.push('\n');
        s
    }

    /// Boots L1, runs the program, waits for L1 to power off.
    pub fn run(&self, assets: &Assets) -> Result<Outcome, NestedError> {
        let job = tempfile::Builder::new()
            .prefix("nested-kvm-job-")
            .tempdir()
            .map_err(|source| NestedError::Io {
                what: "creating the job directory".into(),
                source,
            })?;
        std::fs::write(job.path().join("run.sh"), self.script()).map_err(|source| {
            NestedError::Io {
                what: "writing run.sh".into(),
                source,
            }
        })?;
        let mut dirs = self.dirs.clone();
        if let Some(dir) = self.program.parent() {
            dirs.push((dir.to_path_buf(), true));
        }
        let mut machine = Machine::new(assets.clone(), job.path());
        machine.shares = same_path_shares(&dirs);
        machine.boot()?.wait(self.timeout)
    }
}

/// Runs the calling test binary's test `name` inside L1 (`--exact`, one thread), sharing its
/// directory (a `deps/` directory is shared from its parent, so sibling binaries are found) and
/// `dirs`; panics with L1's console when it fails. Returns L1's console.
pub fn run_this_test_in_l1(
    assets: &Assets,
    name: &str,
    env: &[(&str, String)],
    dirs: &[(PathBuf, bool)],
) -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut run = ProgramRun::new(&exe);
    run.args = vec![
        name.to_owned(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    run.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    run.dirs = dirs.to_vec();
    if let Some(target) = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
    {
        run.dirs.push((target.to_path_buf(), true));
    }
    let outcome = run
        .run(assets)
        .unwrap_or_else(|e| panic!("{name} in L1: the harness failed: {e}"));
    assert_eq!(
        outcome.status,
        Some(0),
        "{name} in L1 failed (status {:?} after {:.1}s); L1's console:\n{}",
        outcome.status,
        outcome.elapsed.as_secs_f64(),
        outcome.console_tail(200)
    );
    outcome.console
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_run_marks_l1_and_quotes_its_arguments() {
        let mut run = ProgramRun::new(Path::new("/t/deps/probe_boot-1"));
        run.args = vec!["it's".into()];
        run.env = vec![("K".into(), "a b".into())];

        let s = run.script();

        assert!(s.starts_with("export BOT_BOTTLE_IN_L1=1\n"), "{s}");
        assert!(s.contains("export K='a b'\n"), "{s}");
        assert!(s.ends_with("'/t/deps/probe_boot-1' 'it'\\''s'\n"), "{s}");
    }
}
