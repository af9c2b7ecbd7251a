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
