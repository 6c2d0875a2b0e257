//! The proxy's request parser (pure): one HTTP/1.x request head in, a [`ProxyRequest`]
//! (CONNECT or a forward rewritten to origin form) or a [`ProxyError`] naming what was
//! wrong out.
//!
//! It does no I/O and depends only on `httparse` and `thiserror`, so the fuzz crate
//! (`fuzz/fuzz_targets/proxy_request.rs`) compiles this very file without the agent's
//! heavy dependencies. It must not decide egress policy: the controller does that on the
//! resolved address.

/// The largest request head (request line and headers) a client may send.
pub const MAX_HEAD: usize = 16 * 1024;

/// The most headers a request head may have.
pub const MAX_HEADERS: usize = 100;

/// The longest host name the proxy passes on (a DNS name is at most 253 characters).
const MAX_HOST: usize = 253;

/// What a client asked for, parsed from its request head.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyRequest {
    /// `CONNECT host:port`: splice raw bytes after a 200.
    Connect { host: String, port: u16 },
    /// An absolute-form request: send `head` (rewritten to origin form) to `host:port`.
    Forward {
        host: String,
        port: u16,
        head: Vec<u8>,
    },
}

/// A request the proxy answers itself with an error status. The text names what was wrong
/// and is sent to the client as the body of the answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The head is not an HTTP/1.x request (httparse's reason, or what is missing).
    #[error("malformed request head: {0}")]
    Malformed(String),
    /// The head did not end within [`MAX_HEAD`] bytes.
    #[error("request head exceeds {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The head has more than [`MAX_HEADERS`] header lines.
    #[error("request head has more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    /// The request target is not `host:port` (CONNECT) or an `http://` URL, or its host
    /// or port is unusable.
    #[error("unsupported request target {target:?}: {why}")]
    BadTarget { target: String, why: &'static str },
}

impl ProxyError {
    /// The status line the proxy answers this error with.
    pub fn status(&self) -> &'static str {
        match self {
            Self::HeadTooLarge | Self::TooManyHeaders => "431 Request Header Fields Too Large",
            Self::Malformed(_) | Self::BadTarget { .. } => "400 Bad Request",
        }
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` when incomplete, with the
/// head's length when complete (`buf` may hold more bytes after it).
///
/// Never panics and allocates at most a copy of the head: the caller bounds `buf` by
/// [`MAX_HEAD`] (plus one read), and a complete head longer than that is refused here too.
pub fn parse_head(buf: &[u8]) -> Result<Option<(ProxyRequest, usize)>, ProxyError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ProxyError::TooManyHeaders),
        Err(e) => return Err(ProxyError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD {
        return Err(ProxyError::HeadTooLarge);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(ProxyError::Malformed("incomplete request line".into()));
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_authority(target, None).map_err(|why| ProxyError::BadTarget {
            target: target.to_owned(),
            why,
        })?;
        return Ok(Some((ProxyRequest::Connect { host, port }, head_len)));
    }
    let (host, port, origin, named_in_path) = match target.strip_prefix(ORIGIN_PREFIX) {
        Some(rest) => {
            let (host, port, origin) = split_named(rest).map_err(|why| ProxyError::BadTarget {
                target: target.to_owned(),
                why,
            })?;
            (host, port, origin, true)
        }
        None => {
            let (host, port, origin) =
                split_absolute(target).map_err(|why| ProxyError::BadTarget {
                    target: target.to_owned(),
                    why,
                })?;
            (host, port, origin, false)
        }
    };
    // A client that named the upstream in the path sent the proxy's own Host header.
    let head = origin_form_head(
        method,
        origin,
        version,
        req.headers,
        &authority(&host, port),
        named_in_path,
    );
    Ok(Some((ProxyRequest::Forward { host, port, head }, head_len)))
}

/// Path prefix of origin-form requests that name their upstream in the path:
/// `GET /.unidesk-egress/<host>:<port>/<path>`. libgit2 sends a plain-http request meant for
/// an HTTP proxy to the origin server itself (libgit2 issue 5650), which would bypass the
/// tunnel; so the agent's own fetches of `http://` remotes address this proxy as their server
/// instead ([`path_named_url`]). The target then takes the same tunnel and the same
/// controller policy as any other request.
pub const ORIGIN_PREFIX: &str = "/.unidesk-egress/";

/// Rewrites an `http://host[:port]/path` URL to one served by the proxy at `proxy`
/// (`http://127.0.0.1:18789`) that names its upstream in the path. `None` for other schemes.
pub fn path_named_url(proxy: &str, url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(auth_end);
    let (host, port) = split_authority(auth, Some(80)).ok()?;
    let path = if path.starts_with('/') || path.is_empty() {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Some(format!(
        "{}{ORIGIN_PREFIX}{}{path}",
        proxy.trim_end_matches('/'),
        authority(&host, port)
    ))
}

/// Splits `host:port/path?query` (after [`ORIGIN_PREFIX`]) into host, port and origin form.
fn split_named(rest: &str) -> Result<(String, u16, String), &'static str> {
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(auth_end);
    let (host, port) = split_authority(auth, Some(80))?;
    let origin = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Ok((host, port, origin))
}

/// Splits an absolute-form `http://host[:port]/path?query` into host, port (default 80) and
/// origin form (`/path?query`).
fn split_absolute(target: &str) -> Result<(String, u16, String), &'static str> {
    let scheme_end = target
        .find("://")
        .ok_or("expected CONNECT host:port or an absolute http:// URL")?;
    let (scheme, rest) = target.split_at(scheme_end);
    if !scheme.eq_ignore_ascii_case("http") {
        return Err("only http:// URLs are forwarded; use CONNECT for https");
    }
    let rest = rest.get(3..).unwrap_or_default();
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(auth_end);
    let (host, port) = split_authority(auth, Some(80))?;
    // A fragment is never sent to a server.
    let path = path.split('#').next().unwrap_or_default();
    let origin = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Ok((host, port, origin))
}

/// Splits `host:port` or `[v6]:port`; `default_port` applies when the port is absent.
pub fn split_authority(
    auth: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), &'static str> {
    if auth.contains('@') {
        return Err("credentials in the request target are not supported");
    }
    if auth.contains('/') {
        return Err("expected host:port, not a URL or a path");
    }
    let (host, port) = if let Some(v6) = auth.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unterminated [ in the host")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("only an IPv6 address may stand in brackets");
        }
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or("junk after ] in the host")?),
            ),
        }
    } else {
        match auth.split_once(':') {
            // An IPv6 literal must be in brackets, so a second colon is an error.
            Some((_, p)) if p.contains(':') => return Err("IPv6 host not in brackets"),
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        }
    };
    if host.is_empty() {
        return Err("empty host");
    }
    if host.len() > MAX_HOST {
        return Err("host is longer than 253 characters");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
    {
        return Err("host has characters no host name has");
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err("port is not 1-65535"),
        },
        None => default_port.ok_or("port missing")?,
    };
    Ok((host.to_owned(), port))
}

/// `host:port` with an IPv6 literal in brackets, as in a Host header.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The head to send upstream: origin-form request line, the client's headers minus
/// `Proxy-*` and hop-by-hop connection headers, a Host header, and `Connection: close` so
/// the server ends the exchange and the splice ends with it.
fn origin_form_head(
    method: &str,
    origin: String,
    version: u8,
    headers: &[httparse::Header<'_>],
    host: &str,
    replace_host: bool,
) -> Vec<u8> {
    let mut head = format!("{method} {origin} HTTP/1.{version}\r\n").into_bytes();
    let mut has_host = false;
    for h in headers {
        let name = h.name;
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("proxy-")
            || lower == "connection"
            || lower == "keep-alive"
            || (replace_host && lower == "host")
        {
            continue;
        }
        has_host |= lower == "host";
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    if !has_host {
        head.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    head
}

/// Asserts what every head [`parse_head`] accepts must satisfy: bounded by the input and
/// [`MAX_HEAD`], a usable port and a non-empty host within DNS's length, and a forwarded head
/// that is itself a complete origin-form request ending the exchange (`Connection: close`).
/// The property tests below and the `proxy_request` fuzz target (which compiles this file
/// with `--cfg fuzzing`) both check through it.
#[cfg(any(test, fuzzing))]
pub fn assert_parse_invariants(data: &[u8]) {
    let Ok(Some((request, len))) = parse_head(data) else {
        return;
    };
    assert!(len <= data.len() && len <= MAX_HEAD, "head length {len}");
    match request {
        ProxyRequest::Connect { host, port } => {
            assert!(port != 0 && !host.is_empty() && host.len() <= MAX_HOST);
        }
        ProxyRequest::Forward { host, port, head } => {
            assert!(port != 0 && !host.is_empty() && host.len() <= MAX_HOST);
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
            let mut again = httparse::Request::new(&mut headers);
            let status = again.parse(&head).expect("the forwarded head parses");
            assert_eq!(status, httparse::Status::Complete(head.len()));
            assert!(again.path.is_some_and(|p| p.starts_with('/')));
            assert!(head.ends_with(b"Connection: close\r\n\r\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn refused(head: &[u8]) -> ProxyError {
        match parse_head(head) {
            Err(e) => e,
            Ok(other) => panic!("{:?} parsed: {other:?}", String::from_utf8_lossy(head)),
        }
    }

    #[test]
    fn malformed_and_adversarial_heads_are_named() {
        let long_host = format!("CONNECT {}:443 HTTP/1.1\r\n\r\n", "a".repeat(254));
        let cases: Vec<(&[u8], &str)> = vec![
            // Request lines that are not HTTP/1.x.
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                "malformed request head",
            ),
            (b"GET\r\n\r\n", "malformed request head"),
            (b"GET http://a/ HTTP/2.0\r\n\r\n", "malformed request head"),
            (
                b"GET http://a/\x00 HTTP/1.1\r\n\r\n",
                "malformed request head",
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
                "malformed request head",
            ),
            (
                b"GET http://a/ HTTP/1.1\r\n folded: x\r\n\r\n",
                "malformed request head",
            ),
            // CONNECT targets that are not host:port.
            (
                b"CONNECT a.example:https HTTP/1.1\r\n\r\n",
                "port is not 1-65535",
            ),
            (
                b"CONNECT a.example:0 HTTP/1.1\r\n\r\n",
                "port is not 1-65535",
            ),
            (
                b"CONNECT a.example:65536 HTTP/1.1\r\n\r\n",
                "port is not 1-65535",
            ),
            (
                b"CONNECT a.example:-1 HTTP/1.1\r\n\r\n",
                "port is not 1-65535",
            ),
            (
                b"CONNECT a.example: HTTP/1.1\r\n\r\n",
                "port is not 1-65535",
            ),
            (b"CONNECT a.example HTTP/1.1\r\n\r\n", "port missing"),
            (b"CONNECT :443 HTTP/1.1\r\n\r\n", "empty host"),
            (
                b"CONNECT http://a.example:443/ HTTP/1.1\r\n\r\n",
                "expected host:port, not a URL",
            ),
            (
                b"CONNECT ::1:443 HTTP/1.1\r\n\r\n",
                "IPv6 host not in brackets",
            ),
            (
                b"CONNECT [a.example]:443 HTTP/1.1\r\n\r\n",
                "only an IPv6 address",
            ),
            (b"CONNECT [::1 HTTP/1.1\r\n\r\n", "unterminated ["),
            (
                b"CONNECT a%2eexample:443 HTTP/1.1\r\n\r\n",
                "characters no host name has",
            ),
            (long_host.as_bytes(), "longer than 253"),
            // Credentials in the target are refused, in every form.
            (
                b"CONNECT user:pw@a.example:443 HTTP/1.1\r\n\r\n",
                "credentials",
            ),
            (
                b"GET http://user:pw@a.example/x HTTP/1.1\r\n\r\n",
                "credentials",
            ),
            (
                b"GET http://user@a.example:80/ HTTP/1.1\r\n\r\n",
                "credentials",
            ),
            (
                b"GET /.unidesk-egress/u@a.example:80/x HTTP/1.1\r\n\r\n",
                "credentials",
            ),
            // Only http:// is forwarded, and only absolute-form.
            (
                b"GET https://a.example/ HTTP/1.1\r\n\r\n",
                "only http:// URLs",
            ),
            (
                b"GET ftp://a.example/ HTTP/1.1\r\n\r\n",
                "only http:// URLs",
            ),
            (
                b"GET /relative HTTP/1.1\r\n\r\n",
                "expected CONNECT host:port",
            ),
            (b"GET * HTTP/1.1\r\n\r\n", "expected CONNECT host:port"),
        ];
        for (head, why) in cases {
            let err = refused(head);
            assert!(
                err.to_string().contains(why),
                "{:?}: {err} lacks {why:?}",
                String::from_utf8_lossy(head)
            );
            assert_eq!(err.status(), "400 Bad Request", "{err}");
        }
    }

    #[test]
    fn absurd_header_sizes_are_431() {
        let many = format!(
            "GET http://a/ HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        let err = refused(many.as_bytes());
        assert_eq!(err, ProxyError::TooManyHeaders);
        assert_eq!(err.status(), "431 Request Header Fields Too Large");
        // A complete head over the limit is refused even when it arrived in one read.
        let long = format!(
            "GET http://a/ HTTP/1.1\r\nX: {}\r\n\r\n",
            "y".repeat(MAX_HEAD)
        );
        assert_eq!(refused(long.as_bytes()), ProxyError::HeadTooLarge);
    }

    #[test]
    fn incomplete_heads_ask_for_more() {
        for head in [
            &b""[..],
            b"CONN",
            b"CONNECT a.example:443 HTTP/1.1\r\n",
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a",
        ] {
            assert_eq!(
                parse_head(head),
                Ok(None),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn good_heads_parse() {
        let (req, len) = parse_head(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(len, 30);
        assert_eq!(
            req,
            ProxyRequest::Connect {
                host: "::1".into(),
                port: 443
            }
        );
        let (req, _) = parse_head(b"GET http://a.example:8080/x?y#frag HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        let ProxyRequest::Forward { host, port, head } = req else {
            panic!("not a forward: {req:?}")
        };
        assert_eq!((host.as_str(), port), ("a.example", 8080));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /x?y HTTP/1.0\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n"
        );
    }

    proptest! {
        /// Arbitrary bytes never panic; whatever parses is bounded by the input and the
        /// limits, names a usable port, and forwards a head that is itself a complete
        /// origin-form request.
        #[test]
        fn arbitrary_heads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            assert_parse_invariants(&data);
        }

        #[test]
        fn request_shaped_heads_keep_the_invariants(
            method in "(CONNECT|GET|POST|connect)",
            target in "[a-z0-9:/\\[\\]@.%?#_-]{0,40}",
            headers in proptest::collection::vec("[A-Za-z-]{1,8}: [ -~]{0,16}", 0..4),
        ) {
            let head = format!("{method} {target} HTTP/1.1\r\n{}\r\n", headers.iter().map(|h| format!("{h}\r\n")).collect::<String>());
            assert_parse_invariants(head.as_bytes());
        }
    }
}
