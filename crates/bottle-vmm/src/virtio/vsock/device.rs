//! The virtio-vsock device (device id 19): three queues (RX, TX, event), the guest CID in its
//! configuration space, and a [`Muxer`] that owns every host-side socket and the allowlist.

use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::{Muxer, MuxerError, MuxerStats};
use super::packet::{self, Packet, HEADER_BYTES};
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

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use crate::config::AllowRule;
    use crate::virtio::mmio::*;
    use crate::virtio::testing::*;
    use crate::virtio::vsock::HOST_CID;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u32 = 9;
    const MEM_BYTES: usize = 16 << 20;
    const QUEUE_BASE: u64 = 0x10_0000;
    const BUFFERS: u64 = 0x20_0000;
    const QSIZE: u16 = 16;

    struct Rig {
        _dir: tempfile::TempDir,
        mem: GuestMemoryMmap,
        transport: MmioTransport,
        queues: Vec<TestQueue>,
        stats: Arc<Mutex<VsockStats>>,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let config = VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.path().join("v.sock"),
            allowlist: vec![AllowRule {
                addr: std::net::Ipv4Addr::LOCALHOST,
                port: 1,
            }],
            event_log: None,
        };
        let device = Vsock::new(&config).unwrap();
        let stats = device.stats();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
        let transport = MmioTransport::new(Box::new(device), mem.clone()).unwrap();
        let queues = (0..3)
            .map(|q| TestQueue::new(QUEUE_BASE + q * 0x1_0000, QSIZE))
            .collect();
        Rig {
            _dir: dir,
            mem,
            transport,
            queues,
            stats,
        }
    }

    fn active_rig() -> Rig {
        let mut rig = rig();
        let status = bring_up(&mut rig.transport, &rig.queues, 1);
        assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        for i in 0..QSIZE {
            rig.queues[0].set_desc(
                &rig.mem,
                i,
                BUFFERS + u64::from(i) * 0x1000,
                0x1000,
                DESC_F_WRITE,
                0,
            );
            rig.queues[0].publish(&rig.mem, i);
        }
        rig
    }

    fn send(rig: &mut Rig, bytes: &[u8]) {
        let addr = BUFFERS + 0x10_0000;
        rig.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        rig.queues[1].set_desc(&rig.mem, 0, addr, bytes.len() as u32, 0, 0);
        rig.queues[1].publish(&rig.mem, 0);
        rig.transport.device_mut().process_queue(TX_QUEUE);
    }

    fn received(rig: &Rig) -> Vec<Header> {
        (0..rig.queues[0].used_idx(&rig.mem))
            .map(|i| {
                let (id, _) = rig.queues[0].used_elem(&rig.mem, i);
                let mut bytes = [0u8; HEADER_BYTES];
                rig.mem
                    .read_slice(&mut bytes, GuestAddress(BUFFERS + u64::from(id) * 0x1000))
                    .unwrap();
                Header::parse(&bytes).unwrap()
            })
            .collect()
    }

    #[test]
    fn test_transport_identifies_a_vsock_device_with_its_guest_cid() {
        let mut rig = rig();
        let ids = (
            read_reg(&mut rig.transport, 0x000),
            read_reg(&mut rig.transport, 0x004),
            read_reg(&mut rig.transport, 0x008),
        );
        let cid = read_reg(&mut rig.transport, 0x100);
        assert_eq!((ids, cid), ((0x7472_6976, 2, VIRTIO_ID_VSOCK), GUEST_CID));
    }

    #[test]
    fn test_driver_without_version_1_is_refused_features_ok() {
        let mut rig = rig();
        let status = bring_up(&mut rig.transport, &[], 0);
        assert_eq!(status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK), 0);
    }

    #[test]
    fn test_queue_outside_guest_memory_fails_the_device() {
        let mut rig = rig();
        let queues = vec![TestQueue::new(MEM_BYTES as u64 + 0x1000, QSIZE)];
        let status = bring_up(&mut rig.transport, &queues, 1);
        assert_eq!(
            (status & STATUS_DRIVER_OK, status & STATUS_FAILED),
            (0, STATUS_FAILED)
        );
    }

    #[test]
    fn test_request_for_an_unknown_port_through_the_queues_is_answered_with_rst() {
        let mut rig = active_rig();
        let hdr = Header {
            src_cid: u64::from(GUEST_CID),
            dst_cid: HOST_CID,
            src_port: 77,
            dst_port: 22,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            ..Default::default()
        };
        send(&mut rig, &hdr.to_bytes());
        let replies = received(&rig);
        assert_eq!(
            replies
                .iter()
                .map(|h| (h.op, h.dst_port, h.dst_cid))
                .collect::<Vec<_>>(),
            vec![(OP_RST, 77, u64::from(GUEST_CID))]
        );
        assert_eq!(rig.queues[1].used_idx(&rig.mem), 1);
    }

    #[test]
    fn test_tx_chain_shorter_than_a_header_is_dropped_and_counted() {
        let mut rig = active_rig();
        send(&mut rig, &[1, 2, 3]);
        assert_eq!(
            (
                rig.stats.lock().unwrap().malformed_descriptors,
                rig.queues[1].used_idx(&rig.mem)
            ),
            (1, 1)
        );
    }

    #[test]
    fn test_writing_zero_to_status_resets_the_device() {
        let mut rig = active_rig();
        write_reg(&mut rig.transport, 0x070, 0);
        assert_eq!(
            (
                read_reg(&mut rig.transport, 0x070),
                rig.transport.is_activated()
            ),
            (0, false)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        /// Arbitrary descriptor tables and avail rings on the TX queue (loops, bad addresses,
        /// huge lengths, write-only flags, out-of-range heads): the device never panics and
        /// never returns more chains than the driver published.
        #[test]
        fn fuzz_tx_queue_with_arbitrary_descriptors(
            descs in proptest::collection::vec((any::<u64>(), any::<u32>(), 0u16..8, 0u16..20), QSIZE as usize),
            heads in proptest::collection::vec(0u16..20, 0..24),
            small_addrs: bool,
        ) {
            let mut rig = active_rig();
            for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
                let addr = if small_addrs { addr % (MEM_BYTES as u64 + 0x1000) } else { addr };
                let len = if small_addrs { len % 0x2_0000 } else { len };
                rig.queues[1].set_desc(&rig.mem, i as u16, addr, len, flags, next);
            }
            for head in &heads {
                rig.queues[1].publish(&rig.mem, *head);
            }
            rig.transport.device_mut().process_queue(TX_QUEUE);
            let used = rig.queues[1].used_idx(&rig.mem);
            prop_assert!(usize::from(used) <= heads.len());
        }
    }
}
