//! Our VMM's KVM suites under a KVM that runs Linux: each of bottle-vmm's KVM test binaries
//! (the probe-guest suites, the stop-signal test, the Linux check) and `vmm_process` (the
//! `bot-bottle __vmm` child with its verified allowlist) runs whole inside the nested-KVM
//! harness's emulated machine (crates/nested-kvm: QEMU TCG with AMD SVM, Debian's kernel,
//! kvm_amd). They also run on this host's own KVM; L1 is where an AMD SVM KVM — and a fast
//! guest — shows what the host's `kvm_pvm` hides (a vCPU reset on shutdown, waits bounded by
//! loop counts). `linux_boot` hands itself to L1 on its own when this KVM cannot run Linux.
//!
//! L1 has no toolchain: the binaries are the ones cargo built on the host (static), the probe
//! guest is built here and handed over with `BOTTLE_VMM_PROBE_ELF`. Skips with the reason when
//! the harness is missing (`.ci/setup-l1`); fails under CI=true.

use std::path::PathBuf;

/// The newest `deps/<name>-<hash>` test executable next to this one.
fn sibling_test_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let prefix = format!("{name}-");
    std::fs::read_dir(deps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let file = p.file_name().unwrap().to_string_lossy().into_owned();
            file.starts_with(&prefix)
                && !file.contains('.')
                && file[prefix.len()..].chars().all(|c| c.is_ascii_hexdigit())
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no {name} test binary in {}: build the workspace's tests first \
                 (cargo nextest run --workspace builds them all)",
                deps.display()
            )
        })
}

/// Runs the test binary `name` in L1 (its tests whose names contain `filter`, all with "") and
/// checks that they ran and passed there.
fn suite_passes_in_l1(test: &str, name: &str, filter: &str) {
    let Some(assets) = nested_kvm::assets_or_skip(test) else {
        return;
    };
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = bottle_vmm::probe::build(probe_dir.path()).unwrap();
    let binary = sibling_test_binary(name);
    let mut run = nested_kvm::ProgramRun::new(&binary);
    run.args = vec![filter.into(), "--test-threads=1".into()];
    run.env = vec![(
        bottle_vmm::probe::PREBUILT_ENV.into(),
        probe.display().to_string(),
    )];
    // The target directory (vmm_process finds the bot-bottle binary there) and the probe.
    run.dirs = vec![
        (
            binary.parent().unwrap().parent().unwrap().to_path_buf(),
            true,
        ),
        (probe_dir.path().to_path_buf(), true),
    ];

    let outcome = run.run(&assets).unwrap();

    let log = outcome.console_tail(300);
    assert_eq!(
        outcome.status,
        Some(0),
        "{name} failed in L1 ({:.0}s):\n{log}",
        outcome.elapsed.as_secs_f64()
    );
    assert!(
        !outcome.console.contains("SKIPPED"),
        "{name} skipped tests in L1:\n{log}"
    );
    let passed = passed_count(&outcome.console);
    assert!(passed > 0, "{name} ran no test in L1:\n{log}");
    eprintln!(
        "{name}: {passed} tests passed under KVM in L1 ({:.0}s including L1's boot)",
        outcome.elapsed.as_secs_f64()
    );
}

/// N from libtest's `test result: ok. N passed` line.
fn passed_count(console: &str) -> usize {
    console
        .lines()
        .filter_map(|l| l.split("test result: ok. ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .sum()
}

#[test]
fn probe_boot_suite_passes_under_kvm_in_l1() {
    suite_passes_in_l1("probe_boot_suite_passes_under_kvm_in_l1", "probe_boot", "");
}

#[test]
fn probe_vsock_suite_passes_under_kvm_in_l1() {
    suite_passes_in_l1(
        "probe_vsock_suite_passes_under_kvm_in_l1",
        "probe_vsock",
        "",
    );
}

#[test]
fn stop_signal_suite_passes_under_kvm_in_l1() {
    suite_passes_in_l1(
        "stop_signal_suite_passes_under_kvm_in_l1",
        "stop_signal",
        "",
    );
}

#[test]
fn linux_check_passes_linuxs_instructions_under_kvm_in_l1() {
    suite_passes_in_l1(
        "linux_check_passes_linuxs_instructions_under_kvm_in_l1",
        "linux_check",
        "",
    );
}

#[test]
fn vmm_process_suite_passes_under_kvm_in_l1() {
    // The VMM-child tests; the others start bottles through Docker, which L1 has not (they run
    // on the host, where the VMM they start is the probe guest's).
    suite_passes_in_l1(
        "vmm_process_suite_passes_under_kvm_in_l1",
        "vmm_process",
        "vmm_child_",
    );
}

#[test]
fn passed_counts_add_up_over_libtest_summaries() {
    let console = "test result: ok. 3 passed; 0 failed\nx\ntest result: ok. 0 passed; 0 failed\n";
    assert_eq!(passed_count(console), 3);
}
