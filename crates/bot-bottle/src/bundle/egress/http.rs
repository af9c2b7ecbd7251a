//! The small part of HTTP/1.x the proxy needs: request heads, targets, body framing, and the
//! proxy's own responses. Pure functions; malformed input is an error, never a panic.

/// Most header lines a request head may carry.
pub(crate) const MAX_HEADERS: usize = 100;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHead {
    pub method: String,
    pub target: String,
    /// Minor version: `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RequestHead {
    /// Values of every header named `name` (case-insensitive).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    /// Not valid HTTP/1.x.
    #[error("malformed request head: {0}")]
    Malformed(MalformedHead),
    /// More than [`MAX_HEADERS`] header lines.
    #[error("too many header lines")]
    TooManyHeaders,
}

/// How a request head is not valid HTTP/1.x.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MalformedHead {
    /// httparse's reason (e.g. `invalid token`).
    #[error("{0}")]
    Syntax(httparse::Error),
    #[error("bare LF line ending in the request head (end lines with CRLF)")]
    BareLf,
    #[error("incomplete request line")]
    IncompleteLine,
}

/// Parses a head from the start of `buf`. `Ok(None)`: incomplete, read more.
/// `Ok(Some((head, n)))`: the head took `n` bytes; the rest belongs to the body or tunnel.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::Malformed(MalformedHead::Syntax(e))),
    };
    if has_bare_lf(&buf[..len]) {
        return Err(HeadError::Malformed(MalformedHead::BareLf));
    }
    let missing = || HeadError::Malformed(MalformedHead::IncompleteLine);
    let head = RequestHead {
        method: req.method.ok_or_else(missing)?.to_owned(),
        target: req.path.ok_or_else(missing)?.to_owned(),
        version: req.version.ok_or_else(missing)?,
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
    };
    Ok(Some((head, len)))
}

/// Whether some `\n` in `bytes` is not preceded by `\r` (RFC 9112 §2.2: the proxy does not
/// accept a lone LF as a line end, so it never reads lines differently from the next hop).
fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

/// A `tchar` of RFC 9110 §5.6.2: the bytes of a token (header names, codings, extensions).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Why an authority (`host[:port]`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthorityError {
    #[error("empty host")]
    EmptyHost,
    #[error("unexpected {found:?} in authority {authority:?}")]
    UnexpectedChar { found: char, authority: String },
    #[error("unclosed `[` in {authority:?}")]
    UnclosedBracket { authority: String },
    #[error("expected `:port` after `]` in {authority:?}")]
    NoPortAfterBracket { authority: String },
    #[error("malformed host in {authority:?}")]
    MalformedHost { authority: String },
    #[error("bad port {port:?}")]
    BadPort { port: String },
    #[error("missing port in {authority:?}")]
    MissingPort { authority: String },
}

/// Splits `host[:port]` / `[v6][:port]`. The port is required when `default_port` is `None`.
/// Rejects user info (`user@host`), paths, empty hosts and port 0.
pub(crate) fn parse_authority(
    authority: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), AuthorityError> {
    let named = || authority.to_owned();
    if authority.is_empty() {
        return Err(AuthorityError::EmptyHost);
    }
    if let Some(found) = authority
        .chars()
        .find(|c| matches!(c, '@' | '/' | '?' | '#' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(AuthorityError::UnexpectedChar {
            found,
            authority: named(),
        });
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| AuthorityError::UnclosedBracket { authority: named() })?;
        let (host, rest) = authority.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => (
                host,
                Some(
                    rest.strip_prefix(':')
                        .ok_or_else(|| AuthorityError::NoPortAfterBracket { authority: named() })?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains(':') && !host.starts_with('[') {
        return Err(AuthorityError::MalformedHost { authority: named() });
    }
    let port = match (port, default_port) {
        (Some(p), _) => match p.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(AuthorityError::BadPort { port: p.to_owned() }),
        },
        (None, Some(default)) => default,
        (None, None) => return Err(AuthorityError::MissingPort { authority: named() }),
    };
    Ok((host.to_owned(), port))
}

/// An absolute-form `http://` target split into host, port and origin-form path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AbsoluteTarget {
    pub host: String,
    pub port: u16,
    /// The authority as written (used for a missing `Host` header).
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Why a plain proxy request's target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TargetError {
    #[error("request target {target:?} is neither `/path` nor `http://host/path`")]
    NotPathOrUrl { target: String },
    #[error("`https://` targets need a CONNECT tunnel, not a plain proxy request")]
    Https,
    #[error("unsupported scheme {scheme:?}")]
    Scheme { scheme: String },
    #[error(transparent)]
    Authority(#[from] AuthorityError),
}

pub(crate) fn parse_absolute_http(target: &str) -> Result<AbsoluteTarget, TargetError> {
    let scheme_end = target
        .find("://")
        .ok_or_else(|| TargetError::NotPathOrUrl {
            target: target.to_owned(),
        })?;
    let scheme = &target[..scheme_end];
    if scheme.eq_ignore_ascii_case("https") {
        return Err(TargetError::Https);
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(TargetError::Scheme {
            scheme: scheme.to_owned(),
        });
    }
    let rest = &target[scheme_end + 3..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let (host, port) = parse_authority(authority, Some(80))?;
    let path = match &rest[auth_end..] {
        "" => "/".to_owned(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_owned(),
    };
    // A fragment never goes on the wire.
    let path = path.split('#').next().unwrap_or("/").to_owned();
    Ok(AbsoluteTarget {
        host,
        port,
        authority: authority.to_owned(),
        path,
    })
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// Why a message's body framing was refused (request-smuggling defences).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FramingError {
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    #[error("conflicting Content-Length headers")]
    ConflictingLengths,
    #[error("bad Content-Length {0:?} (expected decimal digits only)")]
    BadLength(String),
    #[error(
        "Transfer-Encoding {0:?} refused: a request's only transfer coding must be `chunked` \
         (send one `Transfer-Encoding: chunked`, or a Content-Length)"
    )]
    RequestCoding(String),
    #[error("Transfer-Encoding in an HTTP/1.0 request (use HTTP/1.1, or a Content-Length)")]
    CodingInHttp10,
    #[error("unsupported transfer coding {0:?}")]
    UnsupportedCoding(String),
}

/// Reads a request's `Content-Length` / `Transfer-Encoding`. Refused: both together,
/// conflicting or non-decimal lengths, and any transfer coding but exactly one `chunked`
/// (`identity, chunked`, `gzip, chunked`, two `chunked`, an empty or quoted element), and
/// `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 §6.1).
pub(crate) fn body_framing(head: &RequestHead) -> Result<BodyFraming, FramingError> {
    let codings: Vec<&[u8]> = head.header_values("transfer-encoding").collect();
    if codings.is_empty() {
        return content_length(&head.headers);
    }
    if head.header_values("content-length").next().is_some() {
        return Err(FramingError::LengthAndEncoding);
    }
    if head.version == 0 {
        return Err(FramingError::CodingInHttp10);
    }
    match codings.as_slice() {
        [only] if trim_ows(only).eq_ignore_ascii_case(b"chunked") => Ok(BodyFraming::Chunked),
        _ => Err(FramingError::RequestCoding(
            codings
                .iter()
                .map(|c| String::from_utf8_lossy(c))
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    let end = value.len()
        - value[start..]
            .iter()
            .rev()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
    &value[start..end]
}

/// Compression codings a response may carry before its final `chunked`.
const RESPONSE_CODINGS: &[&str] = &[
    "gzip",
    "x-gzip",
    "deflate",
    "compress",
    "x-compress",
    "br",
    "zstd",
];

/// A response's framing from its headers: `chunked` last and once, before it only known
/// compression codings (never `identity`); a length as a request's.
fn response_body_framing(headers: &[(String, Vec<u8>)]) -> Result<BodyFraming, FramingError> {
    let codings: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim_matches([' ', '\t']).to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let Some((last, before)) = codings.split_last() else {
        return content_length(headers);
    };
    if headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        return Err(FramingError::LengthAndEncoding);
    }
    if last != "chunked" {
        return Err(FramingError::UnsupportedCoding(last.clone()));
    }
    match before
        .iter()
        .find(|c| !RESPONSE_CODINGS.contains(&c.as_str()))
    {
        Some(bad) => Err(FramingError::UnsupportedCoding(bad.clone())),
        None => Ok(BodyFraming::Chunked),
    }
}

/// The framing given by `Content-Length` headers alone (none: no body).
fn content_length(headers: &[(String, Vec<u8>)]) -> Result<BodyFraming, FramingError> {
    let lengths: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_slice())
        .collect();
    let Some(first) = lengths.first() else {
        return Ok(BodyFraming::None);
    };
    if lengths.iter().any(|l| l != first) {
        return Err(FramingError::ConflictingLengths);
    }
    let bad = || FramingError::BadLength(String::from_utf8_lossy(first).into_owned());
    if first.is_empty() || !first.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let len = std::str::from_utf8(first)
        .ok()
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or_else(bad)?;
    Ok(if len == 0 {
        BodyFraming::None
    } else {
        BodyFraming::Length(len)
    })
}

/// Headers that describe one hop and are not forwarded (RFC 9110 §7.6.1), plus the proxy's own.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// The head sent upstream: origin-form target, hop-by-hop headers removed (including those the
/// `Connection` header names), `Host` added if missing, and `Connection: close` (one request
/// per upstream connection).
pub(crate) fn upstream_head(head: &RequestHead, path: &str, authority: &str) -> Vec<u8> {
    let named_by_connection = connection_tokens(&head.headers);
    let mut out = format!("{} {} HTTP/1.{}\r\n", head.method, path, head.version).into_bytes();
    let mut has_host = false;
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) || named_by_connection.contains(&lower) {
            continue;
        }
        has_host |= lower == "host";
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        out.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// The lower-cased tokens of every `Connection` header.
pub(crate) fn connection_tokens(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    header_tokens(headers, "connection")
}

/// The lower-cased, comma-separated tokens of every header named `name` (a list-valued
/// header such as `Connection` or `Content-Encoding`), empty ones left out.
pub(crate) fn header_tokens(headers: &[(String, Vec<u8>)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether a message of HTTP/1.`version` with these headers ends its connection.
pub(crate) fn closes_connection(version: u8, headers: &[(String, Vec<u8>)]) -> bool {
    let tokens = connection_tokens(headers);
    tokens.iter().any(|t| t == "close")
        || (version == 0 && !tokens.iter().any(|t| t == "keep-alive"))
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResponseHead {
    pub status: u16,
    /// Minor version: `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why an upstream's response head, or its body framing, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResponseError {
    #[error("incomplete response head")]
    Incomplete,
    #[error("malformed response head: {0}")]
    Malformed(httparse::Error),
    #[error("response without a status line")]
    NoStatusLine,
    #[error(transparent)]
    Framing(#[from] FramingError),
}

/// Parses a complete response head.
pub(crate) fn parse_response_head(buf: &[u8]) -> Result<ResponseHead, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(ResponseError::Incomplete),
        Err(e) => return Err(ResponseError::Malformed(e)),
    }
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(ResponseError::NoStatusLine);
    };
    Ok(ResponseHead {
        status,
        version,
        headers: resp
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
    })
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    Body(BodyFraming),
    /// No length: the body runs until the server closes the connection.
    UntilClose,
}

/// The framing of `head`, the answer to a `method` request. Responses to `HEAD`, `1xx`, `204`
/// and `304` have no body; a length the request checks would refuse is refused here too.
pub(crate) fn response_framing(
    head: &ResponseHead,
    method: &str,
) -> Result<ResponseFraming, ResponseError> {
    if method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304
    {
        return Ok(ResponseFraming::Body(BodyFraming::None));
    }
    let delimited = head.headers.iter().any(|(n, _)| {
        n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding")
    });
    if !delimited {
        return Ok(ResponseFraming::UntilClose);
    }
    Ok(ResponseFraming::Body(response_body_framing(&head.headers)?))
}

/// A complete response from the proxy itself (`Connection: close`, plain-text body).
pub(crate) fn response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nX-Bot-Bottle-Egress: {status}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> RequestHead {
        parse_head(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn parse_head_returns_head_length_and_leaves_body() {
        let text = b"POST http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\nBODY";
        let (head, len) = parse_head(text).unwrap().unwrap();
        assert_eq!(
            (head.method.as_str(), head.target.as_str(), head.version),
            ("POST", "http://a.test/x", 1)
        );
        assert_eq!(&text[len..], b"BODY");
    }

    #[test]
    fn parse_head_incomplete_asks_for_more() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: a"), Ok(None));
    }

    #[test]
    fn parse_head_garbage_is_malformed() {
        assert!(matches!(
            parse_head(b"\x00\x01\x02 nonsense\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn parse_head_too_many_headers_is_refused() {
        let text = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse_head(text.as_bytes()), Err(HeadError::TooManyHeaders));
    }

    #[test]
    fn authority_parses_names_ipv6_and_default_ports() {
        assert_eq!(
            parse_authority("a.test:443", None),
            Ok(("a.test".into(), 443))
        );
        assert_eq!(
            parse_authority("[::1]:8080", None),
            Ok(("[::1]".into(), 8080))
        );
        assert_eq!(
            parse_authority("a.test", Some(80)),
            Ok(("a.test".into(), 80))
        );
        assert_eq!(parse_authority("[::1]", Some(80)), Ok(("[::1]".into(), 80)));
    }

    #[test]
    fn authority_rejects_userinfo_missing_port_and_bad_ports() {
        for bad in [
            "a.test@evil.test:443",
            "a.test",
            "a.test:0",
            "a.test:x",
            ":443",
            "::1:443",
            "[::1",
            "a b:1",
        ] {
            assert!(parse_authority(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn absolute_target_splits_host_port_and_path() {
        assert_eq!(
            parse_absolute_http("HTTP://A.test:8080/p?q=1#frag"),
            Ok(AbsoluteTarget {
                host: "A.test".into(),
                port: 8080,
                authority: "A.test:8080".into(),
                path: "/p?q=1".into()
            })
        );
        assert_eq!(
            parse_absolute_http("http://a.test").map(|t| (t.port, t.path)),
            Ok((80, "/".into()))
        );
        assert_eq!(
            parse_absolute_http("http://a.test?x").map(|t| t.path),
            Ok("/?x".into())
        );
    }

    #[test]
    fn absolute_target_rejects_https_userinfo_and_other_schemes() {
        assert!(parse_absolute_http("https://a.test/")
            .unwrap_err()
            .to_string()
            .contains("CONNECT"));
        assert!(parse_absolute_http("http://a.test@evil.test/").is_err());
        assert!(parse_absolute_http("ftp://a.test/").is_err());
        assert!(parse_absolute_http("a.test/").is_err());
    }

    #[test]
    fn body_framing_reads_length_and_chunked() {
        assert_eq!(
            body_framing(&head("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n")),
            Ok(BodyFraming::Length(5))
        );
        assert_eq!(
            body_framing(&head(
                "POST / HTTP/1.1\r\nTransfer-Encoding: Chunked \r\n\r\n"
            )),
            Ok(BodyFraming::Chunked)
        );
        assert_eq!(
            body_framing(&head("GET / HTTP/1.1\r\n\r\n")),
            Ok(BodyFraming::None)
        );
    }

    #[test]
    fn body_framing_refuses_smuggling_shapes() {
        for text in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: \"chunked\"\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: \r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        ] {
            assert!(body_framing(&head(text)).is_err(), "{text}");
        }
    }

    #[test]
    fn a_request_head_with_a_bare_lf_is_malformed() {
        for text in [
            &b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        ] {
            assert!(
                matches!(parse_head(text), Err(HeadError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn response_framing_takes_compression_before_chunked_but_not_identity() {
        let response = |te: &str| ResponseHead {
            status: 200,
            version: 1,
            headers: vec![("Transfer-Encoding".into(), te.as_bytes().to_vec())],
        };
        assert_eq!(
            response_framing(&response("gzip, chunked"), "GET"),
            Ok(ResponseFraming::Body(BodyFraming::Chunked))
        );
        assert!(response_framing(&response("identity, chunked"), "GET").is_err());
        assert!(response_framing(&response("chunked, chunked"), "GET").is_err());
        assert!(response_framing(&response("chunked, gzip"), "GET").is_err());
    }

    #[test]
    fn upstream_head_drops_hop_by_hop_and_forces_close() {
        let h = head("GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: secret\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nAccept: */*\r\n\r\n");
        let out = String::from_utf8(upstream_head(&h, "/x", "a.test")).unwrap();
        assert_eq!(
            out,
            "GET /x HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn upstream_head_adds_missing_host() {
        let h = head("GET http://a.test:81/ HTTP/1.0\r\n\r\n");
        let out = String::from_utf8(upstream_head(&h, "/", "a.test:81")).unwrap();
        assert_eq!(
            out,
            "GET / HTTP/1.0\r\nHost: a.test:81\r\nConnection: close\r\n\r\n"
        );
    }
}
