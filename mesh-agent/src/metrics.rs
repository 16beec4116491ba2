//! Prometheus metrics (`/metrics`, OpenMetrics text) and the health
//! endpoints (`/healthz`, `/readyz`), served over HTTP on a runtime of their
//! own, apart from the data plane's.
//!
//! Each subsystem registers its own metrics (`Metrics::new(&mut Registry)`):
//! `reconcile` (apply latency, reloads, destroyed sockets), `health`
//! (backend health and its transitions). The kernel's counters are not
//! copied anywhere: `kernel::KernelCollector` reads the per-CPU maps when
//! Prometheus scrapes, so the values are exact and the hot path pays
//! nothing. Names follow Prometheus conventions; counters get `_total` from
//! the encoder, units (`_seconds`, `_bytes`) are declared, not spelled.

pub mod health;
pub mod kernel;
pub mod reconcile;
mod server;

use std::{
    fmt,
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{metrics::info::Info, registry::Registry};

use crate::{reconcile::Reconciler, state::DesiredState};

pub use kernel::{KernelCollector, KernelMaps, View};
pub use server::MetricsServer;

/// Where the agent serves metrics unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";

/// The content type of `/metrics` (prometheus-client's text encoder).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub const PATH_METRICS: &str = "/metrics";
pub const PATH_HEALTHZ: &str = "/healthz";
pub const PATH_READYZ: &str = "/readyz";

/// The commit the agent was built from (`unknown` outside a git checkout).
pub const GIT_COMMIT: &str = match option_env!("MESH_GIT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// How often the data-plane runtime proves it still runs (`/healthz`).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// `/healthz` fails once the data-plane runtime has been silent this long.
const LIVENESS_STALE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for metrics on {addr}: {source}; is another mesh-agent running? Choose another --metrics-addr (port 0 picks a free one) or `--metrics-addr off`"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot open pinned map {path} for metrics: {source}")]
    Map {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// `--metrics-addr`: an address to listen on, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse().map(|a| Self(Some(a))).map_err(|e| {
            format!("{s}: {e}; expected IP:PORT (e.g. {DEFAULT_ADDR}, [::1]:9464) or `off`")
        })
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("off"),
        }
    }
}

/// The agent's metrics: every subsystem's, registered once at start.
pub struct Metrics {
    pub reconcile: reconcile::Metrics,
    pub health: health::Metrics,
    pub kernel: Arc<KernelCollector>,
    pub tunnel: crate::tunnel::TunnelMetrics,
    pub identity: crate::identity::IdentityMetrics,
    pub kubernetes: crate::source::kubernetes::KubeMetrics,
    /// Standing disagreements between source, agent and kernel (`diff.rs`).
    pub diff: std::sync::Mutex<crate::diff::Tracker>,
    probes: Probes,
    registry: Registry,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        registry.register(
            "mesh_build",
            "The agent's version and the commit it was built from",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("git_commit", GIT_COMMIT),
            ]),
        );
        let reconcile = reconcile::Metrics::new(&mut registry);
        let health = health::Metrics::new(&mut registry);
        let tunnel = crate::tunnel::TunnelMetrics::new(&mut registry);
        let identity = crate::identity::IdentityMetrics::new(&mut registry);
        let kubernetes = crate::source::kubernetes::KubeMetrics::new(&mut registry);
        let diff = std::sync::Mutex::new(crate::diff::Tracker::new(&mut registry));
        let kernel = Arc::new(KernelCollector::default());
        health.list_from(kernel.clone());
        registry.register_collector(Box::new(kernel.clone()));
        Self {
            reconcile,
            health,
            kernel,
            tunnel,
            identity,
            kubernetes,
            diff,
            probes: Probes::new(),
            registry,
        }
    }

    /// The OpenMetrics text of every family, read now.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Records a configuration that reached the kernel: counts the reload,
    /// publishes what the kernel's ids now mean, and starts every new
    /// backend healthy (dropping removed ones).
    pub fn applied(&self, desired: &DesiredState, reconciler: &Reconciler) {
        self.reconcile.reload(true);
        let Some(capacity) = self.kernel.capacity() else {
            return;
        };
        let view = View::build(desired, reconciler, capacity);
        self.health.sync_backends(
            view.backends
                .iter()
                .map(|b| health::BackendLabels::new(&b.service, &b.backend)),
        );
        self.kernel.publish(view);
    }

    /// Counts an applied reload. What the kernel's ids mean is read from
    /// the view source on each scrape (see `KernelCollector::set_source`),
    /// so nothing per service or backend happens here.
    pub fn applied_lazily(&self) {
        self.reconcile.reload(true);
    }

    /// Records a configuration that was refused (parse, validation or
    /// map write); the previous one keeps serving.
    pub fn refused(&self) {
        self.reconcile.reload(false);
    }

    /// Marks the agent ready: its first configuration reached the kernel.
    pub fn set_ready(&self) {
        self.probes.ready.store(true, Ordering::Release);
    }

    /// A condition that keeps the agent unready while it holds (the
    /// source's watches failing for too long), besides the first apply.
    pub fn add_readiness_check(&self, check: ReadinessCheck) {
        let _ = self.probes.check.set(check);
    }

    /// Ready, or why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.is_ready() {
            return Err("no configuration has reached the kernel yet".to_owned());
        }
        self.probes.check.get().map_or(Ok(()), |check| check())
    }

    pub fn is_ready(&self) -> bool {
        self.probes.ready.load(Ordering::Acquire)
    }

    /// Records that the data-plane runtime is alive.
    pub fn beat(&self) {
        self.probes.beat();
    }

    /// How long since the data-plane runtime last proved it runs.
    pub fn silent_for(&self) -> Duration {
        self.probes.silent_for()
    }

    /// Liveness: the data-plane runtime answered within the last 10 s.
    pub fn is_live(&self) -> bool {
        self.silent_for() < LIVENESS_STALE
    }

    /// Beats every second on the calling (data-plane) runtime, forever, so
    /// `/healthz` fails when that runtime stops making progress.
    pub fn spawn_heartbeat(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(HEARTBEAT);
            loop {
                ticker.tick().await;
                metrics.beat();
            }
        })
    }

    /// Binds `addr` now (errors surface here) and serves `/metrics`,
    /// `/healthz` and `/readyz` on a thread with its own runtime until the
    /// returned server is dropped. The listener carries `socket_mark`, so
    /// the agent's own programs leave scrapes alone.
    pub fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
        socket_mark: u32,
    ) -> Result<MetricsServer, MetricsError> {
        server::start(self.clone(), addr, socket_mark)
    }
}

/// A readiness condition: Err says why the agent is not ready.
pub type ReadinessCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Readiness and liveness state, read by the probe endpoints.
struct Probes {
    ready: AtomicBool,
    check: std::sync::OnceLock<ReadinessCheck>,
    start: Instant,
    /// Milliseconds after `start` of the last heartbeat.
    last_beat_ms: AtomicU64,
}

impl Probes {
    fn new() -> Self {
        Self {
            ready: AtomicBool::new(false),
            check: std::sync::OnceLock::new(),
            start: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
        }
    }

    fn beat(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_beat_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_parses_addresses_and_off() {
        assert_eq!(
            "127.0.0.1:9464".parse::<MetricsAddr>().unwrap(),
            MetricsAddr(Some("127.0.0.1:9464".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:0".parse::<MetricsAddr>().unwrap().to_string(),
            "[::1]:0"
        );
        assert_eq!("off".parse::<MetricsAddr>().unwrap(), MetricsAddr(None));
        assert_eq!("OFF".parse::<MetricsAddr>().unwrap().to_string(), "off");
        let err = "9464".parse::<MetricsAddr>().unwrap_err();
        assert!(err.contains("expected IP:PORT"), "{err}");
        assert!(DEFAULT_ADDR.parse::<MetricsAddr>().is_ok());
    }

    #[test]
    fn build_info_and_every_agent_family_are_encoded() {
        let metrics = Metrics::new();
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("# TYPE mesh_build info\n"),
            "build info is an info metric: {text}"
        );
        assert!(text.contains(&format!(
            "mesh_build_info{{version=\"{}\",git_commit=\"{GIT_COMMIT}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        for family in [
            "# TYPE mesh_reconcile_duration_seconds histogram",
            "# TYPE mesh_config_reloads counter",
            "mesh_config_reloads_total{result=\"success\"} 0",
            "mesh_config_reloads_total{result=\"failure\"} 0",
            "# TYPE mesh_config_last_reload_success_timestamp_seconds gauge",
            "# TYPE mesh_sockets_destroyed counter",
            "# TYPE mesh_service_connections counter",
            "# TYPE mesh_redirect_bytes counter",
            "# UNIT mesh_redirect_bytes bytes",
            "# TYPE mesh_map_entries gauge",
        ] {
            assert!(text.contains(family), "missing `{family}` in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // Families of labelled samples appear with their first sample.
        assert!(!text.contains("mesh_backend_health"), "{text}");
    }

    #[test]
    fn readiness_and_liveness() {
        let metrics = Metrics::new();
        assert!(!metrics.is_ready());
        metrics.set_ready();
        assert!(metrics.is_ready());
        metrics.beat();
        assert!(metrics.is_live());
        assert!(metrics.silent_for() < Duration::from_secs(1));
    }
}
