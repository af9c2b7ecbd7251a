//! bottle-vmm: the microVM embedded in bot-bottle.
//!
//! A KVM virtual machine that boots a Linux guest (vmlinux or bzImage, optional initrd) with a
//! serial console, an i8042 whose reset ends the VM, virtio-blk disks, and one virtio-mmio vsock
//! device: the guest's only channel out, through which it reaches only the (address, port) pairs
//! of its allowlist. See `prds/0004-microvm.md` for the egress mapping the guest follows.
//!
//! The VMM is meant to run in a child process (`bot-bottle __vmm --config FILE`): [`run`] blocks
//! until the guest ends and [`GuestExit::exit_code`] is that process's exit status.
//!
//! Layout:
//! - [`vstate`]: the machine state: the VM, guest memory, vCPU registers and vCPU threads.
//! - [`arch::x86_64`]: the guest physical layout and the boot structures written into memory.
//! - [`devices`]: port-I/O devices (serial, i8042, exit ports) and the MMIO bus.
//! - [`virtio`]: the virtio-mmio transport and the block and vsock devices.
//! - [`event_loop`]: the device thread serving every virtio device.
//! - [`checks`]: host preflight checks (KVM usable, a Linux guest runnable).
//! - [`config`]: the machine description the parent process writes.
//! - `probe` (feature `testing`): builds the probe guest for tests.

pub mod arch;
pub mod checks;
pub mod config;
pub mod devices;
pub mod event_loop;
#[cfg(any(test, feature = "testing"))]
pub mod probe;
pub mod virtio;
pub mod vstate;

pub use config::{AllowRule, ConfigError, DiskConfig, SerialOutput, VmmConfig, VsockConfig};
pub use virtio::block::BlockStats;
pub use virtio::vsock::{DeniedEgress, DenyReason, VsockStats, EGRESS_VSOCK_PORT, HOST_CID};
pub use vstate::vm::{install_stop_signals, KvmError, StopHandle, Vmm, VmmError};

/// How the guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off (power-off port 0x501, or a KVM shutdown system event).
    PowerOff,
    /// The guest rebooted (i8042 reset, Linux `reboot=k`): how `bottle-init` ends a bottle.
    Reset,
    /// The guest kernel panicked (panic port 0x505, a KVM crash event, or a reset after the
    /// kernel's panic banner appeared on the console).
    Panic,
    /// The VM could not go on (triple fault, failed entry, emulation failure...).
    Crash(String),
}

/// Exit status of `bot-bottle __vmm` when the guest powered off.
pub const EXIT_CODE_POWER_OFF: i32 = 0;
/// Exit status when the guest rebooted (the normal end of a bottle).
pub const EXIT_CODE_RESET: i32 = 0x20;
/// Exit status when the guest kernel panicked.
pub const EXIT_CODE_PANIC: i32 = 0x21;
/// Exit status when the VM crashed.
pub const EXIT_CODE_CRASH: i32 = 0x22;
/// Exit status when the VMM itself failed (bad config, no KVM...): `run` returned an error.
pub const EXIT_CODE_VMM_ERROR: i32 = 0x23;
/// Exit status when the VMM was stopped by SIGTERM, SIGINT or SIGHUP before the guest ended
/// (the machine was still torn down cleanly). SIGKILL leaves no status: the parent sees it.
pub const EXIT_CODE_STOPPED: i32 = 0x24;

impl GuestExit {
    /// The child process's exit status for this end. A VMM killed by a signal has no status:
    /// the parent sees the signal (`ExitStatus::signal()`), which is how "killed" is told apart.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestExit::PowerOff => EXIT_CODE_POWER_OFF,
            GuestExit::Reset => EXIT_CODE_RESET,
            GuestExit::Panic => EXIT_CODE_PANIC,
            GuestExit::Crash(_) => EXIT_CODE_CRASH,
        }
    }

    /// The parent's reading of a child's exit status (`None`: not a guest end, e.g. VMM error).
    pub fn from_exit_code(code: i32) -> Option<GuestExit> {
        match code {
            EXIT_CODE_POWER_OFF => Some(GuestExit::PowerOff),
            EXIT_CODE_RESET => Some(GuestExit::Reset),
            EXIT_CODE_PANIC => Some(GuestExit::Panic),
            EXIT_CODE_CRASH => Some(GuestExit::Crash("the VMM reported a crash".into())),
            _ => None,
        }
    }
}

/// Builds the machine described by `config`, runs it, and returns how the guest ended.
pub fn run(config: &VmmConfig) -> Result<GuestExit, VmmError> {
    Vmm::build(config)?.run()
}

/// The whole of `bot-bottle __vmm --config FILE`: reads the JSON configuration the parent wrote,
/// runs the machine, reports on stderr, and returns the exit status for `std::process::exit`
/// (see [`GuestExit::exit_code`]; [`EXIT_CODE_VMM_ERROR`] when the VMM itself failed).
pub fn child_main(config_path: &std::path::Path) -> i32 {
    let result = VmmConfig::from_file(config_path)
        .map_err(VmmError::from)
        .and_then(|config| install_stop_signals().map(|()| config))
        .and_then(|config| run(&config));
    match result {
        Ok(exit) => {
            eprintln!("bottle-vmm: guest ended: {exit:?}");
            exit.exit_code()
        }
        Err(VmmError::Stopped) => {
            eprintln!("bottle-vmm: stopped by a signal before the guest ended");
            EXIT_CODE_STOPPED
        }
        Err(error) => {
            eprintln!("{}", error_chain(&error));
            EXIT_CODE_VMM_ERROR
        }
    }
}

/// An error and its causes, one numbered line each (the CLI convention of the workspace).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut lines = Vec::new();
    let mut current = Some(error);
    while let Some(err) = current {
        lines.push(format!("bottle-vmm: {}: {err}", lines.len()));
        current = err.source();
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_codes_are_distinct_and_decode_back() {
        let exits = [GuestExit::PowerOff, GuestExit::Reset, GuestExit::Panic];
        let decoded: Vec<_> = exits
            .iter()
            .map(|e| GuestExit::from_exit_code(e.exit_code()))
            .collect();
        assert_eq!(decoded, exits.iter().cloned().map(Some).collect::<Vec<_>>());
    }

    #[test]
    fn test_child_main_with_a_missing_config_returns_the_vmm_error_status() {
        assert_eq!(
            child_main(std::path::Path::new("/nonexistent/vmm.json")),
            EXIT_CODE_VMM_ERROR
        );
    }

    #[test]
    fn test_error_chain_numbers_each_cause() {
        let error = VmmError::from(ConfigError::Vcpus(0));
        assert_eq!(
            error_chain(&error),
            "bottle-vmm: 0: invalid VMM configuration\nbottle-vmm: 1: vcpus must be between 1 and 32, got 0"
        );
    }

    #[test]
    fn test_crash_exit_code_differs_from_vmm_error() {
        assert_ne!(
            GuestExit::Crash("x".into()).exit_code(),
            EXIT_CODE_VMM_ERROR
        );
    }
}
