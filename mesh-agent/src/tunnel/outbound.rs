//! The source node's side: a captured client connection becomes one CONNECT
//! stream to the destination node's agent. The client's socket is reset
//! (never closed cleanly) whenever the stream cannot be had or fails, so an
//! application never takes a failure for a complete response.

use std::{fmt::Display, net::SocketAddr, sync::Arc, time::Duration, time::Instant};

use http::StatusCode;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    Active, Phase, Shared, TunnelMetrics,
    copy::{self, Cancel, CopyError, Counters},
    hbone,
    metrics::Direction,
    pool::{ConnectError, Pool, PoolKey},
    socket,
    tls::OutboundTls,
};

/// Where one captured connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The peer node, as the TLS provider and `meshctl tunnels` name it.
    pub node_name: String,
    /// The peer agent's inbound: node IP, port 15008.
    pub node_addr: SocketAddr,
    /// The pod the kernel chose; becomes `:authority`.
    pub backend: SocketAddr,
    /// The application's own address; becomes `forwarded: for=`.
    pub client_addr: SocketAddr,
    /// Who this node is to the peer (its node SPIFFE ID); the pool key.
    pub source_identity: String,
    /// The SPIFFE ID of the workload that connected, claimed per stream
    /// (`x-mesh-source-identity`); `None` for a client with none.
    pub workload: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no tunnel to {node}: {source}")]
    Connect {
        node: String,
        #[source]
        source: ConnectError,
    },
    #[error("bad destination {backend}: {source}")]
    Request {
        backend: SocketAddr,
        #[source]
        source: http::Error,
    },
    #[error("{node} answered {status} for {backend}")]
    Refused {
        node: String,
        backend: SocketAddr,
        status: StatusCode,
    },
    #[error("CONNECT to {backend} via {node} failed: {source}")]
    Stream {
        node: String,
        backend: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("no answer from {node} for {backend} within {timeout:?}")]
    Timeout {
        node: String,
        backend: SocketAddr,
        timeout: Duration,
    },
    #[error("stream to {backend} via {node} ended abnormally: {source}")]
    Copy {
        node: String,
        backend: SocketAddr,
        #[source]
        source: CopyError,
    },
    #[error("the tunnel is shutting down")]
    ShuttingDown,
}

/// The client side; cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    pool: Pool,
    phase: watch::Sender<Phase>,
    streams: Arc<Active>,
}

impl Outbound {
    pub(crate) fn new(shared: Arc<Shared>, tls: Arc<dyn OutboundTls>) -> Self {
        let (phase, phase_rx) = watch::channel(Phase::Running);
        Self {
            inner: Arc::new(Inner {
                pool: Pool::new(shared.clone(), tls, phase_rx),
                shared,
                phase,
                streams: Arc::new(Active::default()),
            }),
        }
    }

    /// Carries `client` to `dest` until both directions end. On any error
    /// the client's socket has been reset when this returns.
    pub async fn handle(&self, client: TcpStream, dest: Destination) -> Result<(), OutboundError> {
        let started = Instant::now();
        let _stream = self.inner.streams.enter();
        let metrics = &self.inner.shared.metrics;
        let _ = client.set_nodelay(true);
        let result = self.open(&dest).await;
        let (lease, send, recv) = match result {
            Ok(open) => open,
            Err((reason, status, e)) => {
                metrics.rejected(Direction::Outbound, reason, status);
                tracing::debug!(error = %e, "outbound stream refused");
                socket::reset(client);
                return Err(e);
            }
        };
        metrics
            .stream_setup
            .observe(started.elapsed().as_secs_f64());
        TunnelMetrics::counter(&metrics.streams, Direction::Outbound).inc();
        let active = TunnelMetrics::gauge(&metrics.streams_active, Direction::Outbound);
        active.inc();
        let (sent, received) = metrics.byte_counters(Direction::Outbound);
        let counters = Counters {
            conn: lease.state().clone(),
            sent,
            received,
        };
        let cancel = Cancel::new(self.inner.phase.subscribe());
        let result = copy::splice(client, send, recv, cancel, counters).await;
        active.dec();
        drop(lease);
        result.map_err(|source| OutboundError::Copy {
            node: dest.node_name.clone(),
            backend: dest.backend,
            source,
        })
    }

    /// Opens the stream and waits for 200. A connection that refuses new
    /// streams (GOAWAY) is dropped and the stream tried once more on a new
    /// one.
    #[allow(clippy::type_complexity)]
    async fn open(
        &self,
        dest: &Destination,
    ) -> Result<
        (
            super::pool::Lease,
            h2::SendStream<bytes::Bytes>,
            h2::RecvStream,
        ),
        (&'static str, u16, OutboundError),
    > {
        let key = PoolKey {
            source_identity: dest.source_identity.clone(),
            node_name: dest.node_name.clone(),
            node_addr: dest.node_addr,
        };
        let timeout = self.inner.shared.config.handshake_timeout;
        let node = || dest.node_name.clone();
        let mut attempts = 0;
        loop {
            attempts += 1;
            if *self.inner.phase.borrow() == Phase::Stopped {
                return Err(("shutting_down", 0, OutboundError::ShuttingDown));
            }
            let lease = self.inner.pool.checkout(&key).await.map_err(|source| {
                (
                    "connect",
                    0,
                    OutboundError::Connect {
                        node: node(),
                        source,
                    },
                )
            })?;
            let request =
                hbone::connect_request(dest.backend, dest.client_addr, dest.workload.as_deref())
                    .map_err(|source| {
                        (
                            "request",
                            0,
                            OutboundError::Request {
                                backend: dest.backend,
                                source,
                            },
                        )
                    })?;
            let stream_failed = |source: h2::Error| {
                (
                    "stream",
                    0,
                    OutboundError::Stream {
                        node: node(),
                        backend: dest.backend,
                        source,
                    },
                )
            };
            let exchange = async {
                let mut sender = lease.sender().ready().await?;
                let (response, send) = sender.send_request(request, false)?;
                Ok::<_, h2::Error>((response.await?, send))
            };
            let (response, send) = match tokio::time::timeout(timeout, exchange).await {
                Err(_) => {
                    return Err((
                        "timeout",
                        0,
                        OutboundError::Timeout {
                            node: node(),
                            backend: dest.backend,
                            timeout,
                        },
                    ));
                }
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    // A GOAWAY'd or dead connection, or a stream it refused
                    // before processing: safe to retry on a fresh one.
                    let retry = e.is_go_away()
                        || e.reason() == Some(h2::Reason::REFUSED_STREAM)
                        || state_is_dead(&lease);
                    if retry && attempts < 2 {
                        lease.mark_dead();
                        continue;
                    }
                    return Err(stream_failed(e));
                }
            };
            let status = response.status();
            if status != StatusCode::OK {
                let reason = match status {
                    StatusCode::BAD_REQUEST => "bad_request",
                    StatusCode::UNAUTHORIZED => "unauthorized",
                    StatusCode::SERVICE_UNAVAILABLE => "backend_unavailable",
                    _ => "status",
                };
                return Err((
                    reason,
                    status.as_u16(),
                    OutboundError::Refused {
                        node: node(),
                        backend: dest.backend,
                        status,
                    },
                ));
            }
            return Ok((lease, send, response.into_body()));
        }
    }

    /// Accepts on `listener` (see [`socket::reuseport_listener`]) until
    /// shutdown; `resolve` names each accepted socket's destination (the
    /// kernel's record of the original backend), given the client's
    /// address as accept() returned it (a client that has already reset
    /// has no peer name left to ask for, yet its bytes are to be
    /// delivered). A socket it cannot place is reset.
    pub async fn serve<F, E>(&self, listener: TcpListener, resolve: F)
    where
        F: Fn(&TcpStream, SocketAddr) -> Result<Destination, E> + Send + Sync + 'static,
        E: Display,
    {
        let mut phase = self.inner.phase.subscribe();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = phase.wait_for(|p| *p != Phase::Running) => break,
            };
            let (client, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match resolve(&client, peer) {
                Ok(dest) => {
                    let outbound = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = outbound.handle(client, dest).await {
                            tracing::debug!(client = %peer, error = %e, "outbound stream ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(client = %peer, error = %e, "no tunnel destination for a captured connection; resetting it");
                    self.inner
                        .shared
                        .metrics
                        .rejected(Direction::Outbound, "resolve", 0);
                    socket::reset(client);
                }
            }
        }
    }

    /// Stops accepting, lets open streams finish for up to `drain`, then
    /// resets whatever is left and closes every pooled connection.
    pub async fn shutdown(&self, drain: Duration) {
        self.inner.phase.send_replace(Phase::Draining);
        let drained = self.inner.streams.wait_zero(drain).await;
        if !drained {
            tracing::warn!(
                streams = self.inner.streams.get(),
                "outbound drain timed out; resetting the remaining streams"
            );
        }
        self.inner.phase.send_replace(Phase::Stopped);
        // The copies see Stopped at once; give their resets a moment to land.
        self.inner.streams.wait_zero(Duration::from_secs(1)).await;
    }

    /// Streams being opened or carried now.
    pub fn active_streams(&self) -> usize {
        self.inner.streams.get()
    }

    #[cfg(test)]
    pub(crate) fn pooled_connections(&self) -> usize {
        self.inner.pool.len()
    }
}

fn state_is_dead(lease: &super::pool::Lease) -> bool {
    lease.state().is_dead()
}
