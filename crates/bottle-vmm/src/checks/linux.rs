//! Can this KVM run a Linux guest at all?
//!
//! Some KVMs accept every ioctl a VMM makes and run small guests, yet cannot boot Linux: a
//! nested KVM without hardware virtualisation (the `kvm_pvm` module, for one) emulates guest
//! kernel code instruction by instruction, and its emulator stops on instructions Linux runs in
//! its first milliseconds (`lock cmpxchg16b` in SLUB, `xrstor` in the FPU setup; see
//! shared/docs/FINDINGS.md). Booting the real kernel there fails only after the root image is
//! built and with a register dump. This check runs those instructions in a throwaway VM of a
//! few pages, in long mode as the kernel runs them, and names the first one KVM cannot run,
//! in a few milliseconds. Each step announces itself with a port write before it runs, so the
//! failing one is known on every vendor (see `STEP_PORT`).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::boot::{self, EntryPoint};
use crate::arch::x86_64::layout::HIMEM_START;
use crate::vstate::cpu;
use crate::vstate::memory;

/// Memory of the test VM: page tables and GDT below 1 MiB, code and data above.
const MEM_MIB: u32 = 2;
/// Where the test code starts.
const CODE_START: u64 = HIMEM_START;
/// The 16 bytes `cmpxchg16b` swaps (16-byte aligned, as it requires).
const CMPXCHG_DATA: u64 = HIMEM_START + 0x1000;
/// The XSAVE area (64-byte aligned, as it requires).
const XSAVE_AREA: u64 = HIMEM_START + 0x2000;
/// The values `cmpxchg16b` stores (rcx:rbx) when memory matches rdx:rax (zero).
const SWAP_LOW: u64 = 0x1111_2222_3333_4444;
const SWAP_HIGH: u64 = 0x5555_6666_7777_8888;
/// CPUID leaf 1, ECX: CMPXCHG16B and XSAVE support.
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// CR4.OSXSAVE: lets the guest use XSAVE/XRSTOR.
const CR4_OSXSAVE: u64 = 1 << 18;
/// A guest of a few instructions that takes longer than this is not running.
const TIMEOUT: Duration = Duration::from_secs(10);
/// KVM_RUN returns this many times at most: one port write per step, then `hlt`.
const MAX_EXITS: usize = 64;
/// The port each step is announced on before it runs: the POST-code port, where firmware
/// announces its boot steps the same way. The failing step is the last one announced, not
/// the one at RIP: on AMD, a shutdown exit (triple fault) resets the vCPU, so RIP reads the
/// reset vector by the time the VMM looks.
const STEP_PORT: u8 = 0x80;

/// One step of the test code: an instruction Linux runs early in boot, with its set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instruction {
    /// As the user will read it.
    pub name: &'static str,
    /// Machine code (64-bit mode), set-up included.
    pub code: &'static [u8],
    /// Runs only where the guest's CPUID announces it (Linux would not use it otherwise).
    pub needs_leaf1_ecx: u32,
}

/// `lock cmpxchg16b [rdi]`: SLUB's lockless freelists (rdi, rax..rdx set by [`run`]).
pub const CMPXCHG16B: Instruction = Instruction {
    name: "lock cmpxchg16b",
    code: &[0xf0, 0x48, 0x0f, 0xc7, 0x0f],
    needs_leaf1_ecx: LEAF1_ECX_CX16,
};
/// `mov eax, 1; xor edx, edx; xsave64 [rsi]`: the FPU state save (x87 component).
pub const XSAVE: Instruction = Instruction {
    name: "xsave64",
    code: &[
        0xb8, 0x01, 0x00, 0x00, 0x00, 0x31, 0xd2, 0x48, 0x0f, 0xae, 0x26,
    ],
    needs_leaf1_ecx: LEAF1_ECX_XSAVE,
};
/// `xrstor64 [rsi]`: the FPU state restore `fpu__init_system_xstate` runs.
pub const XRSTOR: Instruction = Instruction {
    name: "xrstor64",
    code: &[0x48, 0x0f, 0xae, 0x2e],
    needs_leaf1_ecx: LEAF1_ECX_XSAVE,
};
/// What a Linux boot needs, in the order the kernel reaches them.
pub const LINUX_BOOT: &[Instruction] = &[CMPXCHG16B, XSAVE, XRSTOR];

const HLT: u8 = 0xf4;

/// `mov r8, rax; mov al, STEP; out STEP_PORT, al; mov rax, r8`: announces step `STEP` and
/// leaves rax as the step expects it (r8 is used by no step).
fn announce(step: u8) -> [u8; 10] {
    [
        0x49, 0x89, 0xc0, 0xb0, step, 0xe6, STEP_PORT, 0x4c, 0x89, 0xc0,
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum LinuxCheckError {
    #[error("cannot set up the test VM on {path}: {what}")]
    Setup { path: PathBuf, what: String },
    #[error(
        "KVM at {path} cannot run a Linux guest: a test VM stopped on `{instruction}` ({how}), \
         an instruction Linux runs while booting. This KVM emulates guest kernel code instead \
         of running it on hardware virtualisation (nested virtualisation without VT-x/AMD-V, \
         such as the kvm_pvm module)"
    )]
    Unsupported {
        path: PathBuf,
        instruction: &'static str,
        how: String,
    },
    #[error("KVM at {path} ran `{instruction}` in a test VM but got the wrong result: it cannot be trusted with a Linux guest")]
    WrongResult {
        path: PathBuf,
        instruction: &'static str,
    },
    #[error("a test VM of a few instructions on {path} did not finish within {}s", TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
}

impl LinuxCheckError {
    /// What the user can do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            Self::Setup { .. } => "check `bot-bottle doctor`'s kvm line; or use --backend docker",
            _ => {
                "use the docker backend here (`--backend docker`, `BOT_BOTTLE_BACKEND=docker`, \
                 or `backend = \"docker\"` in the bottle's manifest), or run on a host that \
                 exposes VT-x/AMD-V to this machine"
            }
        }
    }
}

/// What ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxCheckReport {
    /// The instructions the guest's CPUID called for, all run correctly.
    pub ran: Vec<&'static str>,
}

/// Runs Linux's boot-critical instructions in a throwaway VM on the KVM at `path`.
pub fn check_linux_guest(path: &Path) -> Result<LinuxCheckReport, LinuxCheckError> {
    run(path, LINUX_BOOT)
}

/// Runs `steps` (those the CPUID announces) then `hlt` in a throwaway long-mode VM, in a
/// thread so that a KVM that never returns cannot hang the caller.
pub fn run(path: &Path, steps: &[Instruction]) -> Result<LinuxCheckReport, LinuxCheckError> {
    let (tx, rx) = mpsc::channel();
    let owned = path.to_path_buf();
    let steps = steps.to_vec();
    std::thread::Builder::new()
        .name("linux-check".into())
        .spawn(move || {
            let _ = tx.send(run_here(&owned, &steps));
        })
        .map_err(|e| LinuxCheckError::Setup {
            path: path.to_path_buf(),
            what: format!("cannot start a thread: {e}"),
        })?;
    rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
        Err(LinuxCheckError::Timeout {
            path: path.to_path_buf(),
        })
    })
}

fn run_here(path: &Path, steps: &[Instruction]) -> Result<LinuxCheckReport, LinuxCheckError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| LinuxCheckError::Setup {
        path: path.to_path_buf(),
        what: format!("{what}: {e}"),
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| setup("the KVM path", &e))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| setup("open", &e))?;
    // Declared before the VM so that it is dropped after it.
    let mem = memory::create_guest_memory(MEM_MIB).map_err(|e| setup("guest memory", &e))?;
    let vm = kvm.create_vm().map_err(|e| setup("KVM_CREATE_VM", &e))?;
    // SAFETY: `mem` outlives `vm` (declared before it, so dropped after it).
    unsafe { memory::register_regions(&vm, &mem) }
        .map_err(|e| setup("KVM_SET_USER_MEMORY_REGION", &e))?;
    let entry = EntryPoint::Linux64(GuestAddress(CODE_START));
    boot::write_long_mode_tables(&mem, entry).map_err(|e| setup("page tables", &e))?;

    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| setup("KVM_CREATE_VCPU", &e))?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| setup("KVM_GET_SUPPORTED_CPUID", &e))?;
    cpu::normalize_cpuid(&mut cpuid, 0, 1);
    let leaf1_ecx = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .map_or(0, |e| e.ecx);
    cpu::set_cpuid(&vcpu, &cpuid).map_err(|e| setup("CPUID", &e))?;
    cpu::setup_boot_vcpu(&vcpu, entry).map_err(|e| setup("registers", &e))?;

    // The code: each step the CPUID calls for, announced on STEP_PORT before it runs, then hlt.
    let to_run: Vec<Instruction> = steps
        .iter()
        .filter(|s| leaf1_ecx & s.needs_leaf1_ecx == s.needs_leaf1_ecx)
        .copied()
        .collect();
    if to_run.len() > usize::from(u8::MAX) {
        return Err(setup(
            "the test code",
            &"more steps than a port write can number",
        ));
    }
    let mut code = Vec::new();
    for (index, step) in to_run.iter().enumerate() {
        code.extend_from_slice(&announce(index as u8));
        code.extend_from_slice(step.code);
    }
    code.push(HLT);
    mem.write_slice(&code, GuestAddress(CODE_START))
        .map_err(|e| setup("the test code", &e))?;

    let mut sregs = vcpu.get_sregs().map_err(|e| setup("KVM_GET_SREGS", &e))?;
    if leaf1_ecx & LEAF1_ECX_XSAVE != 0 {
        sregs.cr4 |= CR4_OSXSAVE;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| setup("KVM_SET_SREGS", &e))?;
    let mut regs = vcpu.get_regs().map_err(|e| setup("KVM_GET_REGS", &e))?;
    regs.rdi = CMPXCHG_DATA;
    regs.rsi = XSAVE_AREA;
    regs.rax = 0;
    regs.rdx = 0;
    regs.rbx = SWAP_LOW;
    regs.rcx = SWAP_HIGH;
    vcpu.set_regs(&regs)
        .map_err(|e| setup("KVM_SET_REGS", &e))?;

    // The step that was running: the last one announced.
    let mut announced: Option<usize> = None;
    let step_name = |announced: Option<usize>| {
        announced
            .and_then(|i| to_run.get(i))
            .map_or("the test code's set-up", |step| step.name)
    };
    let unsupported = |instruction: &'static str, how: String| LinuxCheckError::Unsupported {
        path: path.to_path_buf(),
        instruction,
        how,
    };
    let mut vcpu = vcpu;
    for _ in 0..MAX_EXITS {
        let how = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == u16::from(STEP_PORT) && data.len() == 1 => {
                announced = Some(usize::from(data[0]));
                continue;
            }
            Ok(VcpuExit::Hlt) => {
                let ran: Vec<_> = to_run.iter().map(|s| s.name).collect();
                if ran.contains(&CMPXCHG16B.name) {
                    let low: u64 = mem.read_obj(GuestAddress(CMPXCHG_DATA)).unwrap_or(0);
                    let high: u64 = mem.read_obj(GuestAddress(CMPXCHG_DATA + 8)).unwrap_or(0);
                    if (low, high) != (SWAP_LOW, SWAP_HIGH) {
                        return Err(LinuxCheckError::WrongResult {
                            path: path.to_path_buf(),
                            instruction: CMPXCHG16B.name,
                        });
                    }
                }
                return Ok(LinuxCheckReport { ran });
            }
            Ok(VcpuExit::InternalError) => {
                "KVM internal error: instruction emulation failed".to_owned()
            }
            Ok(VcpuExit::Shutdown) => "the CPU faulted (KVM_EXIT_SHUTDOWN)".to_owned(),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                format!("KVM could not enter the guest (reason {reason:#x})")
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Ok(other) => format!("unexpected exit {other:?}"),
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        return Err(unsupported(step_name(announced), how));
    }
    Err(unsupported(
        step_name(announced),
        format!("still running after {MAX_EXITS} exits"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instructions_are_encoded_as_the_manuals_say() {
        // REX.W 0F C7 /1 with ModRM [rdi]; REX.W 0F AE /4 and /5 with ModRM [rsi].
        assert_eq!(CMPXCHG16B.code, [0xf0, 0x48, 0x0f, 0xc7, 0b00_001_111]);
        assert_eq!(&XSAVE.code[7..], [0x48, 0x0f, 0xae, 0b00_100_110]);
        assert_eq!(XRSTOR.code, [0x48, 0x0f, 0xae, 0b00_101_110]);
        assert_eq!(CMPXCHG_DATA % 16, 0);
        assert_eq!(XSAVE_AREA % 64, 0);
    }

    #[test]
    fn the_step_announcement_is_an_out_to_the_step_port_that_keeps_rax() {
        // REX.W+B 89 /r mov r8, rax; B0 ib mov al, imm8; E6 ib out imm8, al; REX.W+R 89 /r.
        let code = announce(7);
        assert_eq!(
            (&code[..3], &code[3..5], &code[5..7], &code[7..]),
            (
                &[0x49, 0x89, 0b11_000_000][..],
                &[0xb0, 7][..],
                &[0xe6, STEP_PORT][..],
                &[0x4c, 0x89, 0b11_000_000][..]
            )
        );
    }

    #[test]
    fn a_missing_kvm_is_a_setup_error_naming_the_path() {
        let err = check_linux_guest(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, LinuxCheckError::Setup { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/kvm"), "{err}");
    }
}
