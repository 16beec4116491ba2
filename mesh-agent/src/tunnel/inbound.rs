//! The destination node's side, :15008: TLS with client certificates, the
//! peer named by the TLS hook, then per CONNECT stream: check the request
//! (400), that the authority is a local backend (400), the authorization
//! hook (401), connect to the backend from a marked socket (503 on
//! failure), and only then 200 and the byte copy.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

use super::{
    Active, Phase, Shared, TunnelMetrics,
    copy::{self, Cancel, Counters},
    hbone::{self, ALPN_H2},
    lifetime::{self, Lifetime, RetireReason},
    metrics::Direction,
    policy::{InboundPolicy, PeerInfo},
    snapshot::ConnState,
    socket,
    tls::{self, InboundTls},
};

/// How long a cleanly finished connection waits for its peer to close.
const LINGER: Duration = Duration::from_secs(2);

/// The :15008 server; cheap to clone.
#[derive(Clone)]
pub struct Inbound {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tls: Arc<dyn InboundTls>,
    policy: RwLock<InboundPolicy>,
    phase: watch::Sender<Phase>,
    conns: Arc<Active>,
    /// Streams past their 200, so a new policy can close those it denies.
    open: Mutex<HashMap<u64, OpenStream>>,
    next_stream: AtomicU64,
}

/// What an open stream was authorized as, and how to end it.
struct OpenStream {
    peer: PeerInfo,
    source_identity: Option<String>,
    backend: SocketAddr,
    cancel: Cancel,
}

/// Removes a stream from [`Inner::open`] when it ends.
struct OpenGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.inner.open_streams().remove(&self.id);
    }
}

impl Inner {
    fn open_streams(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenStream>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why an accepted connection was not taken (for the failure counter).
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Setup(#[from] tls::TlsSetupError),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("handshake timed out")]
    Timeout,
    #[error("peer negotiated ALPN {0:?}, not h2")]
    Alpn(Option<String>),
    #[error("peer sent no certificate")]
    NoCertificate,
    #[error("{0}")]
    Peer(#[from] tls::PeerRejected),
    #[error("HTTP/2 handshake: {0}")]
    H2(h2::Error),
}

impl HandshakeError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Setup(_) => "tls_config",
            Self::Tls(e) => crate::identity::io_failure_reason(e),
            Self::Timeout => "timeout",
            Self::Alpn(_) => "alpn",
            Self::NoCertificate => "no_certificate",
            Self::Peer(_) => "peer_rejected",
            Self::H2(_) => "h2",
        }
    }
}

impl Inbound {
    pub(crate) fn new(
        shared: Arc<Shared>,
        tls: Arc<dyn InboundTls>,
        policy: InboundPolicy,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                shared,
                tls,
                policy: RwLock::new(policy),
                phase: watch::channel(Phase::Running).0,
                conns: Arc::new(Active::default()),
                open: Mutex::new(HashMap::new()),
                next_stream: AtomicU64::new(0),
            }),
        }
    }

    /// Replaces the backend set and authorizer. Streams opened from now on
    /// use the new one, and every open stream is checked again: those it
    /// denies are reset (both ends) and counted as revoked. Returns how
    /// many were.
    pub fn set_policy(&self, policy: InboundPolicy) -> usize {
        match self.inner.policy.write() {
            Ok(mut current) => *current = policy.clone(),
            Err(poisoned) => *poisoned.into_inner() = policy.clone(),
        }
        let mut revoked = 0;
        for stream in self.inner.open_streams().values() {
            let verdict = policy.authorizer.authorize(
                &stream.peer,
                stream.source_identity.as_deref(),
                stream.backend,
            );
            if let Err(deny) = verdict {
                tracing::info!(
                    peer = %stream.peer.identity,
                    source = ?stream.source_identity,
                    backend = %stream.backend,
                    %deny,
                    "open tunnel stream closed: the new policy denies it"
                );
                self.inner.shared.metrics.revoked(deny.reason);
                stream.cancel.trigger();
                revoked += 1;
            }
        }
        revoked
    }

    /// Streams past their 200 now.
    pub fn open_streams(&self) -> usize {
        self.inner.open_streams().len()
    }

    fn policy(&self) -> InboundPolicy {
        match self.inner.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Accepts on `listener` (made with [`socket::reuseport_listener`])
    /// until [`Inbound::shutdown`]; the listener is closed on return, so a
    /// successor bound to the same port gets every new connection.
    pub async fn serve(&self, listener: TcpListener) {
        let mut phase = self.inner.phase.subscribe();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = phase.wait_for(|p| *p != Phase::Running) => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let inbound = self.clone();
                    let guard = self.inner.conns.enter();
                    tokio::spawn(async move {
                        inbound.connection(tcp, peer).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Stops accepting, sends GOAWAY on every connection, lets open streams
    /// finish for up to `drain`, then resets what is left.
    pub async fn shutdown(&self, drain: Duration) {
        self.inner.phase.send_replace(Phase::Draining);
        if !self.inner.conns.wait_zero(drain).await {
            tracing::warn!(
                connections = self.inner.conns.get(),
                "inbound drain timed out; resetting the remaining streams"
            );
        }
        self.inner.phase.send_replace(Phase::Stopped);
        self.inner.conns.wait_zero(Duration::from_secs(1)).await;
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.inner.conns.get()
    }

    async fn connection(&self, tcp: TcpStream, peer_addr: SocketAddr) {
        let shared = &self.inner.shared;
        let metrics = &shared.metrics;
        let _ = tcp.set_nodelay(true);
        let lingering = socket::second_handle(&tcp);
        let (connection, peer, lifetime) = match self.handshake(tcp).await {
            Ok(ok) => ok,
            Err(e) => {
                metrics.handshake_failed(Direction::Inbound, e.reason());
                tracing::warn!(peer = %peer_addr, error = %e, "inbound tunnel handshake failed");
                return;
            }
        };
        TunnelMetrics::counter(&metrics.handshakes, Direction::Inbound).inc();
        TunnelMetrics::counter(&metrics.connections_opened, Direction::Inbound).inc();
        let active = TunnelMetrics::gauge(&metrics.connections_active, Direction::Inbound);
        active.inc();
        let registration =
            shared
                .tracker
                .register(Direction::Inbound, peer.clone(), peer_addr, lifetime);
        let state = registration.state.clone();
        let peer = PeerInfo {
            identity: peer,
            addr: peer_addr,
        };
        let dropped = self.drive(connection, &peer, &state).await;
        if let Some(reason) = dropped {
            metrics.dropped(Direction::Inbound, reason);
        }
        active.dec();
        // The h2 connection is closed, but the peer may still be sending
        // (WINDOW_UPDATEs for our last DATA): close without a RST, which
        // would destroy that DATA in the peer's receive queue.
        if dropped.is_none()
            && let Ok(lingering) = lingering
        {
            socket::close_gracefully(lingering, LINGER).await;
        }
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<
        (
            h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
            String,
            Lifetime,
        ),
        HandshakeError,
    > {
        let config = &self.inner.shared.config;
        let tls = self.inner.tls.server_config()?;
        let opened = SystemTime::now();
        let acceptor = TlsAcceptor::from(tls::server_with_alpn(tls.config));
        let handshake = async {
            let stream = acceptor.accept(tcp).await.map_err(HandshakeError::Tls)?;
            let session = stream.get_ref().1;
            let alpn = session.alpn_protocol();
            if alpn != Some(ALPN_H2) {
                return Err(HandshakeError::Alpn(
                    alpn.map(|a| String::from_utf8_lossy(a).into_owned()),
                ));
            }
            let chain = session
                .peer_certificates()
                .filter(|c| !c.is_empty())
                .ok_or(HandshakeError::NoCertificate)?;
            let peer = self.inner.tls.peer_identity(chain)?;
            let peer_validity = tls::peer_validity(Some(chain));
            let connection = hbone::server_builder(config)
                .handshake(stream)
                .await
                .map_err(HandshakeError::H2)?;
            Ok((connection, peer, peer_validity))
        };
        let (connection, peer, peer_validity) =
            tokio::time::timeout(config.handshake_timeout, handshake)
                .await
                .map_err(|_| HandshakeError::Timeout)??;
        // Inbound retires for expiry only (a backstop: the client side
        // replaces its connections on rotation itself).
        let lifetime = Lifetime {
            generation: 0,
            local: tls::local_validity(tls.local_cert_not_before, tls.local_cert_not_after),
            peer: peer_validity,
            opened,
        };
        Ok((connection, peer, lifetime))
    }

    /// Accepts streams until the connection ends; returns why it was
    /// dropped, if not cleanly.
    async fn drive(
        &self,
        mut connection: h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
        peer: &PeerInfo,
        state: &Arc<ConnState>,
    ) -> Option<&'static str> {
        let config = &self.inner.shared.config;
        let keepalive = hbone::keepalive(
            connection.ping_pong(),
            config.ping_interval,
            config.ping_timeout,
        );
        tokio::pin!(keepalive);
        let mut phase = self.inner.phase.subscribe();
        let mut draining = false;
        // GOAWAY ahead of either certificate's expiry, close at it.
        let retire_at = state.lifetime.retire_at().map(lifetime::deadline);
        let close_at = state.lifetime.close_at().map(lifetime::deadline);
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let retire_timer = tokio::time::sleep_until(retire_at.unwrap_or(far));
        let close_timer = tokio::time::sleep_until(close_at.unwrap_or(far));
        tokio::pin!(retire_timer, close_timer);
        let expired = |state: &ConnState| {
            tracing::warn!(
                peer = %peer.addr,
                node = %peer.identity,
                streams = state.streams.load(std::sync::atomic::Ordering::Acquire),
                "inbound tunnel connection closed at its certificate's expiry; its open streams are reset"
            );
            Some("expiry")
        };
        loop {
            tokio::select! {
                accepted = connection.accept() => match accepted {
                    Some(Ok((request, respond))) => {
                        let inbound = self.clone();
                        let peer = peer.clone();
                        let state = state.clone();
                        tokio::spawn(async move {
                            inbound.stream(request, respond, peer, state).await;
                        });
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer = %peer.addr, error = %e, "inbound tunnel connection failed");
                        state.mark_dead();
                        return Some(if e.is_go_away() { "goaway" } else { "error" });
                    }
                    None => {
                        // No new streams will come (GOAWAY), but the open
                        // ones need the connection driven until they end:
                        // dropping it here would reset them.
                        tokio::select! {
                            _ = std::future::poll_fn(|cx| connection.poll_closed(cx)) => {}
                            _ = phase.wait_for(|p| *p == Phase::Stopped) => return Some("shutdown"),
                            _ = &mut close_timer, if close_at.is_some() => return expired(state),
                        }
                        return None;
                    }
                },
                end = &mut keepalive => {
                    tracing::warn!(peer = %peer.addr, node = %peer.identity, "inbound tunnel connection dropped: PING unanswered");
                    state.mark_dead();
                    return Some(end.reason());
                }
                _ = &mut retire_timer, if retire_at.is_some() && !draining => {
                    draining = true;
                    if state.retire(RetireReason::Expiry) {
                        self.inner.shared.metrics.retired(Direction::Inbound, RetireReason::Expiry.as_str());
                    }
                    tracing::debug!(peer = %peer.addr, node = %peer.identity, "inbound tunnel connection nears its certificate's expiry: GOAWAY");
                    connection.graceful_shutdown();
                }
                _ = &mut close_timer, if close_at.is_some() => return expired(state),
                changed = phase.changed() => {
                    let now = if changed.is_err() { Phase::Stopped } else { *phase.borrow_and_update() };
                    match now {
                        Phase::Running => {}
                        Phase::Draining if !draining => {
                            // GOAWAY: no new streams; open ones go on.
                            draining = true;
                            state.mark_dead();
                            connection.graceful_shutdown();
                        }
                        Phase::Draining => {}
                        Phase::Stopped => return Some("shutdown"),
                    }
                }
            }
        }
    }

    async fn stream(
        &self,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: PeerInfo,
        state: Arc<ConnState>,
    ) {
        let shared = &self.inner.shared;
        let metrics = &shared.metrics;
        let reject =
            |respond: &mut SendResponse<Bytes>, status: StatusCode, reason: &'static str| {
                metrics.rejected(Direction::Inbound, reason, status.as_u16());
                let response = Response::builder().status(status).body(());
                if let Ok(response) = response {
                    let _ = respond.send_response(response, true);
                }
            };
        let connect = match hbone::parse_connect(&request) {
            Ok(connect) => connect,
            Err(e) => {
                tracing::debug!(peer = %peer.addr, error = %e, "malformed CONNECT");
                return reject(&mut respond, e.status(), e.reason());
            }
        };
        let policy = self.policy();
        if !policy.backends.is_local_backend(connect.backend) {
            tracing::debug!(peer = %peer.addr, backend = %connect.backend, "CONNECT to a backend this node does not serve");
            return reject(&mut respond, StatusCode::BAD_REQUEST, "not_local_backend");
        }
        let admitted = match policy.authorizer.authorize(
            &peer,
            connect.source_identity.as_deref(),
            connect.backend,
        ) {
            Ok(admitted) => admitted,
            Err(deny) => {
                tracing::info!(peer = %peer.identity, source = ?connect.source_identity, backend = %connect.backend, %deny, "tunnel stream denied");
                return reject(&mut respond, StatusCode::UNAUTHORIZED, deny.reason);
            }
        };
        let backend = match socket::connect(
            connect.backend,
            shared.config.socket_mark,
            shared.config.connect_timeout,
        )
        .await
        {
            Ok(backend) => backend,
            Err(e) => {
                tracing::debug!(backend = %connect.backend, error = %e, "backend connect failed");
                return reject(
                    &mut respond,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "backend_connect",
                );
            }
        };
        let ok = Response::builder().status(StatusCode::OK).body(());
        let send = match ok
            .map_err(|_| ())
            .and_then(|r| respond.send_response(r, false).map_err(|_| ()))
        {
            Ok(send) => send,
            Err(()) => {
                // The stream went away while we connected.
                socket::reset(backend);
                return;
            }
        };
        TunnelMetrics::counter(&metrics.streams, Direction::Inbound).inc();
        if let Some(service) = &admitted {
            metrics.admitted(service);
        }
        let active = TunnelMetrics::gauge(&metrics.streams_active, Direction::Inbound);
        active.inc();
        state
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let (sent, received) = metrics.byte_counters(Direction::Inbound);
        let counters = Counters {
            conn: state.clone(),
            sent,
            received,
        };
        let cancel = Cancel::new(self.inner.phase.subscribe());
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        self.inner.open_streams().insert(
            id,
            OpenStream {
                peer: peer.clone(),
                source_identity: connect.source_identity.clone(),
                backend: connect.backend,
                cancel: cancel.clone(),
            },
        );
        let _open = OpenGuard {
            inner: &self.inner,
            id,
        };
        // A policy swapped between the check above and the insert would not
        // have seen this stream: check once more against the current one.
        if let Err(deny) = self.policy().authorizer.authorize(
            &peer,
            connect.source_identity.as_deref(),
            connect.backend,
        ) {
            shared.metrics.revoked(deny.reason);
            cancel.trigger();
        }
        if let Err(e) = copy::splice(backend, send, request.into_body(), cancel, counters).await {
            tracing::debug!(backend = %connect.backend, error = %e, "inbound stream ended abnormally");
        }
        state
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        active.dec();
    }
}
