//! The KVM preflight against the real /dev/kvm, and as an unprivileged user who may not open it.

mod common;

use common::{stdout, Sandbox};
use std::process::Command;

fn kvm_present(test: &str) -> bool {
    let ok = std::path::Path::new("/dev/kvm").exists();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: CI=true but /dev/kvm is missing"
        );
        eprintln!("SKIPPED {test}: /dev/kvm is missing");
    }
    ok
}

#[test]
fn doctor_on_real_kvm_reports_api_version_12() {
    if !kvm_present("doctor_on_real_kvm_reports_api_version_12") {
        return;
    }
    let sb = Sandbox::new("43-43");
    let out = sb.run(&["doctor"]);
    let text = stdout(&out);
    assert!(text.contains("[ok  ] kvm"), "{text}");
    assert!(text.contains("API version 12"), "{text}");
}

#[test]
fn doctor_as_unprivileged_user_says_join_the_kvm_group() {
    if !kvm_present("doctor_as_unprivileged_user_says_join_the_kvm_group") {
        return;
    }
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o006,
        0,
        "this test needs a /dev/kvm that 'nobody' cannot open (mode is {:o})",
        meta.permissions().mode()
    );
    let sb = Sandbox::new("43-43");
    // The sandbox must be usable by uid 65534 for the state checks.
    Command::new("chmod")
        .args(["-R", "a+rwx"])
        .arg(sb.dir.path())
        .status()
        .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::bin())
        .arg("doctor")
        .env("HOME", sb.dir.path())
        .env("BOT_BOTTLE_STATE_DIR", sb.state())
        .output()
        .expect("setpriv (util-linux) runs");
    let text = stdout(&out);
    assert!(
        text.contains("[FAIL] kvm"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("kvm` group"), "{text}");
}

/// This machine's KVM is known (FINDINGS.md) to be the nested `kvm_pvm`, which cannot run
/// Linux; elsewhere KVM is taken to be hardware KVM, which can.
fn kvm_is_nested_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn doctor_says_whether_this_kvm_can_run_the_linux_guest() {
    if !kvm_present("doctor_says_whether_this_kvm_can_run_the_linux_guest") {
        return;
    }
    let sb = Sandbox::new("43-43");
    let out = sb.run(&["doctor"]);
    let text = stdout(&out);
    if kvm_is_nested_pvm() {
        assert!(text.contains("[FAIL] linux-guest"), "{text}");
        assert!(text.contains("`lock cmpxchg16b`"), "{text}");
        assert!(text.contains("--backend docker"), "{text}");
        assert_eq!(out.status.code(), Some(1), "{text}");
    } else {
        assert!(text.contains("[ok  ] linux-guest"), "{text}");
    }
}

#[test]
fn start_microvm_where_kvm_cannot_run_linux_refuses_before_building_anything() {
    let test = "start_microvm_where_kvm_cannot_run_linux_refuses_before_building_anything";
    if !kvm_present(test) {
        return;
    }
    if !common::docker_available(test) {
        return;
    }
    if !kvm_is_nested_pvm() {
        eprintln!("SKIPPED {test}: this host's KVM can run Linux (no kvm_pvm module)");
        return;
    }
    let sb = Sandbox::new("44-44");
    let out = sb
        .cmd()
        .args(["start", "test", "--backend", "microvm", "--", "true"])
        .output()
        .unwrap();
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot run a Linux guest"), "{err}");
    assert!(err.contains("`lock cmpxchg16b`"), "{err}");
    assert!(err.contains("fix: use the docker backend"), "{err}");
    assert!(err.contains("--backend docker"), "{err}");
    // Refused before anything was built, allocated or started.
    assert!(!err.contains("root image"), "{err}");
    assert!(sb.rows().is_empty(), "{:?}", sb.rows());
    assert!(
        sb.docker_leftovers().is_empty(),
        "{:?}",
        sb.docker_leftovers()
    );
    let images: Vec<_> = common::files_under(&sb.dir.path().join("cache"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sqfs"))
        .collect();
    assert!(images.is_empty(), "{images:?}");
}
