//! The head of a health check's HTTP/1.x response: its status, and whether
//! the connection can carry the next check (the body's end is known and the
//! server keeps the connection open).

/// Headers parsed at most; a response with more fails the check.
const MAX_HEADERS: usize = 64;

/// What a complete response head says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, blank line included.
    pub len: usize,
    pub status: u16,
    pub body: Body,
    /// The server keeps the connection open after this response.
    pub keep_alive: bool,
}

/// How the body that follows the head ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked, delimited by the close, or framed inconsistently: the
    /// check does not read it, so the connection cannot be reused.
    Unframed,
}

/// Parses a response head from the start of `buf`: `Ok(None)` until the
/// head is complete.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = response.parse(buf)? else {
        return Ok(None);
    };
    // A complete parse always has both.
    let status = response.code.unwrap_or(0);
    let http11 = response.version == Some(1);

    let mut close = false;
    let mut keep_alive_token = false;
    let mut length: Option<u64> = None;
    let mut unframed = false;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            unframed = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (value, length) {
                (Some(v), None) => length = Some(v),
                (Some(v), Some(seen)) if v == seen => {}
                // Unreadable or contradicting lengths: the body's end is unknown.
                _ => unframed = true,
            }
        }
    }
    // RFC 9112 6.3: these never have a body, whatever the headers say. A 1xx
    // is followed by another response, which the check does not wait for.
    let informational = (100..200).contains(&status);
    let body = if informational || status == 204 || status == 304 {
        Body::Length(0)
    } else if unframed {
        Body::Unframed
    } else {
        length.map_or(Body::Unframed, Body::Length)
    };
    let keep_alive = !close && !informational && (http11 || keep_alive_token);
    Ok(Some(Head {
        len,
        status,
        body,
        keep_alive,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse(text.as_bytes()).expect("valid").expect("complete")
    }

    #[test]
    fn http11_with_a_length_keeps_the_connection() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let h = head(text);
        assert_eq!(h.status, 200);
        assert_eq!(h.body, Body::Length(2));
        assert!(h.keep_alive);
        assert_eq!(h.len, text.len() - 2, "the body is not part of the head");
    }

    #[test]
    fn close_and_http10_end_the_connection() {
        let h =
            head("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.keep_alive, "HTTP/1.0 closes unless it says keep-alive");
        let h = head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(h.keep_alive);
    }

    #[test]
    fn bodies_of_unknown_length_are_unframed() {
        let chunked = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(chunked.body, Body::Unframed);
        let until_close = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(until_close.body, Body::Unframed);
        let both =
            head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(both.body, Body::Unframed);
        let contradicting =
            head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
        assert_eq!(contradicting.body, Body::Unframed);
        let repeated = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(repeated.body, Body::Length(3));
        let garbage = head("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n");
        assert_eq!(garbage.body, Body::Unframed);
    }

    #[test]
    fn statuses_without_a_body() {
        assert_eq!(
            head("HTTP/1.1 204 No Content\r\n\r\n").body,
            Body::Length(0)
        );
        assert_eq!(
            head("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").body,
            Body::Length(0)
        );
        let early = head("HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(early.status, 100);
        assert!(!early.keep_alive, "a final response would follow");
    }

    #[test]
    fn partial_and_malformed_heads() {
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nContent-Le"), Ok(None));
        assert_eq!(parse(b""), Ok(None));
        assert!(parse(b"SSH-2.0-OpenSSH_9.6\r\n").is_err());
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        assert_eq!(
            parse(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()),
            Err(httparse::Error::TooManyHeaders)
        );
    }
}
