//! Just enough HTTP/1.1 for API clients: request heads with keep-alive,
//! responses with a length, and chunked streams for watches.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A request head larger than this is refused (real heads are < 2 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// Bodies are read and dropped: the server takes no writes.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// Close the connection after answering (`Connection: close`, HTTP/1.0).
    pub close: bool,
}

impl Request {
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }
}

/// Reads the next request head from `reader`, keeping bytes read past it in
/// `buf`; None when the client closed the connection between requests.
pub(crate) async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Request>> {
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("request head larger than 64 KiB"));
        }
        let mut chunk = [0u8; 4096];
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);

    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("malformed request line"));
    };
    let mut close = version == "HTTP/1.0";
    let mut length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(invalid("malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().map_err(|_| invalid("bad Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("chunked request bodies are not accepted"));
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    if length > MAX_BODY {
        return Err(invalid("request body larger than 1 MiB"));
    }
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..length);
    Ok(Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        close,
    }))
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        422 => "Unprocessable Entity",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// The headers the real server sends on every JSON answer.
fn head(code: u16, framing: &str) -> String {
    format!(
        "HTTP/1.1 {code} {}\r\nCache-Control: no-cache, private\r\n\
         Content-Type: application/json\r\n{framing}\r\n",
        reason(code)
    )
}

/// A whole JSON answer.
pub(crate) async fn respond<W: AsyncWrite + Unpin>(
    writer: &mut W,
    code: u16,
    body: &str,
) -> io::Result<()> {
    let mut out = head(code, &format!("Content-Length: {}\r\n", body.len())).into_bytes();
    out.extend_from_slice(body.as_bytes());
    writer.write_all(&out).await
}

/// The head of a chunked stream (a watch).
pub(crate) fn stream_head() -> Vec<u8> {
    head(200, "Transfer-Encoding: chunked\r\n").into_bytes()
}

/// Appends `data` to `out` as one chunk.
pub(crate) fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The zero-length chunk that ends a stream cleanly.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_keep_alive_requests() {
        let raw = b"GET /api/v1/pods?limit=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
                    GET /version HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut reader = &raw[..];
        let mut buf = Vec::new();
        let first = read_request(&mut reader, &mut buf).await.unwrap().unwrap();
        assert_eq!(first.method, "GET");
        assert_eq!(first.path(), "/api/v1/pods");
        assert_eq!(first.query(), "limit=2");
        assert!(!first.close);
        let second = read_request(&mut reader, &mut buf).await.unwrap().unwrap();
        assert_eq!(second.path(), "/version");
        assert!(second.close);
        assert!(read_request(&mut reader, &mut buf).await.unwrap().is_none());
    }

    #[test]
    fn chunks() {
        let mut out = Vec::new();
        chunk(&mut out, b"{\"type\":\"ADDED\"}\n");
        chunk(&mut out, b"");
        assert_eq!(out, b"11\r\n{\"type\":\"ADDED\"}\n\r\n");
    }
}
