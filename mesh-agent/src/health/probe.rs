//! One backend's checks, from sockets carrying the agent's mark. A TCP
//! check connects anew every time (that is what it tests) and ends
//! half-open, on one socket reused from check to check (see `TcpCheck`). An
//! HTTP check keeps its connection open between checks (HTTP/1.1
//! keep-alive, as Envoy's checker does by default). On loopback most of a
//! check's cost is the kernel's: handshake, teardown, and making and
//! freeing sockets, which is why neither kind makes a socket per check.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;

use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::response::{self, Body};
use crate::state::CheckKind;

/// Largest response head; a larger one fails the check.
const MAX_HEAD: usize = 8 * 1024;
/// Largest body read to keep the connection; a longer one is judged by its
/// status alone and the connection dropped.
const MAX_BODY: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// Nothing of a response arrived: on a kept connection, usually the
    /// backend closing it while idle.
    #[error("the connection failed before any response: {0}")]
    NoResponse(#[source] io::Error),
    #[error("reading the response failed: {0}")]
    Read(#[source] io::Error),
    #[error("the connection closed in the middle of the response")]
    Truncated,
    #[error("not an HTTP/1.x response: {0}")]
    Malformed(#[source] httparse::Error),
    #[error("the response head is over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("status {got}, expected {want}")]
    Status { got: u16, want: u16 },
}

/// The checks of one backend, and what they keep between runs.
pub enum Probe {
    Tcp(TcpCheck),
    Http(HttpCheck),
}

impl Probe {
    pub fn new(addr: SocketAddr, kind: &CheckKind, mark: u32) -> Self {
        match kind {
            CheckKind::Tcp => Probe::Tcp(TcpCheck::new(addr, mark)),
            CheckKind::Http {
                path,
                expected_status,
            } => Probe::Http(HttpCheck::new(addr, mark, path, *expected_status)),
        }
    }

    /// One check. Cancelling it (the check's timeout) drops the socket it
    /// was using, so the next check starts on a new one.
    pub async fn run(&mut self) -> Result<(), CheckError> {
        match self {
            Probe::Tcp(tcp) => tcp.run().await,
            Probe::Http(http) => http.run().await,
        }
    }
}

/// A non-blocking socket carrying the agent's mark, so the programs leave
/// its connection alone.
fn marked_socket(addr: SocketAddr, mark: u32) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_mark(mark)?;
    Ok(socket)
}

/// A TCP connection from a marked socket.
async fn connect(addr: SocketAddr, mark: u32) -> Result<TcpStream, CheckError> {
    let socket = marked_socket(addr, mark).map_err(CheckError::Connect)?;
    tokio::net::TcpSocket::from_std_stream(socket.into())
        .connect(addr)
        .await
        .map_err(CheckError::Connect)
}

/// A TCP check that ends at the backend's SYN-ACK, as HAProxy's do: with
/// quick-ack off the handshake's last ACK waits, and the reset that ends
/// the check goes out first, so the backend's kernel drops the half-open
/// connection. The application never accepts it, and neither side pays for
/// a full connection, its FIN exchange and its TIME_WAIT. What it proves is
/// what a full connect proves: the backend's kernel answers on that port.
///
/// One socket serves every check: `connect(AF_UNSPEC)` resets the
/// connection and leaves the socket unconnected, ready to connect again, so
/// a check makes no socket, no reactor registration and no close.
pub struct TcpCheck {
    addr: SocketAddr,
    mark: u32,
    /// Kept between checks, registered with the reactor once.
    socket: Option<AsyncFd<Socket>>,
}

impl TcpCheck {
    pub fn new(addr: SocketAddr, mark: u32) -> Self {
        Self {
            addr,
            mark,
            socket: None,
        }
    }

    pub async fn run(&mut self) -> Result<(), CheckError> {
        // Taken for the check and put back only after a clean reset: an
        // error, or the timeout dropping this future, closes it.
        let socket = match self.socket.take() {
            Some(socket) => socket,
            None => marked_socket(self.addr, self.mark)
                .and_then(registered)
                .map_err(CheckError::Connect)?,
        };
        // Resetting the connection also resets quick-ack mode.
        socket
            .get_ref()
            .set_tcp_quickack(false)
            .map_err(CheckError::Connect)?;
        match socket.get_ref().connect(&self.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => connected(&socket).await?,
            Err(e) => return Err(CheckError::Connect(e)),
        }
        if reset(socket.get_ref()).is_ok() {
            self.socket = Some(socket);
        }
        Ok(())
    }
}

fn registered(socket: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: the socket owns its descriptor, open until the AsyncFd drops it.
    Ok(unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }?)
}

/// Waits for a connect in progress to end; Ok once it is established.
async fn connected(socket: &AsyncFd<Socket>) -> Result<(), CheckError> {
    loop {
        // On loopback the handshake is usually over when connect() returns.
        match socket.get_ref().peer_addr() {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(e) => return Err(CheckError::Connect(e)),
        }
        if let Some(e) = socket.get_ref().take_error().map_err(CheckError::Connect)? {
            return Err(CheckError::Connect(e));
        }
        // Readiness may be left over from the last check, so it is cleared
        // and the state asked again rather than trusted.
        socket
            .writable()
            .await
            .map_err(CheckError::Connect)?
            .clear_ready();
    }
}

/// `connect(AF_UNSPEC)`: the kernel sends the peer a RST and makes the
/// socket unconnected. It leaves `ECONNRESET` pending on the socket, which
/// is taken here so the next check does not read it as its own.
fn reset(socket: &Socket) -> io::Result<()> {
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: a valid sockaddr of the length given, on an open socket.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            &unspec,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.take_error()?;
    Ok(())
}

/// A kept connection with nothing to read. Anything there (the backend's
/// close, or a last word such as a `408` sent as it closed) would be taken
/// for the next check's response; such a connection is not used again.
fn still_idle(conn: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(conn.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

pub struct HttpCheck {
    addr: SocketAddr,
    mark: u32,
    expected_status: u16,
    request: Vec<u8>,
    /// Kept between checks while the backend keeps it alive.
    conn: Option<TcpStream>,
    /// The response read so far; kept for its allocation.
    buf: Vec<u8>,
}

impl HttpCheck {
    pub fn new(addr: SocketAddr, mark: u32, path: &str, expected_status: u16) -> Self {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mesh-agent health check\r\n\r\n"
        )
        .into_bytes();
        Self {
            addr,
            mark,
            expected_status,
            request,
            conn: None,
            buf: Vec::new(),
        }
    }

    pub async fn run(&mut self) -> Result<(), CheckError> {
        // Taken for the exchange and put back only after a complete
        // response: an error, or the timeout dropping this future, closes it.
        if let Some(conn) = self.conn.take().filter(still_idle) {
            match self.exchange(conn).await {
                // A backend may close an idle connection at any time (its
                // keep-alive timeout, a restart); that says nothing about
                // its health, so ask once more on a new connection.
                Err(CheckError::NoResponse(_)) => {}
                verdict => return verdict,
            }
        }
        let conn = connect(self.addr, self.mark).await?;
        self.exchange(conn).await
    }

    /// Sends the request and reads the whole response on `conn`, which is
    /// kept for the next check if the response allows it.
    async fn exchange(&mut self, mut conn: TcpStream) -> Result<(), CheckError> {
        conn.write_all(&self.request)
            .await
            .map_err(CheckError::NoResponse)?;
        self.buf.clear();
        let mut chunk = [0u8; 2048];
        let head = loop {
            let n = match conn.read(&mut chunk).await {
                Ok(0) if self.buf.is_empty() => {
                    return Err(CheckError::NoResponse(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(0) => return Err(CheckError::Truncated),
                Ok(n) => n,
                Err(e) if self.buf.is_empty() => return Err(CheckError::NoResponse(e)),
                Err(e) => return Err(CheckError::Read(e)),
            };
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(head) = response::parse(&self.buf).map_err(CheckError::Malformed)? {
                break head;
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(CheckError::HeadTooLarge);
            }
        };
        if head.len > MAX_HEAD {
            return Err(CheckError::HeadTooLarge);
        }
        let verdict = if head.status == self.expected_status {
            Ok(())
        } else {
            Err(CheckError::Status {
                got: head.status,
                want: self.expected_status,
            })
        };
        let Body::Length(length) = head.body else {
            return verdict;
        };
        if !head.keep_alive || length > MAX_BODY {
            return verdict;
        }
        // Skip the body so the next response starts at the stream's front.
        let mut left = length.checked_sub((self.buf.len() - head.len) as u64);
        while let Some(n @ 1..) = left {
            let want = chunk.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            match conn.read(&mut chunk[..want]).await {
                Ok(0) => return Err(CheckError::Truncated),
                Ok(got) => left = Some(n - got as u64),
                Err(e) => return Err(CheckError::Read(e)),
            }
        }
        // `None`: more bytes than the response holds, which the next
        // response would be confused with; the connection is not reused.
        if left == Some(0) {
            self.conn = Some(conn);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{Ipv4Addr, TcpListener};

    /// Serves `answers[i]` to the i-th request on one loopback listener,
    /// closing the connection after the requests numbered in `close_after`;
    /// returns how many connections it accepted.
    fn serve(
        answers: Vec<String>,
        close_after: Vec<usize>,
    ) -> (SocketAddr, std::thread::JoinHandle<usize>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let mut accepted = 0;
            let mut served = 0;
            while served < answers.len() {
                let (mut conn, _) = listener.accept().unwrap();
                accepted += 1;
                conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while served < answers.len() {
                    let n = conn.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                    if !req.ends_with(b"\r\n\r\n") {
                        continue;
                    }
                    req.clear();
                    conn.write_all(answers[served].as_bytes()).unwrap();
                    served += 1;
                    if close_after.contains(&served) {
                        break;
                    }
                }
            }
            accepted
        });
        (addr, thread)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The listener's kernel answers, its application never gets a
    /// connection to accept, and a closed port fails the check.
    #[test]
    fn tcp_checks_end_half_open() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut check = Probe::new(addr, &CheckKind::Tcp, 0);
        runtime().block_on(async {
            for _ in 0..20 {
                check.run().await.unwrap();
            }
        });
        // Anything the checks left in the accept queue is there by now.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let accepted = listener.accept();
        assert!(
            matches!(&accepted, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "a check reached accept(): {accepted:?}"
        );
        drop(listener);
        let mut closed = Probe::new(addr, &CheckKind::Tcp, 0);
        let failed = runtime().block_on(closed.run());
        assert!(matches!(failed, Err(CheckError::Connect(_))), "{failed:?}");
    }

    /// One socket serves check after check; a failed check drops it and
    /// the next one starts on a new socket.
    #[test]
    fn tcp_checks_reuse_one_socket_and_recover_after_a_failure() {
        let loopbacks: [std::net::IpAddr; 2] = [
            Ipv4Addr::LOCALHOST.into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
        ];
        for ip in loopbacks {
            let listener = TcpListener::bind((ip, 0)).unwrap();
            let addr = listener.local_addr().unwrap();
            let mut check = TcpCheck::new(addr, 0);
            let fd = |check: &TcpCheck| check.socket.as_ref().map(|s| s.as_raw_fd());
            let rt = runtime();
            rt.block_on(check.run()).unwrap();
            let first = fd(&check).expect("kept after a passing check");
            for _ in 0..5 {
                rt.block_on(check.run()).unwrap();
                assert_eq!(fd(&check), Some(first), "{addr}");
            }
            drop(listener);
            assert!(matches!(
                rt.block_on(check.run()),
                Err(CheckError::Connect(_))
            ));
            assert_eq!(fd(&check), None, "a failed check keeps no socket");
            let _listener = TcpListener::bind(addr).unwrap();
            rt.block_on(check.run()).unwrap();
            assert!(fd(&check).is_some(), "{addr}");
        }
    }

    /// The reset leaves the socket unconnected with no error pending: a
    /// check whose handshake is slower than `connect()` reads the socket's
    /// error, and must not find the last check's reset there.
    #[test]
    fn a_reset_socket_is_clean_and_connects_again() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        for _ in 0..3 {
            socket.connect(&addr.into()).unwrap();
            reset(&socket).unwrap();
            assert!(socket.take_error().unwrap().is_none());
            let peer = socket.peer_addr();
            assert!(
                matches!(&peer, Err(e) if e.raw_os_error() == Some(libc::ENOTCONN)),
                "{peer:?}"
            );
        }
    }

    /// Runs `n` checks, each of which must pass.
    fn pass(check: &mut HttpCheck, n: usize) {
        runtime().block_on(async {
            for _ in 0..n {
                check.run().await.unwrap();
            }
        });
    }

    #[test]
    fn keeps_one_connection_across_checks() {
        const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfine\n";
        let (addr, server) = serve(vec![OK.to_string(); 4], vec![]);
        let mut check = HttpCheck::new(addr, 0, "/healthz", 200);
        pass(&mut check, 4);
        assert_eq!(server.join().unwrap(), 1);
    }

    #[test]
    fn a_closed_idle_connection_is_retried_not_failed() {
        const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        // The server drops the connection after every response, without
        // saying so: each later check finds its kept connection dead.
        let (addr, server) = serve(vec![OK.to_string(); 3], vec![1, 2, 3]);
        let mut check = HttpCheck::new(addr, 0, "/", 200);
        pass(&mut check, 3);
        assert_eq!(server.join().unwrap(), 3);
    }

    #[test]
    fn words_sent_on_an_idle_connection_are_not_taken_for_the_answer() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let (checked_tx, checked_rx) = std::sync::mpsc::channel();
        let (closed_tx, closed_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
            // The first connection answers once; once the check is over it
            // says 408 and closes, as some servers do when their idle
            // timeout fires.
            let (mut conn, _) = listener.accept().unwrap();
            let _ = conn.read(&mut buf).unwrap();
            conn.write_all(ok).unwrap();
            checked_rx.recv().unwrap();
            conn.write_all(
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            )
            .unwrap();
            drop(conn);
            closed_tx.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let _ = conn.read(&mut buf).unwrap();
            conn.write_all(ok).unwrap();
        });
        let mut check = HttpCheck::new(addr, 0, "/", 200);
        let rt = runtime();
        rt.block_on(check.run()).unwrap();
        checked_tx.send(()).unwrap();
        closed_rx.recv().unwrap();
        // Let the reactor see the 408 and the close arrive.
        rt.block_on(async {
            let mut byte = [0u8; 1];
            let conn = check.conn.as_ref().expect("kept after the first check");
            conn.peek(&mut byte).await.unwrap();
        });
        rt.block_on(check.run()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn responses_that_end_the_connection_are_judged_then_dropped() {
        let answers = vec![
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ];
        // The server closes its side where the response says so.
        let answers = answers.into_iter().map(String::from).collect();
        let (addr, server) = serve(answers, vec![1, 2, 3]);
        let mut check = HttpCheck::new(addr, 0, "/", 200);
        let verdicts: Vec<bool> = runtime().block_on(async {
            let mut v = Vec::new();
            for _ in 0..5 {
                v.push(check.run().await.is_ok());
            }
            v
        });
        assert_eq!(verdicts, [true, true, true, false, true]);
        // A wrong status on a well-framed response keeps the connection.
        assert_eq!(server.join().unwrap(), 4);
    }

    #[test]
    fn oversized_and_foreign_answers_fail() {
        let big = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let foreign = "SSH-2.0-OpenSSH_9.6\r\n\r\n".to_string();
        let (addr, server) = serve(vec![big, foreign], vec![1, 2]);
        let mut check = HttpCheck::new(addr, 0, "/", 200);
        runtime().block_on(async {
            assert!(matches!(check.run().await, Err(CheckError::HeadTooLarge)));
            assert!(matches!(check.run().await, Err(CheckError::Malformed(_))));
        });
        assert_eq!(server.join().unwrap(), 2);
    }
}
