//! The cross-node tunnel: a client's plain TCP connection, captured on the
//! source node, is carried to the destination node's agent inside mutual
//! TLS as one HTTP/2 `CONNECT` stream (HBONE, as Istio ambient names it).
//! The wire is written down in docs/HBONE.md.
//!
//! - [`Outbound`] takes an accepted client socket plus the [`Destination`]
//!   the kernel chose, and opens a stream on a pooled connection
//!   ([`pool`]) to the peer node's agent.
//! - [`Inbound`] serves :15008: TLS, then per stream: validate, check the
//!   backend is local, authorize, connect to the backend, answer 200.
//! - [`copy`] moves the bytes and maps FIN/RST to END_STREAM/RST_STREAM.
//!
//! Certificates and verifiers come from outside (the `identity` module)
//! through the small traits in [`tls`]; which backends are local and who may
//! reach them through [`policy`]. The tunnel runs on whatever tokio runtime
//! spawns its tasks; the agent gives it its own data-plane runtime.

pub mod copy;
pub mod hbone;
pub mod inbound;
pub mod lifetime;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod snapshot;
pub mod socket;
pub mod tls;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

pub use inbound::Inbound;
pub use metrics::TunnelMetrics;
pub use node::{NodeTunnel, NodeTunnelError, TunnelSettings, TunnelView};
pub use outbound::{Destination, Outbound};
pub use policy::{Admit, AllowAll, Authorizer, Deny, InboundPolicy, LocalBackends, PeerInfo};
pub use snapshot::{ConnSnapshot, PeerSnapshot};
pub use tls::{InboundTls, InboundTlsConfig, OutboundTls, OutboundTlsConfig};

use snapshot::Tracker;

/// How the tunnel behaves; [`TunnelConfig::default`] is what production uses.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// SO_MARK on every socket the tunnel opens (to peer nodes and to
    /// backends), so the kernel programs skip the agent's own traffic.
    /// `None` sets no mark (tests without the programs).
    pub socket_mark: Option<u32>,
    /// Streams per connection before the pool opens another (and the
    /// SETTINGS_MAX_CONCURRENT_STREAMS inbound advertises).
    pub max_streams_per_conn: usize,
    /// A pooled connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// A PING goes out this long after the previous one was answered.
    pub ping_interval: Duration,
    /// A PING unanswered for this long drops the connection.
    pub ping_timeout: Duration,
    /// TCP connect to a peer node, and inbound's connect to a backend.
    pub connect_timeout: Duration,
    /// TLS + HTTP/2 handshake, and outbound's wait for the CONNECT answer.
    pub handshake_timeout: Duration,
    /// HTTP/2 initial stream window (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// HTTP/2 connection window; a multiple (at least 2) of the stream
    /// window, so one unread stream cannot stall the others (ztunnel #1538).
    pub connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE both sides advertise.
    pub max_frame_size: u32,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            socket_mark: None,
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(300),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "tunnel connection window {connection} is not a multiple (at least 2x) of the stream window {stream}: one stream the application does not read would stall every other stream on the connection (ztunnel #1538); set it to e.g. 4x the stream window"
    )]
    Windows { stream: u32, connection: u32 },
    #[error("tunnel max frame size {0} is outside HTTP/2's 16384..=16777215; use 1048576 (1 MiB)")]
    FrameSize(u32),
    #[error("tunnel stream window {0} is outside 65535..=2147483647")]
    StreamWindow(u32),
    #[error("tunnel max streams per connection is 0; use 100")]
    NoStreams,
}

impl TunnelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(65_535..=i32::MAX as u32).contains(&self.stream_window) {
            return Err(ConfigError::StreamWindow(self.stream_window));
        }
        if self.connection_window < 2 * self.stream_window
            || !self.connection_window.is_multiple_of(self.stream_window)
            || self.connection_window > i32::MAX as u32
        {
            return Err(ConfigError::Windows {
                stream: self.stream_window,
                connection: self.connection_window,
            });
        }
        if !(16_384..=16_777_215).contains(&self.max_frame_size) {
            return Err(ConfigError::FrameSize(self.max_frame_size));
        }
        if self.max_streams_per_conn == 0 {
            return Err(ConfigError::NoStreams);
        }
        Ok(())
    }
}

/// What outbound and inbound share: configuration, metrics and the
/// connection table `meshctl tunnels` reads.
pub(crate) struct Shared {
    pub(crate) config: TunnelConfig,
    pub(crate) metrics: TunnelMetrics,
    pub(crate) tracker: Tracker,
}

/// The tunnel subsystem: make one, then its [`Outbound`] and [`Inbound`].
#[derive(Clone)]
pub struct Tunnel {
    shared: Arc<Shared>,
}

impl Tunnel {
    pub fn new(config: TunnelConfig, metrics: TunnelMetrics) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                metrics,
                tracker: Tracker::default(),
            }),
        })
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.shared.config
    }

    pub fn metrics(&self) -> &TunnelMetrics {
        &self.shared.metrics
    }

    /// The client side: pooled connections to peer nodes.
    pub fn outbound(&self, tls: Arc<dyn OutboundTls>) -> Outbound {
        Outbound::new(self.shared.clone(), tls)
    }

    /// The :15008 server side.
    pub fn inbound(&self, tls: Arc<dyn InboundTls>, policy: InboundPolicy) -> Inbound {
        Inbound::new(self.shared.clone(), tls, policy)
    }

    /// Every live tunnel connection, grouped by peer node.
    pub fn snapshot(&self) -> Vec<PeerSnapshot> {
        self.shared.tracker.snapshot()
    }
}

/// Where a drain is: serving, draining (no new connections or streams),
/// or stopped (whatever is left is reset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Draining,
    Stopped,
}

/// Counts live things (streams, connections) so a drain can wait for zero.
#[derive(Default)]
pub(crate) struct Active {
    count: AtomicUsize,
    zero: Notify,
}

/// Holds one count of an [`Active`]; dropping it gives the count back.
pub(crate) struct ActiveGuard(Arc<Active>);

impl Active {
    pub(crate) fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    pub(crate) fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Returns once nothing is live, or after `timeout`; true when drained.
    pub(crate) async fn wait_zero(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.zero.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.get() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}
