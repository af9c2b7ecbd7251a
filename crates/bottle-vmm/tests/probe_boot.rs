//! Boot path under real KVM with the probe guest: boot parameters, exit paths, SMP.

mod common;

use bottle_vmm::{GuestExit, Vmm};
use common::*;

fn boot_probe(mode: &str, vcpus: u8) -> Option<(GuestExit, String)> {
    if !kvm_usable(&format!("probe mode {mode}")) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = probe_config(dir.path(), mode, "", vcpus, None);
    let exit = run_with_watchdog(Vmm::build(&config).unwrap(), dir.path());
    Some((exit, serial_log(dir.path())))
}

#[test]
fn test_probe_guest_sees_its_e820_map_and_command_line_then_powers_off() {
    let Some((exit, log)) = boot_probe("boot", 1) else {
        return;
    };
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
    assert!(
        log.contains("E820 OK") && log.contains("PROBE DONE"),
        "serial log:\n{log}"
    );
}

#[test]
fn test_i8042_reset_ends_the_vm_as_reset() {
    let Some((exit, log)) = boot_probe("reset", 1) else {
        return;
    };
    assert_eq!(exit, GuestExit::Reset, "serial log:\n{log}");
}

#[test]
fn test_panic_port_ends_the_vm_as_panic() {
    let Some((exit, log)) = boot_probe("panic", 1) else {
        return;
    };
    assert_eq!(exit, GuestExit::Panic, "serial log:\n{log}");
}

#[test]
fn test_triple_fault_ends_the_vm_as_crash() {
    let Some((exit, log)) = boot_probe("triple-fault", 1) else {
        return;
    };
    assert!(
        matches!(exit, GuestExit::Crash(_)),
        "exit {exit:?}, serial log:\n{log}"
    );
}

#[test]
fn test_four_vcpu_machine_boots_and_its_idle_vcpus_are_stopped() {
    let Some((exit, log)) = boot_probe("boot", 4) else {
        return;
    };
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
}

#[test]
fn test_probe_guest_i8042_answers_read_ctr_write_ctr_and_self_test() {
    let Some((exit, log)) = boot_probe("i8042", 1) else {
        return;
    };
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
    assert!(log.contains("I8042 OK"), "serial log:\n{log}");
}

#[test]
fn test_child_main_exits_with_the_reset_status_for_a_guest_that_resets() {
    if !kvm_usable("child_main") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("vmm.json");
    let config = probe_config(dir.path(), "reset", "", 1, None);
    std::fs::write(&config_path, serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(
        bottle_vmm::child_main(&config_path),
        bottle_vmm::EXIT_CODE_RESET
    );
}

#[test]
fn test_probe_guest_finds_the_initrd_bytes_where_the_zero_page_says() {
    if !kvm_usable("initrd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(7) % 251) as u8)
        .collect();
    let expected_sum = initrd.iter().fold(0u32, |sum, b| {
        sum.wrapping_mul(31).wrapping_add(u32::from(*b))
    });
    std::fs::write(dir.path().join("initrd.img"), &initrd).unwrap();
    let mut config = probe_config(dir.path(), "boot", "", 1, None);
    config.initrd = Some(dir.path().join("initrd.img"));
    let exit = run_with_watchdog(Vmm::build(&config).unwrap(), dir.path());
    let log = serial_log(dir.path());
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
    assert!(
        log.contains(&format!("INITRD size 300000 sum {expected_sum}\n")),
        "serial log:\n{log}"
    );
}

const DISK_SECTORS: usize = 64;

fn disk_image() -> Vec<u8> {
    (0..DISK_SECTORS * 512).map(|i| (i % 253) as u8).collect()
}

fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |sum, b| {
        sum.wrapping_mul(31).wrapping_add(u32::from(*b))
    })
}

/// Boots the probe in `blk` mode with one disk; returns the exit, the serial log, the disk after.
fn boot_with_disk(read_only: bool) -> Option<(GuestExit, String, Vec<u8>)> {
    if !kvm_usable("virtio-blk") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, disk_image()).unwrap();
    let extra = format!(
        "probe.blk_sectors={DISK_SECTORS} probe.blk_ro={}",
        u8::from(read_only)
    );
    let mut config = probe_config(dir.path(), "blk", &extra, 1, None);
    config.disks = vec![bottle_vmm::DiskConfig {
        path: disk.clone(),
        read_only,
    }];
    let exit = run_with_watchdog(Vmm::build(&config).unwrap(), dir.path());
    Some((exit, serial_log(dir.path()), std::fs::read(&disk).unwrap()))
}

#[test]
fn test_probe_guest_reads_and_writes_a_virtio_blk_disk() {
    let Some((exit, log, after)) = boot_with_disk(false) else {
        return;
    };
    let mut expected = disk_image();
    expected[1024..1024 + 20].copy_from_slice(b"PROBE WROTE SECTOR 2");
    expected[1024 + 20..1536].fill(0);
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
    let read_line = format!(
        "BLK READ sectors {DISK_SECTORS} sum {}",
        checksum(&disk_image())
    );
    assert!(
        log.contains(&read_line) && log.contains("BLK WRITE OK") && log.contains("BLK BOUNDS OK"),
        "serial log:\n{log}"
    );
    assert!(
        after == expected,
        "sector 2 was not written as the guest asked"
    );
}

#[test]
fn test_probe_guest_cannot_write_a_read_only_disk() {
    let Some((exit, log, after)) = boot_with_disk(true) else {
        return;
    };
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
    assert!(log.contains("BLK RO REFUSED"), "serial log:\n{log}");
    assert!(after == disk_image(), "the read-only disk changed");
}

#[test]
fn test_stop_handle_ends_a_guest_that_never_exits() {
    if !kvm_usable("stop handle") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = probe_config(dir.path(), "spin", "", 2, None);
    let vmm = Vmm::build(&config).unwrap();
    let stop = vmm.stop_handle();
    let log = dir.path().join("serial.log");
    std::thread::spawn(move || {
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("SPINNING")
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        stop.stop();
    });
    let started = std::time::Instant::now();
    let result = vmm.run();
    assert!(
        matches!(result, Err(bottle_vmm::VmmError::Stopped)),
        "{result:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn test_probe_guest_wait_ends_at_its_deadline_in_guest_time() {
    if !kvm_usable("probe wait") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = probe_config(dir.path(), "wait", "probe.wait_ms=700", 1, None);
    let vmm = Vmm::build(&config).unwrap();
    let started = std::time::Instant::now();
    let exit = run_with_watchdog(vmm, dir.path());
    let elapsed = started.elapsed();
    let log = serial_log(dir.path());
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
    // Bounded by time, not by a count of loops: neither cut short on a fast KVM nor stretched
    // on an emulating one.
    assert!(
        elapsed >= std::time::Duration::from_millis(700)
            && elapsed < std::time::Duration::from_secs(10),
        "waited {elapsed:?}; serial log:\n{log}"
    );
    let guest_ms: u64 = log
        .split("WAITED ms ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no WAITED line; serial log:\n{log}"));
    assert!(guest_ms >= 700, "the guest's clock counted {guest_ms} ms");
}

#[test]
fn test_probe_guest_cpuid_offers_no_vmx_or_svm_and_carries_the_brand_string() {
    let Some((exit, log)) = boot_probe("cpuid", 1) else {
        return;
    };
    let brand = bottle_vmm::vstate::cpu::guest_brand_string();
    let brand = String::from_utf8_lossy(&brand);
    let expected = format!(
        "CPUID brand {}\n",
        brand.trim_end_matches('\0').trim_start()
    );
    assert_eq!(exit, GuestExit::PowerOff, "serial log:\n{log}");
    assert!(
        log.contains("CPUID OK") && log.contains(&expected),
        "expected {expected:?}; serial log:\n{log}"
    );
}
