//! The egress policy: which destination a guest connection may reach (the allowlist decisions
//! of direct and header mode, see the [`muxer`](super::muxer) for both), why one was refused
//! ([`DenyReason`]), and the record of refusals ([`DeniedEgress`] events, kept in memory and
//! written to the event log, both capped so a hostile guest cannot exhaust the host).

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::muxer::MuxerStats;
use crate::config::AllowRule;

/// Denied-egress events written to the event log per VM; later ones are only counted, so a
/// hostile guest cannot fill the host's disk (one `denied_egress_suppressed` line marks the cut).
pub const MAX_LOGGED_DENIALS: u64 = 10_000;
/// Denials kept in memory in [`MuxerStats::denied`].
pub const MAX_RECORDED_DENIALS: usize = 1024;

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

/// A refused request: why, and the destination it named if it named one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) destination: Option<SocketAddrV4>,
    pub(super) reason: DenyReason,
}

/// The machine's allowlist and the decisions made from it.
pub(super) struct EgressPolicy {
    allowlist: Vec<AllowRule>,
}

impl EgressPolicy {
    pub(super) fn new(allowlist: Vec<AllowRule>) -> Self {
        Self { allowlist }
    }

    /// Direct mode: vsock port P leads to (A, P) for the one allowlisted address A that has a
    /// rule for port P. No rule, or several addresses with that port: refused.
    pub(super) fn direct_destination(&self, vsock_port: u32) -> Result<SocketAddrV4, DenyReason> {
        let mut addrs: Vec<Ipv4Addr> = self
            .allowlist
            .iter()
            .filter(|rule| u32::from(rule.port) == vsock_port)
            .map(|rule| rule.addr)
            .collect();
        addrs.sort();
        addrs.dedup();
        match addrs.as_slice() {
            [addr] => Ok(SocketAddrV4::new(*addr, vsock_port as u16)),
            [] => Err(DenyReason::UnknownVsockPort(vsock_port)),
            _ => Err(DenyReason::AmbiguousPort(vsock_port)),
        }
    }

    /// Header mode: the guest's `CONNECT a.b.c.d:port` line (without its newline) names a
    /// destination, allowed only when that exact (address, port) pair is in the allowlist.
    pub(super) fn egress_destination(&self, line: &[u8]) -> Result<SocketAddrV4, Refusal> {
        let Some(destination) = parse_egress_request(line) else {
            return Err(Refusal {
                destination: None,
                reason: DenyReason::MalformedRequest,
            });
        };
        let rule = AllowRule {
            addr: *destination.ip(),
            port: destination.port(),
        };
        if !self.allowlist.contains(&rule) {
            return Err(Refusal {
                destination: Some(destination),
                reason: DenyReason::NotAllowlisted,
            });
        }
        Ok(destination)
    }
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

/// Where denials are recorded: the event log (optional; its first [`MAX_LOGGED_DENIALS`]
/// events, then one `denied_egress_suppressed` line) and the muxer's counters.
pub(super) struct DenialLog {
    file: Option<File>,
}

impl DenialLog {
    /// Denials written to the event log at `path` (created, or appended to).
    pub(super) fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self { file: Some(file) })
    }

    /// No event log: denials are only counted and kept in memory.
    pub(super) fn counted_only() -> Self {
        Self { file: None }
    }

    /// Records one denial: counted in `stats.denied_total`, written to the log up to the cap,
    /// kept in `stats.denied` while there are fewer than [`MAX_RECORDED_DENIALS`].
    pub(super) fn record(&mut self, stats: &mut MuxerStats, event: DeniedEgress) {
        stats.denied_total += 1;
        if let Some(log) = &mut self.file {
            // A full disk must not let the connection through: the caller resets it anyway.
            if stats.denied_total <= MAX_LOGGED_DENIALS {
                let _ = writeln!(log, "{}", event.to_json());
            } else if stats.denied_total == MAX_LOGGED_DENIALS + 1 {
                let _ = writeln!(
                    log,
                    "{}",
                    serde_json::json!({"event": "denied_egress_suppressed", "after": MAX_LOGGED_DENIALS})
                );
            }
        }
        if stats.denied.len() < MAX_RECORDED_DENIALS {
            stats.denied.push(event);
        }
    }
}

/// The policy as the guest meets it: each refusal through the muxer (the RST the guest sees,
/// the denial recorded, the event log and its cap).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::muxer::{EGRESS_VSOCK_PORT, MAX_CONNECTIONS, MAX_REQUEST_LINE_BYTES};
    use crate::virtio::vsock::packet::*;
    use crate::virtio::vsock::test_fixture::*;
    use std::net::TcpListener;

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
}
