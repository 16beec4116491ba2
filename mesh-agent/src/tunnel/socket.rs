//! Socket set-up the tunnel needs on every leg: SO_REUSEPORT listeners (a
//! new agent binds while the old one drains), SO_MARK on the agent's own
//! connections, TCP_NODELAY, and resetting a socket instead of closing it.

use std::{io, net::SocketAddr, time::Duration};

use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A listener on `addr` with SO_REUSEADDR and SO_REUSEPORT, so a second
/// agent can bind the same port while this one still runs.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Connects to `addr` from a socket carrying `mark` (SO_MARK needs
/// CAP_NET_ADMIN), with TCP_NODELAY, bounded by `timeout`.
pub async fn connect(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        SockRef::from(&socket).set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {timeout:?}"),
        )),
    }
}

/// Makes the coming close send RST instead of FIN (SO_LINGER 0), so the
/// application sees a failure, never a complete response.
pub fn arm_reset(stream: &TcpStream) {
    // Failure leaves a FIN; nothing better can be done with this socket.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Resets `stream` now.
pub fn reset(stream: TcpStream) {
    arm_reset(&stream);
    drop(stream);
}

/// A second handle on `stream`'s socket, kept past the first's close so
/// that the socket can be closed gracefully (`close_gracefully`).
pub fn second_handle(stream: &TcpStream) -> io::Result<TcpStream> {
    let std = SockRef::from(stream).try_clone()?;
    let std: std::net::TcpStream = std.into();
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

/// Closes a connection whose protocol is done without discarding what the
/// peer still sends: a socket closed with unread bytes in its receive queue
/// sends RST, and a RST makes the peer's kernel drop what that peer had
/// received but not yet read (the last DATA of a stream, say). So: FIN, then
/// read and discard until the peer closes too, or for `within` at most.
pub async fn close_gracefully(stream: TcpStream, within: Duration) {
    use tokio::io::AsyncReadExt as _;
    let _ = SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    let mut stream = stream;
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(within, drain).await;
}

/// Whether an I/O error means the peer reset the connection.
pub fn is_reset(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn connect_sets_mark_and_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect(addr, Some(0x5a5a), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(SockRef::from(&stream).mark().unwrap(), 0x5a5a);
        assert!(stream.nodelay().unwrap());
    }

    #[tokio::test]
    async fn connect_refused_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = connect(addr, None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn two_listeners_share_a_port() {
        let first = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = reuseport_listener(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn reset_is_seen_as_econnreset() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        reset(server);
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).await.unwrap_err();
        assert!(is_reset(&err), "{err}");
    }
}
