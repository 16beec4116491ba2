//! The HBONE wire (docs/HBONE.md): the CONNECT request outbound sends, the
//! checks inbound makes on it, and the HTTP/2 settings both sides use.

use std::{net::SocketAddr, time::Duration};

use http::{HeaderValue, Method, Request, StatusCode, Uri, header::FORWARDED};

use super::TunnelConfig;

/// The port a node agent's inbound listens on.
pub const HBONE_PORT: u16 = 15008;
/// The only ALPN protocol either side offers.
pub const ALPN_H2: &[u8] = b"h2";
/// Carries the source workload's SPIFFE ID.
pub const SOURCE_IDENTITY_HEADER: &str = "x-mesh-source-identity";
/// Longest source identity accepted (a SPIFFE ID is at most 2048 bytes).
const MAX_IDENTITY_LEN: usize = 2048;

/// `:authority` for a backend: `ip:port`, IPv6 in brackets.
pub fn authority(backend: SocketAddr) -> String {
    // SocketAddr's Display is exactly that, minus any IPv6 scope id.
    SocketAddr::new(backend.ip(), backend.port()).to_string()
}

/// The `forwarded` value naming the client: `for="ip:port"` (RFC 7239;
/// quoted because of the colon, IPv6 in brackets).
pub fn forwarded_for(client: SocketAddr) -> String {
    format!("for=\"{}\"", SocketAddr::new(client.ip(), client.port()))
}

/// The request outbound sends for one client connection.
pub fn connect_request(
    backend: SocketAddr,
    client: SocketAddr,
    workload: Option<&str>,
) -> Result<Request<()>, http::Error> {
    // An authority-only URI: h2 then sends :method and :authority only,
    // no :scheme or :path (RFC 9113 §8.5).
    let uri: Uri = authority(backend).parse()?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .header(FORWARDED, forwarded_for(client));
    if let Some(workload) = workload {
        request = request.header(SOURCE_IDENTITY_HEADER, workload);
    }
    request.body(())
}

/// A well-formed CONNECT, as inbound understood it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    pub backend: SocketAddr,
    /// From `forwarded: for=`; absent when the header is.
    pub client: Option<SocketAddr>,
    /// From `x-mesh-source-identity`; absent when the header is.
    pub source_identity: Option<String>,
}

/// Why a request is not a well-formed HBONE CONNECT (answered 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("extended CONNECT (:protocol) is not HBONE")]
    ExtendedConnect,
    #[error(":scheme or :path present in CONNECT")]
    SchemeOrPath,
    #[error("missing :authority")]
    MissingAuthority,
    #[error(":authority {0:?} is not an ip:port")]
    BadAuthority(String),
    #[error("forwarded header {0:?} has no for=\"ip:port\"")]
    BadForwarded(String),
    #[error("{SOURCE_IDENTITY_HEADER} {0:?} is not a SPIFFE ID")]
    BadSourceIdentity(String),
    #[error("header {0} appears more than once")]
    DuplicateHeader(&'static str),
}

impl BadRequest {
    /// Label for the rejection counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Method(_) => "method",
            Self::ExtendedConnect => "extended_connect",
            Self::SchemeOrPath => "scheme_or_path",
            Self::MissingAuthority => "missing_authority",
            Self::BadAuthority(_) => "bad_authority",
            Self::BadForwarded(_) => "bad_forwarded",
            Self::BadSourceIdentity(_) => "bad_source_identity",
            Self::DuplicateHeader(_) => "duplicate_header",
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// Checks a request against docs/HBONE.md. (h2 itself resets, with
/// PROTOCOL_ERROR, a CONNECT carrying :scheme or :path before it gets here;
/// the check stays for requests built another way.)
pub fn parse_connect<B>(req: &Request<B>) -> Result<ConnectRequest, BadRequest> {
    if req.method() != Method::CONNECT {
        return Err(BadRequest::Method(req.method().to_string()));
    }
    if req.extensions().get::<h2::ext::Protocol>().is_some() {
        return Err(BadRequest::ExtendedConnect);
    }
    let uri = req.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(BadRequest::SchemeOrPath);
    }
    let authority = uri.authority().ok_or(BadRequest::MissingAuthority)?;
    let backend = parse_authority(authority.as_str())?;

    let client = match single(req, FORWARDED.as_str())? {
        None => None,
        Some(value) => Some(parse_forwarded_for(value)?),
    };
    let source_identity = match single(req, SOURCE_IDENTITY_HEADER)? {
        None => None,
        Some(value) => Some(parse_identity(value)?),
    };
    Ok(ConnectRequest {
        backend,
        client,
        source_identity,
    })
}

fn parse_authority(text: &str) -> Result<SocketAddr, BadRequest> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| BadRequest::BadAuthority(text.to_string()))?;
    // Scope ids, port 0 and unspecified addresses name no backend.
    let canonical = matches!(addr, SocketAddr::V4(_))
        || matches!(addr, SocketAddr::V6(v6) if v6.scope_id() == 0 && !text.contains('%'));
    if !canonical || addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(BadRequest::BadAuthority(text.to_string()));
    }
    Ok(addr)
}

fn single<'r, B>(
    req: &'r Request<B>,
    name: &'static str,
) -> Result<Option<&'r HeaderValue>, BadRequest> {
    let mut values = req.headers().get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(BadRequest::DuplicateHeader(name));
    }
    Ok(first)
}

/// The client address in a `forwarded` value: the `for` parameter of its
/// first element, which must be an `ip:port` (quoted, IPv6 bracketed).
pub fn parse_forwarded_for(value: &HeaderValue) -> Result<SocketAddr, BadRequest> {
    let bad = || BadRequest::BadForwarded(String::from_utf8_lossy(value.as_bytes()).into_owned());
    let text = value.to_str().map_err(|_| bad())?;
    let first = text.split(',').next().unwrap_or_default();
    for pair in first.split(';') {
        let Some((key, val)) = pair.trim().split_once('=') else {
            return Err(bad());
        };
        if !key.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        let val = val.trim();
        let inner = val
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(bad)?;
        if inner.contains('\\') || inner.contains('"') {
            return Err(bad());
        }
        let addr: SocketAddr = inner.parse().map_err(|_| bad())?;
        if matches!(addr, SocketAddr::V6(v6) if v6.scope_id() != 0) {
            return Err(bad());
        }
        return Ok(addr);
    }
    Err(bad())
}

fn parse_identity(value: &HeaderValue) -> Result<String, BadRequest> {
    let bad =
        || BadRequest::BadSourceIdentity(String::from_utf8_lossy(value.as_bytes()).into_owned());
    let text = value.to_str().map_err(|_| bad())?;
    let rest = text.strip_prefix("spiffe://").ok_or_else(bad)?;
    if rest.is_empty()
        || text.len() > MAX_IDENTITY_LEN
        || text.bytes().any(|b| !b.is_ascii_graphic())
    {
        return Err(bad());
    }
    Ok(text.to_string())
}

/// HTTP/2 client settings (docs/HBONE.md "SETTINGS").
pub(crate) fn client_builder(config: &TunnelConfig) -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_frame_size(config.max_frame_size)
        .max_send_buffer_size(config.max_frame_size as usize)
        .max_header_list_size(16 << 10)
        .enable_push(false);
    builder
}

/// HTTP/2 server settings (docs/HBONE.md "SETTINGS").
pub(crate) fn server_builder(config: &TunnelConfig) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_frame_size(config.max_frame_size)
        .max_send_buffer_size(config.max_frame_size as usize)
        .max_header_list_size(16 << 10)
        .max_concurrent_streams(u32::try_from(config.max_streams_per_conn).unwrap_or(u32::MAX));
    builder
}

/// How a keepalive loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeepaliveEnd {
    /// A PING went unanswered for the whole timeout.
    Timeout,
    /// h2 refused the PING: the connection is already gone.
    Closed,
}

impl KeepaliveEnd {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Timeout => "ping_timeout",
            Self::Closed => "closed",
        }
    }
}

/// Sends a PING `interval` after the last answer; returns when one goes
/// unanswered for `timeout`. Runs beside the task polling the connection.
pub(crate) async fn keepalive(
    mut ping_pong: Option<h2::PingPong>,
    interval: Duration,
    timeout: Duration,
) -> KeepaliveEnd {
    let Some(ping_pong) = ping_pong.as_mut() else {
        // ping_pong() is taken once per connection; None means a bug here,
        // and a connection without keepalive is better than none at all.
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return KeepaliveEnd::Closed,
            Err(_) => return KeepaliveEnd::Timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn request(method: Method, uri: &str) -> http::request::Builder {
        Request::builder().method(method).uri(uri)
    }

    #[test]
    fn authority_and_forwarded_bracket_ipv6() {
        assert_eq!(authority(addr("10.1.2.3:8080")), "10.1.2.3:8080");
        assert_eq!(authority(addr("[fd00::1]:80")), "[fd00::1]:80");
        assert_eq!(
            forwarded_for(addr("10.0.0.7:40000")),
            "for=\"10.0.0.7:40000\""
        );
        assert_eq!(
            forwarded_for(addr("[fd00::7]:40000")),
            "for=\"[fd00::7]:40000\""
        );
    }

    #[test]
    fn built_request_parses_back() {
        for (backend, client) in [
            ("10.1.2.3:8080", "10.0.0.7:40000"),
            ("[fd00::1]:80", "[fd00::7]:1"),
        ] {
            let req = connect_request(addr(backend), addr(client), Some("spiffe://td/ns/a/sa/b"))
                .unwrap();
            assert!(req.uri().scheme().is_none());
            assert!(req.uri().path_and_query().is_none());
            let parsed = parse_connect(&req).unwrap();
            assert_eq!(
                parsed,
                ConnectRequest {
                    backend: addr(backend),
                    client: Some(addr(client)),
                    source_identity: Some("spiffe://td/ns/a/sa/b".into()),
                }
            );
        }
    }

    #[test]
    fn headers_are_optional() {
        let req = request(Method::CONNECT, "10.1.2.3:80").body(()).unwrap();
        let parsed = parse_connect(&req).unwrap();
        assert_eq!(parsed.client, None);
        assert_eq!(parsed.source_identity, None);
    }

    #[test]
    fn malformed_requests_are_rejected_with_a_reason() {
        let cases: Vec<(Request<()>, &str)> = vec![
            (
                request(Method::GET, "http://10.1.2.3:80/")
                    .body(())
                    .unwrap(),
                "method",
            ),
            (
                request(Method::CONNECT, "http://10.1.2.3:80/x")
                    .body(())
                    .unwrap(),
                "scheme_or_path",
            ),
            (
                request(Method::CONNECT, "example.com:80").body(()).unwrap(),
                "bad_authority",
            ),
            (
                request(Method::CONNECT, "10.1.2.3").body(()).unwrap(),
                "bad_authority",
            ),
            (
                request(Method::CONNECT, "10.1.2.3:0").body(()).unwrap(),
                "bad_authority",
            ),
            (
                request(Method::CONNECT, "0.0.0.0:80").body(()).unwrap(),
                "bad_authority",
            ),
            (
                request(Method::CONNECT, "10.1.2.3:80")
                    .header(FORWARDED, "for=10.0.0.1")
                    .body(())
                    .unwrap(),
                "bad_forwarded",
            ),
            (
                request(Method::CONNECT, "10.1.2.3:80")
                    .header(FORWARDED, "for=\"unknown\"")
                    .body(())
                    .unwrap(),
                "bad_forwarded",
            ),
            (
                request(Method::CONNECT, "10.1.2.3:80")
                    .header(FORWARDED, "for=\"10.0.0.1:1\"")
                    .header(FORWARDED, "for=\"10.0.0.2:1\"")
                    .body(())
                    .unwrap(),
                "duplicate_header",
            ),
            (
                request(Method::CONNECT, "10.1.2.3:80")
                    .header(SOURCE_IDENTITY_HEADER, "https://td/ns/a")
                    .body(())
                    .unwrap(),
                "bad_source_identity",
            ),
            (
                request(Method::CONNECT, "10.1.2.3:80")
                    .header(SOURCE_IDENTITY_HEADER, "spiffe://")
                    .body(())
                    .unwrap(),
                "bad_source_identity",
            ),
        ];
        for (req, reason) in cases {
            let err = parse_connect(&req).unwrap_err();
            assert_eq!(err.reason(), reason, "{req:?}: {err}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        }
        let mut req = request(Method::CONNECT, "10.1.2.3:80").body(()).unwrap();
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        assert_eq!(
            parse_connect(&req).unwrap_err().reason(),
            "extended_connect"
        );
    }

    #[test]
    fn forwarded_takes_for_from_the_first_element() {
        let v =
            HeaderValue::from_static("proto=https; FOR=\"[fd00::9]:443\";by=x, for=\"1.1.1.1:1\"");
        assert_eq!(parse_forwarded_for(&v).unwrap(), addr("[fd00::9]:443"));
    }
}
