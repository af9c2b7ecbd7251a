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

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::*;
use crate::config::{AllowRule, VsockConfig};

/// The host's CID in virtio-vsock.
pub const HOST_CID: u64 = 2;
/// The one vsock port on the host a guest may connect to: its egress requests.
pub const EGRESS_VSOCK_PORT: u32 = 1024;
/// Per-connection receive buffer we advertise to the guest (and bound our buffering by).
pub const CONN_BUFFER_BYTES: u32 = 256 * 1024;
/// Send a credit update once this much was forwarded since the guest last heard from us.
const CREDIT_UPDATE_THRESHOLD_BYTES: u32 = CONN_BUFFER_BYTES / 4;
/// Most simultaneous connections per machine (both directions).
pub const MAX_CONNECTIONS: usize = 256;
/// Longest `CONNECT ...\n` line, either side ("CONNECT 255.255.255.255:65535\n" is 30 bytes).
const MAX_REQUEST_LINE_BYTES: usize = 64;
/// Denied-egress events written to the event log per VM; later ones are only counted, so a
/// hostile guest cannot fill the host's disk (one `denied_egress_suppressed` line marks the cut).
pub const MAX_LOGGED_DENIALS: u64 = 10_000;
/// Denials kept in memory in [`MuxerStats::denied`].
pub const MAX_RECORDED_DENIALS: usize = 1024;
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

/// Why a guest connection was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// No allowlist rule has this port (direct mode), and it is not the egress port.
    UnknownVsockPort(u32),
    /// Several allowlisted addresses have this port: direct mode cannot choose.
    AmbiguousPort(u32),
    MalformedRequest,
    NotAllowlisted,
    ConnectionCap,
}

impl DenyReason {
    fn as_str(&self) -> &'static str {
        match self {
            DenyReason::UnknownVsockPort(_) => "unknown_vsock_port",
            DenyReason::AmbiguousPort(_) => "ambiguous_port",
            DenyReason::MalformedRequest => "malformed_request",
            DenyReason::NotAllowlisted => "not_allowlisted",
            DenyReason::ConnectionCap => "connection_cap",
        }
    }
}

/// One refused egress attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedEgress {
    pub guest_port: u32,
    pub vsock_port: u32,
    pub destination: Option<SocketAddrV4>,
    pub reason: DenyReason,
}

impl DeniedEgress {
    pub fn to_json(&self) -> String {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        serde_json::json!({
            "event": "denied_egress",
            "ts_unix_ms": ts as u64,
            "guest_port": self.guest_port,
            "vsock_port": self.vsock_port,
            "destination": self.destination.map(|d| d.to_string()),
            "reason": self.reason.as_str(),
        })
        .to_string()
    }
}

/// Counters a caller (and the tests) can read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MuxerStats {
    pub malformed_packets: u64,
    /// The first [`MAX_RECORDED_DENIALS`] denials (a hostile guest can cause any number).
    pub denied: Vec<DeniedEgress>,
    /// Every denial, recorded or not.
    pub denied_total: u64,
    pub connections_opened: u64,
    pub protocol_resets: u64,
}

enum HostStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HostStream {
    fn fd(&self) -> RawFd {
        match self {
            HostStream::Tcp(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }
    fn shutdown_write(&self) {
        // Already-closed sockets fail here; there is nothing left to do for them.
        let _ = match self {
            HostStream::Tcp(s) => s.shutdown(Shutdown::Write),
            HostStream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum ConnState {
    /// Guest-initiated, accepted at vsock level, waiting for the `CONNECT` line.
    AwaitRequest,
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Connection {
    state: ConnState,
    created: Instant,
    stream: Option<HostStream>,
    request_line: Vec<u8>,
    /// Guest → host bytes the host socket has not taken yet.
    to_host: VecDeque<u8>,
    /// Host → guest bytes produced by the muxer itself (the `OK` line).
    to_guest: VecDeque<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes forwarded from the guest to the host socket.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    host_readable: bool,
    host_eof: bool,
    shutdown_sent: bool,
    guest_done_sending: bool,
    /// The guest closed its socket; we still owe the host what it wrote before.
    guest_closed: bool,
    /// The host socket hung up and is no longer in the epoll set.
    unwatched: bool,
}

impl Connection {
    fn new(state: ConnState, stream: Option<HostStream>) -> Self {
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

    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// Connection key: (our port, the guest's port).
type Key = (u32, u32);

struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    allowlist: Vec<AllowRule>,
    listener: Option<(UnixListener, PathBuf)>,
    epoll: Epoll,
    sweep_timer: TimerFd,
    conns: HashMap<Key, Connection>,
    pending_host: HashMap<u64, PendingHost>,
    next_pending_id: u64,
    next_local_port: u32,
    round_robin_cursor: u64,
    control: VecDeque<Packet>,
    event_log: Option<std::fs::File>,
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
        let event_log = match &config.event_log {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| MuxerError::EventLog {
                        path: path.display().to_string(),
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            guest_cid: u64::from(config.guest_cid),
            allowlist: config.allowlist.clone(),
            listener: Some((listener, config.uds_path.clone())),
            epoll,
            sweep_timer,
            conns: HashMap::new(),
            pending_host: HashMap::new(),
            next_pending_id: 0,
            next_local_port: FIRST_EPHEMERAL_PORT,
            round_robin_cursor: 0,
            control: VecDeque::new(),
            event_log,
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
            conn.last_fwd_cnt_sent = conn.fwd_cnt;
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
        self.stats.denied_total += 1;
        if let Some(log) = &mut self.event_log {
            // A full disk must not let the connection through: the RST below happens anyway.
            if self.stats.denied_total <= MAX_LOGGED_DENIALS {
                let _ = writeln!(log, "{}", event.to_json());
            } else if self.stats.denied_total == MAX_LOGGED_DENIALS + 1 {
                let _ = writeln!(
                    log,
                    "{}",
                    serde_json::json!({"event": "denied_egress_suppressed", "after": MAX_LOGGED_DENIALS})
                );
            }
        }
        if self.stats.denied.len() < MAX_RECORDED_DENIALS {
            self.stats.denied.push(event);
        }
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
        let mut events = EventSet::empty();
        if !conn.host_readable
            && !conn.host_eof
            && !conn.guest_closed
            && conn.state == ConnState::Established
        {
            events |= EventSet::IN;
        }
        if !conn.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            stream.fd(),
            EpollEvent::new(events, conn_token(key)),
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
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
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
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        self.conns.insert(key, conn);
        self.push_control(key, OP_RESPONSE, 0);
    }

    /// Direct mode: vsock port P leads to (A, P) for the one allowlisted address A that has a
    /// rule for port P. No rule, or several addresses with that port: refused.
    fn open_direct(&mut self, key: Key, hdr: Header) {
        let mut addrs: Vec<Ipv4Addr> = self
            .allowlist
            .iter()
            .filter(|rule| u32::from(rule.port) == key.0)
            .map(|rule| rule.addr)
            .collect();
        addrs.sort();
        addrs.dedup();
        let destination = match addrs.as_slice() {
            [addr] => SocketAddrV4::new(*addr, key.0 as u16),
            [] => return self.deny(key, None, DenyReason::UnknownVsockPort(key.0)),
            _ => return self.deny(key, None, DenyReason::AmbiguousPort(key.0)),
        };
        let Some(stream) = dial(destination) else {
            self.reset_raw(key);
            return;
        };
        let mut conn = Connection::new(ConnState::Established, Some(HostStream::Tcp(stream)));
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
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
        if conn.state != ConnState::Connecting {
            self.stats.protocol_resets += 1;
            self.reset_conn(key);
            return;
        }
        conn.state = ConnState::Established;
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
        let buffered = conn.to_host.len() + conn.request_line.len();
        if buffered + data.len() > CONN_BUFFER_BYTES as usize
            || conn.state == ConnState::Connecting
            || conn.guest_done_sending
        {
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
        if flags & SHUTDOWN_SEND != 0 {
            conn.guest_done_sending = true;
        }
        if flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == (SHUTDOWN_SEND | SHUTDOWN_RCV) {
            // The guest closed its socket: deliver what it wrote, then confirm with RST
            // (flush_to_host does both once the buffer is empty).
            conn.guest_closed = true;
        }
        self.flush_to_host(key);
    }

    /// Parses the guest's `CONNECT a.b.c.d:port\n` and dials it if allowlisted.
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
        let Some(destination) = parse_egress_request(&line[..newline]) else {
            self.deny(key, None, DenyReason::MalformedRequest);
            return;
        };
        let rule = AllowRule {
            addr: *destination.ip(),
            port: destination.port(),
        };
        if !self.allowlist.contains(&rule) {
            self.deny(key, Some(destination), DenyReason::NotAllowlisted);
            return;
        }
        let Some(stream) = dial(destination) else {
            // Allowed but nobody listens: a plain reset, like a refused TCP connect.
            self.reset_conn(key);
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.stream = Some(HostStream::Tcp(stream));
        conn.state = ConnState::Established;
        conn.fwd_cnt += Wrapping((newline + 1) as u32);
        conn.to_guest
            .extend(format!("OK {destination}\n").as_bytes());
        conn.to_host.extend(&rest);
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
        let credit_due = (conn.fwd_cnt - conn.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD_BYTES;
        if credit_due {
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
            .filter(|(_, c)| {
                c.state == ConnState::Established
                    && !c.guest_closed
                    && (!c.to_guest.is_empty()
                        || (c.host_readable && !c.host_eof)
                        || (c.host_eof && !c.shutdown_sent))
            })
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
        let budget = max_data
            .min(conn.peer_credit() as usize)
            .min(MAX_PACKET_DATA_BYTES);
        if conn.host_eof && conn.to_guest.is_empty() && !conn.shutdown_sent {
            conn.shutdown_sent = true;
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
            return if self
                .conns
                .get(&key)
                .is_some_and(|c| c.host_eof && !c.shutdown_sent)
            {
                self.data_for_guest(key, max_data)
            } else {
                None
            };
        }
        conn.tx_cnt += Wrapping(data.len() as u32);
        conn.last_fwd_cnt_sent = conn.fwd_cnt;
        hdr.len = data.len() as u32;
        Some(Packet { hdr, data })
    }

    /// Whether `pop_to_guest` may have something (used to decide whether to look at RX buffers).
    pub fn has_pending(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| {
                c.state == ConnState::Established
                    && !c.guest_closed
                    && ((!c.to_guest.is_empty()
                        || c.host_readable
                        || (c.host_eof && !c.shutdown_sent))
                        && (c.peer_credit() > 0 || c.host_eof))
            })
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
            .filter(|(_, c)| {
                c.state == ConnState::Connecting
                    && now.saturating_duration_since(c.created) >= HOST_CONNECT_TIMEOUT
            })
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

/// `CONNECT <ipv4>:<port>` (no newline) → destination.
pub fn parse_egress_request(line: &[u8]) -> Option<SocketAddrV4> {
    let text = std::str::from_utf8(line).ok()?;
    let target = text.strip_prefix("CONNECT ")?;
    let (addr, port) = target.split_once(':')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    Some(SocketAddrV4::new(addr, port))
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
    use proptest::prelude::*;
    use std::net::TcpListener;

    const GUEST_CID: u32 = 7;

    struct Fixture {
        _dir: tempfile::TempDir,
        muxer: Muxer,
        uds: PathBuf,
    }

    fn fixture(allowlist: Vec<AllowRule>) -> Fixture {
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

    fn guest_pkt(src_port: u32, dst_port: u32, op: u16, data: &[u8]) -> Packet {
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

    fn drain(muxer: &mut Muxer) -> Vec<Packet> {
        std::iter::from_fn(|| muxer.pop_to_guest(4096)).collect()
    }

    fn ops(packets: &[Packet]) -> Vec<u16> {
        packets.iter().map(|p| p.hdr.op).collect()
    }

    /// Opens an egress stream from guest port 5000 and sends its CONNECT line.
    fn egress(muxer: &mut Muxer, line: &str) -> Vec<Packet> {
        muxer.recv_from_guest(guest_pkt(5000, EGRESS_VSOCK_PORT, OP_REQUEST, &[]));
        muxer.recv_from_guest(guest_pkt(5000, EGRESS_VSOCK_PORT, OP_RW, line.as_bytes()));
        drain(muxer)
    }

    fn rule(listener: &TcpListener) -> AllowRule {
        let addr = listener.local_addr().unwrap();
        AllowRule {
            addr: Ipv4Addr::LOCALHOST,
            port: addr.port(),
        }
    }

    #[test]
    fn test_request_to_a_port_no_rule_names_is_reset_and_logged() {
        let mut f = fixture(vec![]);
        f.muxer
            .recv_from_guest(guest_pkt(5000, 22, OP_REQUEST, &[]));
        assert_eq!(ops(&drain(&mut f.muxer)), vec![OP_RST]);
        assert_eq!(
            f.muxer.stats.denied[0].reason,
            DenyReason::UnknownVsockPort(22)
        );
    }

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
    fn test_direct_mode_port_shared_by_two_addresses_is_refused_as_ambiguous() {
        let rules = vec![
            AllowRule {
                addr: Ipv4Addr::new(127, 0, 0, 1),
                port: 8080,
            },
            AllowRule {
                addr: Ipv4Addr::new(127, 0, 0, 2),
                port: 8080,
            },
        ];
        let mut f = fixture(rules);
        f.muxer
            .recv_from_guest(guest_pkt(5000, 8080, OP_REQUEST, &[]));
        assert_eq!(ops(&drain(&mut f.muxer)), vec![OP_RST]);
        assert_eq!(
            f.muxer.stats.denied[0].reason,
            DenyReason::AmbiguousPort(8080)
        );
    }

    #[test]
    fn test_egress_to_an_address_outside_the_allowlist_is_reset_and_logged() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = fixture(vec![rule(&listener)]);
        let port = listener.local_addr().unwrap().port();
        let packets = egress(&mut f.muxer, &format!("CONNECT 127.0.0.2:{port}\n"));
        assert_eq!(ops(&packets), vec![OP_RESPONSE, OP_RST]);
        assert_eq!(f.muxer.stats.denied[0].reason, DenyReason::NotAllowlisted);
        assert_eq!(f.muxer.connection_count(), 0);
    }

    #[test]
    fn test_egress_to_the_allowlisted_address_on_an_unpublished_port_is_reset() {
        let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
        let unpublished = TcpListener::bind("127.0.0.1:0").unwrap();
        unpublished.set_nonblocking(true).unwrap();
        let mut f = fixture(vec![rule(&allowed)]);
        let line = format!(
            "CONNECT 127.0.0.1:{}\n",
            unpublished.local_addr().unwrap().port()
        );
        let packets = egress(&mut f.muxer, &line);
        assert_eq!(ops(&packets), vec![OP_RESPONSE, OP_RST]);
        assert!(unpublished.accept().is_err());
    }

    #[test]
    fn test_malformed_or_oversized_request_lines_are_reset() {
        let mut f = fixture(vec![]);
        let first = egress(&mut f.muxer, "CONNECT example.com:443\n");
        let second = egress(&mut f.muxer, &"A".repeat(MAX_REQUEST_LINE_BYTES + 1));
        assert_eq!(
            (ops(&first), ops(&second)),
            (vec![OP_RESPONSE, OP_RST], vec![OP_RESPONSE, OP_RST])
        );
        assert_eq!(
            f.muxer
                .stats
                .denied
                .iter()
                .filter(|d| d.reason == DenyReason::MalformedRequest)
                .count(),
            2
        );
    }

    #[test]
    fn test_denied_egress_is_written_to_the_event_log() {
        let mut f = fixture(vec![]);
        egress(&mut f.muxer, "CONNECT 10.0.0.1:80\n");
        let log = std::fs::read_to_string(f._dir.path().join("events.jsonl")).unwrap();
        let event: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
        assert_eq!(
            (event["reason"].as_str(), event["destination"].as_str()),
            (Some("not_allowlisted"), Some("10.0.0.1:80"))
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
    fn test_connections_beyond_the_cap_are_reset() {
        let mut f = fixture(vec![]);
        for port in 0..=MAX_CONNECTIONS as u32 {
            f.muxer
                .recv_from_guest(guest_pkt(10_000 + port, EGRESS_VSOCK_PORT, OP_REQUEST, &[]));
        }
        assert_eq!(f.muxer.connection_count(), MAX_CONNECTIONS);
        assert_eq!(
            f.muxer.stats.denied.last().unwrap().reason,
            DenyReason::ConnectionCap
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
    fn test_a_flood_of_denials_is_logged_up_to_the_cap_then_only_counted() {
        let mut f = fixture(vec![]);
        for i in 0..MAX_LOGGED_DENIALS as u32 + 50 {
            f.muxer.recv_from_guest(guest_pkt(i, 22, OP_REQUEST, &[]));
            drain(&mut f.muxer);
        }
        let log = std::fs::read_to_string(f._dir.path().join("events.jsonl")).unwrap();
        let last = log.lines().last().unwrap().to_string();
        assert_eq!(
            (
                log.lines().count() as u64,
                f.muxer.stats.denied_total,
                f.muxer.stats.denied.len()
            ),
            (
                MAX_LOGGED_DENIALS + 1,
                MAX_LOGGED_DENIALS + 50,
                MAX_RECORDED_DENIALS
            )
        );
        assert!(last.contains("denied_egress_suppressed"));
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
