//! virtio-vsock packets: the 44-byte little-endian header and the descriptor chains carrying it.
//!
//! Everything here parses guest-controlled memory: every length is bounded, every failure is a
//! [`PacketError`], nothing panics (see the proptest fuzz tests below).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

pub const HEADER_BYTES: usize = 44;
/// Largest payload we accept from or send to the guest in one packet (Linux uses at most 64 KiB).
pub const MAX_PACKET_DATA_BYTES: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain shorter than a vsock header ({0} bytes)")]
    ShortHeader(usize),
    #[error("packet larger than {MAX_PACKET_DATA_BYTES} bytes of data")]
    TooLarge,
    #[error("header says {header} bytes of data, the chain carries {chain}")]
    LengthMismatch { header: u32, chain: usize },
    #[error("descriptor points outside guest memory")]
    BadDescriptor,
    #[error("receive buffer of {0} bytes cannot hold a vsock header")]
    RxBufferTooSmall(usize),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        let b = bytes
            .get(..HEADER_BYTES)
            .ok_or(PacketError::ShortHeader(bytes.len()))?;
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Ok(Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A header and its payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    pub hdr: Header,
    pub data: Vec<u8>,
}

impl Packet {
    /// Parses the bytes a guest placed in a TX chain: a header, then exactly `len` bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        let hdr = Header::parse(bytes)?;
        let data = &bytes[HEADER_BYTES..];
        if data.len() > MAX_PACKET_DATA_BYTES || hdr.len as usize > MAX_PACKET_DATA_BYTES {
            return Err(PacketError::TooLarge);
        }
        if hdr.len as usize != data.len() {
            return Err(PacketError::LengthMismatch {
                header: hdr.len,
                chain: data.len(),
            });
        }
        Ok(Self {
            hdr,
            data: data.to_vec(),
        })
    }

    /// Header bytes followed by the payload, `len` set from the payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut hdr = self.hdr;
        hdr.len = self.data.len() as u32;
        let mut out = hdr.to_bytes().to_vec();
        out.extend_from_slice(&self.data);
        out
    }
}

/// Gathers the driver-readable bytes of a TX chain, refusing chains over the packet bound.
pub fn read_chain(
    mem: &GuestMemoryMmap,
    descriptors: impl Iterator<Item = Descriptor>,
) -> Result<Vec<u8>, PacketError> {
    let mut bytes = Vec::new();
    for desc in descriptors.filter(|d| !d.is_write_only()) {
        let len = desc.len() as usize;
        if bytes.len() + len > HEADER_BYTES + MAX_PACKET_DATA_BYTES {
            return Err(PacketError::TooLarge);
        }
        let start = bytes.len();
        bytes.resize(start + len, 0);
        mem.read_slice(&mut bytes[start..], desc.addr())
            .map_err(|_| PacketError::BadDescriptor)?;
    }
    Ok(bytes)
}

/// Total device-writable space of an RX chain (bounded to what one packet can use).
pub fn writable_capacity(descriptors: &[Descriptor]) -> usize {
    descriptors
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| d.len() as usize)
        .fold(0usize, |sum, len| sum.saturating_add(len))
        .min(HEADER_BYTES + MAX_PACKET_DATA_BYTES)
}

/// Writes `bytes` across the writable descriptors of an RX chain; returns the bytes written.
pub fn write_chain(
    mem: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    bytes: &[u8],
) -> Result<usize, PacketError> {
    let mut written = 0;
    for desc in descriptors.iter().filter(|d| d.is_write_only()) {
        if written == bytes.len() {
            break;
        }
        let take = (desc.len() as usize).min(bytes.len() - written);
        mem.write_slice(&bytes[written..written + take], desc.addr())
            .map_err(|_| PacketError::BadDescriptor)?;
        written += take;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_header_round_trips() {
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1,
            dst_port: 2,
            len: 0,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 9,
            fwd_cnt: 7,
        };
        assert_eq!(Header::parse(&hdr.to_bytes()), Ok(hdr));
    }

    #[test]
    fn test_packet_with_wrong_length_is_refused() {
        let mut bytes = Header {
            len: 10,
            ..Default::default()
        }
        .to_bytes()
        .to_vec();
        bytes.extend_from_slice(b"abc");
        assert_eq!(
            Packet::parse(&bytes),
            Err(PacketError::LengthMismatch {
                header: 10,
                chain: 3
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// Arbitrary guest bytes never panic the parser, and whatever parses re-serialises to
        /// the same bytes.
        #[test]
        fn fuzz_packet_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(packet) = Packet::parse(&bytes) {
                prop_assert_eq!(packet.to_bytes(), bytes);
            }
        }

        #[test]
        fn fuzz_header_round_trips(src_cid: u64, dst_cid: u64, src_port: u32, dst_port: u32, type_: u16, op: u16, flags: u32, buf_alloc: u32, fwd_cnt: u32) {
            let hdr = Header { src_cid, dst_cid, src_port, dst_port, len: 0, type_, op, flags, buf_alloc, fwd_cnt };
            prop_assert_eq!(Header::parse(&hdr.to_bytes()), Ok(hdr));
        }
    }
}
