//! Request rules: `[egress] allow` tables `{ host, methods?, paths? }` that limit which
//! requests go to a host the proxy can see inside (an intercepted host, or plain HTTP).
//!
//! ```toml
//! allow = ["plain.example", { host = "api.github.com", methods = ["GET"], paths = ["/repos/me/app/**"] }]
//! ```
//!
//! - `host` is a rule of the string syntax naming **one** host or address (`api.github.com`,
//!   `api.github.com:*`, `plain.example:80`; not `*.suffix`). The table allows that host like
//!   the string would.
//! - `methods`: HTTP methods, upper case, matched exactly (methods are case-sensitive, so
//!   `get` is no `GET`). Absent: every method.
//! - `paths`: patterns on the request's canonical path ([`canonical_path`], the form the
//!   credential `paths` use; the query is not part of it): `/a/b` that path exactly, `/a/**`
//!   `/a` and everything below it on whole segments (not `/ab`), `*` one whole non-empty
//!   segment (`/repos/*/app`). Absent: every path.
//!
//! A request to a host with request rules must fit one of them (its method in `methods`, its
//! canonical path under one of `paths`); a string rule for the same host does not widen
//! them, and deny rules still win. A path without a canonical form is refused. The request
//! goes up in the canonical form it was decided on.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::http::is_tchar;
use super::policy::{
    canonical_path, normalize_target, parse_rule, split_target, HostPattern, PathError, PortSpec,
    Rule, RuleError, Target, DEFAULT_ALLOW_PORT,
};
use super::EgressError;

/// Headers that ask a server to act as if the request had another method (Rails, Google APIs,
/// ASP.NET): the proxy cannot decide on a method it does not see, so a request carrying one is
/// refused where a rule limits methods.
pub const METHOD_OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Methods that never go through the proxy inside a tunnel (refused with a 405 anyway).
const NEVER_METHODS: &[&str] = &["CONNECT", "TRACE", "TRACK"];

/// One `[egress] allow` table as written in the manifest (and carried in the plan and the
/// sidecar's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRuleSpec {
    /// One host (or address), with an optional `:port` or `:*`, as in a string rule.
    pub host: String,
    /// Allowed methods (upper case); absent: every method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Allowed canonical paths (`/a/b`, `/a/**`, `*` for one segment); absent: every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
}

impl RequestRuleSpec {
    /// Whether the table limits requests at all (else it is the string rule `host`).
    pub fn restricts(&self) -> bool {
        self.methods.is_some() || self.paths.is_some()
    }

    /// The rule as the user wrote it (TOML inline table), for messages and the event log.
    pub fn text(&self) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|i| format!("{i:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut text = format!("{{ host = {:?}", self.host);
        if let Some(methods) = &self.methods {
            text.push_str(&format!(", methods = [{}]", list(methods)));
        }
        if let Some(paths) = &self.paths {
            text.push_str(&format!(", paths = [{}]", list(paths)));
        }
        text.push_str(" }");
        text
    }

    /// Whether the proxy sees the requests this rule limits: the host is intercepted (one of
    /// `intercepted`, the hosts with a credential), or the rule names one port other than 443
    /// (plain HTTP through the proxy). Else the rule could not be enforced, and is refused.
    pub fn check_visible(&self, intercepted: &[String]) -> Result<(), EgressError> {
        if !self.restricts() {
            return Ok(());
        }
        let rule = RequestRule::parse(self)?;
        let bad = |reason| EgressError::InvalidRequestRule {
            rule: rule.text.clone(),
            reason,
        };
        let host = match &rule.host.host {
            HostPattern::Exact(name) => name.clone(),
            HostPattern::Ip(ip) => ip.to_string(),
            HostPattern::Suffix(_) => return Err(bad(RuleError::RequestRuleSuffix)),
        };
        let target = normalize_target(&host);
        let is_intercepted = intercepted
            .iter()
            .any(|credential| target.is_some() && normalize_target(credential.trim()) == target);
        let plain_http = matches!(rule.host.port, PortSpec::One(p) if p != DEFAULT_ALLOW_PORT);
        if is_intercepted || plain_http {
            return Ok(());
        }
        let port = match rule.host.port {
            PortSpec::Any => format!("every port ({DEFAULT_ALLOW_PORT} among them)"),
            _ => format!("port {DEFAULT_ALLOW_PORT}"),
        };
        Err(bad(RuleError::RequestRuleNotVisible { host, port }))
    }
}

/// A parsed request rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestRule {
    text: String,
    host: Rule,
    methods: Option<Vec<String>>,
    paths: Option<Vec<PathPattern>>,
}

impl RequestRule {
    /// Checks the host (one host, a valid rule), the methods and the path patterns.
    pub(crate) fn parse(spec: &RequestRuleSpec) -> Result<Self, EgressError> {
        let text = spec.text();
        let bad = |reason| EgressError::InvalidRequestRule {
            rule: text.clone(),
            reason,
        };
        let host = parse_rule(&spec.host).map_err(|e| match e {
            EgressError::InvalidRule { reason, .. } => bad(reason),
            other => other,
        })?;
        if spec.restricts() && matches!(host.host, HostPattern::Suffix(_)) {
            return Err(bad(RuleError::RequestRuleSuffix));
        }
        let methods = match &spec.methods {
            None => None,
            Some(methods) if methods.is_empty() => {
                return Err(bad(RuleError::EmptyRuleList { field: "methods" }))
            }
            Some(methods) => {
                for method in methods {
                    check_method(method).map_err(bad)?;
                }
                Some(methods.clone())
            }
        };
        let paths = match &spec.paths {
            None => None,
            Some(paths) if paths.is_empty() => {
                return Err(bad(RuleError::EmptyRuleList { field: "paths" }))
            }
            Some(paths) => Some(
                paths
                    .iter()
                    .map(|p| PathPattern::parse(p).map_err(bad))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(RequestRule {
            text,
            host,
            methods,
            paths,
        })
    }

    /// The rule's host part (the allow rule it implies).
    pub(crate) fn host_rule(&self) -> &Rule {
        &self.host
    }

    pub(crate) fn restricts(&self) -> bool {
        self.methods.is_some() || self.paths.is_some()
    }

    /// Whether the rule is about requests to `target:port` (the allow rules' port reading).
    pub(crate) fn applies(&self, target: &Target, port: u16) -> bool {
        self.host.matches(target, port, false)
    }

    fn allows(&self, method: &str, canonical: &str) -> bool {
        // Absent: every method, every path.
        let method_ok = match &self.methods {
            Some(methods) => methods.iter().any(|m| m == method),
            None => true,
        };
        let path_ok = match &self.paths {
            Some(paths) => paths.iter().any(|p| p.matches(canonical)),
            None => true,
        };
        method_ok && path_ok
    }
}

fn check_method(method: &str) -> Result<(), RuleError> {
    let token = !method.is_empty() && method.bytes().all(is_tchar);
    if !token {
        return Err(RuleError::BadMethod {
            method: method.to_owned(),
        });
    }
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(RuleError::LowerCaseMethod {
            method: method.to_owned(),
            upper: method.to_ascii_uppercase(),
        });
    }
    if NEVER_METHODS.contains(&method) {
        return Err(RuleError::NeverMethod {
            method: method.to_owned(),
        });
    }
    Ok(())
}

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Exactly this (canonical) segment; `""` only last, for a trailing `/`.
    Literal(String),
    /// `*`: any one non-empty segment.
    One,
}

/// A `paths` pattern: segments, and whether a final `/**` takes everything below.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PathPattern {
    segments: Vec<Segment>,
    below: bool,
}

impl PathPattern {
    fn parse(pattern: &str) -> Result<Self, RuleError> {
        let bad = |why: &str| RuleError::BadPathPattern {
            pattern: pattern.to_owned(),
            why: why.to_owned(),
        };
        if !pattern.starts_with('/') {
            return Err(bad("it must start with `/`"));
        }
        if let Some(c) = pattern
            .chars()
            .find(|c| "?#%;\\".contains(*c) || c.is_control() || *c == ' ' || !c.is_ascii())
        {
            return Err(bad(&format!(
                "it must not contain {c:?} (write plain segments; the query is not part of the path)"
            )));
        }
        match canonical_path(pattern) {
            Ok(canonical) if canonical == pattern => {}
            _ => return Err(bad(
                "it must be in canonical form: no `.` or `..` segments, no empty segments (`//`)",
            )),
        }
        let mut parts: Vec<&str> = pattern[1..].split('/').collect();
        let below = parts.last() == Some(&"**");
        if below {
            parts.pop();
        }
        let mut segments = Vec::with_capacity(parts.len());
        for part in parts {
            segments.push(match part {
                "*" => Segment::One,
                p if p.contains('*') => {
                    return Err(bad(
                        "`*` stands for one whole segment, and `**` only for the last one (e.g. `/repos/*/app/**`)",
                    ))
                }
                p => Segment::Literal(p.to_owned()),
            });
        }
        Ok(PathPattern { segments, below })
    }

    /// Whether the canonical path `path` fits the pattern.
    fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let given: Vec<&str> = rest.split('/').collect();
        let fits = |pattern: &Segment, segment: &str| match pattern {
            Segment::Literal(literal) => literal == segment,
            Segment::One => !segment.is_empty(),
        };
        if self.below {
            // `/a/**`: `/a`, `/a/`, `/a/x/y`; `/**`: everything.
            given.len() >= self.segments.len()
                && self.segments.iter().zip(&given).all(|(p, s)| fits(p, s))
        } else {
            given.len() == self.segments.len()
                && self.segments.iter().zip(&given).all(|(p, s)| fits(p, s))
        }
    }
}

/// Why a request was refused by the request rules of its host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestDenied {
    #[error("{method} {path} fits no request rule for this host ({rules})")]
    NotAllowed {
        method: String,
        path: String,
        rules: String,
    },
    #[error("the {header} header asks for another method than the one the request rules decide on ({rules}): refused")]
    MethodOverride { header: String, rules: String },
    #[error("{error} (request rules: {rules})")]
    Path { error: PathError, rules: String },
}

impl RequestDenied {
    /// The rules that refused, as written.
    pub fn rules(&self) -> &str {
        match self {
            RequestDenied::NotAllowed { rules, .. }
            | RequestDenied::MethodOverride { rules, .. }
            | RequestDenied::Path { rules, .. } => rules,
        }
    }
}

/// The request rules that apply to one host and port (empty: its requests are not checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestRules(Vec<RequestRule>);

impl RequestRules {
    pub(crate) fn new(rules: Vec<RequestRule>) -> Self {
        Self(rules)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rules as written, `, `-separated.
    pub fn text(&self) -> String {
        self.0
            .iter()
            .map(|r| r.text.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Decides a request: `method` as sent (case-sensitive), `target` in origin form,
    /// `method_override` the name of a [`METHOD_OVERRIDE_HEADERS`] header it carries. `Ok`
    /// carries the target to send up: its path in canonical form, the query unchanged (no
    /// rules: the target as given).
    pub fn check(
        &self,
        method: &str,
        target: &str,
        method_override: Option<&str>,
    ) -> Result<String, RequestDenied> {
        if self.0.is_empty() {
            return Ok(target.to_owned());
        }
        let (canonical, query) = split_target(target).map_err(|error| RequestDenied::Path {
            error,
            rules: self.text(),
        })?;
        if let Some(header) = method_override {
            if self.0.iter().any(|r| r.methods.is_some()) {
                return Err(RequestDenied::MethodOverride {
                    header: header.to_owned(),
                    rules: self.text(),
                });
            }
        }
        if self.0.iter().any(|r| r.allows(method, &canonical)) {
            Ok(format!("{canonical}{query}"))
        } else {
            Err(RequestDenied::NotAllowed {
                method: method.to_owned(),
                path: canonical,
                rules: self.text(),
            })
        }
    }
}

impl fmt::Display for RequestRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// The name of the first method-override header among `headers`, if any.
pub(crate) fn method_override<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<String> {
    headers
        .into_iter()
        .find(|name| {
            METHOD_OVERRIDE_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: &str, methods: Option<&[&str]>, paths: Option<&[&str]>) -> RequestRuleSpec {
        let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        RequestRuleSpec {
            host: host.to_owned(),
            methods: methods.map(owned),
            paths: paths.map(owned),
        }
    }

    fn rules(specs: &[RequestRuleSpec]) -> RequestRules {
        RequestRules::new(
            specs
                .iter()
                .map(|s| RequestRule::parse(s).unwrap())
                .collect(),
        )
    }

    fn error(spec: &RequestRuleSpec) -> String {
        RequestRule::parse(spec).unwrap_err().to_string()
    }

    #[test]
    fn patterns_match_exactly_below_on_whole_segments_and_one_segment_for_a_star() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("/a/b", &["/a/b"], &["/a/b/", "/a", "/a/b/c", "/a/bc", "/"]),
            (
                "/a/**",
                &["/a", "/a/", "/a/x", "/a/x/y/"],
                &["/ab", "/", "/b/a"],
            ),
            ("/**", &["/", "/a", "/a/b/c"], &[]),
            ("/", &["/"], &["/a"]),
            (
                "/repos/*/app/**",
                &["/repos/me/app", "/repos/you/app/pulls"],
                &["/repos/app", "/repos/me/x/app", "/repos/me/apps"],
            ),
            ("/a/*", &["/a/x"], &["/a/", "/a", "/a/x/y"]),
            ("/a/b/", &["/a/b/"], &["/a/b"]),
        ];
        for (pattern, yes, no) in cases {
            let p = PathPattern::parse(pattern).unwrap();
            for path in *yes {
                assert!(p.matches(path), "{pattern} should match {path}");
            }
            for path in *no {
                assert!(!p.matches(path), "{pattern} should not match {path}");
            }
        }
    }

    #[test]
    fn bad_patterns_are_refused_naming_them() {
        for bad in [
            "repos/me",
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/a/%2e",
            "/a?x=1",
            "/a#f",
            "/a;x",
            "/a\\b",
            "/a b",
            "/a/**/b",
            "/a*",
            "/a/b**",
            "/***",
            "/caf\u{e9}",
            "",
        ] {
            let message = error(&spec("api.test", None, Some(&[bad])));
            assert!(message.contains(&format!("{bad:?}")), "{bad}: {message}");
        }
    }

    #[test]
    fn methods_are_upper_case_tokens() {
        let lower = error(&spec("api.test", Some(&["get"]), None));
        let spaced = error(&spec("api.test", Some(&["get it"]), None));
        let empty = error(&spec("api.test", Some(&[""]), None));
        let none = error(&spec("api.test", Some(&[]), None));
        let trace = error(&spec("api.test", Some(&["TRACE"]), None));

        assert!(lower.contains("write \"GET\""), "{lower}");
        assert!(
            spaced.contains("\"get it\" is not an HTTP method"),
            "{spaced}"
        );
        assert!(empty.contains("is not an HTTP method"), "{empty}");
        assert!(none.contains("`methods = []`"), "{none}");
        assert!(trace.contains("TRACE"), "{trace}");
        for ok in ["GET", "POST", "PATCH", "PROPFIND", "M-SEARCH"] {
            assert!(RequestRule::parse(&spec("api.test", Some(&[ok]), None)).is_ok());
        }
    }

    #[test]
    fn a_rule_names_one_host() {
        let suffix = error(&spec("*.github.com", Some(&["GET"]), None));
        let bad_host = error(&spec("a.*.com", Some(&["GET"]), None));

        assert!(suffix.contains("not a `*.suffix`"), "{suffix}");
        assert!(suffix.contains("{ host = \"*.github.com\""), "{suffix}");
        assert!(bad_host.contains("leading `*.`"), "{bad_host}");
        // Without methods or paths a table is the string rule, suffix or not.
        assert!(RequestRule::parse(&spec("*.github.com", None, None)).is_ok());
    }

    #[test]
    fn a_rule_the_proxy_cannot_see_inside_is_refused_unless_its_host_is_intercepted() {
        let https = spec("api.github.com", Some(&["GET"]), None);
        let every_port = spec("api.github.com:*", None, Some(&["/a/**"]));
        let plain = spec("plain.test:80", Some(&["GET"]), None);
        let credential = ["API.GitHub.com.".to_owned()];

        let refused = https.check_visible(&[]).unwrap_err().to_string();
        let refused_any = every_port.check_visible(&[]).unwrap_err().to_string();

        assert!(refused.contains("{ host = \"api.github.com\", methods = [\"GET\"] }"));
        assert!(
            refused.contains("[credentials.\"api.github.com\"]"),
            "{refused}"
        );
        assert!(refused.contains("drop `methods` and `paths`"), "{refused}");
        assert!(refused_any.contains("443"), "{refused_any}");
        assert!(https.check_visible(&credential).is_ok());
        assert!(every_port.check_visible(&credential).is_ok());
        assert!(plain.check_visible(&[]).is_ok());
        assert!(spec("x.test", None, None).check_visible(&[]).is_ok());
    }

    #[test]
    fn a_request_must_fit_one_rule_on_its_canonical_path() {
        let r = rules(&[
            spec("api.test", Some(&["GET"]), None),
            spec(
                "api.test",
                Some(&["POST", "PATCH"]),
                Some(&["/repos/me/app/**"]),
            ),
        ]);
        let ok = |m: &str, t: &str| r.check(m, t, None);

        assert_eq!(ok("GET", "/anything?x=1"), Ok("/anything?x=1".to_owned()));
        assert_eq!(
            ok("POST", "/repos/me/app/issues"),
            Ok("/repos/me/app/issues".to_owned())
        );
        assert_eq!(
            ok("POST", "/repos/me/app/x/../pulls?a=/../b"),
            Ok("/repos/me/app/pulls?a=/../b".to_owned())
        );
        for (method, target) in [
            ("POST", "/repos/me/other"),
            ("POST", "/repos/me/app/../other"),
            ("POST", "/repos/me/app/%2e%2e/other"),
            ("POST", "/repos/me/apps"),
            ("DELETE", "/repos/me/app"),
            ("get", "/anything"),
            ("post", "/repos/me/app/issues"),
        ] {
            assert!(
                matches!(
                    r.check(method, target, None),
                    Err(RequestDenied::NotAllowed { .. })
                ),
                "{method} {target}"
            );
        }
        for target in [
            "/repos/me/app//x",
            "/repos/me/app/..;/other",
            "/repos/me/app/%252e",
            "*",
        ] {
            assert!(
                matches!(
                    r.check("GET", target, None),
                    Err(RequestDenied::Path { .. })
                ),
                "{target}"
            );
        }
        assert!(matches!(
            r.check("GET", "/x", Some("X-HTTP-Method-Override")),
            Err(RequestDenied::MethodOverride { .. })
        ));
        assert_eq!(
            RequestRules::default().check("get", "/a/../b", Some("X-HTTP-Method")),
            Ok("/a/../b".to_owned())
        );
    }

    #[test]
    fn a_refusal_names_the_rules() {
        let r = rules(&[spec("api.test", Some(&["GET"]), Some(&["/a/**"]))]);

        let refused = r.check("POST", "/a", None).unwrap_err();

        assert_eq!(
            refused.to_string(),
            "POST /a fits no request rule for this host ({ host = \"api.test\", methods = [\"GET\"], paths = [\"/a/**\"] })"
        );
        assert_eq!(refused.rules(), r.text());
    }

    #[test]
    fn override_headers_are_found_in_any_case() {
        assert_eq!(
            method_override(["Host", "X-Http-Method-Override"]),
            Some("X-Http-Method-Override".to_owned())
        );
        assert_eq!(method_override(["Host", "Accept"]), None);
    }
}
