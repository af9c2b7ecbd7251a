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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Not valid HTTP/1.x.
    Malformed(String),
    /// More than [`MAX_HEADERS`] header lines.
    TooManyHeaders,
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
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let missing = || HeadError::Malformed("incomplete request line".into());
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

/// Splits `host[:port]` / `[v6][:port]`. The port is required when `default_port` is `None`.
/// Rejects user info (`user@host`), paths, empty hosts and port 0.
pub(crate) fn parse_authority(
    authority: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), String> {
    if authority.is_empty() {
        return Err("empty host".into());
    }
    if let Some(bad) = authority
        .chars()
        .find(|c| matches!(c, '@' | '/' | '?' | '#' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(format!("unexpected {bad:?} in authority {authority:?}"));
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| format!("unclosed `[` in {authority:?}"))?;
        let (host, rest) = authority.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => (
                host,
                Some(
                    rest.strip_prefix(':')
                        .ok_or_else(|| format!("expected `:port` after `]` in {authority:?}"))?,
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
        return Err(format!("malformed host in {authority:?}"));
    }
    let port = match (port, default_port) {
        (Some(p), _) => match p.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(format!("bad port {p:?}")),
        },
        (None, Some(default)) => default,
        (None, None) => return Err(format!("missing port in {authority:?}")),
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

pub(crate) fn parse_absolute_http(target: &str) -> Result<AbsoluteTarget, String> {
    let scheme_end = target.find("://").ok_or_else(|| {
        format!("request target {target:?} is neither `/path` nor `http://host/path`")
    })?;
    let scheme = &target[..scheme_end];
    if scheme.eq_ignore_ascii_case("https") {
        return Err("`https://` targets need a CONNECT tunnel, not a plain proxy request".into());
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!("unsupported scheme {scheme:?}"));
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

/// Reads `Content-Length` / `Transfer-Encoding`. Both together, conflicting lengths or an
/// encoding other than a final `chunked` are refused (request-smuggling defences).
pub(crate) fn body_framing(head: &RequestHead) -> Result<BodyFraming, String> {
    framing_of(&head.headers)
}

/// [`body_framing`] from a header list (requests and responses alike).
fn framing_of(headers: &[(String, Vec<u8>)]) -> Result<BodyFraming, String> {
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    };
    let encodings: Vec<String> = values("transfer-encoding")
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect();
    let lengths: Vec<&[u8]> = values("content-length").collect();
    match (encodings.last(), lengths.first()) {
        (Some(_), Some(_)) => Err("both Content-Length and Transfer-Encoding".into()),
        (Some(last), None) if last == "chunked" => Ok(BodyFraming::Chunked),
        (Some(last), None) => Err(format!("unsupported transfer coding {last:?}")),
        (None, Some(first)) => {
            if lengths.iter().any(|l| l != first) {
                return Err("conflicting Content-Length headers".into());
            }
            let text = std::str::from_utf8(first).map_err(|_| "bad Content-Length")?;
            let valid = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
            let len = text
                .parse::<u64>()
                .ok()
                .filter(|_| valid)
                .ok_or_else(|| format!("bad Content-Length {text:?}"))?;
            Ok(if len == 0 {
                BodyFraming::None
            } else {
                BodyFraming::Length(len)
            })
        }
        (None, None) => Ok(BodyFraming::None),
    }
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
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
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

/// Parses a complete response head.
pub(crate) fn parse_response_head(buf: &[u8]) -> Result<ResponseHead, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
        Err(e) => return Err(format!("malformed response head: {e}")),
    }
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err("response without a status line".into());
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
) -> Result<ResponseFraming, String> {
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
    framing_of(&head.headers).map(ResponseFraming::Body)
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
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
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
        ] {
            assert!(body_framing(&head(text)).is_err(), "{text}");
        }
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
