//! Guest kernel: the config fragment in `kernel/bottle.config` and `bot-bottle kernel build`.
//!
//! The kernel is built from a kernel source tree (Debian/Ubuntu: the `linux-source-6.1`
//! package's tarball, extracted once into the cache) as `make tinyconfig` + our fragment, out of
//! tree (`O=`), and the resulting `vmlinux` is kept under
//! `<cache>/kernel/<key>/vmlinux`, where `key` hashes the source's identity and the fragment.
//! Each entry also holds a copy of the fragment it was built from (`bottle.config`), the full
//! `.config` (`config`) and the source identity (`source`), so anyone can find the kernel that
//! matches the fragment without rebuilding.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::host::paths::Dirs;

/// The fragment merged on top of `make tinyconfig`.
pub const FRAGMENT: &str = include_str!("../../../../kernel/bottle.config");

/// Where Debian's `linux-source-6.1` package puts its tarball.
pub const DEFAULT_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

/// The Debian/Ubuntu package that provides [`DEFAULT_SOURCE`].
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// Overrides the default kernel source (a tree or tarball) for `kernel build` and for the build
/// `start` runs when no kernel is cached.
pub const SOURCE_ENV: &str = "BOT_BOTTLE_KERNEL_SOURCE";

/// Tools the build needs, each with the Debian package that provides it.
const TOOLS: [(&str, &str); 7] = [
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("tar", "tar"),
    ("xz", "xz-utils"),
];

/// Marker written into an extracted source tree, holding the identity of its tarball.
const EXTRACTED_MARKER: &str = ".bot-bottle-extracted";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel source {path} not found: install the `{SOURCE_PACKAGE}` package (apt-get install {SOURCE_PACKAGE}) or pass --source DIR with a Linux source tree")]
    SourceMissing { path: PathBuf },
    #[error("{path} is neither a Linux source tree (no Makefile with VERSION/PATCHLEVEL) nor a .tar.xz/.tar.gz/.tar tarball of one")]
    NotASource { path: PathBuf },
    #[error("`{tool}` is needed to build the kernel: install the `{package}` package (apt-get install {package}); also needed: libelf-dev libssl-dev")]
    MissingTool { tool: String, package: String },
    #[error("cannot find a cache directory: set HOME or XDG_CACHE_HOME")]
    NoCacheDir,
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}); last lines of {log}:\n{tail}")]
    Step {
        command: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("the kernel source does not support these options of kernel/bottle.config (they were dropped by olddefconfig): {options}")]
    OptionsDropped { options: String },
}

/// What `bot-bottle kernel build` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBuildOptions {
    /// A Linux source tree, or a tarball of one; [`DEFAULT_SOURCE`] when `None`.
    pub source: Option<PathBuf>,
    /// The kernel cache (`<cache>/kernel`, see [`kernel_cache_dir`]).
    pub cache_dir: PathBuf,
    /// Parallel make jobs.
    pub jobs: usize,
    /// Rebuild even when a kernel for this source and fragment is cached.
    pub force: bool,
}

impl KernelBuildOptions {
    /// Defaults: `$BOT_BOTTLE_KERNEL_SOURCE`, else Debian's source tarball; the user's cache;
    /// one job per CPU.
    pub fn new(dirs: &Dirs) -> KernelBuildOptions {
        KernelBuildOptions {
            source: std::env::var_os(SOURCE_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            cache_dir: kernel_cache_dir(dirs),
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            force: false,
        }
    }
}

/// Progress of a build, for the CLI to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelProgress {
    /// A kernel for this source and fragment is already built.
    Cached { vmlinux: PathBuf },
    /// Unpacking the source tarball (once per tarball; takes seconds).
    Extracting { tarball: PathBuf },
    /// `make tinyconfig` + fragment + `olddefconfig`.
    Configuring,
    /// One more object built; `line` is make's line for it (e.g. `CC kernel/fork.o`).
    Compiling { done: usize, line: String },
    /// Done: the kernel is in the cache.
    Built { vmlinux: PathBuf },
}

/// Progress: one updating line on a terminal, a line per phase (and every 500 objects) otherwise.
pub fn show_on_stderr(p: KernelProgress, tty: bool) {
    use std::io::Write as _;
    let mut err = std::io::stderr();
    match p {
        KernelProgress::Cached { vmlinux } => {
            let _ = writeln!(err, "bot-bottle: kernel up to date: {}", vmlinux.display());
        }
        KernelProgress::Extracting { tarball } => {
            let _ = writeln!(err, "bot-bottle: unpacking {}", tarball.display());
        }
        KernelProgress::Configuring => {
            let _ = writeln!(
                err,
                "bot-bottle: configuring (tinyconfig + kernel/bottle.config)"
            );
        }
        KernelProgress::Compiling { done, line } => {
            if tty {
                let _ = write!(err, "\r\x1b[2K  [{done:>5}] {}", line.trim());
            } else if done % 500 == 0 {
                let _ = writeln!(err, "  {done} objects built");
            }
        }
        KernelProgress::Built { vmlinux } => {
            if tty {
                let _ = writeln!(err);
            }
            let _ = writeln!(err, "bot-bottle: kernel built: {}", vmlinux.display());
        }
    }
}

/// `<cache>/kernel`.
pub fn kernel_cache_dir(dirs: &Dirs) -> PathBuf {
    dirs.cache.join("kernel")
}

/// The cache key of a kernel: its source's identity and the fragment.
pub fn cache_key(source_id: &str, fragment: &str) -> String {
    let mut h = Sha256::new();
    h.update(source_id.as_bytes());
    h.update([0u8]);
    h.update(fragment.as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// A built kernel for the current fragment in the user's cache, if any (for `doctor`).
pub fn cached_kernel() -> Option<PathBuf> {
    let dirs = Dirs::from_env().ok()?;
    cached_kernel_in(&kernel_cache_dir(&dirs), FRAGMENT)
}

/// The newest `vmlinux` under `cache_dir` that was built from exactly `fragment`.
pub fn cached_kernel_in(cache_dir: &Path, fragment: &str) -> Option<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(cache_dir)
        .ok()?
        .flatten()
        .filter(|e| {
            fs::read_to_string(e.path().join("bottle.config"))
                .ok()
                .as_deref()
                == Some(fragment)
        })
        .map(|e| e.path().join("vmlinux"))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// Options the fragment sets (`CONFIG_X=y`/`=value` and `# CONFIG_X is not set`) that the final
/// `.config` does not have as asked.
pub fn dropped_options(fragment: &str, dot_config: &str) -> Vec<String> {
    let have: std::collections::HashSet<&str> = dot_config.lines().map(str::trim).collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("CONFIG_") || (l.starts_with("# CONFIG_") && l.ends_with(" is not set"))
        })
        .filter(|l| {
            if l.starts_with('#') {
                // Off is also satisfied by the option not existing at all.
                let name = l.trim_start_matches("# ").trim_end_matches(" is not set");
                dot_config
                    .lines()
                    .any(|d| d.starts_with(&format!("{name}=")))
            } else {
                !have.contains(l)
            }
        })
        .map(str::to_string)
        .collect()
}

/// `6.1.192` from a kernel Makefile.
pub fn makefile_version(makefile: &str) -> Option<String> {
    let field = |name: &str| {
        makefile.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let (v, p, s) = (
        field("VERSION")?,
        field("PATCHLEVEL")?,
        field("SUBLEVEL").unwrap_or_default(),
    );
    let extra = field("EXTRAVERSION").unwrap_or_default();
    Some(format!("{v}.{p}.{s}{extra}"))
}

enum Source {
    Tree(PathBuf),
    Tarball(PathBuf),
}

impl Source {
    fn resolve(path: Option<&Path>) -> Result<Source, KernelError> {
        let path = path.map_or_else(|| PathBuf::from(DEFAULT_SOURCE), Path::to_path_buf);
        if !path.exists() {
            return Err(KernelError::SourceMissing { path });
        }
        if path.join("Makefile").is_file() {
            return Ok(Source::Tree(path));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if [".tar.xz", ".tar.gz", ".tgz", ".tar"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            return Ok(Source::Tarball(path));
        }
        Err(KernelError::NotASource { path })
    }

    /// Identity for the cache key: a tarball by name and size, a tree by path and version.
    fn identity(&self) -> Result<String, KernelError> {
        match self {
            Source::Tarball(p) => {
                let meta = fs::metadata(p).map_err(|source| KernelError::Io {
                    path: p.clone(),
                    source,
                })?;
                Ok(format!("tarball:{}:{}", p.display(), meta.len()))
            }
            Source::Tree(p) => {
                let makefile =
                    fs::read_to_string(p.join("Makefile")).map_err(|source| KernelError::Io {
                        path: p.join("Makefile"),
                        source,
                    })?;
                let version = makefile_version(&makefile)
                    .ok_or_else(|| KernelError::NotASource { path: p.clone() })?;
                Ok(format!("tree:{}:{version}", p.display()))
            }
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_tools() -> Result<(), KernelError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in TOOLS {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            return Err(KernelError::MissingTool {
                tool: tool.into(),
                package: package.into(),
            });
        }
    }
    Ok(())
}

/// Runs a build step with its output appended to `log`; `on_line` sees each stdout line.
fn run_step(
    mut cmd: Command,
    log: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), KernelError> {
    let command = format!("{cmd:?}");
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(log))?;
    let err_file = log_file.try_clone().map_err(io_err(log))?;
    cmd.stdout(Stdio::piped()).stderr(Stdio::from(err_file));
    let mut child = cmd.spawn().map_err(|source| KernelError::Spawn {
        command: command.clone(),
        source,
    })?;
    let mut log_writer = std::io::LineWriter::new(log_file);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            use std::io::Write;
            let _ = writeln!(log_writer, "{line}");
            on_line(&line);
        }
    }
    let status = child.wait().map_err(|source| KernelError::Spawn {
        command: command.clone(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    let _ = fs::File::open(log).and_then(|mut f| f.read_to_string(&mut text));
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    Err(KernelError::Step {
        command,
        status: status.to_string(),
        log: log.to_path_buf(),
        tail,
    })
}

/// Unpacks `tarball` into `<cache>/src/<name>` once; returns the tree.
fn extract(
    tarball: &Path,
    identity: &str,
    cache_dir: &Path,
    log: &Path,
) -> Result<PathBuf, KernelError> {
    let name = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("linux")
        .trim_end_matches(".xz")
        .trim_end_matches(".gz")
        .trim_end_matches(".tgz")
        .trim_end_matches(".tar")
        .to_string();
    let src_root = cache_dir.join("src");
    let tree = src_root.join(&name);
    let marker = tree.join(EXTRACTED_MARKER);
    if fs::read_to_string(&marker).ok().as_deref() == Some(identity) {
        return Ok(tree);
    }
    let tmp = src_root.join(format!(".{name}.partial"));
    for dir in [&tmp, &tree] {
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(io_err(dir))?;
        }
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let mut cmd = Command::new("tar");
    cmd.arg("-xf").arg(tarball).arg("-C").arg(&tmp);
    run_step(cmd, log, &mut |_| {})?;
    // The tarball holds one top-level directory (linux-source-6.1/); a flat one is the tree.
    let entries: Vec<PathBuf> = fs::read_dir(&tmp)
        .map_err(io_err(&tmp))?
        .flatten()
        .map(|e| e.path())
        .collect();
    let top = match entries.as_slice() {
        [only] if only.join("Makefile").is_file() => only.clone(),
        _ => tmp.clone(),
    };
    fs::rename(&top, &tree).map_err(io_err(&tree))?;
    let _ = fs::remove_dir_all(&tmp);
    fs::write(&marker, identity).map_err(io_err(&marker))?;
    Ok(tree)
}

/// Builds (or finds in the cache) the guest kernel for [`FRAGMENT`]; returns its `vmlinux`.
pub fn build_kernel(
    opts: &KernelBuildOptions,
    progress: &mut dyn FnMut(KernelProgress),
) -> Result<PathBuf, KernelError> {
    build_kernel_with_fragment(opts, FRAGMENT, progress)
}

/// [`build_kernel`] with another fragment (tests, experiments).
pub fn build_kernel_with_fragment(
    opts: &KernelBuildOptions,
    fragment: &str,
    progress: &mut dyn FnMut(KernelProgress),
) -> Result<PathBuf, KernelError> {
    let source = Source::resolve(opts.source.as_deref())?;
    let identity = source.identity()?;
    let key = cache_key(&identity, fragment);
    let entry = opts.cache_dir.join(&key);
    let vmlinux = entry.join("vmlinux");
    if vmlinux.is_file() && !opts.force {
        progress(KernelProgress::Cached {
            vmlinux: vmlinux.clone(),
        });
        return Ok(vmlinux);
    }
    check_tools()?;
    fs::create_dir_all(&opts.cache_dir).map_err(io_err(&opts.cache_dir))?;
    let build_root = opts.cache_dir.join("build");
    fs::create_dir_all(&build_root).map_err(io_err(&build_root))?;
    let log = build_root.join(format!("{key}.log"));
    let _ = fs::remove_file(&log);
    let tree = match &source {
        Source::Tree(t) => t.clone(),
        Source::Tarball(t) => {
            progress(KernelProgress::Extracting { tarball: t.clone() });
            extract(t, &identity, &opts.cache_dir, &log)?
        }
    };
    // One build directory per source: a changed fragment rebuilds only what it touches.
    let out = build_root.join(cache_key(&identity, ""));
    fs::create_dir_all(&out).map_err(io_err(&out))?;
    progress(KernelProgress::Configuring);
    let fragment_path = out.join("bottle.config");
    fs::write(&fragment_path, fragment).map_err(io_err(&fragment_path))?;
    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(&tree)
            .arg(format!("O={}", out.display()))
            .args(args);
        cmd
    };
    run_step(make(&["tinyconfig"]), &log, &mut |_| {})?;
    let mut merge = Command::new("sh");
    merge
        .arg(tree.join("scripts/kconfig/merge_config.sh"))
        .arg("-m")
        .arg("-O")
        .arg(&out)
        .arg(out.join(".config"))
        .arg(&fragment_path)
        .current_dir(&tree);
    run_step(merge, &log, &mut |_| {})?;
    run_step(make(&["olddefconfig"]), &log, &mut |_| {})?;
    let dot_config_path = out.join(".config");
    let dot_config = fs::read_to_string(&dot_config_path).map_err(io_err(&dot_config_path))?;
    let dropped = dropped_options(fragment, &dot_config);
    if !dropped.is_empty() {
        return Err(KernelError::OptionsDropped {
            options: dropped.join(", "),
        });
    }
    let mut done = 0;
    let jobs = format!("-j{}", opts.jobs.max(1));
    run_step(make(&[&jobs, "vmlinux"]), &log, &mut |line| {
        let line = line.trim();
        if line.len() > 2
            && line
                .split_whitespace()
                .next()
                .is_some_and(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        {
            done += 1;
            progress(KernelProgress::Compiling {
                done,
                line: line.to_string(),
            });
        }
    })?;
    let staging = opts.cache_dir.join(format!(".{key}.partial"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io_err(&staging))?;
    for (from, to) in [
        (out.join("vmlinux"), "vmlinux"),
        (dot_config_path.clone(), "config"),
        (fragment_path.clone(), "bottle.config"),
    ] {
        let dest = staging.join(to);
        fs::copy(&from, &dest).map_err(io_err(&dest))?;
    }
    fs::write(staging.join("source"), &identity).map_err(io_err(&staging))?;
    let _ = fs::remove_dir_all(&entry);
    fs::rename(&staging, &entry).map_err(io_err(&entry))?;
    progress(KernelProgress::Built {
        vmlinux: vmlinux.clone(),
    });
    Ok(vmlinux)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_the_fragment() {
        assert_ne!(
            cache_key("tarball:a:1", "CONFIG_A=y\n"),
            cache_key("tarball:a:1", "CONFIG_B=y\n")
        );
    }

    #[test]
    fn cache_key_changes_with_the_source() {
        assert_ne!(
            cache_key("tarball:a:1", FRAGMENT),
            cache_key("tarball:a:2", FRAGMENT)
        );
    }

    #[test]
    fn fragment_asks_for_a_64_bit_kernel_first() {
        let first = FRAGMENT.lines().find(|l| l.starts_with("CONFIG_"));

        assert_eq!(first, Some("CONFIG_64BIT=y"));
    }

    #[test]
    fn fragment_has_what_node_and_git_need() {
        let needed = [
            "CONFIG_SYSVIPC=y",
            "CONFIG_AIO=y",
            "CONFIG_MEMBARRIER=y",
            "CONFIG_RSEQ=y",
            "CONFIG_FHANDLE=y",
            "CONFIG_SLUB=y",
            "CONFIG_HW_RANDOM_VIRTIO=y",
            "CONFIG_SQUASHFS_ZSTD=y",
            "CONFIG_OVERLAY_FS=y",
            "CONFIG_TMPFS_XATTR=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
        ];

        let missing: Vec<&str> = needed
            .into_iter()
            .filter(|o| !FRAGMENT.lines().any(|l| l == *o))
            .collect();

        assert_eq!(missing, Vec::<&str>::new());
    }

    #[test]
    fn option_dropped_by_olddefconfig_is_reported() {
        let fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n";
        let dot_config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n";

        assert_eq!(
            dropped_options(fragment, dot_config),
            vec!["CONFIG_B=y", "# CONFIG_C is not set"]
        );
    }

    #[test]
    fn option_off_and_absent_counts_as_off() {
        assert!(dropped_options("# CONFIG_ACPI is not set\n", "CONFIG_64BIT=y\n").is_empty());
    }

    #[test]
    fn makefile_version_reads_all_fields() {
        let makefile =
            "# SPDX\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\nNAME = x\n";

        assert_eq!(makefile_version(makefile).as_deref(), Some("6.1.192"));
    }

    #[test]
    fn missing_source_names_the_package() {
        let opts = KernelBuildOptions {
            source: Some(PathBuf::from("/no/such/linux.tar.xz")),
            cache_dir: PathBuf::from("/nonexistent-cache"),
            jobs: 1,
            force: false,
        };

        let err = build_kernel(&opts, &mut |_| {}).unwrap_err();

        assert!(err.to_string().contains("linux-source-6.1"), "{err}");
    }

    #[test]
    fn cached_kernel_is_found_only_for_the_same_fragment() {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("abc");
        fs::create_dir_all(&entry).unwrap();
        fs::write(entry.join("vmlinux"), b"elf").unwrap();
        fs::write(entry.join("bottle.config"), "CONFIG_A=y\n").unwrap();

        let same = cached_kernel_in(dir.path(), "CONFIG_A=y\n");
        let other = cached_kernel_in(dir.path(), "CONFIG_B=y\n");

        assert_eq!((same, other), (Some(entry.join("vmlinux")), None));
    }
}
