//! Building a machine from a [`VmmConfig`] in the order rust-vmm's reference VMM uses: KVM,
//! memory, VM (TSS, irqchip, PIT), kernel and boot structures, devices, vCPUs; then running it.
//! Guest memory is created before the VM and the VM is always dropped first (on an early
//! return from [`Vmm::build`] and through [`Vmm`]'s field order), so KVM never holds a slot on
//! memory that is already unmapped.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::config::{ConfigError, VmmConfig};
use crate::devices::legacy::PortIo;
use crate::devices::serial::{ConsoleWriter, EventFdTrigger, SerialError};
use crate::devices::MmioBus;
use crate::event_loop::{EventLoop, EventLoopError};
use crate::virtio::block::{Block, BlockError, BlockStats};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::vsock::{Vsock, VsockError, VsockStats};
use crate::virtio::VirtioDevice;
use crate::vstate::cpu::{self, CpuError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{ExitSignal, VcpuError, VcpuHandles, VcpuShared};
use crate::GuestExit;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: load kvm-intel or kvm-amd, and make sure this user may read and write /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("cannot create a VM (KVM_CREATE_VM): check the host's KVM limits")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot set up {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register guest memory with KVM")]
    MemoryRegion(#[source] kvm_ioctls::Error),
    #[error("cannot create an eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
}

/// Everything that can stop a machine from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VMM configuration")]
    Config(#[from] ConfigError),
    #[error("KVM setup failed")]
    Kvm(#[from] KvmError),
    #[error("guest memory setup failed")]
    Memory(#[from] MemoryError),
    #[error("booting the guest kernel failed")]
    Boot(#[from] BootError),
    #[error("writing the MP table failed")]
    Mptable(#[from] MptableError),
    #[error("vCPU setup failed")]
    Cpu(#[from] CpuError),
    #[error("vCPU threads failed")]
    Vcpu(#[from] VcpuError),
    #[error("serial console setup failed")]
    Serial(#[from] SerialError),
    #[error("vsock device setup failed")]
    Vsock(#[from] VsockError),
    #[error("disk setup failed")]
    Block(#[from] BlockError),
    #[error("device event loop failed")]
    EventLoop(#[from] EventLoopError),
    #[error("too many virtio devices: at most {} fit the IRQ range", LAST_IRQ - FIRST_DEVICE_IRQ + 1)]
    TooManyDevices,
    #[error("the VMM was asked to stop (signal or stop handle) before the guest ended")]
    Stopped,
    #[error("cannot install the VMM's stop signal handlers")]
    StopSignals(#[source] vmm_sys_util::errno::Error),
}

fn setup(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Setup { what, source }
}

/// A machine, built and not yet started.
///
/// Field order is drop order: the VM and its vCPU fds (which keep the kernel's VM alive) go
/// before `mem`, the guest RAM they map, so KVM never holds a slot on unmapped memory. Keep
/// `vm` and `vcpus` above `mem`. (The devices hold clones of `mem`, which keep the mappings
/// alive too; `run` drops `vm` explicitly once the vCPUs are joined.)
pub struct Vmm {
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    mem: GuestMemoryMmap,
    mmio: MmioBus,
    pio: Arc<PortIo>,
    event_loop: EventLoop,
    cmdline: linux_loader::cmdline::Cmdline,
    next_irq: u32,
    next_mmio_base: u64,
    vsock_stats: Option<Arc<Mutex<VsockStats>>>,
    block_stats: Vec<Arc<Mutex<BlockStats>>>,
    exit: Arc<ExitSignal>,
}

/// Stops a running (or about to run) machine from another thread: `Vmm::run` then returns
/// `Err(VmmError::Stopped)` after stopping the vCPUs and devices.
#[derive(Clone)]
pub struct StopHandle(Arc<ExitSignal>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.request_stop();
    }
}

/// The exit eventfd of the machine running in this process, for the signal handler
/// (-1: none). One machine per process is the child-process model.
static SIGNAL_EXIT_FD: AtomicI32 = AtomicI32::new(-1);
/// Set by the signal handler; read by `run`.
static SIGNAL_STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL_STOP_REQUESTED.store(true, Ordering::SeqCst);
    let fd = SIGNAL_EXIT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a live 8-byte value and `fd` is the
        // exit eventfd, which `run` keeps open while it is published here.
        unsafe { libc::write(fd, (&one as *const u64).cast(), std::mem::size_of::<u64>()) };
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP stop the machine cleanly (vCPUs joined, sockets removed):
/// `run` returns `Err(VmmError::Stopped)`. For the child process (`child_main` calls it).
pub fn install_stop_signals() -> Result<(), VmmError> {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(signal, on_stop_signal)
            .map_err(VmmError::StopSignals)?;
    }
    Ok(())
}

impl Vmm {
    /// Builds the machine: validated config, KVM, memory, irqchip, PIT, kernel, devices, vCPUs.
    pub fn build(config: &VmmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let kvm = Kvm::new().map_err(KvmError::OpenKvm)?;
        // Memory before the VM that maps it: locals drop in reverse order, so an early return
        // below closes the VM (and the slots registered in it) before unmapping its memory.
        let mem = memory::create_guest_memory(config.mem_mib)?;
        let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(setup("the TSS (KVM_SET_TSS_ADDR)"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(setup("the identity map (KVM_SET_IDENTITY_MAP_ADDR)"))?;
        vm.create_irq_chip()
            .map_err(setup("the in-kernel irqchip (KVM_CREATE_IRQCHIP)"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(setup("the in-kernel PIT (KVM_CREATE_PIT2)"))?;

        // SAFETY: `mem` outlives `vm` here (created before it, so dropped after it on an early
        // return) and then moves into the returned `Vmm`, whose field order drops `vm` (and
        // the vCPUs) before `mem`: the mappings live as long as KVM may use them.
        unsafe { memory::register_regions(&vm, &mem) }.map_err(KvmError::MemoryRegion)?;

        let panicked = Arc::new(AtomicBool::new(false));
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        vm.register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(setup("the serial IRQ (KVM_IRQFD)"))?;
        let writer = ConsoleWriter::new(&config.serial, panicked.clone())?;
        let serial = vm_superio::Serial::new(EventFdTrigger(serial_evt), writer);
        let pio = Arc::new(PortIo::new(Arc::new(Mutex::new(serial)), panicked));

        let mut vmm = Self {
            vm,
            vcpus: Vec::new(),
            mem,
            mmio: MmioBus::default(),
            pio,
            event_loop: EventLoop::new()?,
            cmdline: boot::build_cmdline(&config.cmdline)?,
            next_irq: FIRST_DEVICE_IRQ,
            next_mmio_base: MMIO_DEVICES_START,
            vsock_stats: None,
            block_stats: Vec::new(),
            exit: Arc::new(ExitSignal::new().map_err(|e| KvmError::EventFd("the exit signal", e))?),
        };
        if let Some(vsock) = &config.vsock {
            let device = Vsock::new(vsock)?;
            vmm.vsock_stats = Some(device.stats());
            vmm.attach_virtio_device(Box::new(device))?;
        }
        for (index, disk) in config.disks.iter().enumerate() {
            let device = Block::new(disk, index)?;
            vmm.block_stats.push(device.stats());
            vmm.attach_virtio_device(Box::new(device))?;
        }

        let kernel = boot::load_kernel(&vmm.mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&vmm.mem, &kernel, path)?),
            None => None,
        };
        boot::write_boot_structures(&vmm.mem, &kernel, initrd, &vmm.cmdline)?;
        mptable::setup(&vmm.mem, config.vcpus)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("CPUID (KVM_GET_SUPPORTED_CPUID)"))?;
        for index in 0..config.vcpus {
            let vcpu = vmm
                .vm
                .create_vcpu(u64::from(index))
                .map_err(setup("a vCPU (KVM_CREATE_VCPU)"))?;
            let mut cpuid = supported.clone();
            cpu::normalize_cpuid(&mut cpuid, index, config.vcpus);
            cpu::set_cpuid(&vcpu, &cpuid)?;
            cpu::set_boot_msrs(&vcpu)?;
            cpu::setup_lapic(&vcpu)?;
            if index == 0 {
                cpu::setup_boot_vcpu(&vcpu, kernel.entry)?;
            } else {
                cpu::setup_fpu(&vcpu)?;
            }
            vmm.vcpus.push(vcpu);
        }
        Ok(vmm)
    }

    /// Puts a virtio device behind a virtio-mmio window with its own IRQ, wires its queue
    /// notifications (ioeventfd) and interrupt (irqfd), and announces it on the command line.
    /// Must run before the boot structures are written (the command line is final then).
    fn attach_virtio_device(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), VmmError> {
        if self.next_irq > LAST_IRQ {
            return Err(VmmError::TooManyDevices);
        }
        let (base, irq) = (self.next_mmio_base, self.next_irq);
        let transport = MmioTransport::new(device, self.mem.clone())
            .map_err(|e| KvmError::EventFd("a virtio device", e))?;
        self.vm
            .register_irqfd(transport.irq_evt(), irq)
            .map_err(setup("a virtio IRQ (KVM_IRQFD)"))?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            let addr =
                kvm_ioctls::IoEventAddress::Mmio(base + crate::virtio::mmio::QUEUE_NOTIFY_OFFSET);
            self.vm
                .register_ioevent(evt, &addr, queue as u32)
                .map_err(setup("a virtio queue notification (KVM_IOEVENTFD)"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.event_loop.add_device(transport.clone())?;
        self.mmio.insert(base, MMIO_DEVICE_SIZE, transport);
        self.cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, vm_memory::GuestAddress(base), irq, None)
            .map_err(BootError::Cmdline)?;
        self.next_irq += 1;
        self.next_mmio_base += MMIO_DEVICE_SIZE;
        Ok(())
    }

    /// Counters of the vsock device (malformed packets dropped, denied egress), readable while
    /// and after the machine runs. `None` without a vsock device.
    pub fn vsock_stats(&self) -> Option<Arc<Mutex<VsockStats>>> {
        self.vsock_stats.clone()
    }

    /// Counters of each disk, in `VmmConfig::disks` order.
    pub fn block_stats(&self) -> Vec<Arc<Mutex<BlockStats>>> {
        self.block_stats.clone()
    }

    /// A handle that stops this machine from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.exit.clone())
    }

    /// Starts the vCPUs and the device loop, blocks until the guest ends (or a stop is
    /// requested), stops everything.
    pub fn run(self) -> Result<GuestExit, VmmError> {
        let exit = self.exit.clone();
        SIGNAL_EXIT_FD.store(exit.evt.as_raw_fd(), Ordering::SeqCst);
        if SIGNAL_STOP_REQUESTED.load(Ordering::SeqCst) {
            exit.request_stop();
        }
        let event_loop = self.event_loop.start(exit.clone())?;
        let shared = VcpuShared {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exit: exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let handles = VcpuHandles::start(self.vcpus, shared)?;
        // Blocks until a vCPU records an exit or a stop is requested (an eventfd read without
        // O_NONBLOCK waits).
        let waited = exit.evt.read();
        let stopped = handles.stop();
        let loop_result = event_loop.stop();
        SIGNAL_EXIT_FD.store(-1, Ordering::SeqCst);
        waited.map_err(|e| KvmError::EventFd("the exit signal", e))?;
        stopped?;
        let stop_requested = exit.stop_requested() || SIGNAL_STOP_REQUESTED.load(Ordering::SeqCst);
        let guest_exit = match exit.take() {
            Some(guest_exit) => guest_exit,
            None if stop_requested => return Err(VmmError::Stopped),
            None => GuestExit::Crash("a vCPU thread ended without a reason".into()),
        };
        // A failed device loop has already turned the exit into a crash that names it.
        if !matches!(guest_exit, GuestExit::Crash(_)) {
            loop_result?;
        }
        drop(self.vm);
        Ok(guest_exit)
    }
}
