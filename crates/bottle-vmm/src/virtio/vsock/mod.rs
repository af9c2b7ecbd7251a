//! virtio-vsock: the device (id 19: RX, TX and event queues, the guest CID in its configuration
//! space; [`device`]), the packets it carries ([`packet`]), and the host side every guest stream
//! ends in: the [`Muxer`] ([`muxer`]: host sockets, epoll, dialling) with the allow/deny
//! decisions and the denial log it enforces ([`policy`]) and each connection's state and credit
//! ([`connection`]).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod policy;
#[cfg(test)]
mod test_fixture;

pub use device::{Vsock, VsockError, VsockStats, VIRTIO_ID_VSOCK};
pub use muxer::{Muxer, MuxerError, MuxerStats, EGRESS_VSOCK_PORT, HOST_CID};
pub use policy::{DeniedEgress, DenyReason};
