//! The harness itself, for real: L1 boots under QEMU's software emulation, its KVM is usable
//! (nested SVM), host directories are shared at the paths asked for, and a job's status and
//! output come back. Skips with the reason when the harness's assets are missing (fails under
//! CI=true).

use std::time::Duration;

use nested_kvm::{assets_or_skip, Machine, Share};

#[test]
fn l1_boots_with_a_usable_kvm_and_writes_through_its_share() {
    let Some(assets) = assets_or_skip("l1_boots_with_a_usable_kvm_and_writes_through_its_share")
    else {
        return;
    };
    let job = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in.txt"), "from the host\n").unwrap();
    let dir = data.path().display().to_string();
    std::fs::write(
        job.path().join("run.sh"),
        format!(
            "test -c /dev/kvm && echo kvm-ok\n\
             cat /sys/module/kvm_amd/parameters/nested\n\
             cat '{dir}/in.txt' > '{dir}/out.txt' && echo written-in-l1 >> '{dir}/out.txt'\n\
             exit 7\n"
        ),
    )
    .unwrap();
    let mut machine = Machine::new(assets, job.path());
    machine.shares = vec![Share::same_path(data.path(), false)];

    let outcome = machine
        .boot()
        .unwrap()
        .wait(Duration::from_secs(120))
        .unwrap();

    assert_eq!(outcome.status, Some(7), "{}", outcome.console);
    assert!(outcome.console.contains("kvm-ok"), "{}", outcome.console);
    assert_eq!(
        std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
        "from the host\nwritten-in-l1\n"
    );
}
