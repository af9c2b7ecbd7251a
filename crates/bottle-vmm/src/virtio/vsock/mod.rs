//! virtio-vsock device (device id 19): three queues (RX, TX, event), the guest CID in its
//! configuration space, and a [`Muxer`] that owns every host-side socket and the allowlist.

pub mod muxer;
pub mod packet;

use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

pub use muxer::{
    DeniedEgress, DenyReason, Muxer, MuxerError, MuxerStats, EGRESS_VSOCK_PORT, HOST_CID,
};
use packet::{Packet, HEADER_BYTES};

use crate::config::VsockConfig;
use crate::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size per queue (the driver may use fewer).
const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock muxer setup failed")]
    Muxer(#[from] MuxerError),
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The vsock device. Its counters are shared so a caller can read them while it runs.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    stats: Arc<Mutex<VsockStats>>,
}

/// What the device refused or counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// TX chains that were not a well-formed packet (dropped).
    pub malformed_descriptors: u64,
    pub muxer: MuxerStats,
}

impl Vsock {
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        Ok(Self {
            guest_cid: u64::from(config.guest_cid),
            muxer: Muxer::new(config)?,
            active: None,
            stats: Arc::new(Mutex::new(VsockStats::default())),
        })
    }

    pub fn stats(&self) -> Arc<Mutex<VsockStats>> {
        self.stats.clone()
    }

    fn publish_stats(&self) {
        let mut stats = crate::devices::lock(&self.stats);
        stats.muxer = self.muxer.stats.clone();
    }

    /// Takes every TX chain, parses it and hands the packet to the muxer.
    fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut used_any = false;
        while let Some(chain) = active.queues[TX_QUEUE].pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let parsed = packet::read_chain(&active.mem, chain).and_then(|b| Packet::parse(&b));
            // add_used fails only for an out-of-range head, which pop_descriptor_chain excludes.
            let _ = active.queues[TX_QUEUE].add_used(&active.mem, head, 0);
            used_any = true;
            match parsed {
                Ok(pkt) => self.muxer.recv_from_guest(pkt),
                Err(_) => crate::devices::lock(&self.stats).malformed_descriptors += 1,
            }
        }
        if used_any {
            active.interrupt.signal_used_queue();
        }
        used_any
    }

    /// Fills RX chains with what the muxer has for the guest.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while self.muxer.has_pending() {
            let Some(chain) = active.queues[RX_QUEUE].pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.collect();
            let capacity = packet::writable_capacity(&descriptors);
            let written = match capacity.checked_sub(HEADER_BYTES) {
                Some(max_data) => match self.muxer.pop_to_guest(max_data) {
                    Some(pkt) => {
                        packet::write_chain(&active.mem, &descriptors, &pkt.to_bytes()).unwrap_or(0)
                    }
                    None => {
                        active.queues[RX_QUEUE].go_to_previous_position();
                        break;
                    }
                },
                None => {
                    // A buffer too small for a header: return it empty and count it.
                    crate::devices::lock(&self.stats).malformed_descriptors += 1;
                    0
                }
            };
            let _ = active.queues[RX_QUEUE].add_used(&active.mem, head, written as u32);
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used_queue();
        }
    }

    fn pump(&mut self) {
        self.process_tx();
        self.process_rx();
        self.publish_stats();
    }

    /// Runs the muxer's host side once (tests without the event loop use this).
    pub fn poll_host(&mut self, timeout_ms: i32) {
        self.muxer.process_host_events(timeout_ms);
        self.pump();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: Arc<Interrupt>) {
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        self.pump();
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn process_queue(&mut self, _index: usize) {
        self.pump();
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self) {
        self.muxer.process_host_events(0);
        self.pump();
    }
}
