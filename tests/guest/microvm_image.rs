//! The microVM backend's host side, end to end under QEMU: the test agent image is built by
//! Docker from `dockerfiles/Dockerfile.test`, exported and turned into the root image by
//! `image::export::prepare_rootfs`, a host directory is snapshotted by `workspace::snapshot`,
//! and the kernel command line and disks come from `microvm::launch` — exactly what `start`
//! hands our VMM. QEMU stands in for the VMM (this machine's nested KVM cannot boot Linux).
//! Most tests use a virtio serial port for the control channel; the vsock test keeps the
//! guest configuration untouched and serves its virtio-vsock device with rust-vmm's
//! `vhost-device-vsock`, which speaks our VMM's Unix-socket convention.

#[path = "../common/mod.rs"]
mod common;
#[path = "qemu_vm.rs"]
mod qemu_vm;
#[path = "vhost_vsock.rs"]
mod vhost_vsock;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bot_bottle::backend::microvm::layer::WritableLayer;
use bot_bottle::backend::microvm::{control as microvm_run, launch as microvm};
use bot_bottle::config::manifest::{Backend, ManifestSource};
use bot_bottle::image::export::prepare_rootfs;
use bot_bottle::image::{build as images, kernel, workspace};
use bot_bottle::plan::{self, HostFacts, HostMount};
use bottle_proto::config::ControlChannel;
use bottle_proto::ExecRequest;
use qemu_vm::{Machine, Qemu, PORT_NAME};
use vhost_vsock::VsockBackend;

use common::in_ci;

/// Kernel, QEMU and bottle-init, or why not.
fn prereqs() -> Result<(PathBuf, PathBuf), String> {
    let kernel = match std::env::var_os("BOT_BOTTLE_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => {
            let dirs = bot_bottle::host::paths::Dirs::from_env().map_err(|e| e.to_string())?;
            kernel::cached_kernel_in(&kernel::kernel_cache_dir(&dirs), kernel::FRAGMENT)
                .ok_or("no guest kernel: run `bot-bottle kernel build`")?
        }
    };
    let qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if !qemu.is_file() {
        return Err("qemu-system-x86_64 missing: apt-get install qemu-system-x86".into());
    }
    Ok((kernel, qemu))
}

/// Everything `start` prepares before it launches the VMM, for the bundled test bottle with
/// one workspace.
struct Prepared {
    work: tempfile::TempDir,
    kernel: PathBuf,
    qemu: PathBuf,
    plan: plan::BottlePlan,
    rootfs: PathBuf,
    ids: bottle_proto::UserIds,
    home: String,
    workspace: PathBuf,
    host: PathBuf,
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

async fn prepare(test: &str) -> Option<Prepared> {
    if !common::docker_available(test) {
        return None;
    }
    let (kernel, qemu) = match prereqs() {
        Ok(p) => p,
        Err(why) => {
            assert!(!in_ci(), "CI=true but {why}");
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
    };
    // bottle-init is built beside bot-bottle (the workspace links statically).
    let init = common::bin().with_file_name("bottle-init");
    assert!(
        init.is_file(),
        "{} missing: cargo build -p bottle-init",
        init.display()
    );
    let work = tempfile::tempdir().unwrap();
    let host = work.path().join("project");
    std::fs::create_dir_all(host.join("src")).unwrap();
    std::fs::write(host.join("src/lib.rs"), "pub fn answer() -> u32 { 42 }\n").unwrap();
    let manifest = ManifestSource::new(work.path().join("no-user-bottles"))
        .load("test")
        .unwrap();
    let facts = HostFacts {
        bottle_id: "test-e2e001".into(),
        alias: Ipv4Addr::new(127, 0, 0, 90),
        guest_cid: plan::derive_cid("test-e2e001", 0),
        backend: Backend::Microvm,
        mounts: vec![HostMount {
            host: host.clone(),
            guest: None,
        }],
        runsc: false,
        state_tag: "e2e".into(),
    };
    let plan = plan::plan(&manifest, &facts).unwrap();
    let docker = bot_bottle::host::docker::connect().await.unwrap();
    let spec = images::load_dockerfile(&plan.agent.dockerfile, work.path()).unwrap();
    let labels = BTreeMap::from([("bot-bottle.managed".to_owned(), "true".to_owned())]);
    let image = images::ensure_image(&docker, &plan.agent.image_repo, &spec, &labels)
        .await
        .unwrap();
    let (rootfs, accounts) = prepare_rootfs(
        &docker,
        &image,
        &init,
        &work.path().join("cache"),
        &labels,
        &format!("bot-bottle-e2e-export-{}", std::process::id()),
    )
    .await
    .unwrap();
    let (ids, home) =
        microvm::resolve_user(&plan.agent.user, &accounts.passwd, &accounts.group).unwrap();
    let workspace = work.path().join("workspace-0.sqfs");
    workspace::snapshot(&host, &workspace, &mut |_, _| {}).unwrap();
    Some(Prepared {
        work,
        kernel,
        qemu,
        plan,
        rootfs,
        ids,
        home,
        workspace,
        host,
    })
}

/// What `start` hands the VMM for this guest, and its disks as (image, read-only).
fn launch(
    p: &Prepared,
    guest: &bottle_proto::config::GuestConfig,
    layer: &WritableLayer,
) -> (microvm::Launch, Vec<(PathBuf, bool)>) {
    let launch = microvm::launch(
        &p.plan,
        guest,
        &p.kernel,
        microvm::Disks {
            rootfs: &p.rootfs,
            workspaces: std::slice::from_ref(&p.workspace),
            layer,
        },
        &bot_bottle::host::run_dir::RunDir::new(p.work.path()),
        &p.work.path().join("state.db"),
    )
    .unwrap();
    let disks = launch
        .vmm
        .disks
        .iter()
        .map(|d| (d.path.clone(), d.read_only))
        .collect();
    (launch, disks)
}

/// Boot what `microvm::launch` describes under QEMU and run `script` as the agent; returns
/// (exit code, stdout, console).
fn boot_and_run(
    p: &Prepared,
    layer: &WritableLayer,
    script: &str,
) -> (Option<i32>, String, String) {
    let mut guest = microvm::guest_config(&p.plan, TOKEN, p.ids, &p.home, layer);
    // The one substitution: the control channel on a virtio serial port instead of vsock.
    guest.control = ControlChannel::VirtioPort {
        name: PORT_NAME.into(),
    };
    let (launch, disks) = launch(p, &guest, layer);
    let started = Instant::now();
    let mut vm = Qemu::spawn(
        &p.qemu,
        &launch.vmm.kernel,
        &launch.vmm.cmdline,
        &disks,
        p.work.path(),
    );
    let (mut client, ready) = vm.wait_for_agent(TOKEN, started);
    eprintln!("agent image root: boot to agent-ready {ready:?}");
    let mut req = ExecRequest::new(["/bin/sh", "-c", script]);
    req.cwd = Some(p.plan.agent.workdir.clone());
    let result = client.exec(&req, b"").unwrap();
    // A clean power-off (sync, reset): what a stopped bottle does.
    let _ = client.shutdown();
    vm.wait_exit(Duration::from_secs(30));
    let console = vm.console_text();
    drop(vm);
    (
        result.status.code,
        String::from_utf8_lossy(&result.stdout).into_owned(),
        format!(
            "{console}\nagent stderr:\n{}",
            String::from_utf8_lossy(&result.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_image_becomes_a_bootable_root_with_its_user_env_and_workspace_overlay() {
    let Some(p) = prepare("agent_image_becomes_a_bootable_root").await else {
        return;
    };
    let script = "id -u; id -g; echo $HTTPS_PROXY; pwd; cat /workspace/src/lib.rs; \
                  echo changed > /workspace/src/lib.rs && cat /workspace/src/lib.rs; \
                  stat -c '%u %a' /workspace/src/lib.rs /tmp; hostname; \
                  stat -c '%h' /bin/busybox; \
                  [ $(stat -c %i /bin/busybox) = $(stat -c %i /usr/sbin/busybox-hardlink) ] && echo same-inode; \
                  tr '\\0' ' ' </proc/1/cmdline";

    let (code, out, console) = boot_and_run(&p, &WritableLayer::Tmpfs, script);

    // The manifest's user (Dockerfile.test's 1000:1000), the planned proxy env, the workspace
    // readable and writable in the overlay, the image's hard link still one inode with two
    // names, and the host file untouched.
    assert_eq!(code, Some(0), "{out}\nconsole:\n{console}");
    let expected = format!(
        "1000\n1000\nhttp://127.0.0.90:3128\n/workspace\npub fn answer() -> u32 {{ 42 }}\nchanged\n1000 644\n0 1777\ntest\n2\nsame-inode\n/{} ",
        bot_bottle::image::rootfs::INIT_PATH
    );
    assert_eq!(out, expected, "console:\n{console}");
    assert_eq!(
        std::fs::read_to_string(p.host.join("src/lib.rs")).unwrap(),
        "pub fn answer() -> u32 { 42 }\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn writable_layer_disk_keeps_the_agents_changes_for_resume() {
    let Some(p) = prepare("writable_layer_disk_keeps_the_agents_changes").await else {
        return;
    };
    let disk = p.work.path().join("disks/test/upper.ext4");
    bot_bottle::backend::microvm::layer::create(&disk, 1).unwrap();
    let layer = WritableLayer::Disk(disk);

    let (first, out1, console1) = boot_and_run(
        &p,
        &layer,
        "echo from-the-first-run > ~/kept.txt && mkdir -p ~/.tool && echo v1 > ~/.tool/version && echo written",
    );
    let (second, out2, console2) = boot_and_run(&p, &layer, "cat ~/kept.txt ~/.tool/version");

    assert_eq!(first, Some(0), "{out1}\nconsole:\n{console1}");
    assert_eq!(out1, "written\n");
    assert_eq!(second, Some(0), "{out2}\nconsole:\n{console2}");
    assert_eq!(out2, "from-the-first-run\nv1\n");
}

/// What our VMM does with a guest connection to the host's vsock port `port`: hand it to the
/// bundle's port on the alias. Here each `<uds>_<port>` connection of the vsock backend is
/// joined to `target`.
fn bridge_vsock_port(uds: &std::path::Path, port: u16, target: std::net::SocketAddr) {
    let listener = tokio::net::UnixListener::bind(format!("{}_{port}", uds.display())).unwrap();
    tokio::spawn(async move {
        while let Ok((mut guest, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut guest, &mut up).await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn start_s_guest_answers_over_vsock_and_its_egress_meets_the_bottles_proxy() {
    use bot_bottle::bundle::egress::{EgressPolicy, EgressProxy, ProxyConfig, Resolver};
    let test = "start_s_guest_answers_over_vsock";
    let Some(p) = prepare(test).await else {
        return;
    };
    let Some(backend) = VsockBackend::start() else {
        return;
    };
    // The bottle's egress proxy with the bottle's policy, as the bundle runs it; allowed.test
    // is a server on this host.
    let upstream = common::http_server("hello from allowed.test");
    let egress = &p.plan.egress;
    let mut config = ProxyConfig::new(
        &p.plan.id,
        "127.0.0.1:0".parse().unwrap(),
        EgressPolicy::new(&egress.allow, &egress.deny, &egress.deny_message).unwrap(),
    );
    config.resolver = Resolver::fixed([("allowed.test", Ipv4Addr::LOCALHOST.into())]);
    config.allow_loopback_upstream = true;
    let proxy = EgressProxy::bind(config).await.unwrap();
    let proxy_addr = proxy.local_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    let proxy_port = p
        .plan
        .bundle
        .ports
        .iter()
        .find(|port| port.service == "egress-proxy")
        .unwrap()
        .host_port;
    bridge_vsock_port(&backend.uds(), proxy_port, proxy_addr);

    // The guest exactly as `start` configures it: control and egress over vsock.
    let layer = WritableLayer::Tmpfs;
    let guest = microvm::guest_config(&p.plan, TOKEN, p.ids, &p.home, &layer);
    let (launch, disks) = launch(&p, &guest, &layer);
    let vhost = backend.vhost();
    let (cmd, _, console) = Machine {
        vhost_vsock: Some(&vhost),
        ..Machine::new(
            &p.qemu,
            &launch.vmm.kernel,
            &launch.vmm.cmdline,
            &disks,
            p.work.path(),
        )
    }
    .command();
    let started = Instant::now();
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // `start` and `exec` reach the agent this way.
    let client = microvm_run::connect_control(&mut child, &backend.uds(), TOKEN, &console)
        .await
        .unwrap();
    eprintln!("boot to agent-ready over vsock: {:?}", started.elapsed());
    let argv = |script: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let (code, mut client) =
        microvm_run::exec(client, argv("exit 7"), p.plan.agent.workdir.clone())
            .await
            .unwrap();
    assert_eq!(code, 7, "the exit code passes through");

    // From the workspace, as the agent user: an allowed host through the planned proxy env,
    // and a denied one with the bottle's message.
    let script = format!(
        "id -u; cat src/lib.rs; wget -qO- http://allowed.test:{upstream}/; echo; \
         printf 'GET http://denied.allowed.test/ HTTP/1.0\\r\\n\\r\\n' | nc {} {proxy_port}",
        p.plan.alias
    );
    let mut req = ExecRequest::new(argv(&script));
    req.cwd = Some(p.plan.agent.workdir.clone());
    let result = tokio::task::block_in_place(|| client.exec(&req, b"")).unwrap();
    let out = String::from_utf8_lossy(&result.stdout).into_owned();
    let why = format!(
        "{out}\nstderr: {}\nconsole:\n{}",
        String::from_utf8_lossy(&result.stderr),
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    assert!(
        out.starts_with(
            "1000\npub fn answer() -> u32 { 42 }\nhello from allowed.test\nHTTP/1.1 403"
        ),
        "{why}"
    );
    assert!(out.contains(&egress.deny_message), "{why}");

    // `cp` both ways over a fresh vsock connection, as the CLI does it.
    let local = p.work.path().join("to-guest");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("notes.txt"), "copied in\n").unwrap();
    let back = p.work.path().join("from-guest");
    std::fs::create_dir_all(&back).unwrap();
    let uds = backend.uds();
    let copied = tokio::task::spawn_blocking({
        let (local, back) = (local.clone(), back.clone());
        move || {
            let stream =
                bottle_proto::connect_vsock(&uds, bottle_proto::config::CONTROL_VSOCK_PORT)
                    .unwrap();
            let mut c = bottle_proto::Client::new(stream, TOKEN);
            c.copy_in(
                "/workspace",
                bot_bottle::backend::transfer::pack(&local)
                    .unwrap()
                    .as_slice(),
            )
            .unwrap();
            let mut tar = Vec::new();
            c.copy_out("/workspace/to-guest/notes.txt", &mut tar)
                .unwrap();
            bot_bottle::backend::transfer::unpack_safely(tar.as_slice(), &back).unwrap();
            let _ = c.shutdown();
        }
    })
    .await;
    copied.unwrap();
    assert_eq!(
        std::fs::read_to_string(back.join("notes.txt")).unwrap(),
        "copied in\n"
    );
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}
