//! The vsock muxer: maps guest vsock streams to host sockets and enforces the allowlist.
//!
//! - Host → guest: a client connects to the machine's Unix socket and writes `CONNECT <port>\n`;
//!   the muxer opens a vsock stream to (guest CID, port) and, once the guest accepts, answers
//!   `OK <port>\n`; then bytes flow both ways.
//! - Guest → host ("egress"), two ways, both checked against the same allowlist:
//!   - header mode: the guest connects to (CID 2, [`EGRESS_VSOCK_PORT`]) and writes
//!     `CONNECT <ipv4>:<port>\n`. The muxer dials that TCP destination only when the exact
//!     (address, port) pair is in the allowlist, then answers `OK <ipv4>:<port>\n` and splices.
//!   - direct mode: the guest connects to (CID 2, P) for any other P; the muxer dials (A, P)
//!     where A is the one allowlisted address with a rule for port P, before accepting the
//!     vsock connection (so the guest's `connect()` fails when the dial does).
//!
//!   A port no rule names, a port several addresses share, a malformed or oversized request
//!   line, a destination outside the allowlist, or a connection over the cap is reset (RST) and
//!   recorded as a denied-egress event; a refused dial of an allowed destination is only reset.
//!
//! Flow control is virtio-vsock's credit scheme: we never send more than the guest advertised
//! (`buf_alloc - (sent - fwd_cnt)`), and we advertise [`CONN_BUFFER_BYTES`] per connection,
//! resetting a guest that overruns it. Every buffer is bounded.
//!
//! This file is the socket side: the Unix listener, the epoll set, reading and writing host
//! sockets, dialling, and turning guest packets into calls on the two parts it uses: the
//! allow/deny decisions and the denial log ([`policy`](super::policy)) and each connection's
//! state and credit ([`connection`](super::connection)).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnState, Connection, HostStream, CONN_BUFFER_BYTES};
use super::packet::*;
use super::policy::{DenialLog, DeniedEgress, DenyReason, EgressPolicy, Refusal};
use crate::config::VsockConfig;

/// The host's CID in virtio-vsock.
pub const HOST_CID: u64 = 2;
/// The one vsock port on the host a guest may connect to: its egress requests.
pub const EGRESS_VSOCK_PORT: u32 = 1024;
/// Most simultaneous connections per machine (both directions).
pub const MAX_CONNECTIONS: usize = 256;
/// Longest `CONNECT ...\n` line, either side ("CONNECT 255.255.255.255:65535\n" is 30 bytes).
pub(super) const MAX_REQUEST_LINE_BYTES: usize = 64;
/// Most control packets waiting for guest RX buffers before we stop reading from the host.
const MAX_PENDING_CONTROL_PACKETS: usize = 1024;
/// Time allowed to dial an allowlisted destination (the device thread waits for it; allowlisted
/// destinations are loopback aliases, where a dial completes or is refused at once).
const EGRESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Host-side ports for host-initiated connections: above the well-known vsock ports, and below
/// 2^31 so a connection's epoll token (ports side by side) never has its top bit set, which
/// marks the tokens of not-yet-connected host clients.
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;
const LAST_EPHEMERAL_PORT: u32 = (1 << 31) - 1;
/// Host sockets polled per `process_host_events` call.
const EVENTS_PER_POLL: usize = 64;
const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
/// How long a host client waits for the guest to accept its `CONNECT` before it is closed.
pub const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often stale host-initiated connections are looked for.
const HOST_CONNECT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const PENDING_TOKEN_BIT: u64 = 1 << 63;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error(
        "cannot listen on the vsock Unix socket {path}: remove a stale file or pick another path"
    )]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the vsock muxer's epoll")]
    Epoll(#[source] std::io::Error),
    #[error("cannot open the denied-egress event log {path}")]
    EventLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Counters a caller (and the tests) can read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MuxerStats {
    pub malformed_packets: u64,
    /// The first [`MAX_RECORDED_DENIALS`](super::policy::MAX_RECORDED_DENIALS) denials (a
    /// hostile guest can cause any number).
    pub denied: Vec<DeniedEgress>,
    /// Every denial, recorded or not.
    pub denied_total: u64,
    pub connections_opened: u64,
    pub protocol_resets: u64,
}

/// Connection key: (our port, the guest's port).
type Key = (u32, u32);

struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    policy: EgressPolicy,
    listener: Option<(UnixListener, PathBuf)>,
    epoll: Epoll,
    sweep_timer: TimerFd,
    conns: HashMap<Key, Connection>,
    pending_host: HashMap<u64, PendingHost>,
    next_pending_id: u64,
    next_local_port: u32,
    round_robin_cursor: u64,
    control: VecDeque<Packet>,
    denials: DenialLog,
    pub stats: MuxerStats,
}

fn conn_token(key: Key) -> u64 {
    (u64::from(key.0) << 32) | u64::from(key.1)
}

impl Muxer {
    pub fn new(config: &VsockConfig) -> Result<Self, MuxerError> {
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let listener =
            UnixListener::bind(&config.uds_path).map_err(|source| MuxerError::Listen {
                path: config.uds_path.display().to_string(),
                source,
            })?;
        listener.set_nonblocking(true).map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(MuxerError::Epoll)?;
        let mut sweep_timer = TimerFd::new().map_err(|e| MuxerError::Epoll(e.into()))?;
        sweep_timer
            .reset(
                HOST_CONNECT_SWEEP_INTERVAL,
                Some(HOST_CONNECT_SWEEP_INTERVAL),
            )
            .map_err(|e| MuxerError::Epoll(e.into()))?;
        epoll
            .ctl(
                ControlOperation::Add,
                sweep_timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(MuxerError::Epoll)?;
        let denials = match &config.event_log {
            Some(path) => DenialLog::open(path).map_err(|source| MuxerError::EventLog {
                path: path.display().to_string(),
                source,
            })?,
            None => DenialLog::counted_only(),
        };
        Ok(Self {
            guest_cid: u64::from(config.guest_cid),
            policy: EgressPolicy::new(config.allowlist.clone()),
            listener: Some((listener, config.uds_path.clone())),
            epoll,
            sweep_timer,
            conns: HashMap::new(),
            pending_host: HashMap::new(),
            next_pending_id: 0,
            next_local_port: FIRST_EPHEMERAL_PORT,
            round_robin_cursor: 0,
            control: VecDeque::new(),
            denials,
            stats: MuxerStats::default(),
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (device reset): the guest's driver starts from nothing.
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.control.clear();
    }

    fn header(&self, key: Key, op: u16) -> Header {
        let conn = self.conns.get(&key);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUFFER_BYTES,
            fwd_cnt: conn.map_or(0, |c| c.fwd_cnt.0),
        }
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() >= MAX_PENDING_CONTROL_PACKETS {
            // The guest is not giving us RX buffers; dropping a control packet is safer than
            // growing without bound (the guest's own timeouts will clean up).
            return;
        }
        let mut hdr = self.header(key, op);
        hdr.flags = flags;
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.mark_credit_sent();
        }
        self.control.push_back(Packet {
            hdr,
            data: Vec::new(),
        });
    }

    fn reset_raw(&mut self, key: Key) {
        self.push_control(key, OP_RST, 0);
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            if let Some(stream) = &conn.stream {
                // The fd is closed right after; a failed removal changes nothing.
                let _ =
                    self.epoll
                        .ctl(ControlOperation::Delete, stream.fd(), EpollEvent::default());
            }
        }
    }

    fn reset_conn(&mut self, key: Key) {
        self.remove(key);
        self.reset_raw(key);
    }

    fn deny(&mut self, key: Key, destination: Option<SocketAddrV4>, reason: DenyReason) {
        let event = DeniedEgress {
            guest_port: key.1,
            vsock_port: key.0,
            destination,
            reason,
        };
        self.denials.record(&mut self.stats, event);
        self.reset_conn(key);
    }

    fn unwatch(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(stream) = &conn.stream {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, stream.fd(), EpollEvent::default());
        }
        conn.unwatched = true;
    }

    /// Re-arms epoll interest for a connection's host socket from its state.
    fn rearm(&self, key: Key) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let Some(stream) = &conn.stream else { return };
        if conn.unwatched {
            return;
        }
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            stream.fd(),
            EpollEvent::new(conn.host_interest(), conn_token(key)),
        );
    }

    fn register(&self, key: Key) {
        if let Some(stream) = self.conns.get(&key).and_then(|c| c.stream.as_ref()) {
            let _ = self.epoll.ctl(
                ControlOperation::Add,
                stream.fd(),
                EpollEvent::new(EventSet::empty(), conn_token(key)),
            );
        }
        self.rearm(key);
    }

    /// Handles one packet the guest sent (already parsed from its TX queue).
    pub fn recv_from_guest(&mut self, pkt: Packet) {
        let hdr = pkt.hdr;
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            self.stats.malformed_packets += 1;
            return;
        }
        let key: Key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            self.reset_raw(key);
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        }
        match hdr.op {
            OP_REQUEST => self.guest_request(key, hdr),
            OP_RESPONSE => self.guest_response(key),
            OP_RW => self.guest_rw(key, pkt.data),
            OP_SHUTDOWN => self.guest_shutdown(key, hdr.flags),
            OP_RST => self.remove(key),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.push_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            _ => {
                self.stats.malformed_packets += 1;
                if self.conns.contains_key(&key) {
                    self.stats.protocol_resets += 1;
                    self.reset_conn(key);
                }
            }
        }
    }

    fn guest_request(&mut self, key: Key, hdr: Header) {
        if self.conns.contains_key(&key) {
            self.stats.protocol_resets += 1;
            self.reset_conn(key);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.deny(key, None, DenyReason::ConnectionCap);
            return;
        }
        if key.0 != EGRESS_VSOCK_PORT {
            self.open_direct(key, hdr);
            return;
        }
        let mut conn = Connection::new(ConnState::AwaitRequest, None);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        self.conns.insert(key, conn);
        self.push_control(key, OP_RESPONSE, 0);
    }

    /// Direct mode: vsock port P leads to the destination the policy names for P (see
    /// [`EgressPolicy::direct_destination`]), dialled before the guest's connection is accepted.
    fn open_direct(&mut self, key: Key, hdr: Header) {
        let destination = match self.policy.direct_destination(key.0) {
            Ok(destination) => destination,
            Err(reason) => return self.deny(key, None, reason),
        };
        let Some(stream) = dial(destination) else {
            self.reset_raw(key);
            return;
        };
        let mut conn = Connection::new(ConnState::Established, Some(HostStream::Tcp(stream)));
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        self.conns.insert(key, conn);
        self.stats.connections_opened += 1;
        self.register(key);
        self.push_control(key, OP_RESPONSE, 0);
    }

    fn guest_response(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reset_raw(key);
            return;
        };
        if !conn.guest_accepted() {
            self.stats.protocol_resets += 1;
            self.reset_conn(key);
            return;
        }
        let reply = format!("OK {}\n", key.1);
        // A fresh socket's send buffer always takes these few bytes; if not, the client is gone.
        let written = conn.stream.as_mut().map(|s| s.write(reply.as_bytes()));
        if !matches!(written, Some(Ok(n)) if n == reply.len()) {
            self.reset_conn(key);
            return;
        }
        self.stats.connections_opened += 1;
        self.rearm(key);
    }

    fn guest_rw(&mut self, key: Key, data: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reset_raw(key);
            return;
        };
        if conn.guest_write_violates(data.len()) {
            // The guest ignored our credit (or wrote before the stream was open, or after it
            // said it would not send any more).
            self.stats.protocol_resets += 1;
            self.reset_conn(key);
            return;
        }
        match conn.state {
            ConnState::AwaitRequest => {
                conn.request_line.extend_from_slice(&data);
                self.try_open_egress(key);
            }
            _ => {
                conn.to_host.extend(&data);
                self.flush_to_host(key);
            }
        }
    }

    fn guest_shutdown(&mut self, key: Key, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reset_raw(key);
            return;
        };
        conn.guest_shutdown(flags);
        // A closed guest socket: flush_to_host delivers what it wrote, then confirms with RST.
        self.flush_to_host(key);
    }

    /// Frames the guest's `CONNECT a.b.c.d:port\n` and dials it if the policy allows it.
    fn try_open_egress(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(newline) = conn.request_line.iter().position(|b| *b == b'\n') else {
            if conn.request_line.len() > MAX_REQUEST_LINE_BYTES {
                self.deny(key, None, DenyReason::MalformedRequest);
            }
            return;
        };
        if newline > MAX_REQUEST_LINE_BYTES {
            self.deny(key, None, DenyReason::MalformedRequest);
            return;
        }
        let rest = conn.request_line.split_off(newline + 1);
        let line = std::mem::take(&mut conn.request_line);
        let destination = match self.policy.egress_destination(&line[..newline]) {
            Ok(destination) => destination,
            Err(Refusal {
                destination,
                reason,
            }) => return self.deny(key, destination, reason),
        };
        let Some(stream) = dial(destination) else {
            // Allowed but nobody listens: a plain reset, like a refused TCP connect.
            self.reset_conn(key);
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.open_egress(HostStream::Tcp(stream), newline + 1, destination, &rest);
        self.stats.connections_opened += 1;
        self.register(key);
        self.flush_to_host(key);
    }

    /// Writes buffered guest bytes to the host socket; counts them as forwarded.
    fn flush_to_host(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        let mut failed = false;
        while !conn.to_host.is_empty() {
            let (front, _) = conn.to_host.as_slices();
            match stream.write(front) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    conn.to_host.drain(..n);
                    conn.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.reset_conn(key);
            return;
        }
        if conn.to_host.is_empty() && conn.guest_done_sending {
            stream.shutdown_write();
        }
        if conn.to_host.is_empty() && conn.guest_closed {
            self.reset_conn(key);
            return;
        }
        if conn.credit_update_due() {
            self.push_control(key, OP_CREDIT_UPDATE, 0);
        }
        self.rearm(key);
    }

    /// Next packet for the guest, at most `max_data` bytes of payload.
    pub fn pop_to_guest(&mut self, max_data: usize) -> Option<Packet> {
        if let Some(pkt) = self.control.pop_front() {
            return Some(pkt);
        }
        let mut keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.wants_to_send())
            .map(|(k, _)| *k)
            .collect();
        // Round robin: start after the connection served last, so none starves the others.
        let cursor = self.round_robin_cursor;
        keys.sort_by_key(|key| conn_token(*key).wrapping_sub(cursor));
        for key in keys {
            if let Some(pkt) = self.data_for_guest(key, max_data) {
                self.round_robin_cursor = conn_token(key).wrapping_add(1);
                return Some(pkt);
            }
        }
        None
    }

    fn data_for_guest(&mut self, key: Key, max_data: usize) -> Option<Packet> {
        let mut hdr = self.header(key, OP_RW);
        let conn = self.conns.get_mut(&key)?;
        let budget = conn.send_budget(max_data);
        if conn.take_eof_shutdown() {
            hdr.op = OP_SHUTDOWN;
            hdr.flags = SHUTDOWN_SEND;
            return Some(Packet {
                hdr,
                data: Vec::new(),
            });
        }
        if budget == 0 {
            return None;
        }
        let mut data = Vec::new();
        if !conn.to_guest.is_empty() {
            let take = budget.min(conn.to_guest.len());
            data.extend(conn.to_guest.drain(..take));
        } else if let Some(stream) = conn.stream.as_mut() {
            data.resize(budget, 0);
            match stream.read(&mut data) {
                Ok(0) => {
                    conn.host_eof = true;
                    data.clear();
                }
                Ok(n) => data.truncate(n),
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    conn.host_readable = false;
                    data.clear();
                }
                Err(_) => {
                    conn.host_eof = true;
                    data.clear();
                }
            }
        }
        if data.is_empty() {
            self.rearm(key);
            return if self.conns.get(&key).is_some_and(|c| c.eof_pending()) {
                self.data_for_guest(key, max_data)
            } else {
                None
            };
        }
        conn.sent(data.len());
        hdr.len = data.len() as u32;
        Some(Packet { hdr, data })
    }

    /// Whether `pop_to_guest` may have something (used to decide whether to look at RX buffers).
    pub fn has_pending(&self) -> bool {
        !self.control.is_empty() || self.conns.values().any(|c| c.may_send())
    }

    /// Handles whatever the host sockets have for us, waiting at most `timeout_ms`.
    pub fn process_host_events(&mut self, timeout_ms: i32) {
        let mut events = vec![EpollEvent::default(); EVENTS_PER_POLL];
        let count = self.epoll.wait(timeout_ms, &mut events).unwrap_or(0);
        for event in &events[..count] {
            let token = event.data();
            if token == LISTENER_TOKEN {
                self.accept_host();
            } else if token == TIMER_TOKEN {
                // Reading clears the expiry count; a failed read means nothing expired.
                let _ = self.sweep_timer.wait();
                self.expire_host_connects(Instant::now());
            } else if token & PENDING_TOKEN_BIT != 0 {
                self.read_host_request(token);
            } else {
                let key: Key = ((token >> 32) as u32, token as u32);
                let set = event.event_set();
                if set.intersects(EventSet::OUT) {
                    self.flush_to_host(key);
                }
                if set.intersects(
                    EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP,
                ) {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.host_readable = true;
                    }
                    if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                        // epoll reports these whatever we ask for: stop watching the socket, or a
                        // guest without credit would keep this thread spinning. What is left to
                        // read is read when the guest has credit; then EOF ends the stream.
                        self.unwatch(key);
                    } else {
                        self.rearm(key);
                    }
                }
            }
        }
    }

    fn accept_host(&mut self) {
        let Some((listener, _)) = &self.listener else {
            return;
        };
        while let Ok((stream, _)) = listener.accept() {
            if stream.set_nonblocking(true).is_err()
                || self.pending_host.len() + self.conns.len() >= MAX_CONNECTIONS
            {
                continue;
            }
            let token = PENDING_TOKEN_BIT | self.next_pending_id;
            self.next_pending_id += 1;
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .is_ok()
            {
                self.pending_host.insert(
                    token,
                    PendingHost {
                        stream,
                        line: Vec::new(),
                    },
                );
            }
        }
    }

    fn read_host_request(&mut self, token: u64) {
        let Some(pending) = self.pending_host.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_REQUEST_LINE_BYTES];
        let outcome = match pending.stream.read(&mut buf) {
            Ok(0) => Err(()),
            Ok(n) => {
                pending.line.extend_from_slice(&buf[..n]);
                match pending.line.iter().position(|b| *b == b'\n') {
                    Some(end) => parse_host_request(&pending.line[..end]).ok_or(()).map(Some),
                    None if pending.line.len() > MAX_REQUEST_LINE_BYTES => Err(()),
                    None => Ok(None),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(_) => Err(()),
        };
        match outcome {
            Ok(None) => {}
            Err(()) => {
                if let Some(p) = self.pending_host.remove(&token) {
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        p.stream.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
            }
            Ok(Some(guest_port)) => {
                let Some(p) = self.pending_host.remove(&token) else {
                    return;
                };
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    p.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                let local = self.allocate_local_port();
                let key = (local, guest_port);
                let conn = Connection::new(ConnState::Connecting, Some(HostStream::Unix(p.stream)));
                self.conns.insert(key, conn);
                self.register(key);
                self.push_control(key, OP_REQUEST, 0);
            }
        }
    }

    /// Closes host clients whose `CONNECT` the guest left unanswered for
    /// [`HOST_CONNECT_TIMEOUT`], and tells the guest to forget the request.
    pub fn expire_host_connects(&mut self, now: Instant) {
        let stale: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.connect_timed_out(now, HOST_CONNECT_TIMEOUT))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            self.reset_conn(key);
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = if port >= LAST_EPHEMERAL_PORT {
                FIRST_EPHEMERAL_PORT
            } else {
                port + 1
            };
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if let Some((_, path)) = self.listener.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                eprintln!(
                    "bottle-vmm: cannot remove vsock socket {}: {e}",
                    path.display()
                );
            }
        }
    }
}

/// Dials an allowlisted destination (blocking, bounded by [`EGRESS_CONNECT_TIMEOUT`]), then
/// makes the stream non-blocking for the event loop.
fn dial(destination: SocketAddrV4) -> Option<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&SocketAddr::V4(destination), EGRESS_CONNECT_TIMEOUT).ok()?;
    stream.set_nonblocking(true).ok()?;
    // Latency over batching: each guest write is a request or a response.
    let _ = stream.set_nodelay(true);
    Some(stream)
}

/// `CONNECT <port>` (no newline) → guest vsock port.
pub fn parse_host_request(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?
        .trim_end_matches('\r')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::test_fixture::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn test_direct_mode_dials_the_allowlisted_address_for_that_port_before_accepting() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = fixture(vec![rule(&listener)]);
        let port = u32::from(listener.local_addr().unwrap().port());
        f.muxer
            .recv_from_guest(guest_pkt(5000, port, OP_REQUEST, &[]));
        f.muxer
            .recv_from_guest(guest_pkt(5000, port, OP_RW, b"direct"));
        let (mut server, _) = listener.accept().unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).unwrap();
        assert_eq!(
            (ops(&drain(&mut f.muxer)), &got),
            (vec![OP_RESPONSE], b"direct")
        );
    }

    #[test]
    fn test_direct_mode_to_a_refused_allowlisted_port_is_reset_without_an_event() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let allowed = rule(&listener);
        drop(listener);
        let mut f = fixture(vec![allowed]);
        f.muxer
            .recv_from_guest(guest_pkt(5000, u32::from(allowed.port), OP_REQUEST, &[]));
        assert_eq!(
            (ops(&drain(&mut f.muxer)), f.muxer.stats.denied_total),
            (vec![OP_RST], 0)
        );
    }

    #[test]
    fn test_allowlisted_egress_answers_ok_and_forwards_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = fixture(vec![rule(&listener)]);
        let port = listener.local_addr().unwrap().port();
        let packets = egress(&mut f.muxer, &format!("CONNECT 127.0.0.1:{port}\nhello"));
        let (mut server, _) = listener.accept().unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).unwrap();
        assert_eq!(ops(&packets), vec![OP_RESPONSE, OP_RW]);
        assert_eq!(
            packets[1].data,
            format!("OK 127.0.0.1:{port}\n").into_bytes()
        );
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn test_host_hangup_while_the_guest_has_no_credit_does_not_spin_and_is_delivered_later() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = fixture(vec![rule(&listener)]);
        let port = listener.local_addr().unwrap().port();
        let mut request = guest_pkt(5000, port.into(), OP_REQUEST, &[]);
        request.hdr.buf_alloc = 0;
        f.muxer.recv_from_guest(request);
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"bye").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // Close with a reset (linger 0): the muxer's socket reports EPOLLHUP | EPOLLERR, which
        // epoll signals whatever interest was registered.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket fd and a `linger` value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(server);
        std::thread::sleep(Duration::from_millis(20));
        f.muxer.process_host_events(100);
        let mut events = vec![EpollEvent::default(); 4];
        let still_ready = f.muxer.epoll.wait(0, &mut events).unwrap();
        let mut credit = guest_pkt(5000, port.into(), OP_CREDIT_UPDATE, &[]);
        credit.hdr.buf_alloc = 1024;
        f.muxer.recv_from_guest(credit);
        let packets = drain(&mut f.muxer);
        let data: Vec<u8> = packets.iter().flat_map(|p| p.data.clone()).collect();
        assert_eq!(
            (still_ready, data, ops(&packets).last().copied()),
            (0, b"bye".to_vec(), Some(OP_SHUTDOWN))
        );
    }

    #[test]
    fn test_two_busy_streams_take_turns_towards_the_guest() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = fixture(vec![rule(&listener)]);
        let port = u32::from(listener.local_addr().unwrap().port());
        let mut servers = Vec::new();
        for guest_port in [5000, 5001] {
            f.muxer
                .recv_from_guest(guest_pkt(guest_port, port, OP_REQUEST, &[]));
            let (mut server, _) = listener.accept().unwrap();
            server.write_all(&[1u8; 4096]).unwrap();
            servers.push(server);
        }
        drain(&mut f.muxer);
        std::thread::sleep(Duration::from_millis(20));
        f.muxer.process_host_events(100);
        let first_four: Vec<u32> = (0..4)
            .map(|_| f.muxer.pop_to_guest(1024).unwrap().hdr.dst_port)
            .collect();
        assert_ne!(first_four[0], first_four[1]);
        assert_eq!(
            (first_four[0], first_four[1]),
            (first_four[2], first_four[3])
        );
    }

    #[test]
    fn test_guest_close_delivers_everything_it_wrote_before_the_rst() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let small_window: libc::c_int = 4096;
        // SAFETY: a valid socket fd and a c_int option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&small_window as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let mut f = fixture(vec![rule(&listener)]);
        let port = listener.local_addr().unwrap().port();
        egress(&mut f.muxer, &format!("CONNECT 127.0.0.1:{port}\n"));
        let (mut server, _) = listener.accept().unwrap();
        let chunk = vec![7u8; MAX_PACKET_DATA_BYTES];
        // Write until the host socket is full and part of the data waits in our buffer (each
        // packet is within the credit we advertise: the buffer is empty before it).
        let mut sent = 0;
        while f.muxer.conns.values().all(|c| c.to_host.is_empty()) && sent < (256 << 20) {
            f.muxer
                .recv_from_guest(guest_pkt(5000, EGRESS_VSOCK_PORT, OP_RW, &chunk));
            sent += chunk.len();
        }
        let mut close = guest_pkt(5000, EGRESS_VSOCK_PORT, OP_SHUTDOWN, &[]);
        close.hdr.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        f.muxer.recv_from_guest(close);
        let waiting_after_close = f.muxer.connection_count();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            server.read_to_end(&mut all).unwrap();
            all.len()
        });
        while f.muxer.connection_count() > 0 {
            f.muxer.process_host_events(100);
        }
        let packets = drain(&mut f.muxer);
        assert_eq!(
            (
                waiting_after_close,
                reader.join().unwrap(),
                packets.last().map(|p| p.hdr.op)
            ),
            (1, sent, Some(OP_RST))
        );
    }

    #[test]
    fn test_packet_with_a_spoofed_source_cid_is_dropped_and_counted() {
        let mut f = fixture(vec![]);
        let mut pkt = guest_pkt(5000, EGRESS_VSOCK_PORT, OP_REQUEST, &[]);
        pkt.hdr.src_cid = 99;
        f.muxer.recv_from_guest(pkt);
        assert_eq!(
            (drain(&mut f.muxer).len(), f.muxer.stats.malformed_packets),
            (0, 1)
        );
    }

    #[test]
    fn test_host_connect_line_opens_a_stream_and_answers_ok_when_the_guest_accepts() {
        let mut f = fixture(vec![]);
        let mut client = UnixStream::connect(&f.uds).unwrap();
        client.write_all(b"CONNECT 9000\n").unwrap();
        f.muxer.process_host_events(100);
        f.muxer.process_host_events(100);
        let request = drain(&mut f.muxer).pop().unwrap();
        let mut response = guest_pkt(9000, request.hdr.src_port, OP_RESPONSE, &[]);
        response.hdr.dst_port = request.hdr.src_port;
        f.muxer.recv_from_guest(response);
        let mut ok = [0u8; 8];
        client.read_exact(&mut ok).unwrap();
        assert_eq!(
            (request.hdr.op, request.hdr.dst_port, &ok),
            (OP_REQUEST, 9000, b"OK 9000\n")
        );
    }

    #[test]
    fn test_host_connect_the_guest_never_answers_is_closed_after_the_timeout() {
        let mut f = fixture(vec![]);
        let mut client = UnixStream::connect(&f.uds).unwrap();
        client.write_all(b"CONNECT 9000\n").unwrap();
        f.muxer.process_host_events(100);
        f.muxer.process_host_events(100);
        drain(&mut f.muxer);
        f.muxer
            .expire_host_connects(Instant::now() + HOST_CONNECT_TIMEOUT);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert_eq!(
            (
                ops(&drain(&mut f.muxer)),
                rest.len(),
                f.muxer.connection_count()
            ),
            (vec![OP_RST], 0, 0)
        );
    }

    #[test]
    fn test_unix_socket_is_removed_when_the_muxer_is_dropped() {
        let f = fixture(vec![]);
        let path = f.uds.clone();
        drop(f.muxer);
        assert!(!path.exists());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any sequence of guest packets (ops, ports, credit fields, payloads) leaves the muxer
        /// consistent: no panic, connections within the cap, nothing reaches a non-allowlisted
        /// destination (the allowlist here is empty, so no stream may ever open).
        #[test]
        fn fuzz_muxer_with_arbitrary_guest_packets(
            packets in proptest::collection::vec(
                (0u32..4, prop_oneof![Just(EGRESS_VSOCK_PORT), 0u32..2048], 0u16..10, any::<u32>(), any::<u32>(), any::<u32>(),
                 proptest::collection::vec(any::<u8>(), 0..80)),
                0..60)
        ) {
            let mut f = fixture(vec![]);
            for (src_port, dst_port, op, flags, buf_alloc, fwd_cnt, data) in packets {
                let mut pkt = guest_pkt(src_port, dst_port, op, &data);
                pkt.hdr.flags = flags;
                pkt.hdr.buf_alloc = buf_alloc;
                pkt.hdr.fwd_cnt = fwd_cnt;
                f.muxer.recv_from_guest(pkt);
                drain(&mut f.muxer);
            }
            prop_assert!(f.muxer.connection_count() <= MAX_CONNECTIONS);
            prop_assert_eq!(f.muxer.stats.connections_opened, 0);
        }
    }
}
