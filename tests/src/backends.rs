//! Loopback TCP backends that answer every connection with their id.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};

/// A server on a loopback address that, per connection, writes `"<id>\n"`
/// and closes first (so TIME_WAIT stays on the server side and clients can
/// make many connections without running out of ports).
pub struct TestBackend {
    addr: SocketAddr,
    id: u32,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A backend on a chosen loopback address, e.g. a VIP like 127.10.0.5:8080
/// to show that sockets the mesh does not touch reach the VIP itself.
pub fn listener_on(addr: SocketAddr, id: u32) -> Result<TestBackend> {
    spawn_backend(addr, id, false)
}

fn spawn_backend(addr: SocketAddr, id: u32, hold: bool) -> Result<TestBackend> {
    if !addr.ip().is_loopback() {
        bail!("test backends listen on loopback only, not {addr}");
    }
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name(format!("backend-{id}"))
        .spawn({
            let (accepted, stop) = (accepted.clone(), stop.clone());
            move || serve(listener, id, hold, &accepted, &stop)
        })?;
    Ok(TestBackend {
        addr,
        id,
        accepted,
        stop,
        thread: Some(thread),
    })
}

fn serve(listener: TcpListener, id: u32, hold: bool, accepted: &AtomicU64, stop: &AtomicBool) {
    let line = format!("{id}\n");
    // With `hold`, connections stay open until the backend is dropped.
    let mut held = Vec::new();
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        // Wait for a connection at most 50 ms so Drop is noticed without
        // needing a connection to ourselves to unblock accept().
        // SAFETY: one valid pollfd for the listener we own.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n <= 0 {
            continue;
        }
        if let Ok((mut conn, _)) = listener.accept() {
            let _ = conn.write_all(line.as_bytes());
            accepted.fetch_add(1, Ordering::Relaxed);
            if hold {
                held.push(conn);
            }
            // Otherwise `conn` drops here: the server closes first.
        }
    }
}

impl TestBackend {
    /// A backend on 127.0.0.1 on an ephemeral port.
    pub fn new(id: u32) -> Result<Self> {
        listener_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), id)
    }

    /// Like `new`, but keeps every connection open (after writing its id)
    /// until the backend is dropped.
    pub fn holding(id: u32) -> Result<Self> {
        spawn_backend(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), id, true)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Connections accepted (and answered) so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server on a loopback address that answers every datagram with
/// `"<id>\n"`, from the address it listens on.
pub struct UdpBackend {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpBackend {
    /// On 127.0.0.1, an ephemeral port.
    pub fn new(id: u32) -> Result<Self> {
        Self::on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), id)
    }

    pub fn on(addr: SocketAddr, id: u32) -> Result<Self> {
        if !addr.ip().is_loopback() {
            bail!("test backends listen on loopback only, not {addr}");
        }
        let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        socket.set_read_timeout(Some(std::time::Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("udp-backend-{id}"))
            .spawn({
                let (received, stop) = (received.clone(), stop.clone());
                move || {
                    let line = format!("{id}\n");
                    let mut buf = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, from)) = socket.recv_from(&mut buf) {
                            received.fetch_add(1, Ordering::Relaxed);
                            let _ = socket.send_to(line.as_bytes(), from);
                        }
                    }
                }
            })?;
        Ok(Self {
            addr,
            received,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How an `HttpBackend` treats a connection after answering a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    /// HTTP/1.1 keep-alive: the next request may come on the same connection.
    Keep,
    /// Answers `Connection: close` and closes.
    Close,
    /// Closes without saying so, as a server whose idle timeout is shorter
    /// than the time to the next request.
    DropIdle,
}

/// A loopback TCP backend that answers HTTP health checks (`GET ...`) with
/// a status the test controls, and anything else (a probe that just reads)
/// with its id line, like `TestBackend`. Counts connections and requests
/// apart, so a test can see whether checks reuse a connection.
pub struct HttpBackend {
    addr: SocketAddr,
    status: Arc<std::sync::atomic::AtomicU16>,
    counts: Arc<HttpCounts>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct HttpCounts {
    connections: AtomicU64,
    requests: AtomicU64,
}

impl HttpBackend {
    /// Keeps connections alive between requests.
    pub fn new(id: u32) -> Result<Self> {
        Self::with(id, KeepAlive::Keep)
    }

    pub fn with(id: u32, keep_alive: KeepAlive) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let counts = Arc::new(HttpCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("http-backend-{id}"))
            .spawn({
                let (status, counts, stop) = (status.clone(), counts.clone(), stop.clone());
                move || accept_http(listener, id, keep_alive, &status, &counts, &stop)
            })?;
        Ok(Self {
            addr,
            status,
            counts,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The status its health endpoint answers from now on.
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    /// Connections accepted so far (HTTP or plain).
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::Relaxed)
    }

    /// HTTP requests received (and answered) so far.
    pub fn requests(&self) -> u64 {
        self.counts.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until stopped, one thread per connection; joins them all before
/// returning, so a dropped backend has closed every connection.
fn accept_http(
    listener: TcpListener,
    id: u32,
    keep_alive: KeepAlive,
    status: &Arc<std::sync::atomic::AtomicU16>,
    counts: &Arc<HttpCounts>,
    stop: &Arc<AtomicBool>,
) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok((conn, _)) = listener.accept() else {
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        let (status, counts, stop) = (status.clone(), counts.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("http-conn-{id}"))
            .spawn(move || serve_http(conn, id, keep_alive, &status, &counts, &stop));
        if let Ok(t) = spawned {
            conns.push(t);
        }
        conns.retain(|t| !t.is_finished());
    }
    for t in conns {
        let _ = t.join();
    }
}

/// Serves one connection: requests in turn until the client closes, the
/// backend stops, or `keep_alive` ends it.
fn serve_http(
    mut conn: std::net::TcpStream,
    id: u32,
    keep_alive: KeepAlive,
    status: &std::sync::atomic::AtomicU16,
    counts: &HttpCounts,
    stop: &AtomicBool,
) {
    use std::io::Read as _;
    let _ = conn.set_nonblocking(false);
    // Short reads so a stop is noticed while the connection idles.
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_millis(10)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
            // A probe only listens: it gets the id line, as from `TestBackend`.
            Err(_) if first && request.is_empty() => {
                let _ = conn.write_all(format!("{id}\n").as_bytes());
                return;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        first = false;
        if request.len() > 64 * 1024 {
            return;
        }
        // Health checks send a head and no body; answer each complete one.
        while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            request.drain(..end + 4);
            let code = status.load(Ordering::Relaxed);
            let close = if keep_alive == KeepAlive::Close {
                "Connection: close\r\n"
            } else {
                ""
            };
            let reply = format!("HTTP/1.1 {code} X\r\nContent-Length: 3\r\n{close}\r\nok\n");
            // Counted before the answer, so a client that has its answer
            // sees it counted.
            counts.requests.fetch_add(1, Ordering::Relaxed);
            if conn.write_all(reply.as_bytes()).is_err() {
                return;
            }
            if keep_alive != KeepAlive::Keep {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpStream;

    fn fetch(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    }

    #[test]
    fn serves_its_id_and_counts() {
        let b = TestBackend::new(7).unwrap();
        assert!(b.addr().ip().is_loopback() && b.port() != 0);
        for _ in 0..3 {
            assert_eq!(fetch(b.addr()), "7\n");
        }
        assert_eq!(b.accepted(), 3);
        let addr = b.addr();
        drop(b);
        assert!(
            TcpStream::connect(addr).is_err(),
            "listener closed after drop"
        );
    }

    #[test]
    fn specific_loopback_address() {
        let b = listener_on("127.10.0.5:0".parse().unwrap(), 42).unwrap();
        assert_eq!(b.addr().ip().to_string(), "127.10.0.5");
        assert_eq!(fetch(b.addr()), "42\n");
        assert!(listener_on("10.0.0.1:80".parse().unwrap(), 1).is_err());
    }

    #[test]
    fn http_backend_counts_requests_and_connections_apart() {
        let b = HttpBackend::new(3).unwrap();
        let mut s = TcpStream::connect(b.addr()).unwrap();
        let mut answer = [0u8; 256];
        for _ in 0..3 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let n = s.read(&mut answer).unwrap();
            assert!(answer[..n].starts_with(b"HTTP/1.1 200 "));
            assert!(
                answer[..n].ends_with(b"\r\n\r\nok\n"),
                "one whole response per read here"
            );
        }
        assert_eq!((b.connections(), b.requests()), (1, 3));
        assert_eq!(
            fetch(b.addr()),
            "3\n",
            "a client that only listens gets the id"
        );

        let closing = HttpBackend::with(4, KeepAlive::Close).unwrap();
        let mut s = TcpStream::connect(closing.addr()).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert_eq!(closing.requests(), 1);
    }
}
