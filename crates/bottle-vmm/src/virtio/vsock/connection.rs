//! One vsock connection: its state machine (waiting for the guest's `CONNECT` line, waiting for
//! the guest to accept a host client, established), its bounded buffers, and its share of
//! virtio-vsock's credit scheme (what the guest may still take from us, what we owe it as a
//! credit update). No sockets are read or written here: the [`Muxer`](super::Muxer) does that.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{MAX_PACKET_DATA_BYTES, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Per-connection receive buffer we advertise to the guest (and bound our buffering by).
pub const CONN_BUFFER_BYTES: u32 = 256 * 1024;
/// Send a credit update once this much was forwarded since the guest last heard from us.
const CREDIT_UPDATE_THRESHOLD_BYTES: u32 = CONN_BUFFER_BYTES / 4;

/// The host end of a connection: a TCP stream (egress) or a host client's Unix stream.
pub(super) enum HostStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HostStream {
    pub(super) fn fd(&self) -> RawFd {
        match self {
            HostStream::Tcp(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }
    pub(super) fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }
    pub(super) fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }
    pub(super) fn shutdown_write(&self) {
        // Already-closed sockets fail here; there is nothing left to do for them.
        let _ = match self {
            HostStream::Tcp(s) => s.shutdown(Shutdown::Write),
            HostStream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) enum ConnState {
    /// Guest-initiated, accepted at vsock level, waiting for the `CONNECT` line.
    AwaitRequest,
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

pub(super) struct Connection {
    pub(super) state: ConnState,
    pub(super) created: Instant,
    pub(super) stream: Option<HostStream>,
    pub(super) request_line: Vec<u8>,
    /// Guest → host bytes the host socket has not taken yet.
    pub(super) to_host: VecDeque<u8>,
    /// Host → guest bytes produced by the muxer itself (the `OK` line).
    pub(super) to_guest: VecDeque<u8>,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    pub(super) tx_cnt: Wrapping<u32>,
    /// Bytes forwarded from the guest to the host socket.
    pub(super) fwd_cnt: Wrapping<u32>,
    pub(super) last_fwd_cnt_sent: Wrapping<u32>,
    pub(super) host_readable: bool,
    pub(super) host_eof: bool,
    pub(super) shutdown_sent: bool,
    pub(super) guest_done_sending: bool,
    /// The guest closed its socket; we still owe the host what it wrote before.
    pub(super) guest_closed: bool,
    /// The host socket hung up and is no longer in the epoll set.
    pub(super) unwatched: bool,
}

impl Connection {
    pub(super) fn new(state: ConnState, stream: Option<HostStream>) -> Self {
        Self {
            state,
            created: Instant::now(),
            stream,
            request_line: Vec::new(),
            to_host: VecDeque::new(),
            to_guest: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            host_readable: false,
            host_eof: false,
            shutdown_sent: false,
            guest_done_sending: false,
            guest_closed: false,
            unwatched: false,
        }
    }

    /// Bytes the guest can still take: what it advertised, less what is in flight.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes the credit fields of a packet the guest sent on this connection.
    pub(super) fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Our `fwd_cnt` went out in a packet header: the guest is up to date.
    pub(super) fn mark_credit_sent(&mut self) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Enough was forwarded since the guest last heard our `fwd_cnt` to send it an update.
    pub(super) fn credit_update_due(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD_BYTES
    }

    /// Whether `len` more bytes from the guest break the protocol: they overrun the buffer we
    /// advertised (the guest ignored our credit), or came before the stream was open, or after
    /// the guest said it would not send any more.
    pub(super) fn guest_write_violates(&self, len: usize) -> bool {
        let buffered = self.to_host.len() + self.request_line.len();
        buffered + len > CONN_BUFFER_BYTES as usize
            || self.state == ConnState::Connecting
            || self.guest_done_sending
    }

    /// The guest's RESPONSE: a host-initiated connection is established. `false` in any other
    /// state (a protocol error).
    pub(super) fn guest_accepted(&mut self) -> bool {
        if self.state != ConnState::Connecting {
            return false;
        }
        self.state = ConnState::Established;
        true
    }

    /// The guest's SHUTDOWN with `flags`.
    pub(super) fn guest_shutdown(&mut self, flags: u32) {
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_done_sending = true;
        }
        if flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == (SHUTDOWN_SEND | SHUTDOWN_RCV) {
            // The guest closed its socket: deliver what it wrote, then confirm with RST
            // (the muxer's flush does both once the buffer is empty).
            self.guest_closed = true;
        }
    }

    /// Header mode: the `CONNECT` line (`request_bytes` long, newline included) was allowed
    /// and `stream` dialled. The line counts as forwarded, `OK <destination>\n` goes to the
    /// guest, and `rest` (what the guest wrote after the line) to the host.
    pub(super) fn open_egress(
        &mut self,
        stream: HostStream,
        request_bytes: usize,
        destination: SocketAddrV4,
        rest: &[u8],
    ) {
        self.stream = Some(stream);
        self.state = ConnState::Established;
        self.fwd_cnt += Wrapping(request_bytes as u32);
        self.to_guest
            .extend(format!("OK {destination}\n").as_bytes());
        self.to_host.extend(rest);
    }

    /// A host-initiated connection the guest has not accepted within `timeout`.
    pub(super) fn connect_timed_out(&self, now: Instant, timeout: Duration) -> bool {
        self.state == ConnState::Connecting
            && now.saturating_duration_since(self.created) >= timeout
    }

    /// The epoll interest its host socket needs now: readable while established and we may
    /// still read (no data waiting to be sent, no EOF, guest not gone), writable while guest
    /// bytes wait for the host.
    pub(super) fn host_interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if !self.host_readable
            && !self.host_eof
            && !self.guest_closed
            && self.state == ConnState::Established
        {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Whether it has something for the guest: our own bytes, readable host bytes, or the
    /// host's EOF to report.
    pub(super) fn wants_to_send(&self) -> bool {
        self.state == ConnState::Established
            && !self.guest_closed
            && (!self.to_guest.is_empty()
                || (self.host_readable && !self.host_eof)
                || (self.host_eof && !self.shutdown_sent))
    }

    /// Whether it may have a packet for the guest now: something to send and the credit to
    /// send it (an EOF needs no credit).
    pub(super) fn may_send(&self) -> bool {
        self.state == ConnState::Established
            && !self.guest_closed
            && ((!self.to_guest.is_empty()
                || self.host_readable
                || (self.host_eof && !self.shutdown_sent))
                && (self.peer_credit() > 0 || self.host_eof))
    }

    /// Payload bytes the next data packet may carry, for a guest buffer of `max_data`.
    pub(super) fn send_budget(&self, max_data: usize) -> usize {
        max_data
            .min(self.peer_credit() as usize)
            .min(MAX_PACKET_DATA_BYTES)
    }

    /// The host's EOF is to be reported and every byte before it was: marks the SHUTDOWN as
    /// sent and returns `true` (the caller sends it).
    pub(super) fn take_eof_shutdown(&mut self) -> bool {
        if self.host_eof && self.to_guest.is_empty() && !self.shutdown_sent {
            self.shutdown_sent = true;
            true
        } else {
            false
        }
    }

    /// The host's EOF is still to be reported to the guest.
    pub(super) fn eof_pending(&self) -> bool {
        self.host_eof && !self.shutdown_sent
    }

    /// `len` payload bytes went to the guest (with our current `fwd_cnt`).
    pub(super) fn sent(&mut self, len: usize) {
        self.tx_cnt += Wrapping(len as u32);
        self.mark_credit_sent();
    }
}

/// A connection's credit accounting, as the guest meets it through the muxer.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::muxer::EGRESS_VSOCK_PORT;
    use crate::virtio::vsock::packet::*;
    use crate::virtio::vsock::test_fixture::*;
    use std::net::TcpListener;

    #[test]
    fn test_host_bytes_to_the_guest_never_exceed_its_credit() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = fixture(vec![rule(&listener)]);
        let port = listener.local_addr().unwrap().port();
        let mut request = guest_pkt(5000, EGRESS_VSOCK_PORT, OP_REQUEST, &[]);
        request.hdr.buf_alloc = 32;
        f.muxer.recv_from_guest(request);
        let mut line = guest_pkt(
            5000,
            EGRESS_VSOCK_PORT,
            OP_RW,
            format!("CONNECT 127.0.0.1:{port}\n").as_bytes(),
        );
        line.hdr.buf_alloc = 32;
        f.muxer.recv_from_guest(line);
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(&[b'x'; 100]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        f.muxer.process_host_events(100);
        let sent: usize = drain(&mut f.muxer)
            .iter()
            .filter(|p| p.hdr.op == OP_RW)
            .map(|p| p.data.len())
            .sum();
        assert_eq!(sent, 32);
    }

    #[test]
    fn test_guest_overrunning_our_credit_is_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = fixture(vec![rule(&listener)]);
        let port = listener.local_addr().unwrap().port();
        egress(&mut f.muxer, &format!("CONNECT 127.0.0.1:{port}\n"));
        let (_server, _) = listener.accept().unwrap();
        let chunk = vec![0u8; MAX_PACKET_DATA_BYTES];
        // The listener never reads: the socket buffers fill, then our bounded buffer.
        for _ in 0..(2 * CONN_BUFFER_BYTES as usize / MAX_PACKET_DATA_BYTES + 64) {
            f.muxer
                .recv_from_guest(guest_pkt(5000, EGRESS_VSOCK_PORT, OP_RW, &chunk));
        }
        assert_eq!(f.muxer.connection_count(), 0);
        assert!(f.muxer.stats.protocol_resets >= 1);
    }
}
