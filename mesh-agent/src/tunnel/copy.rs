//! Moves one client connection's bytes over one CONNECT stream, both ways,
//! and maps TCP's endings onto HTTP/2's (docs/HBONE.md "Endings"):
//! - a FIN read from the socket becomes END_STREAM; END_STREAM received
//!   becomes shutdown(SHUT_WR), so either side can still talk after the
//!   other half-closed;
//! - a reset or error on the socket becomes RST_STREAM(CONNECT_ERROR); a
//!   RST_STREAM received, or the connection dying, resets the socket
//!   (SO_LINGER 0, then close), never a clean FIN.
//!
//! Each direction runs as its own task, so a stream's two directions, and
//! the connection's TLS task, can run on different cores. Reads start at
//! 16 KiB and double up to 256 KiB while they fill the buffer; the bytes
//! read go to h2 as frozen `Bytes` without a copy, and only as much as h2
//! has granted send capacity for (no unbounded buffering). Receive capacity
//! is released as the bytes are written out, so the peer's window follows
//! what the socket actually took.

use std::{future::poll_fn, io, net::Shutdown, sync::Arc};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::{net::TcpStream, sync::watch};

use super::{Phase, snapshot::ConnState, socket};

pub(crate) const INITIAL_BUF: usize = 16 << 10;
pub(crate) const MAX_BUF: usize = 256 << 10;

/// How long a socket's reset waits before it becomes RST_STREAM. h2 drops
/// the DATA a stream has queued but not yet written when the stream is
/// reset, so without the wait the bytes a client wrote just before its
/// reset would be lost, where a direct TCP connection delivers them first.
const RESET_GRACE: std::time::Duration = std::time::Duration::from_millis(20);

/// Why one direction of a stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading the socket: {0}")]
    TcpRead(#[source] io::Error),
    #[error("writing the socket: {0}")]
    TcpWrite(#[source] io::Error),
    #[error("the peer reset the stream ({0})")]
    PeerReset(Reason),
    #[error("tunnel stream: {0}")]
    H2(#[from] h2::Error),
    #[error("the stream's send side closed")]
    SendClosed,
    #[error("cancelled (the other direction failed, or shutdown)")]
    Cancelled,
    #[error("copy task failed: {0}")]
    Task(String),
}

/// Stops a stream: its own trigger (one direction failed) or the owner's
/// hard stop (shutdown after the drain timeout).
#[derive(Clone)]
pub(crate) struct Cancel {
    local: Arc<watch::Sender<bool>>,
    global: watch::Receiver<Phase>,
}

impl Cancel {
    pub(crate) fn new(global: watch::Receiver<Phase>) -> Self {
        Self {
            local: Arc::new(watch::channel(false).0),
            global,
        }
    }

    pub(crate) fn trigger(&self) {
        self.local.send_replace(true);
    }

    pub(crate) async fn cancelled(&self) {
        let mut local = self.local.subscribe();
        let mut global = self.global.clone();
        let local = async move {
            // `self.local` lives as long as `self`: this cannot fail.
            let _ = local.wait_for(|v| *v).await;
        };
        let global = async move {
            if global.wait_for(|p| *p == Phase::Stopped).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = local => {}
            _ = global => {}
        }
    }
}

/// Where a stream's bytes are counted.
#[derive(Clone)]
pub(crate) struct Counters {
    pub(crate) conn: Arc<ConnState>,
    pub(crate) sent: Counter,
    pub(crate) received: Counter,
}

impl Counters {
    fn sent(&self, n: usize) {
        self.conn
            .bytes_sent
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.sent.inc_by(n as u64);
    }

    fn received(&self, n: usize) {
        self.conn
            .bytes_received
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.received.inc_by(n as u64);
    }
}

/// Carries `tcp` over the stream until both directions ended. On any
/// failure the stream is reset (CONNECT_ERROR) and so is the socket.
pub(crate) async fn splice(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    cancel: Cancel,
    counters: Counters,
) -> Result<(), CopyError> {
    let tcp = Arc::new(tcp);
    let up = tokio::spawn({
        let tcp = tcp.clone();
        let cancel = cancel.clone();
        let counters = counters.clone();
        async move {
            let mut send = send;
            let result = tcp_to_h2(&tcp, &mut send, &cancel, &counters).await;
            if let Err(CopyError::TcpRead(_)) = result {
                tokio::time::sleep(RESET_GRACE).await;
            }
            if result.is_err() {
                cancel.trigger();
            }
            (send, result)
        }
    });
    let down = h2_to_tcp(recv, &tcp, &cancel, &counters).await;
    if down.is_err() {
        cancel.trigger();
    }
    let (send, up) = match up.await {
        Ok((send, result)) => (Some(send), result),
        Err(join) => (None, Err(CopyError::Task(join.to_string()))),
    };
    if up.is_err() || down.is_err() {
        if let Some(mut send) = send {
            // Ignored by h2 when the stream is already reset or closed.
            send.send_reset(Reason::CONNECT_ERROR);
        }
        socket::arm_reset(&tcp);
    }
    // Keep the first cause; a `Cancelled` is only the echo of the other.
    match (up, down) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(CopyError::Cancelled), Err(e)) | (Err(e), _) | (Ok(()), Err(e)) => Err(e),
    }
}

async fn read_buf(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        tcp.readable().await?;
        match tcp.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

async fn tcp_to_h2(
    tcp: &TcpStream,
    send: &mut SendStream<Bytes>,
    cancel: &Cancel,
    counters: &Counters,
) -> Result<(), CopyError> {
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut size = INITIAL_BUF;
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(size);
        let n = tokio::select! {
            biased;
            _ = &mut cancelled => return Err(CopyError::Cancelled),
            reset = poll_fn(|cx| send.poll_reset(cx)) => {
                return Err(match reset {
                    Ok(reason) => CopyError::PeerReset(reason),
                    Err(e) => CopyError::H2(e),
                });
            }
            read = read_buf(tcp, &mut buf) => read.map_err(CopyError::TcpRead)?,
        };
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        if n >= size {
            size = (size * 2).min(MAX_BUF);
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let mut granted = send.capacity();
            while granted == 0 {
                granted = tokio::select! {
                    biased;
                    _ = &mut cancelled => return Err(CopyError::Cancelled),
                    cap = poll_fn(|cx| send.poll_capacity(cx)) => match cap {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return Err(CopyError::H2(e)),
                        None => return Err(CopyError::SendClosed),
                    },
                };
            }
            let piece = data.split_to(granted.min(data.len()));
            let len = piece.len();
            send.send_data(piece, false)?;
            counters.sent(len);
        }
    }
}

/// Writes what the stream has already received (DATA that came before a
/// RST_STREAM, say) to the socket, as far as it takes it without waiting:
/// the far end wrote those bytes before its reset, and a direct TCP
/// connection would have delivered them.
async fn deliver_received(recv: &mut RecvStream, tcp: &TcpStream, counters: &Counters) {
    // A zero timeout polls once: only frames already here.
    while let Ok(Some(Ok(data))) =
        tokio::time::timeout(std::time::Duration::ZERO, recv.data()).await
    {
        let mut written = 0;
        while written < data.len() {
            match tcp.try_write(&data[written..]) {
                Ok(n) => {
                    written += n;
                    counters.received(n);
                }
                Err(_) => return,
            }
        }
    }
}

async fn h2_to_tcp(
    mut recv: RecvStream,
    tcp: &TcpStream,
    cancel: &Cancel,
    counters: &Counters,
) -> Result<(), CopyError> {
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let next = tokio::select! {
            biased;
            _ = &mut cancelled => {
                deliver_received(&mut recv, tcp, counters).await;
                return Err(CopyError::Cancelled);
            }
            next = recv.data() => next,
        };
        let data = match next {
            None => {
                // END_STREAM: the far end half-closed; pass the FIN on.
                SockRef::from(tcp)
                    .shutdown(Shutdown::Write)
                    .map_err(CopyError::TcpWrite)?;
                return Ok(());
            }
            Some(Err(e)) => {
                return Err(match e.reason() {
                    Some(reason) if e.is_reset() && e.is_remote() => CopyError::PeerReset(reason),
                    _ => CopyError::H2(e),
                });
            }
            Some(Ok(data)) => data,
        };
        let mut written = 0;
        while written < data.len() {
            tokio::select! {
                biased;
                _ = &mut cancelled => return Err(CopyError::Cancelled),
                ready = tcp.writable() => ready.map_err(CopyError::TcpWrite)?,
            }
            match tcp.try_write(&data[written..]) {
                Ok(n) => {
                    written += n;
                    recv.flow_control().release_capacity(n)?;
                    counters.received(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(CopyError::TcpWrite(e)),
            }
        }
    }
}
