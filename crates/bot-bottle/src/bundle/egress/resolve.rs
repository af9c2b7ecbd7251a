//! Pure-Rust name resolution for upstream connections.
//!
//! The sidecar is a static glibc binary, where `getaddrinfo` would try to load NSS modules, so we
//! never call it. [`Resolver::system`] reads `/etc/hosts` first (exact name match), then asks the
//! `nameserver`s of `/etc/resolv.conf` over UDP (TCP when the answer is truncated), through
//! hickory-resolver (pure Rust; DNS messages are never parsed by hand here). Inside a
//! Docker user network that nameserver is `127.0.0.11`, which knows container names and aliases.
//! Search domains and `ndots` are ignored on purpose: the proxy resolves exactly the name the
//! policy allowed, never a name the policy did not see.
//!
//! Both files are re-read on every lookup (they are small, and Docker rewrites them).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::Name;

use super::EgressError;

/// How long one DNS query may take: 127.0.0.11 answers in well under a millisecond; an
/// upstream recursive resolver within a second or two.
const DNS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts per query (UDP may drop a datagram).
const DNS_ATTEMPTS: usize = 2;
const DNS_PORT: u16 = 53;

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

/// Asks `nameservers` (in order) for the A records of exactly `name` (as a fully qualified
/// name: no search domains), then AAAA only when there are none (some resolvers forward AAAA
/// queries for local names upstream, where they may never be answered). hickory-resolver
/// speaks DNS (UDP, TCP when an answer is truncated); nothing is cached, since Docker
/// rewrites its records while a bottle runs.
async fn lookup_dns(name: &str, nameservers: &[SocketAddr]) -> Result<Vec<IpAddr>, EgressError> {
    let not_found = || EgressError::HostNotFound {
        host: name.to_owned(),
    };
    let listed = || {
        nameservers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fqdn = Name::from_ascii(format!("{name}.")).map_err(|_| not_found())?;
    let servers = nameservers
        .iter()
        .map(|server| {
            let mut config = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut config.connections {
                connection.port = server.port();
            }
            config
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.ndots = 0;
    options.timeout = DNS_ATTEMPT_TIMEOUT;
    options.attempts = DNS_ATTEMPTS;
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    let resolver = hickory_resolver::Resolver::builder_with_config(
        ResolverConfig::from_parts(None, Vec::new(), servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(options)
    .build()
    .map_err(|source| EgressError::DnsLookup {
        host: name.to_owned(),
        nameservers: listed(),
        source: Box::new(source),
    })?;
    match resolver.lookup_ip(fqdn).await {
        Ok(found) => {
            let mut addresses: Vec<IpAddr> = found.iter().collect();
            addresses.sort_by_key(IpAddr::is_ipv6);
            addresses.dedup();
            if addresses.is_empty() {
                Err(not_found())
            } else {
                Ok(addresses)
            }
        }
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Err(not_found()),
        Err(NetError::Timeout) => Err(EgressError::DnsTimeout {
            host: name.to_owned(),
            nameservers: listed(),
        }),
        Err(source) => Err(EgressError::DnsLookup {
            host: name.to_owned(),
            nameservers: listed(),
            source: Box::new(source),
        }),
    }
}

/// The address floor: ranges the proxy refuses to dial, whatever name led there, because they
/// lead back into the bundle, the host, another bottle, the cloud's metadata service or the
/// user's local network rather than to the internet. A manifest may waive the ranges for which
/// [`FloorRange::waivable`] holds, for names it lists in `[egress] allow_private`; the rest are
/// never dialled (loopback only in tests, through `ProxyConfig::allow_loopback_upstream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorRange {
    /// `0.0.0.0/8` ("this network"; `0.0.0.0` reaches the local host) and `::`.
    ThisNetwork,
    /// `127.0.0.0/8`, `::1`: the bundle's own services.
    Loopback,
    /// `169.254.0.0/16` (the cloud metadata service at 169.254.169.254), `fe80::/10`, and the
    /// deprecated site-local `fec0::/10`.
    LinkLocal,
    /// `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16` (RFC 1918).
    Private,
    /// `100.64.0.0/10` (RFC 6598, carrier-grade NAT).
    SharedAddressSpace,
    /// `198.18.0.0/15` (RFC 2544): the bottles' own internal networks live here.
    Benchmark,
    /// `192.0.2.0/24`, `198.51.100.0/24`, `203.0.113.0/24`, `2001:db8::/32`.
    Documentation,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `240.0.0.0/4`, including the broadcast address `255.255.255.255`.
    Reserved,
    /// `fc00::/7` (IPv6 unique local).
    UniqueLocal,
    /// An address of the Docker host as the bundle sees it (its gateways, `host-gateway`).
    HostGateway,
}

impl FloorRange {
    /// Whether `[egress] allow_private` may open this range for a name it lists.
    pub fn waivable(self) -> bool {
        matches!(
            self,
            FloorRange::Private
                | FloorRange::SharedAddressSpace
                | FloorRange::Benchmark
                | FloorRange::Documentation
                | FloorRange::UniqueLocal
                | FloorRange::HostGateway
        )
    }
}

impl std::fmt::Display for FloorRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FloorRange::ThisNetwork => "\"this network\" (0.0.0.0/8, ::)",
            FloorRange::Loopback => "loopback",
            FloorRange::LinkLocal => "link-local (cloud metadata)",
            FloorRange::Private => "private (RFC 1918)",
            FloorRange::SharedAddressSpace => "shared address space (100.64.0.0/10)",
            FloorRange::Benchmark => "benchmarking (198.18.0.0/15)",
            FloorRange::Documentation => "documentation",
            FloorRange::Multicast => "multicast",
            FloorRange::Reserved => "reserved or broadcast (240.0.0.0/4)",
            FloorRange::UniqueLocal => "IPv6 unique local (fc00::/7)",
            FloorRange::HostGateway => "the Docker host",
        })
    }
}

/// The floor range `ip` falls in, `None` for an address the proxy may dial. IPv6 forms that
/// carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64
/// `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that IPv4 address.
pub fn floor_range(ip: IpAddr) -> Option<FloorRange> {
    match ip {
        IpAddr::V4(v4) => floor_range_v4(v4),
        IpAddr::V6(v6) => floor_range_v6(v6),
    }
}

fn floor_range_v4(ip: Ipv4Addr) -> Option<FloorRange> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => FloorRange::ThisNetwork,
        (127, _, _) => FloorRange::Loopback,
        (169, 254, _) => FloorRange::LinkLocal,
        (10, _, _) | (192, 168, _) => FloorRange::Private,
        (172, 16..=31, _) => FloorRange::Private,
        (100, 64..=127, _) => FloorRange::SharedAddressSpace,
        (198, 18..=19, _) => FloorRange::Benchmark,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => FloorRange::Documentation,
        (224..=239, _, _) => FloorRange::Multicast,
        (240..=255, _, _) => FloorRange::Reserved,
        _ => return None,
    })
}

fn floor_range_v6(ip: Ipv6Addr) -> Option<FloorRange> {
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if let Some(v4) = ip.to_ipv4_mapped() {
        return floor_range_v4(v4);
    }
    if ip.is_unspecified() {
        return Some(FloorRange::ThisNetwork);
    }
    if ip.is_loopback() {
        return Some(FloorRange::Loopback);
    }
    if s[..6] == [0; 6] {
        // IPv4-compatible (deprecated): never a public destination of its own.
        return floor_range_v4(embedded(s[6], s[7])).or(Some(FloorRange::Reserved));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return floor_range_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return floor_range_v4(embedded(s[1], s[2]));
    }
    Some(match s[0] {
        x if x & 0xffc0 == 0xfe80 || x & 0xffc0 == 0xfec0 => FloorRange::LinkLocal,
        x if x & 0xfe00 == 0xfc00 => FloorRange::UniqueLocal,
        x if x & 0xff00 == 0xff00 => FloorRange::Multicast,
        0x2001 if s[1] == 0x0db8 => FloorRange::Documentation,
        _ => return None,
    })
}

/// The gateways of the routes in `/proc/net/route` (IPv4, little-endian hex): the Docker host
/// as the bundle sees it on each of its networks.
pub fn route_gateways(proc_net_route: &str) -> Vec<IpAddr> {
    let mut gateways: Vec<IpAddr> = proc_net_route
        .lines()
        .skip(1)
        .filter_map(|line| {
            let gateway = line.split_whitespace().nth(2)?;
            let raw = u32::from_str_radix(gateway, 16).ok()?;
            (raw != 0).then(|| IpAddr::V4(Ipv4Addr::from(raw.swap_bytes())))
        })
        .collect();
    gateways.sort();
    gateways.dedup();
    gateways
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UdpSocket;

    fn range(ip: &str) -> Option<FloorRange> {
        floor_range(ip.parse().unwrap())
    }

    #[test]
    fn the_floor_covers_every_non_internet_range_and_its_ipv6_spellings() {
        let cases = [
            ("0.0.0.0", FloorRange::ThisNetwork),
            ("0.1.2.3", FloorRange::ThisNetwork),
            ("::", FloorRange::ThisNetwork),
            ("127.0.0.1", FloorRange::Loopback),
            ("::1", FloorRange::Loopback),
            ("169.254.169.254", FloorRange::LinkLocal),
            ("fe80::1", FloorRange::LinkLocal),
            ("fec0::1", FloorRange::LinkLocal),
            ("10.0.0.1", FloorRange::Private),
            ("172.16.0.1", FloorRange::Private),
            ("172.31.255.255", FloorRange::Private),
            ("192.168.1.1", FloorRange::Private),
            ("100.64.0.1", FloorRange::SharedAddressSpace),
            ("100.127.255.254", FloorRange::SharedAddressSpace),
            ("198.18.0.1", FloorRange::Benchmark),
            ("198.19.255.1", FloorRange::Benchmark),
            ("192.0.2.1", FloorRange::Documentation),
            ("198.51.100.7", FloorRange::Documentation),
            ("203.0.113.9", FloorRange::Documentation),
            ("2001:db8::1", FloorRange::Documentation),
            ("224.0.0.1", FloorRange::Multicast),
            ("ff02::1", FloorRange::Multicast),
            ("255.255.255.255", FloorRange::Reserved),
            ("240.0.0.1", FloorRange::Reserved),
            ("fc00::1", FloorRange::UniqueLocal),
            ("fd12:3456::1", FloorRange::UniqueLocal),
            ("::ffff:169.254.169.254", FloorRange::LinkLocal),
            ("::ffff:10.0.0.1", FloorRange::Private),
            ("::ffff:127.0.0.1", FloorRange::Loopback),
            ("::10.0.0.1", FloorRange::Private),
            ("64:ff9b::a9fe:a9fe", FloorRange::LinkLocal),
            ("2002:a00:1::1", FloorRange::Private),
        ];
        let seen: Vec<(&str, Option<FloorRange>)> =
            cases.iter().map(|(ip, _)| (*ip, range(ip))).collect();
        let expected: Vec<(&str, Option<FloorRange>)> =
            cases.iter().map(|(ip, r)| (*ip, Some(*r))).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn the_floor_lets_internet_addresses_through() {
        for ip in [
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "198.20.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert_eq!(range(ip), None, "{ip}");
        }
    }

    #[test]
    fn only_ranges_that_lead_to_another_machine_can_be_waived() {
        let never = [
            FloorRange::ThisNetwork,
            FloorRange::Loopback,
            FloorRange::LinkLocal,
            FloorRange::Multicast,
            FloorRange::Reserved,
        ];
        assert!(never.iter().all(|r| !r.waivable()));
        assert!(FloorRange::Private.waivable() && FloorRange::HostGateway.waivable());
    }

    #[test]
    fn route_gateways_are_read_from_proc_net_route() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                     eth1\t00000000\t014812C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";

        let gateways = route_gateways(table);

        assert_eq!(
            gateways,
            vec![
                "172.18.0.1".parse::<IpAddr>().unwrap(),
                "198.18.72.1".parse().unwrap()
            ]
        );
    }

    const TYPE_A: u16 = 1;
    const TYPE_AAAA: u16 = 28;
    const CLASS_IN: u16 = 1;
    const RCODE_NXDOMAIN: u8 = 3;

    /// `name` as DNS labels (lower case).
    fn encode_name(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.') {
            out.push(u8::try_from(label.len()).unwrap());
            out.extend_from_slice(label.to_ascii_lowercase().as_bytes());
        }
        out.push(0);
        out
    }

    /// The question of a query: its name (lower case) and type, and where the question ends.
    fn question(query: &[u8]) -> (Vec<u8>, u16, usize) {
        let mut at = 12;
        while query[at] != 0 {
            at += usize::from(query[at]) + 1;
        }
        let name = query[12..=at].to_ascii_lowercase();
        let qtype = u16::from_be_bytes([query[at + 1], query[at + 2]]);
        (name, qtype, at + 5)
    }

    /// A response to `query` (its header and question, nothing it added) with these records.
    fn response(query: &[u8], rcode: u8, truncated: bool, records: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let (_, _, end) = question(query);
        let mut msg = query[..end].to_vec();
        let flags = 0x8180u16 | u16::from(rcode) | if truncated { 0x0200 } else { 0 };
        msg[2..4].copy_from_slice(&flags.to_be_bytes());
        msg[6..8].copy_from_slice(&u16::try_from(records.len()).unwrap().to_be_bytes());
        msg[8..12].copy_from_slice(&[0; 4]);
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
            let mut buf = [0u8; 1500];
            let wanted = encode_name(name);
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let query = &buf[..n];
                let (qname, qtype, _) = question(query);
                let known = qname == wanted;
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
                let (_, qtype, _) = question(&query);
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
    async fn a_server_answering_garbage_is_an_error_not_a_panic() {
        // Every answer is cut short, or has its counts inflated past its end.
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            let mut n_answer = 0usize;
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = response(&buf[..n], 0, false, &[(TYPE_A, vec![1, 2, 3, 4])]);
                match n_answer % 2 {
                    0 => reply.truncate(reply.len() - 3),
                    _ => reply[6..8].copy_from_slice(&[0xff, 0xff]),
                }
                n_answer += 1;
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        let resolver = Resolver::Dns {
            hosts: None,
            nameservers: vec![server],
        };

        let found = resolver.lookup("garbage.test").await;

        assert!(found.is_err(), "{found:?}");
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
