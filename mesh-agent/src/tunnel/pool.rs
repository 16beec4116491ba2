//! Outbound's connections to peer nodes, keyed by (source identity,
//! destination node):
//! - a stream takes a slot on a live connection with fewer than
//!   `max_streams_per_conn` streams, else a new connection is opened;
//! - at most one handshake per key is in flight: later callers wait on that
//!   key's lock, then take slots on what it opened (a burst of N streams
//!   opens ceil(N / max) connections). The lock is per key, so a slow peer
//!   never holds up streams to other nodes (ztunnel PR #2017), and the pool
//!   table itself is only locked for lookups, never across an await;
//! - a connection with no stream for `idle_timeout` is closed (GOAWAY);
//! - a connection that failed, got GOAWAY, missed PINGs or closed is marked
//!   dead and dropped from the table at once, so it is never reused;
//! - a connection is retired (out of the table, so new streams get a new
//!   connection, make-before-break) when this node's credentials changed
//!   since its handshake or a certificate of either end nears expiry; it
//!   closes when its last stream ends, and is closed outright just before
//!   that expiry (see `lifetime`).
//!
//! Each connection is driven by its own task (TLS and framing); its
//! streams' bytes are copied by their own tasks (see `copy`).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    Phase, Shared,
    hbone::{self, ALPN_H2},
    lifetime::{self, Lifetime, RetireReason},
    metrics::{Direction, TunnelMetrics},
    snapshot::{ConnState, Registration},
    socket,
    tls::{self, OutboundTls, TlsSetupError},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct PoolKey {
    pub(crate) source_identity: String,
    pub(crate) node_name: String,
    pub(crate) node_addr: SocketAddr,
}

/// Why no connection to a peer node could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    TlsSetup(#[from] TlsSetupError),
    #[error("TCP connect to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("handshake with {0} timed out")]
    Timeout(SocketAddr),
    #[error("{addr} negotiated ALPN {alpn:?}, not h2; is it a mesh agent's :15008?")]
    Alpn {
        addr: SocketAddr,
        alpn: Option<String>,
    },
    #[error("HTTP/2 handshake with {addr}: {source}")]
    H2 {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("the tunnel is shutting down")]
    ShuttingDown,
}

impl ConnectError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TlsSetup(_) => "tls_config",
            Self::Tcp { .. } => "tcp_connect",
            Self::Tls { source, .. } => crate::identity::io_failure_reason(source),
            Self::Timeout(_) => "timeout",
            Self::Alpn { .. } => "alpn",
            Self::H2 { .. } => "h2",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

pub(crate) struct PooledConn {
    pub(crate) state: Arc<ConnState>,
    sender: SendRequest<Bytes>,
    /// When the last stream ended; guarded by the pool table's lock.
    idle_since: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<PooledConn>>,
    /// Held while this key's handshake is in flight.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    shared: Arc<Shared>,
    tls: Arc<dyn OutboundTls>,
    phase: watch::Receiver<Phase>,
    /// This node's credentials generation, when they can change.
    generations: Option<watch::Receiver<u64>>,
    entries: Mutex<HashMap<PoolKey, Entry>>,
}

/// One stream's slot on a pooled connection; gives it back when dropped.
pub(crate) struct Lease {
    conn: Arc<PooledConn>,
    pool: Arc<PoolInner>,
}

impl Lease {
    pub(crate) fn sender(&self) -> SendRequest<Bytes> {
        self.conn.sender.clone()
    }

    pub(crate) fn state(&self) -> &Arc<ConnState> {
        &self.conn.state
    }

    /// The connection refused a new stream (GOAWAY): never use it again.
    pub(crate) fn mark_dead(&self) {
        self.conn.state.mark_dead();
        self.pool.remove(self.conn.state.id);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Under the table lock, so the idle check sees count and time agree.
        let _entries = lock(&self.pool.entries);
        if self.conn.state.streams.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut idle) = self.conn.idle_since.lock()
        {
            *idle = Some(Instant::now());
        }
    }
}

impl Pool {
    pub(crate) fn new(
        shared: Arc<Shared>,
        tls: Arc<dyn OutboundTls>,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        let generations = tls.generations();
        Self {
            inner: Arc::new(PoolInner {
                shared,
                tls,
                phase,
                generations,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A slot on a connection for `key`, opening one if none has room.
    pub(crate) async fn checkout(&self, key: &PoolKey) -> Result<Lease, ConnectError> {
        if let Some(lease) = self.inner.try_reserve(key) {
            return Ok(lease);
        }
        let connecting = {
            let mut entries = lock(&self.inner.entries);
            entries.entry(key.clone()).or_default().connecting.clone()
        };
        let _one_handshake = connecting.lock().await;
        if let Some(lease) = self.inner.try_reserve(key) {
            return Ok(lease);
        }
        if *self.inner.phase.borrow() != Phase::Running {
            return Err(ConnectError::ShuttingDown);
        }
        let conn = PoolInner::connect(&self.inner, key).await?;
        let mut entries = lock(&self.inner.entries);
        conn.state.streams.fetch_add(1, Ordering::AcqRel);
        // Its task may have retired it already (a reload during the
        // handshake) or seen it end: then this stream is its last.
        if !conn.state.is_dead() {
            entries
                .entry(key.clone())
                .or_default()
                .conns
                .push(conn.clone());
        }
        Ok(Lease {
            conn,
            pool: self.inner.clone(),
        })
    }

    /// Connections in the table (live ones only).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner.entries)
            .values()
            .map(|e| e.conns.len())
            .sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the table leaves it consistent (every update
    // is a single push/remove/counter step), so poisoning is ignored.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PoolInner {
    fn current_generation(&self) -> Option<u64> {
        self.generations.as_ref().map(|g| *g.borrow())
    }

    fn try_reserve(self: &Arc<Self>, key: &PoolKey) -> Option<Lease> {
        let max = self.shared.config.max_streams_per_conn;
        let (now, generation) = (SystemTime::now(), self.current_generation());
        let mut entries = lock(&self.entries);
        let entry = entries.get_mut(key)?;
        // Checked here too, not only by the connection's task, so no stream
        // ever lands on a connection that is due to retire.
        entry
            .conns
            .retain(|c| match c.state.lifetime.retire(now, generation) {
                Some(reason) => {
                    self.count_retired(&c.state, reason);
                    false
                }
                None => true,
            });
        let conn = entry
            .conns
            .iter()
            .find(|c| !c.state.is_dead() && c.state.streams.load(Ordering::Acquire) < max)?;
        conn.state.streams.fetch_add(1, Ordering::AcqRel);
        *lock(&conn.idle_since) = None;
        Some(Lease {
            conn: conn.clone(),
            pool: self.clone(),
        })
    }

    /// Takes connection `id` out of the table for `reason`: new streams go
    /// to a new connection, this one closes once its streams end.
    fn retire(&self, state: &ConnState, reason: RetireReason) {
        self.count_retired(state, reason);
        self.remove(state.id);
    }

    fn count_retired(&self, state: &ConnState, reason: RetireReason) {
        if state.retire(reason) {
            self.shared
                .metrics
                .retired(Direction::Outbound, reason.as_str());
            tracing::debug!(
                node = %state.peer_node,
                conn = state.id,
                reason = reason.as_str(),
                streams = state.streams.load(Ordering::Acquire),
                "tunnel connection retired; new streams go to a new connection"
            );
        }
    }

    fn remove(&self, id: u64) {
        let mut entries = lock(&self.entries);
        entries.retain(|_, entry| {
            entry.conns.retain(|c| c.state.id != id);
            !entry.conns.is_empty() || Arc::strong_count(&entry.connecting) > 1
        });
    }

    /// Drops connection `id` from the table if it has been idle long
    /// enough; its h2 connection then closes with GOAWAY once the last
    /// handle is gone.
    fn close_if_idle(&self, id: u64) -> bool {
        let timeout = self.shared.config.idle_timeout;
        let mut entries = lock(&self.entries);
        let mut closed = false;
        for entry in entries.values_mut() {
            entry.conns.retain(|c| {
                if c.state.id != id || c.state.streams.load(Ordering::Acquire) != 0 {
                    return true;
                }
                let idle = lock(&c.idle_since).is_some_and(|since| since.elapsed() >= timeout);
                if idle {
                    c.state.mark_dead();
                    closed = true;
                }
                !idle
            });
        }
        closed
    }

    async fn connect(self: &Arc<Self>, key: &PoolKey) -> Result<Arc<PooledConn>, ConnectError> {
        let metrics = &self.shared.metrics;
        match self.try_connect(key).await {
            Ok(conn) => {
                metrics.handshakes.get_or_create(&dir()).inc();
                metrics.connections_opened.get_or_create(&dir()).inc();
                Ok(conn)
            }
            Err(e) => {
                metrics.handshake_failed(Direction::Outbound, e.reason());
                tracing::warn!(node = %key.node_name, addr = %key.node_addr, error = %e, "tunnel connection failed");
                Err(e)
            }
        }
    }

    async fn try_connect(self: &Arc<Self>, key: &PoolKey) -> Result<Arc<PooledConn>, ConnectError> {
        let config = &self.shared.config;
        let addr = key.node_addr;
        let tls = self
            .tls
            .client_config(&key.source_identity, &key.node_name)?;
        let opened = SystemTime::now();
        let tcp = socket::connect(addr, config.socket_mark, config.connect_timeout)
            .await
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        let connector = TlsConnector::from(tls::client_with_alpn(tls.config));
        let handshake = async {
            let stream = connector
                .connect(tls.server_name.clone(), tcp)
                .await
                .map_err(|source| ConnectError::Tls { addr, source })?;
            let session = stream.get_ref().1;
            let alpn = session.alpn_protocol();
            if alpn != Some(ALPN_H2) {
                return Err(ConnectError::Alpn {
                    addr,
                    alpn: alpn.map(|a| String::from_utf8_lossy(a).into_owned()),
                });
            }
            let peer = tls::peer_validity(session.peer_certificates());
            hbone::client_builder(config)
                .handshake::<_, Bytes>(stream)
                .await
                .map(|(sender, connection)| (sender, connection, peer))
                .map_err(|source| ConnectError::H2 { addr, source })
        };
        let (sender, connection, peer) = tokio::time::timeout(config.handshake_timeout, handshake)
            .await
            .map_err(|_| ConnectError::Timeout(addr))??;
        // The generation read before the handshake: had a reload come in
        // between, the connection is retired at once (never the reverse).
        let lifetime = Lifetime {
            generation: tls.generation,
            local: tls::local_validity(tls.local_cert_not_before, tls.local_cert_not_after),
            peer,
            opened,
        };
        let registration = self.shared.tracker.register(
            Direction::Outbound,
            key.node_name.clone(),
            addr,
            lifetime,
        );
        let conn = Arc::new(PooledConn {
            state: registration.state.clone(),
            sender,
            idle_since: Mutex::new(None),
        });
        tokio::spawn(drive(
            connection,
            registration,
            Arc::downgrade(self),
            self.shared.clone(),
            self.phase.clone(),
            self.generations.clone(),
        ));
        Ok(conn)
    }
}

fn dir() -> super::metrics::DirectionLabels {
    super::metrics::DirectionLabels {
        direction: Direction::Outbound,
    }
}

/// Polls one client connection until it ends, with keepalive and the idle
/// check beside it; then takes it out of the pool.
async fn drive(
    connection: h2::client::Connection<TlsStream<TcpStream>, Bytes>,
    registration: Registration,
    pool: Weak<PoolInner>,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    mut generations: Option<watch::Receiver<u64>>,
) {
    let config = &shared.config;
    let metrics: &TunnelMetrics = &shared.metrics;
    let state = registration.state.clone();
    let active = TunnelMetrics::gauge(&metrics.connections_active, Direction::Outbound);
    active.inc();
    let mut connection = connection;
    let ping_pong = connection.ping_pong();
    let keepalive = hbone::keepalive(ping_pong, config.ping_interval, config.ping_timeout);
    tokio::pin!(keepalive);
    // Boxed so it can be dropped (failing its streams) before we return.
    let mut connection = Box::pin(connection);
    let check_every = (config.idle_timeout / 4).max(Duration::from_millis(10));
    let mut idle_check = tokio::time::interval(check_every);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lifetime = state.lifetime;
    let retire_at = lifetime.retire_at().map(lifetime::deadline);
    let close_at = lifetime.close_at().map(lifetime::deadline);
    let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let retire_timer = tokio::time::sleep_until(retire_at.unwrap_or(far));
    let close_timer = tokio::time::sleep_until(close_at.unwrap_or(far));
    tokio::pin!(retire_timer, close_timer);
    let retire = |reason: RetireReason| {
        if let Some(pool) = pool.upgrade() {
            pool.retire(&state, reason);
        }
    };
    // A reload between the config's generation and now: retire at once.
    if let Some(g) = generations.as_mut()
        && *g.borrow_and_update() != lifetime.generation
    {
        retire(RetireReason::Rotation);
    }
    let dropped: Option<&'static str> = loop {
        tokio::select! {
            result = &mut connection => match result {
                Ok(()) => break None,
                Err(e) => {
                    tracing::debug!(node = %state.peer_node, error = %e, "tunnel connection ended");
                    break Some(if e.is_go_away() { "goaway" } else { "error" });
                }
            },
            end = &mut keepalive => {
                tracing::warn!(node = %state.peer_node, addr = %state.peer_addr, "tunnel connection dropped: PING unanswered");
                break Some(end.reason());
            }
            _ = idle_check.tick() => {
                if let Some(pool) = pool.upgrade()
                    && pool.close_if_idle(state.id)
                {
                    tracing::debug!(node = %state.peer_node, "closing idle tunnel connection");
                }
            }
            _ = &mut retire_timer, if retire_at.is_some() && state.retired().is_none() => {
                retire(RetireReason::Expiry);
            }
            changed = async {
                match generations.as_mut() {
                    Some(g) => g.changed().await,
                    None => std::future::pending().await,
                }
            }, if state.retired().is_none() => {
                match changed {
                    Ok(()) => {
                        let now = generations.as_mut().map(|g| *g.borrow_and_update());
                        if now.is_some_and(|g| g != lifetime.generation) {
                            retire(RetireReason::Rotation);
                        }
                    }
                    // The credentials are gone: nothing will change again.
                    Err(_) => generations = None,
                }
            }
            _ = &mut close_timer, if close_at.is_some() => {
                tracing::warn!(
                    node = %state.peer_node,
                    conn = state.id,
                    streams = state.streams.load(Ordering::Acquire),
                    "tunnel connection closed at its certificate's expiry; its open streams are reset"
                );
                break Some("expiry");
            }
            changed = phase.wait_for(|p| *p == Phase::Stopped) => {
                // Stopped, or the outbound is gone.
                let _ = changed;
                break Some("shutdown");
            }
        }
    };
    state.mark_dead();
    if let Some(pool) = pool.upgrade() {
        pool.remove(state.id);
    }
    if let Some(reason) = dropped {
        metrics.dropped(Direction::Outbound, reason);
    }
    active.dec();
    // Dropping the connection fails its remaining streams, which reset
    // their client sockets.
    drop(connection);
    drop(registration);
}
