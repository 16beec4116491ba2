//! The agent's main loop: load the data path, apply what the source says,
//! serve the admin API, and apply again when the source changes, a drain
//! ends, or backend health moves. `apply.rs` is one apply (source → model
//! → overlays → reconcile); `views.rs` is what the admin API reads.

mod apply;
mod diff;
mod views;

use apply::{release_free_memory, sync_inbound};

use std::{
    collections::{BTreeSet, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_common::{
    CONFIG_EVENTS, CONFIG_FLAG_DEBUG_LOG, CONFIG_FLAG_SAME_NODE_REDIRECT, ConfigValue, Event,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    admin,
    bpf::{self, BpfError, Datapath, MapSizes, Maps, PinLayout},
    events,
    health::HealthMonitor,
    kernel_log::{DebugLogSwitch, KernelDebugLog, KernelLogError},
    metrics::{KernelMaps, Metrics, MetricsError},
    overlay::Overlays,
    overlay::SourceView,
    placement::Placement,
    reconcile::{Capacity, ReconcileError, Reconciler},
    redirect::{Redirect, RedirectError, RedirectHandle, RedirectOptions},
    source::{Changes, Source, SourceError, SourceOptions, Update},
    state::ServiceSet,
    tunnel::{NodeTunnel, NodeTunnelError, TunnelSettings, TunnelView},
};

/// Default mark of the agent's own sockets ("MESH"); the programs skip them.
pub const DEFAULT_SOCKET_MARK: u32 = 0x4d45_5348;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Where the desired state comes from.
    pub source: SourceOptions,
    /// The cgroup whose sockets are balanced; the whole cgroup v2 tree when unset.
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub admin_socket: PathBuf,
    pub watch_interval: Duration,
    pub socket_mark: u32,
    pub map_sizes: MapSizes,
    /// Whether the kernel reports every decision on the event ring buffer.
    pub events: bool,
    /// Same-node redirect: switch and node-local addresses.
    pub redirect: RedirectOptions,
    /// Map layout version to pin under (the build's own unless testing an
    /// upgrade).
    pub schema_version: u32,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; None: nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Kernel-side debug logs (aya-log) at start; switchable at runtime
    /// unless `Never`.
    pub kernel_debug_log: KernelDebugLog,
    /// This node's name in the mesh (`nodes:`).
    pub node_name: String,
    /// The cross-node mTLS tunnel; None: off (no node identity given).
    pub tunnel: Option<TunnelSettings>,
}

/// The listener addresses as `MESH_CONFIG` holds them.
fn tunnel_kernel_config(tunnel: &TunnelSettings, config: &mut ConfigValue) {
    config.tunnel_v4 = u32::from_ne_bytes(tunnel.outbound_v4.ip().octets());
    config.tunnel_v6 = crate::reconcile::ip_to_words((*tunnel.outbound_v6.ip()).into()).0;
    // One port for both listeners (the kernel keeps one).
    config.tunnel_port = tunnel.outbound_v4.port().to_be();
}

/// How often the node's own addresses are re-read for same-node redirect.
const LOCAL_ADDR_REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{0}")]
    Bpf(#[from] BpfError),
    #[error("{0}")]
    Mount(#[from] bpf::MountError),
    #[error("{0}")]
    Reconcile(#[from] ReconcileError),
    #[error("{0}")]
    Admin(#[from] admin::AdminServerError),
    #[error("writing MESH_CONFIG failed: {0}")]
    ConfigMap(#[source] aya::maps::MapError),
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("cannot read this network namespace's cookie: {0}")]
    NetnsCookie(#[source] std::io::Error),
    #[error("cannot watch the event ring buffer: {0}")]
    Events(#[source] std::io::Error),
    #[error("same-node redirect: {0}")]
    Redirect(#[from] RedirectError),
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error("kernel debug log: {0}")]
    KernelLog(#[from] KernelLogError),
    #[error("tunnel: {0}")]
    Tunnel(#[from] NodeTunnelError),
}

/// State shared between the reload loop and the admin API.
pub struct Shared {
    inner: Mutex<Inner>,
    meta: Meta,
    redirect: RedirectHandle,
    metrics: Arc<Metrics>,
    debug_log: Mutex<DebugLogSwitch>,
    /// The cross-node tunnel, when this node has an identity.
    tunnel: Option<NodeTunnel>,
    /// The kernel's event ring, once the reader runs.
    event_ring: std::sync::OnceLock<events::Ring>,
}

struct Inner {
    /// What the kernel holds: the source with the overlays laid over it,
    /// by service name.
    desired: ServiceSet,
    /// Where the desired state comes from; `current()` is the last state
    /// accepted from it.
    source: Source,
    /// Drains, overrides, placement, health and tiers (`overlay.rs`).
    overlays: Overlays,
    /// How long the last load of the source took (for the log).
    load_time: Duration,
    /// Services changed since memory was last handed back.
    changed_since_trim: usize,
    reconciler: Reconciler,
    maps: Maps,
    reloads: ReloadStatus,
    /// The newest decision events with their sequence numbers, oldest first.
    events: VecDeque<(u64, Event)>,
    next_event: u64,
    /// Where the next slice of the kernel check starts (after this name).
    diff_cursor: Option<String>,
    /// Local backends of strict/permissive services (`bpf/ingress.rs`).
    inbound: bpf::Inbound,
}

/// Service changes after which freed memory is handed back to the system.
const TRIM_AFTER: usize = 256;

/// Every how many ticks the source's own view is compared with the
/// agent's state (`diff.rs`).
const SOURCE_CHECK_TICKS: u64 = 10;

/// How many decision events the agent keeps for `meshctl events`.
const EVENTS_KEPT: usize = 4096;

struct Meta {
    host_netns_cookie: u64,
    cgroup: String,
    bpffs: String,
    programs: Vec<String>,
    /// Where metrics are served (the bound port when asked for port 0).
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Default)]
struct ReloadStatus {
    generation: u64,
    sockets_destroyed: u64,
    ok: u64,
    failed: u64,
    last_error: Option<String>,
    last_unix_ms: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave maps half written (the
        // reconciler undoes its own writes), so the data is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn redirect(&self) -> &RedirectHandle {
        &self.redirect
    }

    /// The agent's metrics, e.g. for health checks to report backend health
    /// (`metrics().health.set_health(service, backend, healthy)`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Switches the kernel's debug logs. Holds the redirect lock too: both
    /// switches read-modify-write the same `MESH_CONFIG` word.
    pub fn set_debug_log(&self, on: bool) -> Result<(), KernelLogError> {
        let _redirect = self.redirect.lock();
        self.debug_log().set(on)?;
        info!(on, "kernel debug log switched");
        Ok(())
    }

    pub fn debug_log_enabled(&self) -> bool {
        self.debug_log().enabled()
    }

    fn debug_log(&self) -> MutexGuard<'_, DebugLogSwitch> {
        // Every write leaves the switch consistent, so a poisoned lock is usable.
        self.debug_log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs the agent until SIGTERM or SIGINT. Programs and maps stay pinned
/// when it returns, so traffic keeps flowing until the next agent starts;
/// `mesh-agent cleanup` removes them.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let cgroup = match &opts.cgroup {
        Some(path) => path.clone(),
        None => bpf::cgroup2_mount()?,
    };
    // Metrics and probes first, so /readyz says 503 until the config is in.
    let metrics = Arc::new(Metrics::new());
    let heartbeat = metrics.spawn_heartbeat();
    let metrics_server = match opts.metrics_addr {
        Some(addr) => {
            let server = metrics.serve(addr, opts.socket_mark)?;
            info!(addr = %server.addr(), "metrics on http://{}/metrics", server.addr());
            Some(server)
        }
        None => None,
    };
    // A bad file at start is fatal: there is no earlier state to keep
    // serving. The Kubernetes source returns once every kind is listed;
    // until then the pinned maps of an earlier agent keep serving, and
    // nothing is attached or changed.
    let (mut source, first) = Source::open(&opts.source, &metrics).await?;
    let changes = source.changes().map_err(AgentError::Signal)?;
    let pins = PinLayout::new(&opts.bpffs).with_version(opts.schema_version);
    let log_sites = opts.kernel_debug_log.log_sites();
    let Datapath {
        mut ebpf,
        mut maps,
        events: ring,
        attached,
    } = Datapath::load(&pins, &cgroup, opts.map_sizes, log_sites)?;
    let agent_config = ConfigValue {
        agent_mark: opts.socket_mark,
        // Both switches at once, so a restart never briefly turns one off.
        flags: if opts.events { CONFIG_EVENTS } else { 0 }
            | if opts.redirect.enabled {
                CONFIG_FLAG_SAME_NODE_REDIRECT
            } else {
                0
            }
            | if opts.kernel_debug_log == KernelDebugLog::On {
                CONFIG_FLAG_DEBUG_LOG
            } else {
                0
            },
        host_netns_cookie: events::own_netns_cookie().map_err(AgentError::NetnsCookie)?,
        ..ConfigValue::default()
    };
    let mut agent_config = agent_config;
    if let Some(tunnel) = &opts.tunnel {
        tunnel_kernel_config(tunnel, &mut agent_config);
    }
    maps.config
        .set(0, agent_config, 0)
        .map_err(AgentError::ConfigMap)?;
    let kernel_log_task = crate::kernel_log::forward(&mut ebpf)?;
    let debug_log = DebugLogSwitch::open(&pins.maps_dir(), log_sites)?;
    let redirect_maps = bpf::RedirectMaps::take_from(&mut ebpf).map_err(BpfError::from)?;
    let mut redirect_opts = RedirectOptions {
        workload_cgroup: Some(cgroup.clone()),
        ..opts.redirect.clone()
    };
    if let Some(tunnel) = &opts.tunnel {
        // The client's leg to the outbound listener stays on TCP: a reset
        // of a socket in the sockhash frees the bytes redirected into it
        // and not yet read (sk_psock_drop), so a client that writes and
        // resets would lose what a direct connection delivers.
        redirect_opts.exclude_ports.push(tunnel.outbound_v4.port());
    }
    let redirect = Redirect::start(redirect_maps, &pins.maps_dir(), redirect_opts)?;
    let capacity = Capacity::of(&maps);
    if (capacity.services, capacity.backends, capacity.slots)
        != (
            opts.map_sizes.services,
            opts.map_sizes.backends,
            opts.map_sizes.slots,
        )
    {
        warn!(
            ?capacity,
            "pinned maps from an earlier agent keep their sizes; new sizes apply after `mesh-agent cleanup`"
        );
    }
    let (health, health_changes) = HealthMonitor::new(opts.socket_mark);
    let placement = Placement {
        node: opts.node_name.clone(),
        tunnel_on: opts.tunnel.is_some(),
        mesh: Arc::default(),
    };
    let mut overlays = Overlays::new(placement, health);
    let desired = first_desired(&mut overlays, &mut source, first);
    metrics
        .kernel
        .attach(KernelMaps::open(&pins.maps_dir())?, capacity);
    let mut reconciler = Reconciler::recover(capacity, &mut maps).on_node(&opts.node_name);
    let mut inbound = bpf::Inbound::take_from(&mut ebpf).map_err(BpfError::from)?;
    let first_report =
        redirect.around_service_changes(desired.iter().map(|s| (None, Some(s))), || {
            metrics
                .reconcile
                .time_apply(|| reconciler.apply_set(desired.iter(), &desired.workloads, &mut maps))
                .map_err(AgentError::from)
        })?;
    sync_inbound(
        &mut inbound,
        (&desired, &reconciler, &overlays.placement),
        None,
        &first_report.new_service_ids,
    );
    let tunnel = match &opts.tunnel {
        Some(settings) => {
            let origins = bpf::TunnelOrigins::take_from(&mut ebpf).map_err(BpfError::from)?;
            let tunnel = NodeTunnel::start(
                settings,
                &opts.node_name,
                opts.socket_mark,
                origins,
                metrics.tunnel.clone(),
                metrics.identity.clone(),
            )?;
            tunnel.update(TunnelView {
                services: &desired,
                mesh: &overlays.placement.mesh,
                workloads: &desired.workloads,
                identities: reconciler.identities(),
            });
            Some(tunnel)
        }
        None => None,
    };
    metrics.applied_lazily();
    release_free_memory();
    metrics.set_ready();
    info!(
        cgroup = %cgroup.display(),
        bpffs = %opts.bpffs.display(),
        services = desired.len(),
        "data path attached"
    );
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            source,
            overlays,
            load_time: Duration::ZERO,
            changed_since_trim: 0,
            desired,
            reconciler,
            maps,
            reloads: ReloadStatus {
                generation: 1,
                ok: 1,
                last_unix_ms: unix_ms(),
                ..Default::default()
            },
            diff_cursor: None,
            events: VecDeque::with_capacity(EVENTS_KEPT),
            next_event: 0,
            inbound,
        }),
        meta: Meta {
            host_netns_cookie: agent_config.host_netns_cookie,
            cgroup: cgroup.display().to_string(),
            bpffs: opts.bpffs.display().to_string(),
            programs: attached.iter().map(|p| p.to_string()).collect(),
            metrics_addr: metrics_server.as_ref().map(|s| s.addr()),
        },
        redirect: redirect.clone(),
        metrics: metrics.clone(),
        debug_log: Mutex::new(debug_log),
        tunnel,
        event_ring: std::sync::OnceLock::new(),
    });
    // What the kernel's ids mean, built when Prometheus asks (not on each
    // apply, which would cost a pass over every backend).
    {
        let weak = Arc::downgrade(&shared);
        metrics.kernel.set_source(Box::new(move || {
            let shared = weak.upgrade()?;
            let capacity = shared.metrics.kernel.capacity()?;
            let inner = shared.lock();
            Some(crate::metrics::View::build_from(
                inner.desired.iter(),
                &inner.reconciler,
                capacity,
            ))
        }));
    }
    let events_task = {
        let shared = shared.clone();
        let mut reader = events::Reader::new(ring).map_err(AgentError::Events)?;
        let _ = shared.event_ring.set(reader.ring());
        tokio::spawn(async move {
            while reader.wait().await.is_ok() {
                events::drain_into(&reader.ring(), |batch| shared.record_events(batch));
            }
        })
    };
    {
        let inner = shared.lock();
        shared.redirect_workload_addresses(&inner.desired.workloads, &opts.node_name);
    }
    let refresher = redirect.spawn_refresher(LOCAL_ADDR_REFRESH);
    // An agent of another map layout left its programs attached; ours now
    // serve the full state beside them, so its socket state is carried over
    // and then its programs and maps go (upgrade/downgrade).
    for old in pins.other_versions() {
        let report = crate::migrate::upgrade_from(&old, &pins.maps_dir(), &cgroup);
        metrics.reconcile.migrated(report.carried());
    }
    let admin_task = admin::serve(&opts.admin_socket, shared.clone()).await?;
    info!(socket = %opts.admin_socket.display(), "ready");

    watch(&opts, &shared, changes, health_changes).await?;

    admin_task.abort();
    if let Some(tunnel) = &shared.tunnel {
        tunnel.shutdown().await;
    }
    events_task.abort();
    kernel_log_task.abort();
    refresher.abort();
    heartbeat.abort();
    drop(metrics_server);
    let _ = std::fs::remove_file(&opts.admin_socket);
    drop(ebpf);
    info!("stopped; programs stay attached through their pins (mesh-agent cleanup removes them)");
    Ok(())
}

/// The first desired state: the source's first load with the overlays laid
/// over every service, committed to both.
fn first_desired(overlays: &mut Overlays, source: &mut Source, first: Update) -> ServiceSet {
    let nothing = ServiceSet::default();
    let view = SourceView {
        current: &nothing,
        update: &first,
    };
    let dirty: BTreeSet<&str> = first.services.keys().map(String::as_str).collect();
    let plan = overlays.plan(&nothing, view, &dirty, Instant::now());
    let services = overlays
        .commit(plan, view)
        .into_iter()
        .filter_map(|(name, svc)| Some((name.to_owned(), svc?)))
        .collect();
    drop(dirty);
    source.commit(first);
    ServiceSet {
        services,
        workloads: source.current().workloads.clone(),
        mesh: source.current().mesh.clone(),
    }
}

/// Applies what the source says whenever it changes, a drain ends or a
/// backend's health moves; returns on SIGTERM or SIGINT.
async fn watch(
    opts: &AgentOptions,
    shared: &Shared,
    mut changes: Changes,
    mut health_changes: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> Result<(), AgentError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut ticker = tokio::time::interval(opts.watch_interval);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            changed = changes.next() => shared.reload(&changed),
            _ = ticker.tick() => {
                if shared.drain_expired() || shared.observe_outliers() {
                    info!("drain timeout over or backend ejected: applying again");
                    shared.reapply(BTreeSet::new());
                }
                shared.check_kernel_slice();
                ticks += 1;
                if ticks.is_multiple_of(SOURCE_CHECK_TICKS) {
                    shared.check_source().await;
                }
            }
            Some(()) = health_changes.recv() => {
                // One apply for a burst of health changes.
                while health_changes.try_recv().is_ok() {}
                shared.reapply(BTreeSet::new());
            }
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
