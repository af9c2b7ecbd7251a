//! virtio-mmio transport, version 2 ("modern"), as in the virtio 1.1 specification §4.2.2.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::MmioDevice;
use crate::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

const MMIO_MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION_2: u32 = 2;
/// Vendor id we report (virtio leaves it free; "BOTL").
const VENDOR_ID: u32 = 0x4c54_4f42;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of QueueNotify, where KVM ioeventfds catch the driver's notifications.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// One device behind one MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    /// Accesses the transport refused (bad width, read-only registers, bad state): counted,
    /// never fatal.
    pub rejected_accesses: u64,
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|max| Queue::new(*max).expect("queue sizes are nonzero powers of two"))
        .collect()
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> std::io::Result<Self> {
        let queues = fresh_queues(device.as_ref());
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new()?),
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            rejected_accesses: 0,
        })
    }

    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.evt()
    }

    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the driver is running.
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.queues = fresh_queues(self.device.as_ref());
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.acknowledge(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                // The driver reads Status back and sees FEATURES_OK missing (spec §3.1.1).
                value &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && !self.activated {
            let ready = value & STATUS_FEATURES_OK != 0
                && self
                    .queues
                    .iter()
                    .all(|q| !q.ready() || q.is_valid(&self.mem));
            if !ready {
                value = (value & !STATUS_DRIVER_OK) | STATUS_FAILED;
                self.rejected_accesses += 1;
            } else {
                let queues =
                    std::mem::replace(&mut self.queues, fresh_queues(self.device.as_ref()));
                self.device
                    .activate(self.mem.clone(), queues, self.interrupt.clone());
                self.activated = true;
            }
        }
        self.status = value;
    }
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *value = (*value & !0xffff_ffff) | u64::from(half);
    }
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            self.rejected_accesses += 1;
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION_2,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => {
                self.rejected_accesses += 1;
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET || data.len() != 4 {
            // The vsock configuration space is read-only; other widths are not allowed.
            self.rejected_accesses += 1;
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_select {
                    0 => set_half(&mut self.driver_features, false, value),
                    1 => set_half(&mut self.driver_features, true, value),
                    _ => self.rejected_accesses += 1,
                }
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM => match (self.selected_queue(), u16::try_from(value)) {
                (Some(queue), Ok(size)) => queue.set_size(size),
                _ => self.rejected_accesses += 1,
            },
            REG_QUEUE_READY => match self.selected_queue() {
                Some(queue) => queue.set_ready(value == 1),
                None => self.rejected_accesses += 1,
            },
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => {
                let high = offset & 0x4 != 0;
                let (low, high) = if high {
                    (None, Some(value))
                } else {
                    (Some(value), None)
                };
                match self.selected_queue() {
                    Some(queue) => match offset & !0x4 {
                        REG_QUEUE_DESC_LOW => queue.set_desc_table_address(low, high),
                        REG_QUEUE_AVAIL_LOW => queue.set_avail_ring_address(low, high),
                        _ => queue.set_used_ring_address(low, high),
                    },
                    None => self.rejected_accesses += 1,
                }
            }
            QUEUE_NOTIFY_OFFSET => {
                // Normally caught by the ioeventfd before reaching us; forward it the same way.
                match self.queue_evts.get(value as usize) {
                    Some(evt) => {
                        let _ = evt.write(1);
                    }
                    None => self.rejected_accesses += 1,
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.set_status(value),
            _ => self.rejected_accesses += 1,
        }
    }
}
