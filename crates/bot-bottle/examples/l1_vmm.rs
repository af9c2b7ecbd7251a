//! A stand-in for `bot-bottle __vmm` that runs OUR VMM — the real `bot-bottle __vmm`, unmodified
//! — under KVM inside the nested-KVM harness's emulated machine (crates/nested-kvm: QEMU TCG with
//! AMD SVM, Debian's kernel, kvm_amd), for hosts whose own KVM cannot run Linux (this project's
//! machines and CI). `BOT_BOTTLE_VMM=<this binary>` makes `start` launch it with the arguments it
//! gives our VMM (`__vmm --config <launch.json>`).
//!
//! What crosses between the host and L1, and nothing else:
//! - the launch file's directories (kernel, disks, console and event logs), shared over 9p at
//!   their own paths, so the VMM in L1 reads and writes the host's files;
//! - the machine's verified state-DB row, copied (the VMM in L1 reads it with the same
//!   `verified_rules` as on a host: it refuses to boot without it);
//! - the control socket: the host's `vsock.sock` is relayed over a QEMU user-network forward to
//!   the VMM's socket in L1 (the `CONNECT <port>` handshake passes through untouched);
//! - egress: for each rule of the verified allowlist (and only those), L1 listens on the rule's
//!   address and port — where our VMM's vsock muxer dials — and relays to the host, which dials
//!   that same address and port. The allowlist is enforced by our VMM in L1; the relays only
//!   exist for destinations it allows.
//!
//! SIGTERM/SIGINT stop the VMM in L1 the way they stop ours on a host (it exits with
//! `EXIT_CODE_STOPPED`); SIGKILL takes QEMU with it (`setpriv --pdeathsig`). The exit status is
//! the VMM's own. Software emulation under it: slow, for tests and benchmarks only.
//!
//! In L1 the same binary runs as the relay (`__relay ...`): it is static like the workspace.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bot_bottle::backend::microvm::launch::Launch;
use bottle_vmm::config::SerialOutput;
use nix::sys::signal::{SigSet, Signal};

#[path = "support/relay.rs"]
mod relay;

/// L1's end of the control-socket forward.
const CONTROL_PORT: u16 = 7000;
/// L1's end of the stop forward: a connection there sends SIGTERM to the VMM.
const STOP_PORT: u16 = 7001;
/// The host as QEMU's user network shows it to L1.
const HOST_FROM_L1: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Where the VMM's control socket and state-DB copy live inside L1 (its own tmpfs).
const L1_UDS: &str = "/run/vsock.sock";
const L1_DB: &str = "/run/state.db";
/// Longest the whole L1 run may take (a session is as long as the test that runs it).
const L1_RUN_LIMIT: Duration = Duration::from_secs(1800);
/// After a stop request, how long L1 gets to power off before QEMU is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("__vmm") => host(&args),
        Some("__relay") => l1_relay(&args[2..]),
        _ => Err("usage: l1_vmm __vmm --config <launch.json>".into()),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("l1_vmm: error: {e}");
            ExitCode::from(bottle_vmm::EXIT_CODE_VMM_ERROR as u8)
        }
    }
}

fn host(args: &[String]) -> Result<u8, String> {
    let config = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .ok_or("usage: l1_vmm __vmm --config <launch.json>")?;
    let launch: Launch = serde_json::from_slice(
        &std::fs::read(config).map_err(|e| format!("reading {config}: {e}"))?,
    )
    .map_err(|e| format!("parsing {config}: {e}"))?;
    // Refuse what our VMM would refuse before booting anything; it checks again in L1.
    let rules =
        bot_bottle::backend::microvm::launch::verified_rules(&launch).map_err(|e| e.to_string())?;
    let assets = nested_kvm::Assets::locate().map_err(|e| e.to_string())?;
    let vmm_bin = our_vmm_binary()?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let vsock = launch
        .vmm
        .vsock
        .clone()
        .ok_or("the launch file has no vsock device")?;
    let SerialOutput::File(console) = &launch.vmm.serial else {
        return Err("the stand-in writes the console to a file only".into());
    };

    // Signals wait for the signal thread (blocked here, before any thread starts).
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGTERM);
    stop_signals.add(Signal::SIGINT);
    stop_signals.thread_block().map_err(|e| e.to_string())?;
    // `start` gone (SIGKILL included): SIGTERM, the same clean stop as our VMM's (PRD 0007).
    bot_bottle::session::orphans::die_with_parent(Signal::SIGTERM).map_err(|e| e.to_string())?;

    // The job: the launch file as L1 sees it, the DB row's copy, the script.
    let job = tempfile::Builder::new()
        .prefix("l1-vmm-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    copy_state_db(&launch.state_db, &job.path().join("state.db"))?;
    let mut inner = launch.clone();
    inner.state_db = PathBuf::from(L1_DB);
    if let Some(v) = inner.vmm.vsock.as_mut() {
        v.uds_path = PathBuf::from(L1_UDS);
    }
    std::fs::write(
        job.path().join("launch.json"),
        serde_json::to_vec_pretty(&inner).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;

    // Egress: a host listener per verified rule, dialling exactly that destination.
    let mut egress = Vec::new();
    for rule in &rules {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let target = SocketAddr::V4(SocketAddrV4::new(rule.addr, rule.port));
        thread::spawn(move || relay::tcp_to_tcp(listener, target));
        egress.push(format!("{}:{}={HOST_FROM_L1}:{port}", rule.addr, rule.port));
    }
    let control_port = free_port()?;
    let stop_port = free_port()?;
    std::fs::write(job.path().join("run.sh"), script(&vmm_bin, &me, &egress))
        .map_err(|e| e.to_string())?;

    // The control socket on the host, relayed into L1.
    let _ = std::fs::remove_file(&vsock.uds_path);
    let uds = UnixListener::bind(&vsock.uds_path)
        .map_err(|e| format!("{}: {e}", vsock.uds_path.display()))?;
    thread::spawn(move || {
        relay::serve(uds.incoming(), move || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, control_port))
        })
    });

    let mut dirs: Vec<(PathBuf, bool)> = vec![
        (parent(&launch.vmm.kernel), true),
        (parent(&vmm_bin), true),
        (parent(&me), true),
        (parent(console), false),
    ];
    if let Some(log) = &vsock.event_log {
        dirs.push((parent(log), false));
    }
    if let Some(initrd) = &launch.vmm.initrd {
        dirs.push((parent(initrd), true));
    }
    for d in &launch.vmm.disks {
        dirs.push((parent(&d.path), d.read_only));
    }
    let mut machine = nested_kvm::Machine::new(assets, job.path());
    machine.shares = nested_kvm::same_path_shares(&dirs);
    machine.net = Some(vec![
        nested_kvm::Forward {
            host_port: control_port,
            guest_port: CONTROL_PORT,
        },
        nested_kvm::Forward {
            host_port: stop_port,
            guest_port: STOP_PORT,
        },
    ]);
    machine.console = parent(console).join("l1-console.log");
    let running = machine.boot().map_err(|e| e.to_string())?;
    let qemu_pid = running.pid();

    // A stop signal: ask the VMM in L1 to stop; kill QEMU if L1 does not power off in time.
    let stopping = Arc::new(Mutex::new(false));
    {
        let stopping = Arc::clone(&stopping);
        thread::spawn(move || {
            if stop_signals.wait().is_err() {
                return;
            }
            *stopping.lock().unwrap() = true;
            if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, stop_port)) {
                let _ = s.write_all(b"stop\n");
                let _ = s.read(&mut [0u8; 1]);
            }
            thread::sleep(STOP_GRACE);
            if let Some(pid) = qemu_pid {
                // QEMU is our unreaped child until `wait` below returns: its pid is still ours.
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        });
    }
    let outcome = running.wait(L1_RUN_LIMIT);
    let _ = std::fs::remove_file(&vsock.uds_path);
    let vmm_log = std::fs::read_to_string(job.path().join("out/vmm.log")).unwrap_or_default();
    eprint!("{vmm_log}");
    let outcome = outcome.map_err(|e| e.to_string())?;
    match std::fs::read_to_string(job.path().join("out/vmm.rc"))
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
    {
        Some(code) => Ok(code),
        None if *stopping.lock().unwrap() => Ok(bottle_vmm::EXIT_CODE_STOPPED as u8),
        None => Err(format!(
            "L1 ended before our VMM did ({:.0}s); L1's console:\n{}",
            outcome.elapsed.as_secs_f64(),
            outcome.console_tail(40)
        )),
    }
}

/// What L1 runs: the DB copy into L1's tmpfs (SQLite wants local locks), our VMM with the
/// rewritten launch file, the relays; the VMM's status is the job's.
fn script(vmm_bin: &Path, me: &Path, egress: &[String]) -> String {
    let q = |p: &Path| nested_kvm::sh_quote(&p.display().to_string());
    let job = nested_kvm::JOB_MOUNT;
    let mut relay = format!(
        "{} __relay --control {CONTROL_PORT}={L1_UDS} --stop {STOP_PORT}=$vmm",
        q(me)
    );
    for e in egress {
        relay.push_str(&format!(" --egress {e}"));
    }
    format!(
        "cp {job}/state.db {L1_DB}\n\
         {} __vmm --config {job}/launch.json > {job}/out/vmm.log 2>&1 &\n\
         vmm=$!\n\
         {relay} > {job}/out/relay.log 2>&1 &\n\
         relay=$!\n\
         wait $vmm\n\
         rc=$?\n\
         kill $relay\n\
         echo $rc > {job}/out/vmm.rc\n\
         echo \"L1: our VMM exited with status $rc\"\n\
         exit $rc\n",
        q(vmm_bin)
    )
}

/// The bot-bottle binary whose VMM runs in L1: the one that launched us (`start`), else the one
/// built next to this example.
fn our_vmm_binary() -> Result<PathBuf, String> {
    let parent_exe =
        std::fs::read_link(format!("/proc/{}/exe", std::os::unix::process::parent_id()))
            .ok()
            .filter(|p| p.file_name().is_some_and(|n| n == "bot-bottle"));
    if let Some(p) = parent_exe.filter(|p| p.is_file()) {
        return Ok(p);
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let sibling = me
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("bot-bottle"))
        .filter(|p| p.is_file());
    sibling.ok_or_else(|| "bot-bottle not found (cargo build -p bot-bottle)".into())
}

fn copy_state_db(from: &Path, to: &Path) -> Result<(), String> {
    let db =
        rusqlite::Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("{}: {e}", from.display()))?;
    db.execute("VACUUM INTO ?1", [to.display().to_string()])
        .map_err(|e| format!("copying {}: {e}", from.display()))?;
    Ok(())
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn parent(p: &Path) -> PathBuf {
    p.parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

/// In L1: `--control PORT=UDS` (TCP from the host to the VMM's socket, once it exists),
/// `--stop PORT=PID` (SIGTERM to the VMM), `--egress ADDR:PORT=HOST:PORT` (where the VMM's
/// muxer dials, relayed to the host). Runs until L1 powers off.
fn l1_relay(args: &[String]) -> Result<u8, String> {
    let mut threads = Vec::new();
    for pair in args.chunks(2) {
        let [flag, value] = pair else {
            return Err(format!("relay: {pair:?} needs a value"));
        };
        let (listen, target) = value
            .split_once('=')
            .ok_or_else(|| format!("relay: {value}: expected LISTEN=TARGET"))?;
        match flag.as_str() {
            "--control" => {
                let port: u16 = listen
                    .parse()
                    .map_err(|_| format!("relay: port {listen}"))?;
                let listener =
                    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|e| e.to_string())?;
                let uds = PathBuf::from(target);
                threads.push(thread::spawn(move || {
                    relay::serve(listener.incoming(), move || UnixStream::connect(&uds))
                }));
            }
            "--stop" => {
                let port: u16 = listen
                    .parse()
                    .map_err(|_| format!("relay: port {listen}"))?;
                let pid: i32 = target.parse().map_err(|_| format!("relay: pid {target}"))?;
                let listener =
                    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|e| e.to_string())?;
                threads.push(thread::spawn(move || {
                    for conn in listener.incoming().flatten() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            Signal::SIGTERM,
                        );
                        drop(conn);
                    }
                }));
            }
            "--egress" => {
                let listen: SocketAddr = listen.parse().map_err(|_| format!("relay: {listen}"))?;
                let target: SocketAddr = target.parse().map_err(|_| format!("relay: {target}"))?;
                let listener = TcpListener::bind(listen).map_err(|e| format!("{listen}: {e}"))?;
                threads.push(thread::spawn(move || relay::tcp_to_tcp(listener, target)));
            }
            other => return Err(format!("relay: unknown flag {other}")),
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(0)
}
