//! The egress policy: which `host:port` pairs a bottle may reach. Pure, no I/O.
//!
//! Rule syntax (allow and deny lists alike):
//! - `host` — exactly that host name;
//! - `*.suffix` — every name *below* `suffix` (`a.suffix`, `a.b.suffix`), not `suffix` itself;
//! - an IP literal (`1.2.3.4`, `[::1]`, `::1`) — that address, exactly;
//! - any of those followed by `:port` (only that port) or `:*` (every port). Without a port an
//!   allow rule opens port 443 only; a deny rule without a port denies every port.
//!
//! Order of evaluation, first match wins:
//! 1. the request host is malformed → deny (`invalid_host`);
//! 2. a deny rule matches → deny (`deny_rule`): deny always wins over allow;
//! 3. the host is an IP literal (including numeric forms like `2130706433` or `0x7f.1` that some
//!    resolvers treat as addresses) → allowed only by an exact IP allow rule, else `ip_literal`;
//! 4. the host is a well-known DNS-over-HTTPS endpoint (or below one) → allowed only by an exact
//!    host allow rule naming it (a `*.suffix` rule never opens a DoH endpoint), else
//!    `doh_endpoint`;
//! 5. an allow rule matches → allow;
//! 6. otherwise → deny (`not_allowed`).
//!
//! Host names are normalised once ([`normalize_host`]: IDNA to ASCII, lower case, one trailing
//! dot dropped) before they are compared, intercepted or logged.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::request_rules::{RequestRule, RequestRuleSpec, RequestRules};
use super::resolve::{floor_range, FloorRange};
use super::EgressError;

/// Well-known DNS-over-HTTPS endpoints. Each entry also covers every name below it. A resolver
/// reachable over HTTPS would let the agent resolve (and tunnel data through) names the policy
/// never sees, so these are denied unless an allow rule names the exact host.
pub const DOH_ENDPOINTS: &[&str] = &[
    "dns.google",
    "dns.google.com",
    "8888.google",
    "dns64.dns.google",
    "cloudflare-dns.com",
    "one.one.one.one",
    "1dot1dot1dot1.cloudflare-dns.com",
    "cloudflare-gateway.com",
    "dns.quad9.net",
    "dns9.quad9.net",
    "dns10.quad9.net",
    "dns11.quad9.net",
    "doh.opendns.com",
    "doh.familyshield.opendns.com",
    "doh.umbrella.com",
    "dns.adguard.com",
    "dns.adguard-dns.com",
    "unfiltered.adguard-dns.com",
    "family.adguard-dns.com",
    "doh.cleanbrowsing.org",
    "doh.dns.sb",
    "dns.nextdns.io",
    "doh.mullvad.net",
    "dns.mullvad.net",
    "doh.libredns.gr",
    "dns.alidns.com",
    "doh.pub",
    "doh.360.cn",
    "dns.twnic.tw",
    "ordns.he.net",
    "dns.controld.com",
    "freedns.controld.com",
    "doh.xfinity.com",
    "dns0.eu",
    "dns.switch.ch",
    "dns.digitale-gesellschaft.ch",
    "doh.applied-privacy.net",
    "dns.njal.la",
];

/// Longest host name DNS can carry (RFC 1035, without the trailing dot).
const MAX_HOST_LEN: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// What a rule matches on the host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// Exactly this (normalised) host name.
    Exact(String),
    /// Any name strictly below this suffix (stored without the leading `*.`).
    Suffix(String),
    /// Exactly this address (IPv4-mapped IPv6 stored as IPv4).
    Ip(IpAddr),
}

/// The port part of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortSpec {
    /// No port written: port 443 in an allow rule, every port in a deny rule.
    Unwritten,
    /// `:*`: every port.
    Any,
    /// `:port`.
    One(u16),
}

/// The port an allow rule without a port opens (HTTPS through `CONNECT`).
pub const DEFAULT_ALLOW_PORT: u16 = 443;

/// One parsed allow or deny rule. Keeps its original text for events and messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    text: String,
    pub(crate) host: HostPattern,
    pub(crate) port: PortSpec,
}

/// A request host after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Name(String),
    Ip(IpAddr),
    /// A numeric form (`2130706433`, `0x7f.1`) that is no valid name or canonical address.
    /// Treated as an IP literal that no rule can list.
    Numeric,
}

/// Why a request was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// A deny rule matched (deny wins over allow).
    DenyRule { rule: String },
    /// The host is an IP literal (or a numeric form of one) that no allow rule lists exactly.
    IpLiteral,
    /// The host is a DNS-over-HTTPS endpoint that no allow rule names exactly.
    DohEndpoint,
    /// No allow rule matched.
    NotAllowed,
    /// The host is not a syntactically valid host name or address.
    InvalidHost,
}

impl DenyReason {
    /// Stable machine-readable code, used in event lines.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::DenyRule { .. } => "deny_rule",
            DenyReason::IpLiteral => "ip_literal",
            DenyReason::DohEndpoint => "doh_endpoint",
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::InvalidHost => "invalid_host",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::DenyRule { rule } => write!(f, "matched deny rule `{rule}`"),
            DenyReason::IpLiteral => f.write_str("IP literals are denied unless listed exactly"),
            DenyReason::DohEndpoint => {
                f.write_str("DNS-over-HTTPS endpoints are denied unless listed exactly")
            }
            DenyReason::NotAllowed => f.write_str("no allow rule matches"),
            DenyReason::InvalidHost => f.write_str("not a valid host name"),
        }
    }
}

/// The outcome of [`EgressPolicy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the allow rule with this text.
    Allow { rule: String },
    /// Denied.
    Deny { reason: DenyReason },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The text of the rule that decided, if a rule did.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Decision::Allow { rule }
            | Decision::Deny {
                reason: DenyReason::DenyRule { rule },
            } => Some(rule),
            Decision::Deny { .. } => None,
        }
    }

    /// Stable machine-readable reason code: `allow_rule` or one of [`DenyReason::code`].
    pub fn reason_code(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allow_rule",
            Decision::Deny { reason } => reason.code(),
        }
    }
}

/// Allow and deny lists plus the message a denied agent reads, and the exceptions to the
/// address floor.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    deny_message: String,
    /// `[egress] allow_private`: names (or addresses) that may lead to a waivable floor range.
    private_ok: Vec<Rule>,
    /// The Docker host as the bundle sees it (its route gateways): never dialled unless waived.
    host_addresses: Vec<IpAddr>,
    /// `[egress] allow` tables with `methods` or `paths`: what requests to their host may be.
    requests: Vec<RequestRule>,
}

/// Why the proxy refuses to dial an address an allowed request led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloorRefusal {
    pub ip: IpAddr,
    pub range: FloorRange,
}

impl fmt::Display for FloorRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {}", self.ip, self.range)?;
        if self.range.waivable() {
            f.write_str(
                ": `[egress] allow_private = [\"<name>\"]` in the manifest opens it for a name",
            )?;
        }
        Ok(())
    }
}

impl EgressPolicy {
    /// Parses both rule lists. The first malformed rule is reported by its text.
    pub fn new(allow: &[String], deny: &[String], deny_message: &str) -> Result<Self, EgressError> {
        Ok(EgressPolicy {
            allow: allow
                .iter()
                .map(|r| parse_rule(r))
                .collect::<Result<_, _>>()?,
            deny: deny
                .iter()
                .map(|r| parse_rule(r))
                .collect::<Result<_, _>>()?,
            deny_message: deny_message.to_owned(),
            private_ok: Vec::new(),
            host_addresses: Vec::new(),
            requests: Vec::new(),
        })
    }

    /// The manifest's `[egress] allow` tables (`{ host, methods?, paths? }`): each allows its
    /// host like the string rule `host` would; one with `methods` or `paths` also limits the
    /// requests to that host (see [`super::request_rules`]). The first bad one is named.
    pub fn with_request_rules(mut self, specs: &[RequestRuleSpec]) -> Result<Self, EgressError> {
        for spec in specs {
            let rule = RequestRule::parse(spec)?;
            let host = rule.host_rule();
            if !self.allow.iter().any(|r| r.text == host.text) {
                self.allow.push(host.clone());
            }
            if rule.restricts() && !self.requests.contains(&rule) {
                self.requests.push(rule);
            }
        }
        Ok(self)
    }

    /// The request rules for `host:port` (normalised like [`EgressPolicy::decide`]); empty:
    /// its requests are not checked. Deny rules are [`EgressPolicy::decide`]'s business.
    pub fn request_rules(&self, host: &str, port: u16) -> RequestRules {
        let Some(target) = normalize_target(host) else {
            return RequestRules::default();
        };
        RequestRules::new(
            self.requests
                .iter()
                .filter(|r| r.applies(&target, port))
                .cloned()
                .collect(),
        )
    }

    /// The manifest's `[egress] allow_private`: host names, `*.suffix` patterns or addresses
    /// (no port) whose resolved addresses may lie in a waivable floor range (private, shared,
    /// benchmark, documentation, unique-local, the Docker host).
    pub fn with_private_exceptions(mut self, entries: &[String]) -> Result<Self, EgressError> {
        for entry in entries {
            let rule = parse_rule(entry)?;
            if rule.port != PortSpec::Unwritten {
                return Err(invalid(entry, RuleError::PrivateWithPort));
            }
            self.private_ok.push(rule);
        }
        Ok(self)
    }

    /// The addresses of the Docker host as the bundle sees it: refused like a private range.
    pub fn with_host_addresses(mut self, addresses: Vec<IpAddr>) -> Self {
        self.host_addresses = addresses;
        self
    }

    /// Whether `[egress] allow_private` names `host`.
    pub fn allows_private(&self, host: &str) -> bool {
        normalize_target(host)
            .is_some_and(|target| self.private_ok.iter().any(|r| r.matches_host(&target)))
    }

    /// The address floor: whether `ip`, which the allowed request for `host` led to, may be
    /// dialled. `allow_loopback` only for tests and benchmarks.
    pub fn may_dial(
        &self,
        host: &str,
        ip: IpAddr,
        allow_loopback: bool,
    ) -> Result<(), FloorRefusal> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let range = if self.host_addresses.contains(&ip) {
            Some(FloorRange::HostGateway)
        } else {
            floor_range(ip)
        };
        let Some(range) = range else {
            return Ok(());
        };
        if range == FloorRange::Loopback && allow_loopback {
            return Ok(());
        }
        if range.waivable() && self.allows_private(host) {
            Ok(())
        } else {
            Err(FloorRefusal { ip, range })
        }
    }

    /// The manifest's message for denied requests, sent in every 403 body.
    pub fn deny_message(&self) -> &str {
        &self.deny_message
    }

    /// Adds an allow rule (the supervisor's, while a bottle runs). Deny rules still win: a
    /// rule for one host that a deny rule covers is refused, saying which.
    pub fn allow_more(&mut self, rule: &str) -> Result<(), EgressError> {
        let parsed = parse_rule(rule)?;
        let target = match &parsed.host {
            HostPattern::Exact(name) => Some(Target::Name(name.clone())),
            HostPattern::Ip(ip) => Some(Target::Ip(*ip)),
            HostPattern::Suffix(_) => None,
        };
        if let Some(target) = target {
            let port = match parsed.port {
                PortSpec::One(port) => port,
                PortSpec::Unwritten | PortSpec::Any => DEFAULT_ALLOW_PORT,
            };
            if let Some(deny) = self.deny.iter().find(|d| d.matches(&target, port, true)) {
                return Err(invalid(
                    rule,
                    RuleError::DenyCovers {
                        deny: deny.text.clone(),
                    },
                ));
            }
        }
        if !self.allow.iter().any(|r| r.text == parsed.text) {
            self.allow.push(parsed);
        }
        Ok(())
    }

    /// The rules' texts: (allow, deny).
    pub fn rules(&self) -> (Vec<String>, Vec<String>) {
        let texts = |rules: &[Rule]| rules.iter().map(|r| r.text.clone()).collect();
        (texts(&self.allow), texts(&self.deny))
    }

    /// Decides whether `host:port` may be reached. Pure; see the module docs for the order.
    /// `host` may be a name, an IP literal, or a bracketed IPv6 literal (`[::1]`).
    pub fn decide(&self, host: &str, port: u16) -> Decision {
        let Some(target) = normalize_target(host) else {
            return Decision::Deny {
                reason: DenyReason::InvalidHost,
            };
        };
        if let Some(rule) = self.deny.iter().find(|r| r.matches(&target, port, true)) {
            return Decision::Deny {
                reason: DenyReason::DenyRule {
                    rule: rule.text.clone(),
                },
            };
        }
        let exact_only = match &target {
            Target::Ip(_) | Target::Numeric => Some(DenyReason::IpLiteral),
            Target::Name(name) if is_doh_endpoint(name) => Some(DenyReason::DohEndpoint),
            Target::Name(_) => None,
        };
        let allowed = self.allow.iter().find(|r| {
            r.matches(&target, port, false)
                && (exact_only.is_none() || !matches!(r.host, HostPattern::Suffix(_)))
        });
        match (allowed, exact_only) {
            (Some(rule), _) => Decision::Allow {
                rule: rule.text.clone(),
            },
            (None, Some(reason)) => Decision::Deny { reason },
            (None, None) => Decision::Deny {
                reason: DenyReason::NotAllowed,
            },
        }
    }
}

impl Rule {
    /// `unwritten_means_any`: a rule without a port matches every port (deny rules), else
    /// only [`DEFAULT_ALLOW_PORT`] (allow rules).
    pub(crate) fn matches(&self, target: &Target, port: u16, unwritten_means_any: bool) -> bool {
        let port_matches = match self.port {
            PortSpec::Any => true,
            PortSpec::One(p) => p == port,
            PortSpec::Unwritten => unwritten_means_any || port == DEFAULT_ALLOW_PORT,
        };
        port_matches && self.matches_host(target)
    }

    fn matches_host(&self, target: &Target) -> bool {
        match (&self.host, target) {
            (HostPattern::Exact(rule), Target::Name(name)) => rule == name,
            (HostPattern::Suffix(suffix), Target::Name(name)) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (HostPattern::Ip(rule), Target::Ip(ip)) => rule == ip,
            _ => false,
        }
    }
}

fn is_doh_endpoint(name: &str) -> bool {
    DOH_ENDPOINTS.iter().any(|doh| {
        name == *doh
            || name
                .strip_suffix(doh)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
    })
}

/// Why an egress rule (or `allow_private` entry) was refused; [`EgressError::InvalidRule`]
/// names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("the rule is empty")]
    Empty,
    #[error("an opening `[` needs a closing `]`")]
    UnclosedBracket,
    #[error("expected `:port` after `]`")]
    NoPortAfterBracket,
    #[error("`{port}` is not a port (expected 1-65535, or `*` for every port)")]
    BadPort { port: String },
    #[error("only an IPv6 address may stand inside `[...]`")]
    NotIpv6InBrackets,
    #[error("the part after `*.` is not a valid host name (expected e.g. `*.example.com`)")]
    BadSuffix,
    #[error("a wildcard is only allowed as a leading `*.` (e.g. `*.example.com`)")]
    MisplacedWildcard,
    #[error("looks like an IP address but is not a valid one (write e.g. `1.2.3.4` or `[::1]`)")]
    BadIp,
    #[error("not a valid host name (letters, digits, `-` and `_`, dot-separated labels)")]
    BadHostName,
    #[error("an `allow_private` entry names a host or address, without a port (the allow rule sets the port)")]
    PrivateWithPort,
    #[error("the manifest's deny rule {deny:?} covers it, and deny rules win")]
    DenyCovers { deny: String },
    #[error("a rule with `methods` or `paths` names one host, not a `*.suffix` pattern (write one table per host)")]
    RequestRuleSuffix,
    #[error("the proxy cannot see the requests to {host} on {port} (HTTPS goes through a TLS tunnel that it opens only for a host with a credential): add `[credentials.\"{host}\"]` so that it intercepts them, or drop `methods` and `paths` (for plain HTTP, name its port: `{host}:80`)")]
    RequestRuleNotVisible { host: String, port: String },
    #[error("`{field} = []` allows nothing: list some, or leave `{field}` out to allow every one")]
    EmptyRuleList { field: &'static str },
    #[error("{method:?} is not an HTTP method (an upper-case token such as \"GET\" or \"POST\")")]
    BadMethod { method: String },
    #[error("{method:?}: methods are case-sensitive, write {upper:?}")]
    LowerCaseMethod { method: String, upper: String },
    #[error("{method} never goes through the proxy inside a tunnel: leave it out")]
    NeverMethod { method: String },
    #[error("path pattern {pattern:?}: {why}")]
    BadPathPattern { pattern: String, why: String },
}

fn invalid(rule: &str, reason: RuleError) -> EgressError {
    EgressError::InvalidRule {
        rule: rule.to_owned(),
        reason,
    }
}

pub(crate) fn parse_rule(text: &str) -> Result<Rule, EgressError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(invalid(text, RuleError::Empty));
    }
    let (host_part, port) = split_host_port(trimmed).map_err(|why| invalid(text, why))?;
    let host = if let Some(ip) = parse_ip_literal(host_part) {
        HostPattern::Ip(ip)
    } else if trimmed.starts_with('[') {
        return Err(invalid(text, RuleError::NotIpv6InBrackets));
    } else if let Some(suffix) = host_part.strip_prefix("*.") {
        let suffix = normalize_name(suffix).ok_or_else(|| invalid(text, RuleError::BadSuffix))?;
        HostPattern::Suffix(suffix)
    } else if host_part.contains('*') {
        return Err(invalid(text, RuleError::MisplacedWildcard));
    } else if looks_numeric(host_part) {
        return Err(invalid(text, RuleError::BadIp));
    } else {
        HostPattern::Exact(
            normalize_name(host_part).ok_or_else(|| invalid(text, RuleError::BadHostName))?,
        )
    };
    Ok(Rule {
        text: trimmed.to_owned(),
        host,
        port,
    })
}

/// Splits `host[:port]` (or `[v6][:port]`, or a bare IPv6 literal without port).
fn split_host_port(text: &str) -> Result<(&str, PortSpec), RuleError> {
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(RuleError::UnclosedBracket)?;
        let port = match after {
            "" => PortSpec::Unwritten,
            _ => parse_port(
                after
                    .strip_prefix(':')
                    .ok_or(RuleError::NoPortAfterBracket)?,
            )?,
        };
        return Ok((inside, port));
    }
    if text.matches(':').count() > 1 {
        // A bare IPv6 literal; a port needs brackets.
        return Ok((text, PortSpec::Unwritten));
    }
    match text.split_once(':') {
        Some((host, port)) => Ok((host, parse_port(port)?)),
        None => Ok((text, PortSpec::Unwritten)),
    }
}

fn parse_port(text: &str) -> Result<PortSpec, RuleError> {
    if text == "*" {
        return Ok(PortSpec::Any);
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(RuleError::BadPort {
            port: text.to_owned(),
        }),
        Ok(port) => Ok(PortSpec::One(port)),
    }
}

/// Parses an IP literal, bracketed or not, mapping IPv4-mapped IPv6 to IPv4.
fn parse_ip_literal(text: &str) -> Option<IpAddr> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    let ip = if let Ok(v4) = inner.parse::<Ipv4Addr>() {
        IpAddr::V4(v4)
    } else {
        let v6 = inner.parse::<Ipv6Addr>().ok()?;
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    };
    Some(ip)
}

/// True for names whose last label is numeric or hexadecimal (`2130706433`, `127.1`, `0x7f.1`):
/// not valid DNS names, but `inet_aton` and friends read them as addresses.
fn looks_numeric(text: &str) -> bool {
    let name = text.strip_suffix('.').unwrap_or(text);
    name.rsplit('.').next().is_some_and(|last| {
        !last.is_empty()
            && (last.bytes().all(|b| b.is_ascii_digit())
                || last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x")))
    })
}

/// The one normal form of a host name: IDNA (UTS #46) to ASCII, which also lower-cases, then
/// one trailing dot dropped, then DNS syntax checked. `None` if not a valid name.
fn normalize_name(text: &str) -> Option<String> {
    let ascii = if text.is_ascii() && !text.contains("xn--") && !text.contains("XN--") {
        text.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(text).ok()?
    };
    let name = ascii.strip_suffix('.').unwrap_or(&ascii).to_owned();
    let valid = !name.is_empty()
        && name.len() <= MAX_HOST_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then_some(name)
}

pub(crate) fn normalize_target(host: &str) -> Option<Target> {
    if let Some(ip) = parse_ip_literal(host) {
        return Some(Target::Ip(ip));
    }
    if looks_numeric(host) {
        // Not a canonical address, but something a lenient resolver would treat as one.
        return Some(Target::Numeric);
    }
    normalize_name(host).map(Target::Name)
}

/// Normalises a request host for comparisons (e.g. URI host vs `Host` header): lower case, no
/// trailing dot, no IPv6 brackets, IPv4-mapped IPv6 as IPv4, IDNA to ASCII.
pub(crate) fn canonical_host(host: &str) -> String {
    normalize_host(host).unwrap_or_else(|| host.to_ascii_lowercase())
}

/// The one normal form of a request host, applied before the policy, interception, the
/// certificate cache and the event log: an IP literal as its canonical address (IPv4-mapped
/// IPv6 as IPv4, no brackets), a name IDNA-mapped to ASCII, lower case, one trailing dot
/// dropped. `None` when the host is no valid name or address (the policy denies it).
pub fn normalize_host(host: &str) -> Option<String> {
    if let Some(ip) = parse_ip_literal(host) {
        return Some(ip.to_string());
    }
    if looks_numeric(host) {
        return None;
    }
    normalize_name(host)
}

/// A policy shared by the proxy and the supervisor, which may add allow rules while the bottle
/// runs. Every decision takes the lock for its few microseconds; nothing awaits under it.
#[derive(Debug, Clone)]
pub struct LivePolicy(std::sync::Arc<std::sync::RwLock<EgressPolicy>>);

impl LivePolicy {
    pub fn new(policy: EgressPolicy) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(policy)))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, EgressPolicy> {
        // A writer that panicked left a whole policy behind (pushes are atomic): go on.
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn decide(&self, host: &str, port: u16) -> Decision {
        self.read().decide(host, port)
    }

    pub fn deny_message(&self) -> String {
        self.read().deny_message().to_owned()
    }

    pub fn may_dial(
        &self,
        host: &str,
        ip: IpAddr,
        allow_loopback: bool,
    ) -> Result<(), FloorRefusal> {
        self.read().may_dial(host, ip, allow_loopback)
    }

    pub fn rules(&self) -> (Vec<String>, Vec<String>) {
        self.read().rules()
    }

    pub fn request_rules(&self, host: &str, port: u16) -> RequestRules {
        self.read().request_rules(host, port)
    }

    pub fn allow_more(&self, rule: &str) -> Result<(), EgressError> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .allow_more(rule)
    }
}

/// Why a request path has no canonical form, or falls outside a credential's paths.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {path:?} must start with `/`")]
    NotAbsolute { path: String },
    #[error("path {path:?} must not contain {found:?} (write the prefix as plain segments, e.g. `/owner/repo`)")]
    BadPrefixChar { path: String, found: char },
    #[error("path {path:?} must be in its canonical form {canonical:?} (no `.`/`..` or empty segments, nothing encoded)")]
    PrefixNotCanonical { path: String, canonical: String },
    #[error("request target {target:?} is not an absolute path")]
    TargetNotAbsolute { target: String },
    #[error("path {path:?} has a `;` parameter, which servers read differently: refused")]
    Parameter { path: String },
    #[error("path {path:?} has a backslash, which some servers read as `/`: refused")]
    Backslash { path: String },
    #[error("path {path:?} has a byte that must be percent-encoded (space, control or non-ASCII): refused")]
    RawByte { path: String },
    #[error("path {path:?} has a `%` not followed by two hex digits: refused")]
    BadEscape { path: String },
    #[error("path {path:?} encodes `%` itself (double encoding such as `%252e`): refused")]
    DoubleEncoded { path: String },
    #[error("path {path:?} encodes a slash, backslash or control character: refused")]
    EncodedDelimiter { path: String },
    #[error("path {path:?} does not decode to valid UTF-8 (e.g. an overlong `%c0%ae`): refused")]
    NotUtf8 { path: String },
    #[error("path {path:?} has an empty segment (`//`), which servers read differently: refused")]
    EmptySegment { path: String },
    #[error("path {path:?} climbs above `/` with `..`: refused")]
    AboveRoot { path: String },
    #[error("path {path:?} (canonical {canonical:?}) is outside the paths this credential may be used for ({prefixes})")]
    Outside {
        path: String,
        canonical: String,
        prefixes: String,
    },
}

/// The one canonical form a request path is decided on (and sent to the host in): percent
/// escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded, other escapes kept with
/// upper-case hex, then `.` and `..` segments resolved (RFC 3986 §5.2.4). Refused, because
/// servers disagree on what they mean: `;` parameters, backslashes, `%25` (double encoding),
/// encoded `/`, `\` or control characters, escapes that do not decode to UTF-8 (overlong
/// forms like `%c0%ae`), raw bytes that must be encoded, empty segments, and `..` above `/`.
pub fn canonical_path(path: &str) -> Result<String, PathError> {
    let err_path = || path.to_owned();
    if !path.starts_with('/') {
        return Err(PathError::TargetNotAbsolute { target: err_path() });
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| PathError::BadEscape { path: err_path() })?;
                match hex {
                    b'%' => return Err(PathError::DoubleEncoded { path: err_path() }),
                    b'/' | b'\\' | 0..=0x1f | 0x7f => {
                        return Err(PathError::EncodedDelimiter { path: err_path() })
                    }
                    c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => {
                        out.push(char::from(c))
                    }
                    c => out.push_str(&format!("%{c:02X}")),
                }
                decoded.push(hex);
                i += 3;
            }
            b';' => return Err(PathError::Parameter { path: err_path() }),
            b'\\' => return Err(PathError::Backslash { path: err_path() }),
            c if c <= b' ' || c >= 0x7f => return Err(PathError::RawByte { path: err_path() }),
            c => {
                out.push(char::from(c));
                decoded.push(c);
                i += 1;
            }
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::NotUtf8 { path: err_path() });
    }
    let segments: Vec<&str> = out[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (n, segment) in segments.into_iter().enumerate() {
        trailing_slash = false;
        match segment {
            "" if n == last => trailing_slash = true,
            "" => return Err(PathError::EmptySegment { path: err_path() }),
            "." => trailing_slash = true,
            ".." => {
                kept.pop()
                    .ok_or_else(|| PathError::AboveRoot { path: err_path() })?;
                trailing_slash = true;
            }
            segment => kept.push(segment),
        }
    }
    let mut canonical = format!("/{}", kept.join("/"));
    if trailing_slash && !canonical.ends_with('/') {
        canonical.push('/');
    }
    Ok(canonical)
}

/// An origin-form request target as the path's [`canonical_path`] and the query (with its
/// `?`, unchanged; empty when there is none). A fragment or a target that is no absolute path
/// is refused.
pub(crate) fn split_target(target: &str) -> Result<(String, &str), PathError> {
    let (path, query) = match target.find(['?', '#']) {
        Some(at) if target.as_bytes()[at] == b'#' => {
            return Err(PathError::RawByte {
                path: target.to_owned(),
            })
        }
        Some(at) => target.split_at(at),
        None => (target, ""),
    };
    if !path.starts_with('/') {
        return Err(PathError::TargetNotAbsolute {
            target: target.to_owned(),
        });
    }
    Ok((canonical_path(path)?, query))
}

/// The request paths a host's credential may be used for: prefixes matched on whole path
/// segments (`/me/app` covers `/me/app` and `/me/app/info/refs`, not `/me/app-other`) of the
/// request's [`canonical_path`]. Empty: every path. A request path without a canonical form
/// is refused rather than guessed at: servers differ in how they normalise it, and the one
/// that counts is the real host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialPaths(Vec<String>);

impl CredentialPaths {
    /// Checks each prefix: absolute, no query, fragment, `;`, `%` or backslash, and already
    /// in canonical form.
    pub fn new(prefixes: &[String]) -> Result<Self, PathError> {
        for p in prefixes {
            if !p.starts_with('/') {
                return Err(PathError::NotAbsolute { path: p.clone() });
            }
            if let Some(c) = p.chars().find(|c| "?#%;\\".contains(*c) || c.is_control()) {
                return Err(PathError::BadPrefixChar {
                    path: p.clone(),
                    found: c,
                });
            }
            let canonical = canonical_path(p).unwrap_or_default();
            if &canonical != p {
                return Err(PathError::PrefixNotCanonical {
                    path: p.clone(),
                    canonical,
                });
            }
        }
        Ok(Self(prefixes.to_vec()))
    }

    /// Whether the origin-form request target `target` falls under a prefix. `Ok` carries
    /// the target to send up: its path in canonical form, the query unchanged (with no
    /// prefixes, the target as given).
    pub fn allows(&self, target: &str) -> Result<String, PathError> {
        if self.0.is_empty() {
            return Ok(target.to_owned());
        }
        let (canonical, query) = split_target(target)?;
        let path = &target[..target.len() - query.len()];
        let under = |prefix: &String| {
            canonical == *prefix
                || (canonical.starts_with(prefix.as_str())
                    && (prefix.ends_with('/') || canonical[prefix.len()..].starts_with('/')))
        };
        if self.0.iter().any(under) {
            Ok(format!("{canonical}{query}"))
        } else {
            Err(PathError::Outside {
                path: path.to_owned(),
                canonical,
                prefixes: self.0.join(", "),
            })
        }
    }

    pub fn prefixes(&self) -> &[String] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let deny: Vec<String> = deny.iter().map(|s| s.to_string()).collect();
        EgressPolicy::new(&allow, &deny, "ask the user").unwrap()
    }

    fn allow(rule: &str) -> Decision {
        Decision::Allow {
            rule: rule.to_owned(),
        }
    }

    fn deny(reason: DenyReason) -> Decision {
        Decision::Deny { reason }
    }

    fn rule_error(rule: &str) -> String {
        EgressPolicy::new(&[rule.to_owned()], &[], "")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn exact_rule_with_star_port_allows_its_host_on_any_port() {
        let p = policy(&["api.example.com:*"], &[]);
        assert_eq!(p.decide("api.example.com", 443), allow("api.example.com:*"));
        assert_eq!(
            p.decide("api.example.com", 8080),
            allow("api.example.com:*")
        );
    }

    #[test]
    fn exact_rule_denies_subdomains_and_parents() {
        let p = policy(&["api.example.com"], &[]);
        assert_eq!(
            p.decide("x.api.example.com", 443),
            deny(DenyReason::NotAllowed)
        );
        assert_eq!(p.decide("example.com", 443), deny(DenyReason::NotAllowed));
    }

    #[test]
    fn exact_rule_denies_lookalike_suffix() {
        let p = policy(&["example.com"], &[]);
        assert_eq!(
            p.decide("evilexample.com", 443),
            deny(DenyReason::NotAllowed)
        );
        assert_eq!(
            p.decide("example.com.evil.net", 443),
            deny(DenyReason::NotAllowed)
        );
    }

    #[test]
    fn suffix_rule_allows_names_below_at_any_depth() {
        let p = policy(&["*.github.com"], &[]);
        assert_eq!(p.decide("api.github.com", 443), allow("*.github.com"));
        assert_eq!(p.decide("a.b.github.com", 443), allow("*.github.com"));
    }

    #[test]
    fn suffix_rule_denies_the_apex_and_lookalikes() {
        let p = policy(&["*.github.com"], &[]);
        assert_eq!(p.decide("github.com", 443), deny(DenyReason::NotAllowed));
        assert_eq!(
            p.decide("evilgithub.com", 443),
            deny(DenyReason::NotAllowed)
        );
        assert_eq!(p.decide(".github.com", 443), deny(DenyReason::InvalidHost));
    }

    #[test]
    fn port_rule_allows_only_its_port() {
        let p = policy(&["example.com:443", "*.example.org:8443"], &[]);
        assert_eq!(p.decide("example.com", 443), allow("example.com:443"));
        assert_eq!(p.decide("example.com", 80), deny(DenyReason::NotAllowed));
        assert_eq!(p.decide("a.example.org", 8443), allow("*.example.org:8443"));
        assert_eq!(p.decide("a.example.org", 443), deny(DenyReason::NotAllowed));
    }

    #[test]
    fn deny_rule_wins_over_matching_allow_rule() {
        let p = policy(&["*.example.com"], &["secret.example.com"]);
        assert_eq!(
            p.decide("secret.example.com", 443),
            deny(DenyReason::DenyRule {
                rule: "secret.example.com".into()
            })
        );
        assert_eq!(p.decide("public.example.com", 443), allow("*.example.com"));
    }

    #[test]
    fn deny_rule_with_port_denies_only_that_port() {
        let p = policy(&["example.com"], &["example.com:80"]);
        assert_eq!(
            p.decide("example.com", 80),
            deny(DenyReason::DenyRule {
                rule: "example.com:80".into()
            })
        );
        assert_eq!(p.decide("example.com", 443), allow("example.com"));
    }

    #[test]
    fn deny_suffix_rule_wins_over_exact_allow() {
        let p = policy(&["a.corp.example"], &["*.corp.example"]);
        assert_eq!(
            p.decide("a.corp.example", 443),
            deny(DenyReason::DenyRule {
                rule: "*.corp.example".into()
            })
        );
    }

    #[test]
    fn ip_literal_is_denied_even_when_suffix_or_names_are_allowed() {
        let p = policy(&["*.example.com", "example.com"], &[]);
        assert_eq!(p.decide("93.184.216.34", 443), deny(DenyReason::IpLiteral));
        assert_eq!(p.decide("[2001:db8::1]", 443), deny(DenyReason::IpLiteral));
        assert_eq!(p.decide("2001:db8::1", 443), deny(DenyReason::IpLiteral));
    }

    #[test]
    fn listed_ip_literal_is_allowed_on_its_port_only() {
        let p = policy(&["10.0.0.5:80", "[2001:db8::1]:443"], &[]);
        assert_eq!(p.decide("10.0.0.5", 80), allow("10.0.0.5:80"));
        assert_eq!(p.decide("10.0.0.5", 81), deny(DenyReason::IpLiteral));
        assert_eq!(p.decide("[2001:db8::1]", 443), allow("[2001:db8::1]:443"));
        assert_eq!(p.decide("2001:DB8:0::1", 443), allow("[2001:db8::1]:443"));
    }

    #[test]
    fn ipv4_mapped_ipv6_matches_the_ipv4_rule() {
        let p = policy(&["127.0.0.1"], &[]);
        assert_eq!(p.decide("[::ffff:127.0.0.1]", 443), allow("127.0.0.1"));
    }

    #[test]
    fn numeric_host_forms_are_denied_as_ip_literals() {
        let p = policy(&["*.example.com"], &[]);
        assert_eq!(p.decide("2130706433", 80), deny(DenyReason::IpLiteral));
        assert_eq!(p.decide("127.1", 80), deny(DenyReason::IpLiteral));
        assert_eq!(p.decide("0x7f.0.0.1", 80), deny(DenyReason::IpLiteral));
        assert_eq!(p.decide("a.0x7f", 80), deny(DenyReason::IpLiteral));
    }

    #[test]
    fn doh_endpoint_is_denied_despite_matching_suffix_rule() {
        let p = policy(&["*.google", "*.quad9.net", "*.cloudflare-dns.com"], &[]);
        assert_eq!(p.decide("dns.google", 443), deny(DenyReason::DohEndpoint));
        assert_eq!(
            p.decide("dns.quad9.net", 443),
            deny(DenyReason::DohEndpoint)
        );
        assert_eq!(
            p.decide("mozilla.cloudflare-dns.com", 443),
            deny(DenyReason::DohEndpoint)
        );
    }

    #[test]
    fn doh_endpoint_without_any_rule_reports_doh_reason() {
        let p = policy(&[], &[]);
        assert_eq!(
            p.decide("doh.opendns.com", 443),
            deny(DenyReason::DohEndpoint)
        );
        assert_eq!(
            p.decide("cloudflare-dns.com", 443),
            deny(DenyReason::DohEndpoint)
        );
    }

    #[test]
    fn doh_endpoint_listed_exactly_is_allowed() {
        let p = policy(&["dns.google:443"], &[]);
        assert_eq!(p.decide("dns.google", 443), allow("dns.google:443"));
        assert_eq!(p.decide("DNS.Google.", 443), allow("dns.google:443"));
    }

    #[test]
    fn doh_endpoint_listed_exactly_still_loses_to_deny_rule() {
        let p = policy(&["dns.google"], &["*.google"]);
        assert_eq!(
            p.decide("dns.google", 443),
            deny(DenyReason::DenyRule {
                rule: "*.google".into()
            })
        );
    }

    #[test]
    fn hosts_compare_case_insensitively() {
        let p = policy(&["API.Example.COM", "*.GitHub.com"], &[]);
        assert_eq!(p.decide("api.example.com", 443), allow("API.Example.COM"));
        assert_eq!(p.decide("Api.EXAMPLE.com", 443), allow("API.Example.COM"));
        assert_eq!(
            p.decide("RAW.githubusercontent.com", 443),
            deny(DenyReason::NotAllowed)
        );
        assert_eq!(p.decide("CODELOAD.GITHUB.COM", 443), allow("*.GitHub.com"));
    }

    #[test]
    fn trailing_dot_is_ignored_in_hosts_and_rules() {
        let p = policy(&["example.com.", "*.example.org"], &["bad.example.org."]);
        assert_eq!(p.decide("example.com.", 443), allow("example.com."));
        assert_eq!(p.decide("example.com", 443), allow("example.com."));
        assert_eq!(p.decide("a.example.org.", 443), allow("*.example.org"));
        assert_eq!(
            p.decide("bad.example.org", 443),
            deny(DenyReason::DenyRule {
                rule: "bad.example.org.".into()
            })
        );
    }

    #[test]
    fn malformed_hosts_are_denied_as_invalid() {
        let p = policy(&["example.com"], &[]);
        for host in [
            "",
            ".",
            "exa mple.com",
            "example..com",
            "-a.com",
            "a/b",
            "xn--zz.com",
        ] {
            assert_eq!(
                p.decide(host, 443),
                deny(DenyReason::InvalidHost),
                "{host:?}"
            );
        }
    }

    #[test]
    fn empty_policy_denies_everything() {
        let p = policy(&[], &[]);
        assert_eq!(p.decide("example.com", 443), deny(DenyReason::NotAllowed));
    }

    #[test]
    fn decision_exposes_rule_and_reason_code() {
        let p = policy(&["a.test"], &["b.test"]);
        let allowed = p.decide("a.test", 443);
        let denied = p.decide("b.test", 1);
        let unknown = p.decide("c.test", 1);
        assert_eq!(
            (allowed.rule(), allowed.reason_code()),
            (Some("a.test"), "allow_rule")
        );
        assert_eq!(
            (denied.rule(), denied.reason_code()),
            (Some("b.test"), "deny_rule")
        );
        assert_eq!(
            (unknown.rule(), unknown.reason_code()),
            (None, "not_allowed")
        );
    }

    #[test]
    fn bad_rules_are_rejected_naming_the_rule() {
        let cases = [
            "",
            "*",
            "*.",
            "a.*.com",
            "ex ample.com",
            "example.com:0",
            "example.com:70000",
            "example.com:http",
            "[::1",
            "[::1]443",
            "[nope]:443",
            "1.2.3",
            "999.1.1.1",
        ];
        for rule in cases {
            let message = rule_error(rule);
            assert!(message.contains(&format!("{rule:?}")), "{message}");
        }
    }

    #[test]
    fn bad_rule_error_explains_the_wildcard_form() {
        assert!(rule_error("a.*.com").contains("leading `*.`"));
    }

    #[test]
    fn canonical_host_unifies_case_dot_and_brackets() {
        assert_eq!(canonical_host("Example.COM."), "example.com");
        assert_eq!(canonical_host("[::ffff:127.0.0.1]"), "127.0.0.1");
        assert_eq!(canonical_host("[2001:DB8::1]"), "2001:db8::1");
    }

    fn paths(p: &[&str]) -> CredentialPaths {
        CredentialPaths::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn credential_paths_match_whole_segments_and_ignore_the_query() {
        let p = paths(&["/me/app", "/me/app.git", "/v1/"]);
        for ok in [
            "/me/app",
            "/me/app/pulls",
            "/me/app.git/info/refs?service=git-upload-pack",
            "/v1/messages",
            "/me/app?x=/../evil",
        ] {
            assert!(p.allows(ok).is_ok(), "{ok}");
        }
        for refused in ["/me/app-evil", "/me/ap", "/evil/app", "/v1", "/", "/ME/APP"] {
            assert!(p.allows(refused).is_err(), "{refused}");
        }
        assert_eq!(
            CredentialPaths::default().allows("/anything"),
            Ok("/anything".to_owned())
        );
    }

    #[test]
    fn credential_paths_refuse_what_a_server_could_read_another_way() {
        let p = paths(&["/me/app"]);
        for attack in [
            "/me/app/../evil/x",
            "/me/app/./x/../../../evil",
            "/me/app/%2e%2e/evil",
            "/me/app/%2E%2E/evil",
            "/me/app%2f..%2fevil",
            "/me/app/..%5cevil",
            "/me/app\\..\\evil",
            "https://github.com/me/app",
            "*",
        ] {
            assert!(p.allows(attack).is_err(), "{attack}");
        }
    }

    #[test]
    fn an_allow_rule_without_a_port_opens_only_443() {
        let p = policy(&["api.example.com", "*.example.org", "10.0.0.5"], &[]);
        assert_eq!(p.decide("api.example.com", 443), allow("api.example.com"));
        assert_eq!(p.decide("a.example.org", 443), allow("*.example.org"));
        for (host, port) in [
            ("api.example.com", 22),
            ("api.example.com", 80),
            ("a.example.org", 6379),
            ("10.0.0.5", 8080),
        ] {
            assert!(!p.decide(host, port).is_allowed(), "{host}:{port}");
        }
    }

    #[test]
    fn international_names_are_decided_in_their_ascii_form() {
        let p = policy(&["xn--bcher-kva.example"], &[]);
        assert_eq!(
            p.decide("BÜCHER.example.", 443),
            allow("xn--bcher-kva.example")
        );
        assert_eq!(
            p.decide("xn--BCHER-kva.example", 443),
            allow("xn--bcher-kva.example")
        );
    }

    #[test]
    fn credential_paths_refuse_what_has_no_canonical_form() {
        let p = paths(&["/me/app"]);
        for attack in [
            "/me/app/..;/other",
            "/me/app;x=1/../../other",
            "/me/app/%252e%252e/other",
            "/me/app/%25",
            "/me/app/%c0%ae%c0%ae/other",
            "/me/app/%e0%80%ae/other",
            "/me/app/%ff",
            "/me/app//../other",
            "/me/app/%00",
            "/me/app/%2F..%2Fother",
            "/me/app/%zz",
            "/me/app/caf\u{e9}",
        ] {
            assert!(p.allows(attack).is_err(), "{attack}");
        }
    }

    #[test]
    fn canonical_paths_decode_only_unreserved_escapes_and_resolve_dot_segments() {
        let cases = [
            ("/", "/"),
            ("/me/app", "/me/app"),
            ("/me/app/", "/me/app/"),
            ("/me/%61pp", "/me/app"),
            ("/me/app/%2e%2E/x", "/me/x"),
            ("/me/app/x/../y", "/me/app/y"),
            ("/me/app/./y/.", "/me/app/y/"),
            ("/me/app/x/..", "/me/app/"),
            ("/me/a%3ab", "/me/a%3Ab"),
            ("/caf%C3%A9", "/caf%C3%A9"),
        ];
        let seen: Vec<(&str, Result<String, PathError>)> =
            cases.iter().map(|(p, _)| (*p, canonical_path(p))).collect();
        let expected: Vec<(&str, Result<String, PathError>)> = cases
            .iter()
            .map(|(p, c)| (*p, Ok((*c).to_owned())))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_request_is_sent_up_in_the_canonical_form_it_was_decided_on() {
        let p = paths(&["/me/app"]);
        assert_eq!(
            p.allows("/me/app/x/../%79?q=/../z"),
            Ok("/me/app/y?q=/../z".to_owned())
        );
        assert!(matches!(
            p.allows("/me/../../other"),
            Err(PathError::AboveRoot { .. })
        ));
    }

    #[test]
    fn star_port_opens_every_port_and_a_portless_deny_rule_denies_every_port() {
        let p = policy(&["a.test:*", "b.test:*"], &["b.test"]);
        assert_eq!(p.decide("a.test", 22), allow("a.test:*"));
        assert_eq!(p.decide("a.test", 443), allow("a.test:*"));
        assert_eq!(
            p.decide("b.test", 8080),
            deny(DenyReason::DenyRule {
                rule: "b.test".into()
            })
        );
        assert!(rule_error("a.test:**").contains("`*` for every port"));
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_address_floor_holds_unless_allow_private_names_the_host() {
        let p = policy(&["*.corp.test"], &[])
            .with_private_exceptions(&["git.corp.test".to_owned(), "10.0.0.5".to_owned()])
            .unwrap()
            .with_host_addresses(vec![ip("198.51.100.1")]);

        let named = p.may_dial("git.corp.test", ip("10.1.2.3"), false);
        let named_mapped = p.may_dial("GIT.corp.test.", ip("::ffff:10.1.2.3"), false);
        let literal = p.may_dial("10.0.0.5", ip("10.0.0.5"), false);
        let unnamed = p.may_dial("wiki.corp.test", ip("10.1.2.3"), false);
        let metadata = p.may_dial("git.corp.test", ip("169.254.169.254"), false);
        let loopback = p.may_dial("git.corp.test", ip("127.0.0.1"), false);
        let host = p.may_dial("wiki.corp.test", ip("198.51.100.1"), false);
        let public = p.may_dial("wiki.corp.test", ip("93.184.216.34"), false);

        assert_eq!((named, named_mapped, literal), (Ok(()), Ok(()), Ok(())));
        let range = |r: Result<(), FloorRefusal>| r.map_err(|e| e.range);
        assert_eq!(range(unnamed), Err(FloorRange::Private));
        assert_eq!(range(metadata), Err(FloorRange::LinkLocal));
        assert_eq!(range(loopback), Err(FloorRange::Loopback));
        assert_eq!(range(host), Err(FloorRange::HostGateway));
        assert_eq!(public, Ok(()));
    }

    #[test]
    fn allow_private_entries_name_hosts_without_ports() {
        let entries = ["x.test:443".to_owned()];
        let refused = policy(&[], &[]).with_private_exceptions(&entries);
        assert!(refused.unwrap_err().to_string().contains("without a port"));
    }

    #[test]
    fn credential_path_prefixes_are_checked() {
        for bad in ["me/app", "/me/../x", "/me/%61pp", "/me?x", "/a\\b", "/./a"] {
            assert!(CredentialPaths::new(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
