//! `bot-bottle start --backend microvm` end to end, each test twice: with OUR VMM (the real
//! `bot-bottle __vmm`) under KVM inside the nested-KVM harness's emulated machine
//! (`our_vmm_in_l1::*`, stand-in `examples/l1_vmm.rs`: this machine's own KVM cannot run Linux),
//! and with QEMU standing in for our VMM (`qemu_direct::*`, `examples/qemu_vmm.rs`, faster).
//! Everything else is the real thing — the agent image built by Docker, the root image and
//! workspace snapshot, the bundle published on the bottle's alias with the real egress proxy,
//! the guest configuration, the control channel over vsock, `exec`, `cp`, `stop` and the
//! teardown. With our VMM, the allowlist is enforced by its vsock muxer (the L1 stand-in only
//! relays the verified destinations); the QEMU stand-in bridges only those same destinations.
//!
//! Needs Docker, `qemu-system-x86_64`, a guest kernel (`bot-bottle kernel build`), the
//! stand-ins (`cargo build -p bot-bottle --examples`), and: for QEMU, `vhost-device-vsock`; for
//! our VMM, the harness's L1 kernel (`.ci/setup-l1`). Each missing piece skips with the
//! reason, and fails under `CI=true`.

mod common;
#[path = "guest/qemu_vm.rs"]
mod qemu_vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Running, Sandbox};

use common::in_ci;

/// Which VMM runs the guest: QEMU directly (fast), or our own VMM under KVM in the nested-KVM
/// harness's emulated machine (`examples/l1_vmm.rs`: the real `bot-bottle __vmm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    QemuDirect,
    OursInL1,
}

impl Vmm {
    /// The stand-in `start` launches in place of its own VMM child.
    fn stand_in(self) -> PathBuf {
        let name = match self {
            Vmm::QemuDirect => "qemu_vmm",
            Vmm::OursInL1 => "l1_vmm",
        };
        common::bin().with_file_name("examples").join(name)
    }

    /// The test's own alias pool (one address, the alias `127.0.0.<octet>`): the two VMMs'
    /// runs of a test use different ones, so they may run at once.
    fn octet(self, base: u8) -> u8 {
        match self {
            Vmm::QemuDirect => base,
            Vmm::OursInL1 => base + 40,
        }
    }

    fn sandbox(self, base: u8) -> Sandbox {
        let n = self.octet(base);
        Sandbox::new(&format!("{n}-{n}"))
    }
}

/// (stand-in VMM, guest kernel), or why the test cannot run here.
fn prereqs(test: &str, vmm: Vmm) -> Option<(PathBuf, PathBuf)> {
    if !common::docker_available(test) {
        return None;
    }
    let stand_in = vmm.stand_in();
    let kernel = bot_bottle::host::paths::Dirs::from_env()
        .ok()
        .and_then(|dirs| {
            bot_bottle::image::kernel::cached_kernel_in(
                &bot_bottle::image::kernel::kernel_cache_dir(&dirs),
                bot_bottle::image::kernel::FRAGMENT,
            )
        });
    let harness = match vmm {
        Vmm::OursInL1 => nested_kvm::Assets::locate().err().map(|e| e.to_string()),
        Vmm::QemuDirect => None,
    };
    let why = if !stand_in.is_file() {
        format!(
            "the stand-in VMM {} is not built: cargo build -p bot-bottle --examples",
            stand_in.display()
        )
    } else if qemu_vm::which("qemu-system-x86_64").is_none() {
        "qemu-system-x86_64 missing: apt-get install qemu-system-x86".into()
    } else if vmm == Vmm::QemuDirect && qemu_vm::which("vhost-device-vsock").is_none() {
        "vhost-device-vsock missing: cargo install --locked vhost-device-vsock".into()
    } else if let Some(why) = harness {
        why
    } else if let Some(kernel) = kernel {
        return Some((stand_in, kernel));
    } else {
        "no guest kernel: run `bot-bottle kernel build`".into()
    };
    assert!(!in_ci(), "{test}: CI=true but {why}");
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// `start test --backend microvm` with the stand-in VMM and the kernel built for this
/// checkout (the sandbox's private cache has none).
fn start_cmd(s: &Sandbox, stand_in: &Path, kernel: &Path, args: &[&str]) -> Command {
    let mut c = start_bottle(s, stand_in, kernel, "test");
    c.args(args);
    c
}

/// `start <bottle> --backend microvm`, as [`start_cmd`].
fn start_bottle(s: &Sandbox, stand_in: &Path, kernel: &Path, bottle: &str) -> Command {
    let mut c = s.cmd();
    c.env(bot_bottle::backend::microvm::launch::VMM_ENV, stand_in)
        .env("BOT_BOTTLE_KERNEL", kernel)
        .args(["start", bottle, "--backend", "microvm"]);
    c
}

/// `cp` of a directory holding `hello.txt` into the bottle's /tmp, then of that file back out
/// into a fresh directory: (cp in, cp out, where it came back to).
fn copy_round_trip(s: &Sandbox, id: &str) -> (std::process::Output, std::process::Output, PathBuf) {
    let local = s.dir.path().join("to-guest");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("hello.txt"), "copied in\n").unwrap();
    let cp_in = s.run(&["cp", local.to_str().unwrap(), &format!("{id}:/tmp")]);
    let back = s.dir.path().join("back");
    std::fs::create_dir_all(&back).unwrap();
    let cp_out = s.run(&[
        "cp",
        &format!("{id}:/tmp/to-guest/hello.txt"),
        back.to_str().unwrap(),
    ]);
    (cp_in, cp_out, back)
}

/// Processes whose command line mentions `dir` (QEMU and the vsock device name files in the
/// bottle's directory).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

fn start_runs_the_agent_in_the_guest_with_its_workspace_egress_and_exit_code(vmm: Vmm) {
    let test = "start_runs_the_agent_in_the_guest";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(64);
    let project = s.dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("notes.txt"), "from the host\n").unwrap();
    let upstream = common::http_server("hello from allowed.test");
    let script = format!(
        "id -u; cat notes.txt; echo edited > notes.txt; \
         wget -qO- http://allowed.test:{upstream}/; echo; \
         wget -qO- http://example.com/ 2>&1; exit 3"
    );

    let out = start_cmd(
        &s,
        &stand_in,
        &kernel,
        &[
            "--mount",
            project.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .output()
    .unwrap();

    let (stdout, stderr) = (common::stdout(&out), common::stderr(&out));
    let why = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(3), "{why}");
    assert!(
        stdout.starts_with("1000\nfrom the host\nhello from allowed.test\n"),
        "{why}"
    );
    assert!(
        stdout.contains("403 Forbidden (bot-bottle test bottle: egress to this host is denied)"),
        "{why}"
    );
    assert_eq!(
        std::fs::read_to_string(project.join("notes.txt")).unwrap(),
        "from the host\n",
        "the host's workspace is never written"
    );
    // Nothing left: containers, networks, the VM's processes, its sockets and snapshots.
    assert_eq!(s.docker_leftovers(), Vec::<String>::new());
    assert_eq!(processes_under(&s.state()), Vec::<String>::new());
    for entry in common::files_under(&s.state().join("bottles")) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with("vsock.sock") && !name.ends_with(".sqfs"),
            "{} left behind",
            entry.display()
        );
    }
}

fn exec_cp_and_stop_reach_a_running_microvm_bottle(vmm: Vmm) {
    let test = "exec_cp_and_stop_reach_a_running_microvm_bottle";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(65);
    let mut running = Running::spawn(start_cmd(
        &s,
        &stand_in,
        &kernel,
        &["--", "sh", "-c", "sleep 120"],
    ));
    running.wait_for("booting", Duration::from_secs(240));
    let id = s.wait_running(Duration::from_secs(180));

    let exec = s.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo $((6 * 7)) in $(pwd); exit 5",
    ]);
    let (cp_in, cp_out, back) = copy_round_trip(&s, &id);
    let stop = s.run(&["stop", &id]);
    let status = running.wait();

    assert_eq!(
        (exec.status.code(), common::stdout(&exec)),
        (Some(5), "42 in /workspace\n".to_owned()),
        "{}",
        common::stderr(&exec)
    );
    assert!(cp_in.status.success(), "{}", common::stderr(&cp_in));
    assert!(cp_out.status.success(), "{}", common::stderr(&cp_out));
    assert_eq!(
        std::fs::read_to_string(back.join("hello.txt")).unwrap(),
        "copied in\n"
    );
    assert!(stop.status.success(), "{}", common::stderr(&stop));
    assert!(
        status.code().is_some(),
        "start ended by a signal: {status:?}"
    );
    assert_eq!(s.docker_leftovers(), Vec::<String>::new());
    assert_eq!(processes_under(&s.state()), Vec::<String>::new());
}

fn start_on_a_terminal_gives_the_agent_a_tty_of_its_size(vmm: Vmm) {
    let test = "start_on_a_terminal_gives_the_agent_a_tty_of_its_size";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(66);
    // `script` runs bot-bottle on a fresh pty whose size `stty` sets first.
    let inner = format!(
        "stty rows 33 cols 111; {} start test --backend microvm -- sh -c 'tty; stty size; exit 3'",
        common::bin().display()
    );
    let start = start_cmd(&s, &stand_in, &kernel, &[]);
    let mut script = Command::new("script");
    script.args(["-qec", &inner, "/dev/null"]);
    for (k, v) in start.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }

    let out = script
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux) runs");

    let text = common::stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{text}\n{}",
        common::stderr(&out)
    );
    assert!(text.contains("/dev/pts/"), "no TTY in the agent:\n{text}");
    assert!(text.contains("33 111"), "terminal size not passed:\n{text}");
    assert_eq!(s.docker_leftovers(), Vec::<String>::new());
}

fn the_agents_changes_survive_until_resume_and_start_will_not_discard_them(vmm: Vmm) {
    let test = "the_agents_changes_survive_until_resume";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(67);
    let run = |args: &[&str]| {
        let mut c = s.cmd();
        c.env(bot_bottle::backend::microvm::launch::VMM_ENV, &stand_in)
            .env("BOT_BOTTLE_KERNEL", &kernel)
            .args(args);
        c.output().unwrap()
    };

    let first = run(&[
        "start",
        "test",
        "--backend",
        "microvm",
        "--",
        "sh",
        "-c",
        "echo installed > ~/tool.txt",
    ]);
    let again = run(&["start", "test", "--backend", "microvm", "--", "true"]);
    let resumed = run(&[
        "resume",
        "test",
        "--backend",
        "microvm",
        "--",
        "cat",
        "/home/agent/tool.txt",
    ]);

    assert_eq!(first.status.code(), Some(0), "{}", common::stderr(&first));
    assert_ne!(
        again.status.code(),
        Some(0),
        "start discarded the kept layer"
    );
    assert!(
        common::stderr(&again).contains("resume"),
        "the refusal names the way on: {}",
        common::stderr(&again)
    );
    assert_eq!(
        (resumed.status.code(), common::stdout(&resumed)),
        (Some(0), "installed\n".to_owned()),
        "{}",
        common::stderr(&resumed)
    );
    assert_eq!(s.docker_leftovers(), Vec::<String>::new());
}

fn the_guest_has_no_way_out_but_its_bundle(vmm: Vmm) {
    let test = "the_guest_has_no_way_out_but_its_bundle";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(68);
    let upstream = common::http_server("reached the host directly");
    // The agent tries the ways out a container would have, each printing how it ended. (nc,
    // not wget: busybox wget crashes on an unreachable network.)
    let attempts = [
        ("public", "1.1.1.1 80".to_owned()),
        ("docker0", format!("172.17.0.1 {upstream}")),
        ("gateway", format!("10.0.2.2 {upstream}")),
        ("alias", format!("127.0.0.{} {upstream}", vmm.octet(68))),
    ];
    let mut script = String::from("ip -o link | cut -d: -f2; ");
    for (name, target) in &attempts {
        script.push_str(&format!(
            "echo x | nc -w 3 {target} 2>&1; echo \"{name} rc=$?\"; "
        ));
    }
    script.push_str("nslookup example.com 8.8.8.8 2>&1; echo \"dns rc=$?\"");

    let out = start_cmd(&s, &stand_in, &kernel, &["--", "sh", "-c", &script])
        .output()
        .unwrap();

    let text = common::stdout(&out);
    let why = format!("{text}\n{}", common::stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{why}");
    assert!(
        text.starts_with(" lo\n"),
        "only the loopback interface: {why}"
    );
    for name in ["public", "docker0", "gateway", "dns"] {
        assert!(text.contains(&format!("{name} rc=1")), "{name}: {why}");
    }
    // Inside the guest the alias is the guest's own loopback: nothing listens there.
    assert!(
        text.contains(&format!(
            "127.0.0.{}): Connection refused\nalias rc=1",
            vmm.octet(68)
        )),
        "{why}"
    );
    assert_eq!(text.matches("Network is unreachable").count(), 4, "{why}");
    assert!(!text.contains("reached the host directly"), "{why}");
}

/// The approval flow of the Docker backend's test (`common::approvals`) from the guest: held in
/// the same bundle, answered from the host the same way, the guest's own attempts refused.
fn a_request_held_for_approval_is_answered_from_the_host(vmm: Vmm) {
    let test = "a_request_held_for_approval_is_answered_from_the_host";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(102);
    let start = start_bottle(&s, &stand_in, &kernel, "ask");
    common::approvals::held_listed_approved_once_then_saved(&s, start);
}

/// The Docker backend's outbound-secret attack (`common::secrets`, run in `escape_egress`)
/// from the guest: a token posted or put in a URL is refused by the bundle before it goes up.
fn a_token_the_guest_posts_is_refused_before_it_goes_up(vmm: Vmm) {
    let test = "a_token_the_guest_posts_is_refused_before_it_goes_up";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(103);
    let start = start_bottle(&s, &stand_in, &kernel, "leaky");
    common::secrets::leaks_are_refused(&s, start);
}

/// The Docker backend's address-floor attack (`common::floor`, run in `escape_egress`) from
/// the guest: the proxy is the same, so must be its refusals. The microVM's bundle is published
/// on the bottle's loopback alias, so `bundle.test` names that.
fn names_below_the_address_floor_are_refused_from_the_guest(vmm: Vmm) {
    let test = "names_below_the_address_floor_are_refused_from_the_guest";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(101);
    let start = start_bottle(&s, &stand_in, &kernel, "floor");
    common::floor::attack_and_assert(&s, &format!("127.0.0.{}", vmm.octet(101)), start);
}

fn the_guest_trusts_the_bottles_ca_and_never_holds_the_credential(vmm: Vmm) {
    let test = "the_guest_trusts_the_bottles_ca_and_never_holds_the_credential";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(69);
    s.add_bottle(
        "creds",
        "extends = \"test\"\n[credentials.\"api.example.test\"]\nenv = \"BB_TEST_TOKEN\"\nscheme = \"Bearer\"\n",
    );
    let mut cmd = s.cmd();
    cmd.env(bot_bottle::backend::microvm::launch::VMM_ENV, &stand_in)
        .env("BOT_BOTTLE_KERNEL", &kernel)
        .env("BB_TEST_TOKEN", "secret-value-456")
        .args(["start", "creds", "--backend", "microvm", "--tmpfs", "--"])
        .args([
            "sh",
            "-c",
            "cat $NODE_EXTRA_CA_CERTS; stat -c '%u %a' $NODE_EXTRA_CA_CERTS; \
             cat /proc/cmdline; env | grep -c secret-value-456; echo READY; sleep 300",
        ]);
    // The configuration of a bottle with credentials goes on the config disk (the CA makes it
    // too long for the command line): `exec` and `cp` must reach that guest all the same.
    let mut running = Running::spawn(cmd);
    let lines = running.stdout_lines();
    let seen = common::lines_until(&lines, |l| l == "READY", Duration::from_secs(240));
    let id = s.wait_running(Duration::from_secs(30));
    let exec = s.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo from exec; env | grep -c secret-value-456; exit 7",
    ]);
    let (cp_in, cp_out, back) = copy_round_trip(&s, &id);
    let cp_ca = s.run(&[
        "cp",
        &format!("{id}:/etc/bot-bottle/ca.pem"),
        back.to_str().unwrap(),
    ]);
    let stop = s.run(&["stop", &id]);
    let status = running.wait();

    let text = format!("{}\n", seen.join("\n"));
    let why = text.clone();
    let bottle_dir = std::fs::read_dir(s.state().join("bottles"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("ca.pem").is_file())
        .expect("the bundle wrote the bottle CA's certificate");
    let ca = std::fs::read_to_string(bottle_dir.join("ca.pem")).unwrap();
    assert!(text.starts_with(&format!("{ca}0 644\n")), "{why}");
    // Too long for the kernel command line with the CA: the configuration came on a disk.
    assert!(text.contains("bottle.config=dev:/dev/vd"), "{why}");
    assert!(
        text.ends_with("\n0\nREADY\n"),
        "the secret reached the guest: {why}"
    );
    assert_eq!(
        (exec.status.code(), common::stdout(&exec)),
        (Some(7), "from exec\n0\n".to_owned()),
        "exec into a config-disk guest: {}",
        common::stderr(&exec)
    );
    assert!(cp_in.status.success(), "cp in: {}", common::stderr(&cp_in));
    assert!(
        cp_out.status.success(),
        "cp out: {}",
        common::stderr(&cp_out)
    );
    assert_eq!(
        std::fs::read_to_string(back.join("hello.txt")).unwrap(),
        "copied in\n"
    );
    assert!(cp_ca.status.success(), "cp out: {}", common::stderr(&cp_ca));
    assert_eq!(std::fs::read_to_string(back.join("ca.pem")).unwrap(), ca);
    assert!(stop.status.success(), "{}", common::stderr(&stop));
    assert!(
        status.code().is_some(),
        "start ended by a signal: {status:?}"
    );
    let launch =
        std::fs::read_to_string(bot_bottle::host::run_dir::RunDir::new(&bottle_dir).launch_file())
            .unwrap();
    assert!(!launch.contains("secret-value-456"));
    assert!(
        !bottle_dir.join("config.img").exists(),
        "config disk left behind"
    );
    assert_eq!(s.docker_leftovers(), Vec::<String>::new());
    assert_eq!(processes_under(&s.state()), Vec::<String>::new());
}

/// `bot-bottle allow` reaches a microVM bottle's bundle the same way: the guest's retry gets
/// through once the host has allowed the name.
fn the_host_allows_more_while_the_microvm_bottle_runs(vmm: Vmm) {
    let test = "the_host_allows_more_while_the_microvm_bottle_runs";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(96);
    s.add_bottle(
        "later",
        "extends = \"test\"\n[egress]\nhosts = { \"later.test\" = \"host-gateway\", \"allowed.test\" = \"host-gateway\" }\nallow_private = [\"later.test\"]\n",
    );
    let port = common::http_server("later-says-hello");
    let script = format!(
        "echo \"BEFORE: $(wget -qO- http://later.test:{port}/ 2>&1 | head -1)\"; \
         i=0; while [ $i -lt 240 ]; do \
           if wget -qO- http://later.test:{port}/ 2>/dev/null | grep -q later-says-hello; then echo AFTER: allowed; exit 0; fi; \
           sleep 0.5; i=$((i+1)); done; echo AFTER: still denied; exit 1"
    );
    let mut cmd = s.cmd();
    cmd.env(bot_bottle::backend::microvm::launch::VMM_ENV, &stand_in)
        .env("BOT_BOTTLE_KERNEL", &kernel)
        .args([
            "start",
            "later",
            "--backend",
            "microvm",
            "--",
            "sh",
            "-c",
            &script,
        ]);
    let mut run = Running::spawn(cmd);
    let lines = run.stdout_lines();
    let mut seen = common::lines_until(
        &lines,
        |l| l.starts_with("BEFORE:"),
        Duration::from_secs(180),
    );
    // `:*`: the test's server is on a port of its own (a rule without a port opens 443 only).
    let allowed = s.run(&["allow", "later", "later.test:*"]);
    let status = run.wait();
    seen.extend(lines.try_iter());

    let text = seen.join("\n");
    assert!(allowed.status.success(), "{}", common::stderr(&allowed));
    assert!(
        text.contains("BEFORE: wget: server returned error: HTTP/1.1 403"),
        "{text}"
    );
    assert!(text.contains("AFTER: allowed"), "{text}");
    assert!(status.success(), "{text}");
    assert_eq!(s.docker_leftovers(), Vec::<String>::new());
}

/// How long what a SIGKILLed microVM `start` left may take to go: the VMM's death signal stops
/// the guest (in the nested harness a clean stop of L1 takes up to its 30 s grace), and the
/// reaper removes the bundle, networks and rows in passes a second apart.
const MICROVM_REAP_TIMEOUT: Duration = Duration::from_secs(60);

/// Run directories' sockets a VMM made (the control socket and its per-port listeners).
fn sockets_left(s: &Sandbox) -> Vec<PathBuf> {
    common::files_under(&s.state().join("bottles"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vsock.sock"))
        })
        .collect()
}

fn a_sigkilled_start_takes_its_vm_and_bundle_with_it(vmm: Vmm) {
    let test = "a_sigkilled_start_takes_its_vm_and_bundle_with_it";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(97);
    let mut running = Running::spawn(start_cmd(
        &s,
        &stand_in,
        &kernel,
        &["--tmpfs", "--", "sh", "-c", "sleep 600"],
    ));
    running.wait_for("booting", Duration::from_secs(240));
    let id = s.wait_running(Duration::from_secs(180));
    assert!(
        s.processes().iter().any(|p| p.contains("__vmm")),
        "no VMM child: {:?}",
        s.processes()
    );

    running.signal(nix::sys::signal::Signal::SIGKILL);
    running.wait();

    // Without `cleanup`: the VMM ends by its death signal, the reaper removes the rest.
    let deadline = std::time::Instant::now() + MICROVM_REAP_TIMEOUT;
    while !(s.processes().is_empty() && s.docker_leftovers().is_empty() && s.rows().is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{id}: left after {MICROVM_REAP_TIMEOUT:?}: processes {:?}, objects {:?}, rows {:?}",
            s.processes(),
            s.docker_leftovers(),
            s.rows()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(processes_under(&s.state()), Vec::<String>::new());
    assert_eq!(s.leases(), Vec::<(String, String)>::new());
    assert_eq!(sockets_left(&s), Vec::<PathBuf>::new());
}

/// A hangup (a closed terminal, a lost SSH session) ends a microVM `start` with its teardown:
/// the VMM stopped, the bundle, networks, rows, lease and sockets gone, exit code 129.
fn a_hangup_tears_a_running_microvm_bottle_down_and_exits_129(vmm: Vmm) {
    let test = "a_hangup_tears_a_running_microvm_bottle_down";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(99);
    let mut running = Running::spawn(start_cmd(
        &s,
        &stand_in,
        &kernel,
        &["--tmpfs", "--", "sh", "-c", "sleep 600"],
    ));
    running.wait_for("booting", Duration::from_secs(240));
    s.wait_running(Duration::from_secs(180));

    running.signal(nix::sys::signal::Signal::SIGHUP);
    let status = running.wait();

    assert_eq!(status.code(), Some(129), "{status:?}");
    assert_eq!(s.rows(), Vec::<serde_json::Value>::new());
    assert_eq!(s.docker_leftovers(), Vec::<String>::new());
    assert_eq!(s.leases(), Vec::<(String, String)>::new());
    assert_eq!(s.processes(), Vec::<String>::new());
    assert_eq!(sockets_left(&s), Vec::<PathBuf>::new());
}

/// Kills land in this window after `start` began: from before its reaper exists, through the
/// image builds, the bundle and the boot, to a guest running its agent (about 5 s here under
/// QEMU's software emulation with warm images).
const MICROVM_CHAOS_WINDOW_MS: u64 = 8_000;

/// The chaos test on the microVM backend, with QEMU standing in for our VMM (20 boots of the
/// nested harness would take most of CI's time; our VMM's death signal is tested on the real
/// `__vmm` child in tests/lifecycle.rs and end to end by the test above in the harness).
#[test]
fn chaos_sigkill_of_a_microvm_start_leaves_an_orphan_or_nothing_and_cleanup_leaves_zero() {
    let test = "chaos_sigkill_of_a_microvm_start";
    let Some((stand_in, kernel)) = prereqs(test, Vmm::QemuDirect) else {
        return;
    };
    let s = Vmm::QemuDirect.sandbox(98);
    common::sigkill_chaos(&s, MICROVM_CHAOS_WINDOW_MS, MICROVM_REAP_TIMEOUT, || {
        start_cmd(&s, &stand_in, &kernel, &["--fresh", "--", "sleep", "600"])
    });
    assert_eq!(processes_under(&s.state()), Vec::<String>::new());
    assert_eq!(sockets_left(&s), Vec::<PathBuf>::new());
    // The writable layer is the agent's work, kept for `resume` (README): at most the one
    // disk of this bottle, and no process holds its lock.
    let disks: Vec<PathBuf> = common::files_under(&s.state().join("disks"));
    assert!(disks.len() <= 1, "{disks:?}");
    for disk in disks {
        let file = std::fs::File::open(&disk).unwrap();
        assert!(
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(),
            "{} is still locked",
            disk.display()
        );
    }
}

/// The git gate from inside the guest: a stock git (the `common::git_image` bottle) commits
/// in the workspace, which is the agent's in the guest whatever its owner on the host, and
/// pushes to its `bottle` remote over the guest's only way out; `pull` brings the branch home.
fn the_agent_in_the_guest_pushes_to_the_gate_and_pull_brings_it_home(vmm: Vmm) {
    let test = "the_agent_in_the_guest_pushes_to_the_gate";
    let Some((stand_in, kernel)) = prereqs(test, vmm) else {
        return;
    };
    let s = vmm.sandbox(100);
    common::git_image::write_git_bottle(&s.dir.path().join("config"), "gitvm").unwrap();
    let repo = s.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["-c", "user.email=t@e", "-c", "user.name=t"])
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            common::stderr(&out)
        );
        common::stdout(&out).trim().to_owned()
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README"), "host\n").unwrap();
    git(&["add", "README"]);
    git(&["commit", "-qm", "host"]);
    let script = "stat -c 'owner %u:%g' /workspace/README; cd /workspace && \
        echo guest >> README && git -c user.email=a@b -c user.name=agent commit -qam guest && \
        git push bottle HEAD:bot/vm 2>&1";
    let mut cmd = s.cmd();
    cmd.env(bot_bottle::backend::microvm::launch::VMM_ENV, &stand_in)
        .env("BOT_BOTTLE_KERNEL", &kernel)
        .args([
            "start",
            "gitvm",
            "--backend",
            "microvm",
            "--tmpfs",
            "--mount",
        ])
        .arg(&repo)
        .args(["--", "sh", "-c", script]);
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (common::stdout(&out), common::stderr(&out));
    let why = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{why}");
    assert!(stdout.contains("owner 1000:1000"), "{why}");
    assert!(stdout.contains("HEAD -> bot/vm"), "{why}");
    let pulled = s.run(&["pull", "gitvm"]);
    assert!(pulled.status.success(), "{}", common::stderr(&pulled));
    assert_eq!(
        git(&["show", "refs/remotes/bottle/bot/vm:README"]),
        "host\nguest"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("README")).unwrap(),
        "host\n"
    );
}

/// Every test above, once with each VMM: `qemu_direct::*` and `our_vmm_in_l1::*`.
macro_rules! with_each_vmm {
    ($($name:ident),* $(,)?) => {
        mod qemu_direct {
            $(#[test] fn $name() { super::$name(super::Vmm::QemuDirect) })*
        }
        mod our_vmm_in_l1 {
            $(#[test] fn $name() { super::$name(super::Vmm::OursInL1) })*
        }
    };
}

with_each_vmm!(
    start_runs_the_agent_in_the_guest_with_its_workspace_egress_and_exit_code,
    exec_cp_and_stop_reach_a_running_microvm_bottle,
    start_on_a_terminal_gives_the_agent_a_tty_of_its_size,
    the_agents_changes_survive_until_resume_and_start_will_not_discard_them,
    the_guest_has_no_way_out_but_its_bundle,
    names_below_the_address_floor_are_refused_from_the_guest,
    a_request_held_for_approval_is_answered_from_the_host,
    a_token_the_guest_posts_is_refused_before_it_goes_up,
    the_guest_trusts_the_bottles_ca_and_never_holds_the_credential,
    the_host_allows_more_while_the_microvm_bottle_runs,
    a_sigkilled_start_takes_its_vm_and_bundle_with_it,
    a_hangup_tears_a_running_microvm_bottle_down_and_exits_129,
    the_agent_in_the_guest_pushes_to_the_gate_and_pull_brings_it_home,
);
