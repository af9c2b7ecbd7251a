//! Pure-Rust name resolution for upstream connections.
//!
//! The sidecar is a static glibc binary, where `getaddrinfo` would try to load NSS modules, so we
//! never call it. [`Resolver::system`] reads `/etc/hosts` first (exact name match), then asks the
//! `nameserver`s of `/etc/resolv.conf` over UDP (TCP when the answer is truncated). Inside a
//! Docker user network that nameserver is `127.0.0.11`, which knows container names and aliases.
//! Search domains and `ndots` are ignored on purpose: the proxy resolves exactly the name the
//! policy allowed, never a name the policy did not see.
//!
//! Both files are re-read on every lookup (they are small, and Docker rewrites them).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use super::EgressError;

/// How long one DNS attempt (A and AAAA queries together) may take: 127.0.0.11 answers in
/// well under a millisecond; an upstream recursive resolver within a second or two.
const DNS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for the second address family once the first has answered.
const DNS_SECOND_FAMILY_GRACE: Duration = Duration::from_millis(200);
/// Attempts per nameserver before moving to the next one (UDP may drop a datagram).
const DNS_ATTEMPTS: usize = 2;
/// Largest DNS message we read over UDP (no EDNS, so servers stay within 512; margin kept).
const DNS_UDP_MAX: usize = 1232;
const DNS_PORT: u16 = 53;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;

/// Where upstream addresses come from.
#[derive(Debug, Clone)]
pub enum Resolver {
    /// A hosts file, then the nameservers listed in a resolv.conf (both re-read per lookup).
    System {
        hosts: PathBuf,
        resolv_conf: PathBuf,
    },
    /// An optional hosts file, then these nameservers (any port): for tests and callers that
    /// know their nameserver.
    Dns {
        hosts: Option<PathBuf>,
        nameservers: Vec<SocketAddr>,
    },
    /// A fixed map from lower-case host name to addresses; anything else is not found.
    Static(HashMap<String, Vec<IpAddr>>),
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl Resolver {
    /// `/etc/hosts`, then the nameservers of `/etc/resolv.conf`.
    pub fn system() -> Self {
        Resolver::System {
            hosts: PathBuf::from("/etc/hosts"),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }

    /// A fixed map (host names are matched case-insensitively, without a trailing dot).
    pub fn fixed<'a>(entries: impl IntoIterator<Item = (&'a str, IpAddr)>) -> Self {
        let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (name, ip) in entries {
            map.entry(normalize(name)).or_default().push(ip);
        }
        Resolver::Static(map)
    }

    /// Addresses for `host`, IPv4 first. An IP literal (bracketed or not) resolves to itself.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, EgressError> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let name = normalize(host);
        let not_found = || EgressError::HostNotFound { host: name.clone() };
        match self {
            Resolver::Static(map) => map.get(&name).cloned().ok_or_else(not_found),
            Resolver::System { hosts, resolv_conf } => {
                if let Some(found) = lookup_hosts_file(hosts, &name).await? {
                    return Ok(found);
                }
                let nameservers = read_nameservers(resolv_conf).await?;
                lookup_dns(&name, &nameservers).await
            }
            Resolver::Dns { hosts, nameservers } => {
                if let Some(path) = hosts {
                    if let Some(found) = lookup_hosts_file(path, &name).await? {
                        return Ok(found);
                    }
                }
                lookup_dns(&name, nameservers).await
            }
        }
    }
}

fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Addresses for `name` in a hosts file, `None` if the file lacks it or does not exist.
async fn lookup_hosts_file(path: &Path, name: &str) -> Result<Option<Vec<IpAddr>>, EgressError> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EgressError::ReadResolverConfig {
                path: path.to_owned(),
                source,
            })
        }
    };
    let found = parse_hosts(&text, name);
    Ok((!found.is_empty()).then_some(found))
}

/// Every address a hosts file gives `name` (already normalised), IPv4 first.
fn parse_hosts(text: &str, name: &str) -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = text
        .lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("");
            let mut fields = line.split_whitespace();
            let ip = fields.next()?.parse::<IpAddr>().ok()?;
            fields.any(|alias| normalize(alias) == name).then_some(ip)
        })
        .collect();
    found.sort_by_key(IpAddr::is_ipv6);
    found.dedup();
    found
}

async fn read_nameservers(path: &Path) -> Result<Vec<SocketAddr>, EgressError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|source| {
        EgressError::ReadResolverConfig {
            path: path.to_owned(),
            source,
        }
    })?;
    let servers = parse_resolv_conf(&text);
    if servers.is_empty() {
        return Err(EgressError::NoNameserver {
            path: path.to_owned(),
        });
    }
    Ok(servers)
}

/// The `nameserver` entries of a resolv.conf, port 53 (an IPv6 zone suffix is dropped).
fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == "nameserver").then_some(())?;
            let addr = fields.next()?;
            let addr = addr.split('%').next().unwrap_or(addr);
            Some(SocketAddr::new(addr.parse().ok()?, DNS_PORT))
        })
        .collect()
}

async fn lookup_dns(name: &str, nameservers: &[SocketAddr]) -> Result<Vec<IpAddr>, EgressError> {
    let not_found = || EgressError::HostNotFound {
        host: name.to_owned(),
    };
    let qname = encode_name(name).ok_or_else(not_found)?;
    let mut last_error = None;
    for &server in nameservers {
        for _ in 0..DNS_ATTEMPTS {
            let (v4, v6) = both_families(server, name, &qname).await;
            match (v4, v6) {
                (Err(EgressError::DnsTimeout { .. }), Err(EgressError::DnsTimeout { .. })) => {}
                (Ok(mut a), Ok(aaaa)) => {
                    a.extend(aaaa);
                    return if a.is_empty() {
                        Err(not_found())
                    } else {
                        Ok(a)
                    };
                }
                (Ok(a), Err(_)) if !a.is_empty() => return Ok(a),
                (Err(_), Ok(aaaa)) if !aaaa.is_empty() => return Ok(aaaa),
                (Err(e), _) | (_, Err(e)) => last_error = Some(e),
            }
        }
    }
    Err(last_error.unwrap_or_else(|| EgressError::DnsTimeout {
        host: name.to_owned(),
        nameservers: nameservers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }))
}

/// A and AAAA queries in parallel, each bounded by [`DNS_ATTEMPT_TIMEOUT`]. Once one family has
/// answered with addresses, the other gets only [`DNS_SECOND_FAMILY_GRACE`]: some resolvers
/// forward AAAA queries for local names upstream, where they may never be answered.
async fn both_families(
    server: SocketAddr,
    name: &str,
    qname: &[u8],
) -> (
    Result<Vec<IpAddr>, EgressError>,
    Result<Vec<IpAddr>, EgressError>,
) {
    let bounded = |qtype| async move {
        timeout(DNS_ATTEMPT_TIMEOUT, query(server, name, qname, qtype))
            .await
            .unwrap_or_else(|_| {
                Err(EgressError::DnsTimeout {
                    host: name.to_owned(),
                    nameservers: server.to_string(),
                })
            })
    };
    let other_with_grace = |first: &Result<Vec<IpAddr>, EgressError>| {
        if matches!(first, Ok(found) if !found.is_empty()) {
            DNS_SECOND_FAMILY_GRACE
        } else {
            DNS_ATTEMPT_TIMEOUT
        }
    };
    let a = bounded(TYPE_A);
    let aaaa = bounded(TYPE_AAAA);
    tokio::pin!(a, aaaa);
    let late = || Ok(Vec::new());
    tokio::select! {
        v4 = &mut a => {
            let v6 = timeout(other_with_grace(&v4), &mut aaaa).await.unwrap_or_else(|_| late());
            (v4, v6)
        }
        v6 = &mut aaaa => {
            let v4 = timeout(other_with_grace(&v6), &mut a).await.unwrap_or_else(|_| late());
            (v4, v6)
        }
    }
}

/// One query (UDP, retried over TCP when truncated). NXDOMAIN and empty answers give `Ok(vec![])`.
async fn query(
    server: SocketAddr,
    name: &str,
    qname: &[u8],
    qtype: u16,
) -> Result<Vec<IpAddr>, EgressError> {
    let io_err = |source| EgressError::DnsIo { server, source };
    let id = random_id();
    let message = encode_query(id, qname, qtype);
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io_err)?;
    socket.connect(server).await.map_err(io_err)?;
    socket.send(&message).await.map_err(io_err)?;
    let mut buf = vec![0u8; DNS_UDP_MAX];
    let answer = loop {
        let n = socket.recv(&mut buf).await.map_err(io_err)?;
        // Datagrams with another id are stale or forged: keep waiting for ours.
        if let Ok(answer) = parse_response(&buf[..n], id, qtype) {
            break answer;
        }
    };
    let answer = if answer.truncated {
        query_tcp(server, &message, id, qtype)
            .await?
            .map_err(|reason| malformed(name, server, reason))?
    } else {
        answer
    };
    match answer.rcode {
        0 | RCODE_NXDOMAIN => Ok(answer.addresses),
        rcode => Err(EgressError::DnsServerFailure {
            host: name.to_owned(),
            server,
            rcode,
        }),
    }
}

fn malformed(name: &str, server: SocketAddr, reason: &'static str) -> EgressError {
    EgressError::DnsMalformed {
        host: name.to_owned(),
        server,
        reason,
    }
}

async fn query_tcp(
    server: SocketAddr,
    message: &[u8],
    id: u16,
    qtype: u16,
) -> Result<Result<Answer, &'static str>, EgressError> {
    let io_err = |source| EgressError::DnsIo { server, source };
    let mut stream = TcpStream::connect(server).await.map_err(io_err)?;
    let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed).await.map_err(io_err)?;
    let len = stream.read_u16().await.map_err(io_err)?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.map_err(io_err)?;
    Ok(parse_response(&buf, id, qtype))
}

fn random_id() -> u16 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (hasher.finish() & 0xffff) as u16
}

/// `name` as DNS labels, `None` if a label is empty or longer than 63 bytes.
fn encode_name(name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..=63).contains(l))?;
        out.push(len);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    (out.len() <= 255).then_some(out)
}

fn encode_query(id: u16, qname: &[u8], qtype: u16) -> Vec<u8> {
    let mut msg = Vec::with_capacity(12 + qname.len() + 4);
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&0x0100u16.to_be_bytes()); // standard query, recursion desired
    msg.extend_from_slice(&1u16.to_be_bytes()); // one question
    msg.extend_from_slice(&[0; 6]); // no answer, authority or additional records
    msg.extend_from_slice(qname);
    msg.extend_from_slice(&qtype.to_be_bytes());
    msg.extend_from_slice(&CLASS_IN.to_be_bytes());
    msg
}

#[derive(Debug, PartialEq, Eq)]
struct Answer {
    rcode: u8,
    truncated: bool,
    addresses: Vec<IpAddr>,
}

/// Reads a DNS response: checks id and QR bit, collects A/AAAA records of the answer section
/// (a recursive resolver's CNAME chain ends in them).
fn parse_response(msg: &[u8], id: u16, qtype: u16) -> Result<Answer, &'static str> {
    let u16_at = |pos: usize| -> Result<u16, &'static str> {
        msg.get(pos..pos + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or("message too short")
    };
    if u16_at(0)? != id {
        return Err("wrong id");
    }
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        return Err("not a response");
    }
    let questions = u16_at(4)?;
    let answers = u16_at(6)?;
    let mut pos = 12;
    for _ in 0..questions {
        pos = skip_name(msg, pos)? + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..answers {
        pos = skip_name(msg, pos)?;
        let rtype = u16_at(pos)?;
        let class = u16_at(pos + 2)?;
        let len = usize::from(u16_at(pos + 8)?);
        let data = msg
            .get(pos + 10..pos + 10 + len)
            .ok_or("record data past the end")?;
        pos += 10 + len;
        if class != CLASS_IN || rtype != qtype {
            continue;
        }
        match (rtype, <[u8; 4]>::try_from(data), <[u8; 16]>::try_from(data)) {
            (TYPE_A, Ok(v4), _) => addresses.push(IpAddr::from(v4)),
            (TYPE_AAAA, _, Ok(v6)) => addresses.push(IpAddr::from(v6)),
            _ => return Err("address record of the wrong length"),
        }
    }
    Ok(Answer {
        rcode: (flags & 0x000f) as u8,
        truncated: flags & 0x0200 != 0,
        addresses,
    })
}

/// Position just past the (possibly compressed) name starting at `pos`.
fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, &'static str> {
    loop {
        let len = *msg.get(pos).ok_or("name past the end")?;
        match len & 0xc0 {
            0x00 if len == 0 => return Ok(pos + 1),
            0x00 => pos += 1 + usize::from(len),
            0xc0 => return Ok(pos + 2),
            _ => return Err("unknown label type"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response to `query` (a message made by `encode_query`) with these records.
    fn response(query: &[u8], rcode: u8, truncated: bool, records: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut msg = query.to_vec();
        let flags = 0x8180u16 | u16::from(rcode) | if truncated { 0x0200 } else { 0 };
        msg[2..4].copy_from_slice(&flags.to_be_bytes());
        msg[6..8].copy_from_slice(&u16::try_from(records.len()).unwrap().to_be_bytes());
        for (rtype, data) in records {
            msg.extend_from_slice(&[0xc0, 12]); // pointer to the question's name
            msg.extend_from_slice(&rtype.to_be_bytes());
            msg.extend_from_slice(&CLASS_IN.to_be_bytes());
            msg.extend_from_slice(&60u32.to_be_bytes());
            msg.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            msg.extend_from_slice(data);
        }
        msg
    }

    /// A real UDP DNS server on 127.0.0.1 answering every A query for `name` with `v4` and
    /// everything else with NXDOMAIN. Returns its address.
    async fn serve_dns(name: &'static str, v4: Ipv4Addr) -> SocketAddr {
        serve_dns_with(name, v4, true).await
    }

    /// Like [`serve_dns`]; with `answer_aaaa` false, AAAA queries are never answered.
    async fn serve_dns_with(name: &'static str, v4: Ipv4Addr, answer_aaaa: bool) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let wanted = encode_name(name).unwrap();
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let query = &buf[..n];
                let qname = &query[12..n - 4];
                let qtype = u16::from_be_bytes([query[n - 4], query[n - 3]]);
                let known = qname == wanted.as_slice();
                let records = match (known, qtype) {
                    (true, TYPE_A) => vec![(TYPE_A, v4.octets().to_vec())],
                    _ => vec![],
                };
                if qtype == TYPE_AAAA && !answer_aaaa {
                    continue;
                }
                let rcode = if known { 0 } else { RCODE_NXDOMAIN };
                let reply = response(query, rcode, false, &records);
                socket.send_to(&reply, peer).await.unwrap();
            }
        });
        addr
    }

    #[test]
    fn parse_response_collects_a_records_and_skips_others() {
        let query = encode_query(7, &encode_name("a.test").unwrap(), TYPE_A);
        let msg = response(
            &query,
            0,
            false,
            &[
                (5, encode_name("b.test").unwrap()),
                (TYPE_A, vec![10, 0, 0, 1]),
                (TYPE_A, vec![10, 0, 0, 2]),
            ],
        );

        let answer = parse_response(&msg, 7, TYPE_A).unwrap();

        assert_eq!(
            answer.addresses,
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
    }

    #[test]
    fn parse_response_reads_aaaa_rcode_and_truncation() {
        let query = encode_query(9, &encode_name("a.test").unwrap(), TYPE_AAAA);
        let v6 = Ipv6Addr::LOCALHOST.octets().to_vec();
        let msg = response(&query, 2, true, &[(TYPE_AAAA, v6)]);

        let answer = parse_response(&msg, 9, TYPE_AAAA).unwrap();

        assert_eq!(
            answer,
            Answer {
                rcode: 2,
                truncated: true,
                addresses: vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]
            }
        );
    }

    #[test]
    fn parse_response_rejects_wrong_id() {
        let query = encode_query(1, &encode_name("a.test").unwrap(), TYPE_A);
        let msg = response(&query, 0, false, &[]);
        assert_eq!(parse_response(&msg, 2, TYPE_A), Err("wrong id"));
    }

    #[test]
    fn parse_response_rejects_truncated_garbage_without_panicking() {
        let query = encode_query(1, &encode_name("a.test").unwrap(), TYPE_A);
        let msg = response(&query, 0, false, &[(TYPE_A, vec![1, 2, 3, 4])]);
        let results: Vec<bool> = (0..msg.len())
            .map(|cut| parse_response(&msg[..cut], 1, TYPE_A).is_err())
            .collect();
        assert_eq!(results, vec![true; msg.len()]);
    }

    #[test]
    fn encode_name_rejects_empty_and_long_labels() {
        assert_eq!(encode_name("a..b"), None);
        assert_eq!(encode_name(&"x".repeat(64)), None);
        assert_eq!(encode_name("ab.c"), Some(vec![2, b'a', b'b', 1, b'c', 0]));
    }

    #[test]
    fn hosts_file_matches_aliases_case_insensitively_ipv4_first() {
        let text = "# comment\n::1 Allowed.Test\n127.0.0.1\tlocalhost allowed.test # x\nbad line\n";
        assert_eq!(
            parse_hosts(text, "allowed.test"),
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            ]
        );
    }

    #[test]
    fn resolv_conf_nameservers_are_read_with_port_53() {
        let text = "search x\nnameserver 127.0.0.11\noptions ndots:0\nnameserver fe80::1%eth0\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "127.0.0.11:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn fixed_resolver_ignores_case_and_trailing_dot() {
        let resolver = Resolver::fixed([("Allowed.Test", IpAddr::V4(Ipv4Addr::LOCALHOST))]);
        let found = resolver.lookup("ALLOWED.test.").await.unwrap();
        assert_eq!(found, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    }

    #[tokio::test]
    async fn fixed_resolver_reports_unknown_host_as_not_found() {
        let resolver = Resolver::fixed([]);
        let err = resolver.lookup("nope.test").await.unwrap_err();
        assert!(matches!(err, EgressError::HostNotFound { host } if host == "nope.test"));
    }

    #[tokio::test]
    async fn ip_literal_resolves_to_itself_without_dns() {
        let resolver = Resolver::Dns {
            hosts: None,
            nameservers: vec![],
        };
        let found = resolver.lookup("[::1]").await.unwrap();
        assert_eq!(found, vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
    }

    #[tokio::test]
    async fn dns_resolver_gets_address_from_a_real_udp_server() {
        let server = serve_dns("allowed.test", Ipv4Addr::new(127, 0, 0, 9)).await;
        let resolver = Resolver::Dns {
            hosts: None,
            nameservers: vec![server],
        };

        let found = resolver.lookup("Allowed.Test.").await.unwrap();

        assert_eq!(found, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]);
    }

    #[tokio::test]
    async fn dns_resolver_returns_a_records_when_aaaa_is_never_answered() {
        let server = serve_dns_with("allowed.test", Ipv4Addr::new(127, 0, 0, 9), false).await;
        let resolver = Resolver::Dns {
            hosts: None,
            nameservers: vec![server],
        };
        let started = std::time::Instant::now();

        let found = resolver.lookup("allowed.test").await.unwrap();

        assert_eq!(found, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]);
        assert!(
            started.elapsed() < DNS_ATTEMPT_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn truncated_udp_answer_is_retried_over_tcp() {
        // UDP says "truncated, no records"; TCP on the same port has the real answer.
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(server).await.unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                let reply = response(&buf[..n], 0, true, &[]);
                udp.send_to(&reply, peer).await.unwrap();
            }
        });
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let len = usize::from(stream.read_u16().await.unwrap());
                let mut query = vec![0u8; len];
                stream.read_exact(&mut query).await.unwrap();
                let qtype = u16::from_be_bytes([query[len - 4], query[len - 3]]);
                let records: Vec<(u16, Vec<u8>)> = [(TYPE_A, vec![127, 0, 0, 5])]
                    .into_iter()
                    .filter(|(t, _)| *t == qtype)
                    .collect();
                let reply = response(&query, 0, false, &records);
                let mut framed = u16::try_from(reply.len()).unwrap().to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                stream.write_all(&framed).await.unwrap();
            }
        });
        let resolver = Resolver::Dns {
            hosts: None,
            nameservers: vec![server],
        };

        let found = resolver.lookup("big.test").await.unwrap();

        assert_eq!(found, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5))]);
    }

    #[tokio::test]
    async fn dns_resolver_reports_nxdomain_as_not_found() {
        let server = serve_dns("allowed.test", Ipv4Addr::new(127, 0, 0, 9)).await;
        let resolver = Resolver::Dns {
            hosts: None,
            nameservers: vec![server],
        };

        let err = resolver.lookup("other.test").await.unwrap_err();

        assert!(matches!(err, EgressError::HostNotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn hosts_file_wins_over_dns() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.7 allowed.test\n").unwrap();
        let server = serve_dns("allowed.test", Ipv4Addr::new(127, 0, 0, 9)).await;
        let resolver = Resolver::Dns {
            hosts: Some(hosts),
            nameservers: vec![server],
        };

        let found = resolver.lookup("allowed.test").await.unwrap();

        assert_eq!(found, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7))]);
    }

    #[tokio::test]
    async fn system_resolver_without_nameserver_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let resolv_conf = dir.path().join("resolv.conf");
        std::fs::write(&resolv_conf, "search example\n").unwrap();
        let resolver = Resolver::System {
            hosts: dir.path().join("missing-hosts"),
            resolv_conf: resolv_conf.clone(),
        };

        let err = resolver.lookup("allowed.test").await.unwrap_err();

        assert!(matches!(err, EgressError::NoNameserver { path } if path == resolv_conf));
    }
}
