//! Devices the guest reaches through port I/O (serial, i8042, exit ports) and MMIO (virtio).

pub mod legacy;
pub mod serial;

use std::sync::{Arc, Mutex};

/// A device that answers MMIO accesses inside its window (`offset` is relative to its base).
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the vCPU threads and the device thread.
pub type SharedMmioDevice = Arc<Mutex<dyn MmioDevice>>;

/// The MMIO bus: non-overlapping windows, looked up by address on each exit.
#[derive(Clone, Default)]
pub struct MmioBus {
    windows: Vec<(u64, u64, SharedMmioDevice)>,
}

impl MmioBus {
    pub fn insert(&mut self, base: u64, len: u64, device: SharedMmioDevice) {
        self.windows.push((base, len, device));
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedMmioDevice)> {
        self.windows
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - *base < *len)
            .map(|(base, _, device)| (addr - base, device))
    }

    /// Reads fill `data` with zeroes where no device answers (like unbacked bus cycles).
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((offset, device)) = self.find(addr) {
            lock(device).read(offset, data);
        }
    }

    /// Writes to an address no device claims are ignored.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, device)) = self.find(addr) {
            lock(device).write(offset, data);
        }
    }
}

/// Locks a device, surviving a panic in another holder (the device state stays usable: each
/// device keeps its registers consistent between statements).
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
