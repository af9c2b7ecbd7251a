//! Booting the emulated machine: QEMU's software emulation (TCG) with emulated AMD SVM, the
//! L1 kernel, the harness's initramfs, 9p shares of host directories (each mounted at the path
//! the caller names) and, when asked for, QEMU's user network with host-to-L1 port forwards.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::initramfs;
use crate::NestedError;

/// Where the job share (run.sh, results) is mounted in L1.
pub const JOB_MOUNT: &str = "/job";
/// The L1 kernel, modules and release, as `.ci/setup-l1` lays them out.
pub const L1_DIR_ENV: &str = "BOT_BOTTLE_L1_DIR";
/// Where `.ci/setup-l1` puts them by default.
pub const DEFAULT_L1_DIR: &str = "/var/cache/bot-bottle/l1";
/// L1's CPU: everything TCG emulates, AMD SVM included, but no XSAVE: QEMU 7.2's TCG does not
/// pass the L2 guest's XSETBV intercept on to L1's KVM (FINDINGS.md).
pub const L1_CPU: &str = "max,-xsave";
/// L1's memory: the L2 guest (up to 1 GiB), our VMM, the test and 9p caches.
pub const L1_MEM_MIB: u32 = 2048;
/// How often a waiting caller looks at QEMU.
const POLL: Duration = Duration::from_millis(50);

/// What the harness needs from the host: QEMU, busybox and the unpacked L1 kernel.
#[derive(Debug, Clone)]
pub struct Assets {
    pub qemu: PathBuf,
    pub busybox: PathBuf,
    pub kernel: PathBuf,
    pub modules: PathBuf,
    /// The L1 kernel's release, e.g. `6.1.0-57-amd64`.
    pub release: String,
}

impl Assets {
    /// Finds them, or says what to install.
    pub fn locate() -> Result<Assets, NestedError> {
        let dir = std::env::var_os(L1_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_L1_DIR), PathBuf::from);
        let release = std::fs::read_to_string(dir.join("release"))
            .map_err(|_| NestedError::NoL1Kernel { dir: dir.clone() })?
            .trim()
            .to_owned();
        let qemu = which("qemu-system-x86_64").ok_or(NestedError::Missing {
            program: "qemu-system-x86_64",
            package: "qemu-system-x86",
        })?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or(NestedError::Missing {
                program: "busybox",
                package: "busybox-static",
            })?;
        Ok(Assets {
            qemu,
            busybox,
            kernel: dir.join("vmlinuz"),
            modules: dir.join("modules"),
            release,
        })
    }
}

/// `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A host directory mounted in L1 over 9p.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub host: PathBuf,
    /// Where L1 mounts it (often the host's own path, so paths in files stay valid).
    pub guest: PathBuf,
    pub read_only: bool,
}

impl Share {
    pub fn new(host: impl Into<PathBuf>, guest: impl Into<PathBuf>, read_only: bool) -> Share {
        Share {
            host: host.into(),
            guest: guest.into(),
            read_only,
        }
    }

    /// `dir` at its own path in L1.
    pub fn same_path(dir: impl Into<PathBuf>, read_only: bool) -> Share {
        let dir = dir.into();
        Share::new(dir.clone(), dir, read_only)
    }
}

/// Shares for `dirs` at their own paths: one per outermost directory (a directory inside
/// another is reached through it), writable when any directory under it must be.
pub fn same_path_shares(dirs: &[(PathBuf, bool)]) -> Vec<Share> {
    let mut sorted: Vec<(PathBuf, bool)> = dirs.to_vec();
    sorted.sort();
    let mut shares: Vec<Share> = Vec::new();
    for (dir, read_only) in sorted {
        match shares.iter_mut().find(|s| dir.starts_with(&s.host)) {
            Some(outer) => outer.read_only &= read_only,
            None => shares.push(Share::same_path(dir, read_only)),
        }
    }
    shares
}

/// A TCP port on the host's 127.0.0.1 forwarded to a port of L1 (QEMU user networking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub host_port: u16,
    pub guest_port: u16,
}

/// What to boot. The job share (`job`, at [`JOB_MOUNT`]) holds `run.sh`, which L1 runs as
/// root in `/tmp` with everything mounted; its status lands in `job/out/rc`.
#[derive(Debug, Clone)]
pub struct Machine {
    pub assets: Assets,
    pub job: PathBuf,
    pub shares: Vec<Share>,
    /// QEMU user networking (L1 is 10.0.2.15 and reaches the host's 127.0.0.1 as 10.0.2.2),
    /// with these forwards; `None`: no network device at all.
    pub net: Option<Vec<Forward>>,
    pub mem_mib: u32,
    pub vcpus: u8,
    /// L1's console (its kernel, init and `run.sh` output).
    pub console: PathBuf,
}

impl Machine {
    /// Two vCPUs, [`L1_MEM_MIB`], no network, the console in `job/out/l1-console.log`.
    pub fn new(assets: Assets, job: &Path) -> Machine {
        Machine {
            assets,
            job: job.to_path_buf(),
            shares: Vec::new(),
            net: None,
            mem_mib: L1_MEM_MIB,
            vcpus: 2,
            console: job.join("l1-console.log"),
        }
    }

    /// Starts QEMU (killed when the returned handle drops; and with its parent, through
    /// `setpriv --pdeathsig`). `run.sh` must already be in the job directory.
    pub fn boot(&self) -> Result<Running, NestedError> {
        let io = |what: String| move |source| NestedError::Io { what, source };
        std::fs::create_dir_all(self.job.join("out"))
            .map_err(io("creating the job's out/".into()))?;
        let _ = std::fs::remove_file(self.job.join(initramfs::RC_FILE));
        let mut shares = vec![Share::new(&self.job, JOB_MOUNT, false)];
        shares.extend(self.shares.iter().cloned());
        let work = tempfile::Builder::new()
            .prefix("nested-kvm-")
            .tempdir()
            .map_err(io("creating a work directory".into()))?;
        let initrd = work.path().join("initramfs.cpio");
        let init = initramfs::init_script(&shares, self.net.is_some());
        let mut file = std::io::BufWriter::new(
            File::create(&initrd).map_err(io(format!("creating {}", initrd.display())))?,
        );
        initramfs::write(&mut file, &init, &self.assets.busybox, &self.assets.modules)
            .and_then(|()| std::io::Write::flush(&mut file))
            .map_err(io("writing the L1 initramfs".into()))?;
        drop(file);
        let console = File::create(&self.console)
            .map_err(io(format!("creating {}", self.console.display())))?;

        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&self.assets.qemu)
            .args(["-accel", "tcg,thread=multi", "-M", "pc", "-cpu", L1_CPU])
            .args(["-smp", &self.vcpus.to_string()])
            .args(["-m", &self.mem_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio", "-kernel"])
            .arg(&self.assets.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"]);
        for (i, share) in shares.iter().enumerate() {
            let ro = if share.read_only { ",readonly=on" } else { "" };
            cmd.arg("-fsdev")
                .arg(format!(
                    "local,id=s{i},path={},security_model=none{ro}",
                    share.host.display()
                ))
                .arg("-device")
                .arg(format!("virtio-9p-pci,fsdev=s{i},mount_tag=s{i}"));
        }
        if let Some(forwards) = &self.net {
            let mut netdev = String::from("user,id=n0,restrict=off,ipv6=off");
            for f in forwards {
                netdev.push_str(&format!(
                    ",hostfwd=tcp:127.0.0.1:{}-:{}",
                    f.host_port, f.guest_port
                ));
            }
            // No option ROM: L1 boots its kernel directly, iPXE would only cost time.
            cmd.args([
                "-netdev",
                &netdev,
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
            ]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                console.try_clone().map_err(io("the console".into()))?,
            ))
            .stderr(Stdio::from(console))
            .spawn()
            .map_err(|source| NestedError::Spawn { source })?;
        Ok(Running {
            child: Some(child),
            job: self.job.clone(),
            console: self.console.clone(),
            started: Instant::now(),
            _work: work,
        })
    }
}

/// A booted L1. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Running {
    child: Option<Child>,
    job: PathBuf,
    console: PathBuf,
    started: Instant,
    _work: tempfile::TempDir,
}

/// How an L1 run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `run.sh`'s exit status, or `None` when L1 ended before it finished.
    pub status: Option<i32>,
    /// L1's console: its boot, `run.sh`'s output, its power-off.
    pub console: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// The last `lines` of the console, for failure messages.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.console, lines)
    }
}

impl Running {
    /// QEMU's pid (to signal it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for L1 to power off, at most `limit` (then QEMU is killed and that is the error).
    pub fn wait(mut self, limit: Duration) -> Result<Outcome, NestedError> {
        let deadline = Instant::now() + limit;
        let Some(mut child) = self.child.take() else {
            return Err(NestedError::Gone);
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(NestedError::Timeout {
                        limit,
                        console: tail(&read_lossy(&self.console), 40),
                    });
                }
            }
        }
        let status = std::fs::read_to_string(self.job.join(initramfs::RC_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(Outcome {
            status,
            console: read_lossy(&self.console),
            elapsed: self.started.elapsed(),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).replace('\r', "")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_directories_share_one_mount_writable_when_any_part_must_be() {
        let dirs = [
            (PathBuf::from("/state/bottles/b1"), false),
            (PathBuf::from("/cache/kernel/abc"), true),
            (PathBuf::from("/state"), true),
            (PathBuf::from("/cache/kernel/abc"), true),
        ];

        let shares = same_path_shares(&dirs);

        assert_eq!(
            shares,
            [
                Share::same_path("/cache/kernel/abc", true),
                Share::same_path("/state", false),
            ]
        );
    }
}
