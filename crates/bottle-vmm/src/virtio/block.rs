//! virtio-blk device (device id 2): one request queue, served synchronously from a host file on
//! the device thread. Reads, writes, flushes and `GET_ID`; a read-only disk advertises
//! `VIRTIO_BLK_F_RO` and fails writes. Malformed requests are answered with an error status (or
//! dropped when they carry no status byte) and counted, never a panic.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::config::DiskConfig;
use crate::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const SECTOR_BYTES: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Most data segments per request we announce (`VIRTIO_BLK_F_SEG_MAX`): the queue size minus
/// the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest request we serve; Linux stays far below (its default is 1280 sectors).
const MAX_REQUEST_BYTES: u64 = 16 << 20;
const REQUEST_HEADER_BYTES: usize = 16;
/// `GET_ID` answers with 20 bytes.
const ID_BYTES: usize = 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open the disk image {path}: check that it exists and this user may read it (and write it unless read_only)")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Counters a caller (and the tests) can read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub requests: u64,
    /// Requests with a broken layout (no header, no status byte, descriptors of the wrong
    /// direction, outside guest memory).
    pub malformed: u64,
    pub io_errors: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    active: Option<Active>,
    stats: Arc<Mutex<BlockStats>>,
}

enum Outcome {
    /// Status to write, and bytes written to the guest before it.
    Status(u8, u32),
    /// Not even a status byte to answer in.
    Dropped,
}

impl Block {
    /// Opens the disk; `index` names it in `GET_ID` (`bottle-disk-<index>`).
    pub fn new(config: &DiskConfig, index: usize) -> Result<Self, BlockError> {
        let open_error = |source| BlockError::Open {
            path: config.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(open_error)?;
        let len = file.metadata().map_err(open_error)?.len();
        let mut id = [0u8; ID_BYTES];
        let name = format!("bottle-disk-{index}");
        for (slot, byte) in id.iter_mut().zip(name.bytes()) {
            *slot = byte;
        }
        Ok(Self {
            file,
            read_only: config.read_only,
            capacity_sectors: len / SECTOR_BYTES,
            id,
            active: None,
            stats: Arc::new(Mutex::new(BlockStats::default())),
        })
    }

    pub fn stats(&self) -> Arc<Mutex<BlockStats>> {
        self.stats.clone()
    }

    fn config_space(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_BYTES as u32).to_le_bytes());
        config
    }

    /// Serves one request chain.
    fn serve(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Outcome {
        let Some((status, rest)) = descs.split_last() else {
            return Outcome::Dropped;
        };
        if !status.is_write_only() || status.len() < 1 {
            return Outcome::Dropped;
        }
        let Some((header, data)) = rest.split_first() else {
            return Outcome::Status(VIRTIO_BLK_S_IOERR, 0);
        };
        let mut bytes = [0u8; REQUEST_HEADER_BYTES];
        if header.is_write_only()
            || (header.len() as usize) < REQUEST_HEADER_BYTES
            || mem.read_slice(&mut bytes, header.addr()).is_err()
        {
            return Outcome::Status(VIRTIO_BLK_S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&bytes[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let writing = kind == VIRTIO_BLK_T_OUT;
                let in_bounds = sector
                    .checked_mul(SECTOR_BYTES)
                    .and_then(|start| start.checked_add(total).map(|end| (start, end)))
                    .filter(|(_, end)| *end <= self.capacity_sectors * SECTOR_BYTES);
                let wrong_direction = data.iter().any(|d| d.is_write_only() == writing);
                match in_bounds {
                    _ if wrong_direction || total > MAX_REQUEST_BYTES => {
                        Outcome::Status(VIRTIO_BLK_S_IOERR, 0)
                    }
                    _ if writing && self.read_only => Outcome::Status(VIRTIO_BLK_S_IOERR, 0),
                    None => Outcome::Status(VIRTIO_BLK_S_IOERR, 0),
                    Some((start, _)) => self.transfer(mem, data, start, writing),
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.read_only || self.file.sync_data().is_ok() {
                true => Outcome::Status(VIRTIO_BLK_S_OK, 0),
                false => Outcome::Status(VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() && d.len() as usize >= ID_BYTES => {
                    match mem.write_slice(&self.id, d.addr()) {
                        Ok(()) => Outcome::Status(VIRTIO_BLK_S_OK, ID_BYTES as u32),
                        Err(_) => Outcome::Status(VIRTIO_BLK_S_IOERR, 0),
                    }
                }
                _ => Outcome::Status(VIRTIO_BLK_S_IOERR, 0),
            },
            _ => Outcome::Status(VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        data: &[Descriptor],
        start: u64,
        writing: bool,
    ) -> Outcome {
        let mut offset = start;
        let mut written_to_guest = 0u32;
        for desc in data {
            let mut buf = vec![0u8; desc.len() as usize];
            let ok = if writing {
                mem.read_slice(&mut buf, desc.addr()).is_ok()
                    && self.file.write_all_at(&buf, offset).is_ok()
            } else {
                let ok = self.file.read_exact_at(&mut buf, offset).is_ok()
                    && mem.write_slice(&buf, desc.addr()).is_ok();
                written_to_guest += desc.len();
                ok
            };
            if !ok {
                return Outcome::Status(VIRTIO_BLK_S_IOERR, 0);
            }
            offset += u64::from(desc.len());
        }
        Outcome::Status(VIRTIO_BLK_S_OK, written_to_guest)
    }

    fn process_requests(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let outcome = self.serve_counted(&active.mem, &descs);
            let used_len = match outcome {
                Outcome::Status(status, written) => {
                    let status_desc = descs[descs.len() - 1];
                    match active.mem.write_obj(status, status_desc.addr()) {
                        Ok(()) => written + 1,
                        Err(_) => written,
                    }
                }
                Outcome::Dropped => 0,
            };
            // add_used fails only for an out-of-range head, which pop_descriptor_chain excludes.
            let _ = active.queue.add_used(&active.mem, head, used_len);
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used_queue();
        }
        self.active = Some(active);
    }

    fn serve_counted(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Outcome {
        let outcome = self.serve(mem, descs);
        let mut stats = crate::devices::lock(&self.stats);
        stats.requests += 1;
        match outcome {
            Outcome::Dropped => stats.malformed += 1,
            Outcome::Status(VIRTIO_BLK_S_IOERR, _) => stats.io_errors += 1,
            Outcome::Status(..) => {}
        }
        outcome
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let read_only = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | read_only
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
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
        if let Some(queue) = queues.into_iter().next() {
            self.active = Some(Active {
                mem,
                queue,
                interrupt,
            });
            self.process_requests();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, _index: usize) {
        self.process_requests();
    }

    fn backend_fd(&self) -> Option<RawFd> {
        None
    }

    fn process_backend(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::testing::*;
    use proptest::prelude::*;
    use vm_memory::GuestAddress;

    const MEM_BYTES: usize = 8 << 20;
    const HEADER: u64 = 0x20_0000;
    const DATA: u64 = 0x30_0000;
    const STATUS: u64 = 0x40_0000;
    const DISK_SECTORS: u64 = 8;

    struct Rig {
        _disk: tempfile::NamedTempFile,
        mem: GuestMemoryMmap,
        transport: MmioTransport,
        queue: TestQueue,
        stats: Arc<Mutex<BlockStats>>,
    }

    fn disk_bytes() -> Vec<u8> {
        (0..DISK_SECTORS * SECTOR_BYTES)
            .map(|i| (i % 251) as u8)
            .collect()
    }

    fn rig(read_only: bool) -> Rig {
        let disk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(disk.path(), disk_bytes()).unwrap();
        let device = Block::new(
            &DiskConfig {
                path: disk.path().into(),
                read_only,
            },
            0,
        )
        .unwrap();
        let stats = device.stats();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
        let mut transport = MmioTransport::new(Box::new(device), mem.clone()).unwrap();
        let queue = TestQueue::new(0x10_0000, 16);
        let status = bring_up(&mut transport, std::slice::from_ref(&queue), 1);
        assert_eq!(
            status & crate::virtio::mmio::STATUS_DRIVER_OK,
            crate::virtio::mmio::STATUS_DRIVER_OK
        );
        Rig {
            _disk: disk,
            mem,
            transport,
            queue,
            stats,
        }
    }

    /// Submits header + one data buffer + status; returns (status byte, used length).
    fn request(
        rig: &mut Rig,
        kind: u32,
        sector: u64,
        data_len: u32,
        data_writable: bool,
    ) -> (u8, u32) {
        rig.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        rig.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
        rig.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let data_flags = DESC_F_NEXT | if data_writable { DESC_F_WRITE } else { 0 };
        rig.queue.set_desc(&rig.mem, 0, HEADER, 16, DESC_F_NEXT, 1);
        rig.queue
            .set_desc(&rig.mem, 1, DATA, data_len, data_flags, 2);
        rig.queue.set_desc(&rig.mem, 2, STATUS, 1, DESC_F_WRITE, 0);
        rig.queue.publish(&rig.mem, 0);
        rig.transport.device_mut().process_queue(0);
        let index = rig.queue.used_idx(&rig.mem) - 1;
        (
            rig.mem.read_obj(GuestAddress(STATUS)).unwrap(),
            rig.queue.used_elem(&rig.mem, index).1,
        )
    }

    fn guest_data(rig: &Rig, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        rig.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        buf
    }

    #[test]
    fn test_config_space_reports_capacity_in_sectors() {
        let mut rig = rig(true);
        let low = read_reg(&mut rig.transport, 0x100);
        assert_eq!(u64::from(low), DISK_SECTORS);
    }

    #[test]
    fn test_read_copies_the_sector_into_guest_memory() {
        let mut rig = rig(true);
        let result = request(&mut rig, VIRTIO_BLK_T_IN, 1, 512, true);
        assert_eq!(result, (VIRTIO_BLK_S_OK, 513));
        assert_eq!(guest_data(&rig, 512), disk_bytes()[512..1024].to_vec());
    }

    #[test]
    fn test_write_then_read_back_on_a_writable_disk() {
        let mut rig = rig(false);
        rig.mem
            .write_slice(&[0xabu8; 512], GuestAddress(DATA))
            .unwrap();
        let wrote = request(&mut rig, VIRTIO_BLK_T_OUT, 3, 512, false);
        rig.mem
            .write_slice(&[0u8; 512], GuestAddress(DATA))
            .unwrap();
        let read = request(&mut rig, VIRTIO_BLK_T_IN, 3, 512, true);
        assert_eq!(
            (wrote, read, guest_data(&rig, 512)),
            ((0, 1), (0, 513), vec![0xab; 512])
        );
    }

    #[test]
    fn test_write_to_a_read_only_disk_fails_and_leaves_the_file_alone() {
        let mut rig = rig(true);
        rig.mem
            .write_slice(&[0xabu8; 512], GuestAddress(DATA))
            .unwrap();
        let result = request(&mut rig, VIRTIO_BLK_T_OUT, 0, 512, false);
        assert_eq!(result.0, VIRTIO_BLK_S_IOERR);
        assert_eq!(std::fs::read(rig._disk.path()).unwrap(), disk_bytes());
    }

    #[test]
    fn test_read_past_the_end_of_the_disk_fails() {
        let mut rig = rig(true);
        assert_eq!(
            request(&mut rig, VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024, true).0,
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn test_read_with_a_huge_sector_number_fails_without_overflow() {
        let mut rig = rig(true);
        assert_eq!(
            request(&mut rig, VIRTIO_BLK_T_IN, u64::MAX, 512, true).0,
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn test_get_id_names_the_disk() {
        let mut rig = rig(true);
        let result = request(&mut rig, VIRTIO_BLK_T_GET_ID, 0, 20, true);
        assert_eq!(
            (result, &guest_data(&rig, 13)[..]),
            ((0, 21), &b"bottle-disk-0"[..])
        );
    }

    #[test]
    fn test_unknown_request_type_is_unsupported() {
        let mut rig = rig(true);
        assert_eq!(request(&mut rig, 99, 0, 512, true).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn test_chain_without_a_writable_status_byte_is_dropped_and_counted() {
        let mut rig = rig(true);
        rig.queue.set_desc(&rig.mem, 0, HEADER, 16, 0, 0);
        rig.queue.publish(&rig.mem, 0);
        rig.transport.device_mut().process_queue(0);
        let stats = rig.stats.lock().unwrap().clone();
        assert_eq!(
            (rig.queue.used_elem(&rig.mem, 0).1, stats.malformed),
            (0, 1)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        /// Arbitrary descriptor tables, request headers and heads: no panic, the disk file only
        /// changes on a writable disk, and no more chains come back than were published.
        #[test]
        fn fuzz_block_requests_with_arbitrary_descriptors(
            descs in proptest::collection::vec((0u64..(MEM_BYTES as u64 + 0x1000), 0u32..0x2_0000, 0u16..8, 0u16..20), 16),
            kind in 0u32..10,
            sector in prop_oneof![0u64..16, any::<u64>()],
            heads in proptest::collection::vec(0u16..20, 0..20),
        ) {
            let mut rig = rig(true);
            rig.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
            rig.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
            for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
                let addr = if i == 0 { HEADER } else { addr };
                rig.queue.set_desc(&rig.mem, i as u16, addr, len, flags, next);
            }
            for head in &heads {
                rig.queue.publish(&rig.mem, *head);
            }
            rig.transport.device_mut().process_queue(0);
            prop_assert!(usize::from(rig.queue.used_idx(&rig.mem)) <= heads.len());
            prop_assert_eq!(std::fs::read(rig._disk.path()).unwrap(), disk_bytes());
        }
    }
}
