//! Test support for the vsock muxer's, policy's and connection's unit tests: a [`Muxer`] on a
//! Unix socket and event log in a temporary directory, and the packets its guest sends.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;

use super::muxer::{Muxer, EGRESS_VSOCK_PORT, HOST_CID};
use super::packet::*;
use crate::config::{AllowRule, VsockConfig};

pub(super) const GUEST_CID: u32 = 7;

pub(super) struct Fixture {
    pub(super) _dir: tempfile::TempDir,
    pub(super) muxer: Muxer,
    pub(super) uds: PathBuf,
}

pub(super) fn fixture(allowlist: Vec<AllowRule>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let config = VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: uds.clone(),
        allowlist,
        event_log: Some(dir.path().join("events.jsonl")),
    };
    Fixture {
        muxer: Muxer::new(&config).unwrap(),
        _dir: dir,
        uds,
    }
}

pub(super) fn guest_pkt(src_port: u32, dst_port: u32, op: u16, data: &[u8]) -> Packet {
    Packet {
        hdr: Header {
            src_cid: u64::from(GUEST_CID),
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: data.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        },
        data: data.to_vec(),
    }
}

pub(super) fn drain(muxer: &mut Muxer) -> Vec<Packet> {
    std::iter::from_fn(|| muxer.pop_to_guest(4096)).collect()
}

pub(super) fn ops(packets: &[Packet]) -> Vec<u16> {
    packets.iter().map(|p| p.hdr.op).collect()
}

/// Opens an egress stream from guest port 5000 and sends its CONNECT line.
pub(super) fn egress(muxer: &mut Muxer, line: &str) -> Vec<Packet> {
    muxer.recv_from_guest(guest_pkt(5000, EGRESS_VSOCK_PORT, OP_REQUEST, &[]));
    muxer.recv_from_guest(guest_pkt(5000, EGRESS_VSOCK_PORT, OP_RW, line.as_bytes()));
    drain(muxer)
}

pub(super) fn rule(listener: &TcpListener) -> AllowRule {
    let addr = listener.local_addr().unwrap();
    AllowRule {
        addr: Ipv4Addr::LOCALHOST,
        port: addr.port(),
    }
}
