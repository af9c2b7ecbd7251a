//! Virtio devices behind our virtio-mmio (version 2) transport: the transport ([`mmio`]), the
//! devices ([`block`], [`vsock`]), and what they share here: the [`VirtioDevice`] model and a
//! device's [`Interrupt`] line.

pub mod block;
pub mod mmio;
/// A simulated driver over plain memory, for tests and benchmarks (not for production use):
/// compiled for this crate's unit tests and with the `testing` feature.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vsock;

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit every modern (virtio 1.x) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `InterruptStatus` bit: a used buffer was added.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;

/// A device's interrupt line: the status register the driver reads and acknowledges, and the
/// eventfd registered as irqfd (raising the device's IRQ in the in-kernel IOAPIC).
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Tells the driver a used ring changed.
    pub fn signal_used_queue(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        // Fails only when the counter is saturated, i.e. an interrupt is already pending.
        let _ = self.evt.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn evt(&self) -> &EventFd {
        &self.evt
    }
}

/// A virtio device model, independent of transport and of KVM: its tests drive it over plain
/// guest memory.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    /// Reads the device configuration space (out-of-range bytes read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK: the device owns `queues` from now on.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: Arc<Interrupt>);
    /// The driver wrote 0 to Status: drop queues and any device state built on them.
    fn reset(&mut self);
    /// The driver notified queue `index` (through an ioeventfd).
    fn process_queue(&mut self, index: usize);
    /// A pollable fd for the device's own I/O (sockets), if it has any.
    fn backend_fd(&self) -> Option<RawFd>;
    /// `backend_fd` is readable.
    fn process_backend(&mut self);
}
