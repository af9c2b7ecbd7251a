//! The microVM backend's host side, end to end under QEMU: the test agent image is built by
//! Docker from `dockerfiles/Dockerfile.test`, exported and turned into the root image by
//! `microvm_run::prepare_rootfs`, a host directory is snapshotted by `workspace::snapshot`,
//! and the kernel command line and disks come from `microvm::launch` — exactly what `start`
//! hands our VMM. QEMU stands in for the VMM (this machine's nested KVM cannot boot Linux) and
//! a virtio serial port stands in for vsock (no vhost-vsock here); everything else is real.

#[path = "../common/mod.rs"]
mod common;
#[path = "qemu_vm.rs"]
mod qemu_vm;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bot_bottle::manifest::{Backend, ManifestSource};
use bot_bottle::plan::{self, HostFacts, HostMount};
use bot_bottle::upper::WritableLayer;
use bot_bottle::{images, kernel, microvm, microvm_run, workspace};
use bottle_proto::config::ControlChannel;
use bottle_proto::ExecRequest;
use qemu_vm::{Qemu, PORT_NAME};

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Kernel, QEMU and bottle-init, or why not.
fn prereqs() -> Result<(PathBuf, PathBuf), String> {
    let kernel = match std::env::var_os("BOT_BOTTLE_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => {
            let dirs = bot_bottle::paths::Dirs::from_env().map_err(|e| e.to_string())?;
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
    let docker = bot_bottle::docker::connect().await.unwrap();
    let spec = images::load_dockerfile(&plan.agent.dockerfile, work.path()).unwrap();
    let labels = BTreeMap::from([("bot-bottle.managed".to_owned(), "true".to_owned())]);
    let image = images::ensure_image(&docker, &plan.agent.image_repo, &spec, &labels)
        .await
        .unwrap();
    let (rootfs, accounts) = microvm_run::prepare_rootfs(
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
    let launch = microvm::launch(
        &p.plan,
        &guest,
        &p.kernel,
        microvm::Disks {
            rootfs: &p.rootfs,
            workspaces: std::slice::from_ref(&p.workspace),
            layer,
        },
        p.work.path(),
        &p.work.path().join("state.db"),
    )
    .unwrap();
    let disks: Vec<(PathBuf, bool)> = launch
        .vmm
        .disks
        .iter()
        .map(|d| (d.path.clone(), d.read_only))
        .collect();
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
        bot_bottle::rootfs::INIT_PATH
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
    bot_bottle::upper::create(&disk, 1).unwrap();
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
