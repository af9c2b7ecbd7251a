//! vCPU threads: each runs KVM_RUN in a loop, dispatches port and MMIO exits, and reports how
//! the guest ended. [`VcpuHandles::stop`] kicks and joins them with a time limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::legacy::PortIo;
use crate::devices::MmioBus;
use crate::GuestExit;

/// How long `stop` waits for every vCPU thread to leave KVM_RUN and end.
pub const VCPU_JOIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between two kicks of a vCPU that has not stopped yet (a kick sent just before the
/// thread enters KVM_RUN is lost, so kicks repeat).
const VCPU_KICK_INTERVAL: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot start a vCPU thread: the host is out of threads or memory")]
    Spawn(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error(
        "{0} vCPU thread(s) did not stop within {VCPU_JOIN_TIMEOUT:?}; they were left detached"
    )]
    JoinTimeout(usize),
}

/// The first reason a guest ended, with an eventfd the main thread waits on.
pub struct ExitSignal {
    reason: Mutex<Option<GuestExit>>,
    stop_requested: AtomicBool,
    pub evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            stop_requested: AtomicBool::new(false),
            evt: EventFd::new(0)?,
        })
    }

    /// The host wants the machine stopped (no guest exit): wakes the waiter.
    pub fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        // Fails only when the counter is saturated, i.e. the waiter is already woken.
        let _ = self.evt.write(1);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Records `exit` unless an earlier one was recorded, and wakes the waiter.
    pub fn set(&self, exit: GuestExit) {
        let mut reason = crate::devices::lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
        }
        // An eventfd write fails only when the counter would overflow: it is then already set.
        let _ = self.evt.write(1);
    }

    pub fn take(&self) -> Option<GuestExit> {
        crate::devices::lock(&self.reason).take()
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), noop_handler).map_err(VcpuError::Signal);
    });
    result
}

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuShared {
    pub pio: Arc<PortIo>,
    pub mmio: MmioBus,
    pub exit: Arc<ExitSignal>,
    pub stop: Arc<AtomicBool>,
}

/// Runs `vcpu` until the guest ends or `stop` is set.
fn run_vcpu(mut vcpu: VcpuFd, index: u8, shared: VcpuShared) {
    let verdict = |exit: GuestExit| {
        if shared.pio.panicked.load(Ordering::SeqCst) && !matches!(exit, GuestExit::PowerOff) {
            GuestExit::Panic
        } else {
            exit
        }
    };
    while !shared.stop.load(Ordering::SeqCst) {
        let ended = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                shared.pio.read(port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => shared.pio.write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio.write(addr, data);
                None
            }
            // Only reachable without the in-kernel LAPIC, kept for completeness: a halted boot
            // CPU with nothing to wake it is a powered-off machine.
            Ok(VcpuExit::Hlt) => Some(GuestExit::PowerOff),
            Ok(VcpuExit::Shutdown) => Some(verdict(GuestExit::Crash(format!(
                "vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN)"
            )))),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => verdict(GuestExit::Reset),
                KVM_SYSTEM_EVENT_CRASH => GuestExit::Panic,
                other => GuestExit::Crash(format!("vCPU {index}: system event {other}")),
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(GuestExit::Crash(format!(
                "vCPU {index}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => Some(verdict(GuestExit::Crash(format!(
                "vCPU {index}: KVM internal error (instruction emulation failed)"
            )))),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(other) => Some(GuestExit::Crash(format!(
                "vCPU {index}: unhandled exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(GuestExit::Crash(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        };
        if let Some(exit) = ended {
            let exit = match exit {
                GuestExit::Crash(reason) => GuestExit::Crash(with_registers(&vcpu, reason)),
                other => other,
            };
            shared.exit.set(exit);
            shared.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// Appends where the vCPU was to a crash reason (what a developer needs first).
fn with_registers(vcpu: &VcpuFd, reason: String) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(regs), Ok(sregs)) => format!(
            "{reason} at rip {:#x} rsp {:#x} (cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x})",
            regs.rip, regs.rsp, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer
        ),
        _ => reason,
    }
}

/// The running vCPU threads. Dropping them stops and joins them (errors are then only logged).
pub struct VcpuHandles {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl VcpuHandles {
    /// Starts one thread per vCPU.
    pub fn start(vcpus: Vec<VcpuFd>, shared: VcpuShared) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let stop = shared.stop.clone();
        let mut handles = Self {
            threads: Vec::new(),
            stop,
        };
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let exit = shared.exit.clone();
                    let stop = shared.stop.clone();
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_vcpu(vcpu, index as u8, shared)
                    }));
                    if ran.is_err() {
                        // Without this the main thread would wait forever for an exit.
                        exit.set(GuestExit::Crash(format!(
                            "vCPU {index}: VMM thread panicked"
                        )));
                        stop.store(true, Ordering::SeqCst);
                    }
                })
                .map_err(VcpuError::Spawn)?;
            handles.threads.push(thread);
        }
        Ok(handles)
    }

    /// Asks every vCPU to stop, kicks it out of KVM_RUN, and joins it within
    /// [`VCPU_JOIN_TIMEOUT`]. Threads still running after that are detached and counted.
    pub fn stop(mut self) -> Result<(), VcpuError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), VcpuError> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + VCPU_JOIN_TIMEOUT;
        while Instant::now() < deadline && self.threads.iter().any(|t| !t.is_finished()) {
            for thread in self.threads.iter().filter(|t| !t.is_finished()) {
                // The thread may end between the check and the kill: the error is harmless.
                let _ = thread.kill(kick_signal());
            }
            std::thread::sleep(VCPU_KICK_INTERVAL);
        }
        let (finished, stuck): (Vec<_>, Vec<_>) =
            self.threads.drain(..).partition(|t| t.is_finished());
        for thread in finished {
            // A vCPU thread that panicked has already reported nothing: the exit stays unset
            // and the caller sees a crash.
            let _ = thread.join();
        }
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(VcpuError::JoinTimeout(stuck.len()))
        }
    }
}

impl Drop for VcpuHandles {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("bottle-vmm: {e}");
        }
    }
}
