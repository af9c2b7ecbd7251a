//! A minimal split-virtqueue driver over plain guest memory, for device and transport tests
//! and benchmarks that run without KVM. It panics on misuse: it is test code, compiled only for
//! this crate's unit tests and with the `testing` feature (which its benches enable).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::MmioDevice;
use crate::virtio::mmio::*;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

pub struct TestQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_avail: u16,
}

impl TestQueue {
    pub fn new(base: u64, size: u16) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            next_avail: 0,
        }
    }

    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = self.desc + u64::from(i) * 16;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + u64::from(self.next_avail % self.size) * 2;
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write_obj(self.next_avail, GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (descriptor id, length) of used element `i`.
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let e = self.used + 4 + u64::from(i % self.size) * 8;
        (
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }
}

pub fn write_reg(transport: &mut MmioTransport, offset: u64, value: u32) {
    transport.write(offset, &value.to_le_bytes());
}

pub fn read_reg(transport: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    transport.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// Negotiates VERSION_1 and sets up `queues` the way a driver does; returns the final Status.
pub fn bring_up(
    transport: &mut MmioTransport,
    queues: &[TestQueue],
    driver_features_high: u32,
) -> u32 {
    write_reg(transport, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_reg(transport, 0x024, 1);
    write_reg(transport, 0x020, driver_features_high);
    write_reg(
        transport,
        0x070,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    for (index, queue) in queues.iter().enumerate() {
        write_reg(transport, 0x030, index as u32);
        write_reg(transport, 0x038, u32::from(queue.size));
        write_reg(transport, 0x080, queue.desc as u32);
        write_reg(transport, 0x084, (queue.desc >> 32) as u32);
        write_reg(transport, 0x090, queue.avail as u32);
        write_reg(transport, 0x094, (queue.avail >> 32) as u32);
        write_reg(transport, 0x0a0, queue.used as u32);
        write_reg(transport, 0x0a4, (queue.used >> 32) as u32);
        write_reg(transport, 0x044, 1);
    }
    let status = read_reg(transport, 0x070);
    write_reg(transport, 0x070, status | STATUS_DRIVER_OK);
    read_reg(transport, 0x070)
}
