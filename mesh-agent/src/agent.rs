//! The agent's main loop: load the data path, apply the configuration, serve
//! the admin API, and reload on SIGHUP or when the file changes.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_common::{
    CONFIG_EVENTS, CONFIG_FLAG_DEBUG_LOG, CONFIG_FLAG_SAME_NODE_REDIRECT, ConfigValue, Event,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    admin::{self, BackendView, EventsResponse, ServiceView, ServicesResponse, StatusResponse},
    bpf::{self, BpfError, Datapath, LogSites, MapSizes, Maps, PinLayout},
    config::{ConfigError, ConfigSource, Scope, Update},
    destroy,
    drain::Draining,
    events::{self, EventFilter},
    explain::{self, ExplainError, ExplainResponse},
    health::HealthMonitor,
    kernel_log::{DebugLogSwitch, KernelDebugLog, KernelLogError},
    metrics::{KernelMaps, Metrics, MetricsError},
    overrides::{Action, OverrideError, Overrides},
    placement::Placement,
    reconcile::{ApplyReport, Capacity, ReconcileError, Reconciler, service_keys},
    redirect::{Redirect, RedirectError, RedirectHandle, RedirectOptions},
    state::{DesiredState, Service, ServiceSet},
    tunnel::{NodeTunnel, NodeTunnelError, TunnelSettings, TunnelView},
};

/// Default mark of the agent's own sockets ("MESH"); the programs skip them.
pub const DEFAULT_SOCKET_MARK: u32 = 0x4d45_5348;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub config: PathBuf,
    /// The cgroup whose sockets are balanced; the whole cgroup v2 tree when unset.
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub admin_socket: PathBuf,
    pub watch_interval: Duration,
    /// Watch the config with inotify (changes apply at once); the poll
    /// every `watch_interval` is the fallback.
    pub inotify: bool,
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
    Config(#[from] ConfigError),
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
    /// What the kernel holds: the source plus backends still draining,
    /// overrides and health, by service name.
    desired: ServiceSet,
    /// Where the configuration comes from; `current()` is the last
    /// configuration accepted from it.
    source: ConfigSource,
    /// Services whose effective state backend health can change (they
    /// have, or had, health checks or outlier detection).
    health_watch: BTreeSet<String>,
    /// How long the last load of the source took (for the log).
    load_time: Duration,
    /// Services changed since memory was last handed back.
    changed_since_trim: usize,
    draining: Draining,
    reconciler: Reconciler,
    maps: Maps,
    reloads: ReloadStatus,
    /// The newest decision events with their sequence numbers, oldest first.
    events: VecDeque<(u64, Event)>,
    next_event: u64,
    overrides: Overrides,
    health: HealthMonitor,
    /// Services whose backends are all unhealthy, served by panic mode.
    panicking: Vec<String>,
    /// Which backends this node reaches through the tunnel.
    placement: Placement,
    /// Local backends of strict/permissive services (`bpf/ingress.rs`).
    inbound: bpf::Inbound,
}

/// Service changes after which freed memory is handed back to the system.
const TRIM_AFTER: usize = 256;

/// How many decision events the agent keeps for `meshctl events`.
const EVENTS_KEPT: usize = 4096;

struct Meta {
    host_netns_cookie: u64,
    config_path: String,
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

    pub fn status(&self) -> StatusResponse {
        let (kernel_debug_log, sites) = {
            let switch = self.debug_log();
            (switch.enabled(), switch.sites())
        };
        let inner = self.lock();
        StatusResponse {
            ready: inner.reloads.generation > 0,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_path: self.meta.config_path.clone(),
            config_generation: inner.reloads.generation,
            reloads_ok: inner.reloads.ok,
            reloads_failed: inner.reloads.failed,
            last_reload_error: inner.reloads.last_error.clone(),
            last_reload_unix_ms: inner.reloads.last_unix_ms,
            sockets_destroyed: inner.reloads.sockets_destroyed,
            panic_services: inner.panicking.clone(),
            maps: inner
                .reconciler
                .fill()
                .into_iter()
                .map(|(name, entries, capacity)| admin::MapFill {
                    name: name.to_owned(),
                    entries,
                    capacity,
                })
                .collect(),
            cgroup: self.meta.cgroup.clone(),
            bpffs: self.meta.bpffs.clone(),
            programs: self.meta.programs.clone(),
            services: inner.desired.services.len(),
            metrics_addr: self.meta.metrics_addr.map(|a| a.to_string()),
            kernel_debug_log,
            kernel_log_sites_removed: sites == LogSites::Removed,
        }
    }

    pub fn tunnels(&self) -> admin::TunnelsResponse {
        let node = self.lock().placement.node.clone();
        admin::TunnelsResponse {
            node,
            enabled: self.tunnel.is_some(),
            certificate: self.tunnel.as_ref().map(|t| t.certificate()),
            peers: self
                .tunnel
                .as_ref()
                .map(|t| t.snapshot())
                .unwrap_or_default(),
        }
    }

    pub fn certs(&self) -> admin::CertsResponse {
        let td = self.trust_domain();
        let inner = self.lock();
        let node = &inner.placement.node;
        let workloads = match &self.tunnel {
            None => Vec::new(),
            Some(_) => inner
                .desired
                .workloads
                .iter()
                .filter(|w| w.is_on(node))
                .map(|w| admin::SpokenIdentity {
                    workload: w.name.clone(),
                    spiffe_id: crate::state::spiffe_id_of(&w.identity, &td),
                    cgroup: w.cgroup.display().to_string(),
                    claimable: w.is_hosted_by(node),
                })
                .collect(),
        };
        admin::CertsResponse {
            node: node.clone(),
            identities: self
                .tunnel
                .as_ref()
                .map(|t| t.identities())
                .unwrap_or_default(),
            workloads,
        }
    }

    pub fn services(&self) -> ServicesResponse {
        let inner = self.lock();
        let services = inner
            .desired
            .iter()
            .map(|svc| {
                // A `both` service has one kernel entry per protocol.
                let programmed: Vec<_> = service_keys(svc)
                    .filter_map(|key| inner.reconciler.service(&key))
                    .collect();
                let mut view = ServiceView {
                    name: svc.name.clone(),
                    vip: svc.vip,
                    port: svc.port,
                    protocol: svc.protocol.to_string(),
                    algorithm: svc.algorithm.to_string(),
                    affinity_timeout_s: svc.affinity_timeout_s,
                    same_node_redirect: svc.same_node_redirect,
                    connections: 0,
                    udp_flows: 0,
                    no_backend: 0,
                    denied: 0,
                    mtls: svc.mtls_mode(&inner.placement.mesh).to_string(),
                    tunnelled: 0,
                    udp_direct_remote: 0,
                    backends: Vec::new(),
                };
                for p in &programmed {
                    let stats = inner.maps.service_stats(p.id());
                    view.connections += stats.connections;
                    view.udp_flows += stats.udp_flows;
                    view.no_backend += stats.no_backend;
                    view.denied += stats.denied;
                    view.tunnelled += stats.tunnelled;
                    view.udp_direct_remote += stats.udp_direct_remote;
                }
                view.backends = svc
                    .backends
                    .iter()
                    .map(|b| {
                        let mut backend = BackendView {
                            address: b.address,
                            port: b.port,
                            weight: b.weight,
                            state: b.state.to_string(),
                            slots: 0,
                            connections: 0,
                            udp_flows: 0,
                            active: 0,
                            health: inner
                                .health
                                .health(&svc.name, b.socket_addr(), Instant::now())
                                .as_str()
                                .to_owned(),
                            health_transitions: inner
                                .health
                                .transitions(&svc.name, b.socket_addr()),
                            overridden: inner
                                .overrides
                                .get(&svc.name, b.socket_addr())
                                .map(|o| o.describe()),
                            node: b.node.clone(),
                            tunnel: b.tunnel,
                        };
                        for p in &programmed {
                            let Some(&id) = p.backends.get(&(b.address, b.port)) else {
                                continue;
                            };
                            let stats = inner.maps.backend_stats(id);
                            backend.slots += p.slots.iter().filter(|&&s| s == id).count() as u32;
                            backend.connections += stats.connections;
                            backend.udp_flows += stats.udp_flows;
                            backend.active += inner.maps.backend_active(id);
                        }
                        backend
                    })
                    .collect();
                view
            })
            .collect();
        ServicesResponse { services }
    }

    /// The newest `limit` decisions after sequence number `after`, of one
    /// service and one client if named.
    pub fn events(&self, filter: &EventFilter) -> EventsResponse {
        // Decisions still waiting in the ring count: a caller that just
        // made connections sees them.
        if let Some(ring) = self.event_ring.get() {
            events::drain_into(ring, |batch| self.record_events(batch));
        }
        let inner = self.lock();
        let names = events::Names::new(&inner.reconciler);
        let mut views: Vec<_> = inner
            .events
            .iter()
            .rev()
            .take_while(|(seq, _)| filter.after.is_none_or(|after| *seq > after))
            .filter(|(_, e)| {
                filter
                    .client
                    .is_none_or(|c| e.client == c || e.cgroup_id == c)
            })
            .map(|(seq, e)| names.view(*seq, e))
            .filter(|v| filter.service.as_ref().is_none_or(|s| &v.service == s))
            .take(filter.limit)
            .collect();
        views.reverse();
        EventsResponse {
            events: views,
            next: inner.next_event,
        }
    }

    fn record_events(&self, batch: Vec<Event>) {
        let mut inner = self.lock();
        for event in batch {
            if inner.events.len() == EVENTS_KEPT {
                inner.events.pop_front();
            }
            let seq = inner.next_event;
            inner.next_event += 1;
            inner.events.push_back((seq, event));
        }
    }

    /// Sets a runtime override and applies it at once.
    pub fn set_override(
        &self,
        backend: std::net::SocketAddr,
        service: Option<&str>,
        action: &Action,
    ) -> Result<Vec<String>, OverrideError> {
        let touched = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            inner
                .overrides
                .set_in(inner.source.current().iter(), backend, service, action)?
        };
        info!(%backend, ?action, services = ?touched, "runtime override");
        self.reapply(touched.iter().cloned().collect());
        Ok(touched)
    }

    /// `meshctl authz check`: `service`'s policy for `from`, as a
    /// destination of this node's trust domain evaluates it.
    pub fn authz_check(
        &self,
        service: &str,
        from: Option<&str>,
        node: Option<&str>,
    ) -> Result<crate::identity::AuthzCheck, ExplainError> {
        let inner = self.lock();
        let svc = inner
            .desired
            .get(service)
            .ok_or_else(|| ExplainError::UnknownService(service.to_owned()))?;
        Ok(crate::identity::authz::check(
            svc,
            &inner.desired.workloads,
            &self.trust_domain(),
            from,
            node,
        ))
    }

    fn trust_domain(&self) -> String {
        self.tunnel.as_ref().map_or_else(
            || crate::state::DEFAULT_TRUST_DOMAIN.to_owned(),
            NodeTunnel::trust_domain,
        )
    }

    pub fn explain(
        &self,
        service: &str,
        cgroup: Option<&Path>,
    ) -> Result<ExplainResponse, ExplainError> {
        let trust_domain = self.trust_domain();
        let inner = self.lock();
        explain::explain(
            &inner.desired,
            &inner.reconciler,
            &inner.maps,
            service,
            cgroup,
            self.meta.host_netns_cookie,
            &explain::Vantage {
                node: &inner.placement.node,
                trust_domain: &trust_domain,
            },
        )
    }

    /// Reads the kernel's connect failures; true when an ejection started or
    /// ended, so the state must be applied again.
    fn observe_outliers(&self) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let watched = inner.desired.subset(&inner.health_watch);
        inner
            .health
            .observe_outliers(&watched, &inner.reconciler, &mut inner.maps, Instant::now())
    }

    /// True when a draining backend is due for removal.
    fn drain_expired(&self) -> bool {
        self.lock().draining.has_expired(Instant::now())
    }

    /// Applies the last accepted configuration again to `services` (after
    /// an override), and to every service a drain or backend health may
    /// have changed; the others are not looked at.
    fn reapply(&self, services: BTreeSet<String>) {
        let mut inner = self.lock();
        self.apply(&mut inner, Ok(None), services);
    }

    /// Reads the configuration again (`scope`: all of it, or the files
    /// inotify named) and applies what changed.
    fn reload(&self, scope: &Scope) {
        let mut inner = self.lock();
        let started = Instant::now();
        let update = inner.source.load(scope);
        inner.load_time = started.elapsed();
        if matches!(&update, Ok(u) if u.is_empty()) && matches!(scope, Scope::Paths(_)) {
            // Nothing of ours changed (e.g. an editor's temporary file).
            return;
        }
        self.apply(&mut inner, update.map(Some), BTreeSet::new());
    }

    /// Applies a change of the source (None: none) plus anything due in
    /// `services`, or records why it was refused. Only services that
    /// changed are planned and written: the kernel keeps the others as
    /// they are, with no new generation.
    fn apply(
        &self,
        inner: &mut MutexGuard<'_, Inner>,
        update: Result<Option<Update>, ConfigError>,
        services: BTreeSet<String>,
    ) {
        let inner = &mut **inner;
        let started = Instant::now();
        let result = update.map_err(AgentError::from).and_then(|update| {
            let update = update.unwrap_or_default();
            if update.services.len() >= 256 {
                // Reading a large change left garbage behind; hand it back
                // before the plan takes its own memory.
                release_free_memory();
            }
            let now = Instant::now();
            // What to look at: the source's changes, and whatever else is due.
            let mut extra: BTreeSet<String> = services;
            extra.extend(inner.health_watch.iter().cloned());
            extra.extend(inner.draining.expired_services(now));
            if update.workloads.is_some() || update.mesh.is_some() {
                // Identities, and so any policy, may have changed; or where
                // backends are, and so which are tunnelled.
                extra.extend(inner.desired.services.keys().cloned());
                extra.extend(inner.source.current().services.keys().cloned());
            }
            let dirty: BTreeSet<&str> = update
                .services
                .keys()
                .chain(extra.iter())
                .map(String::as_str)
                .collect();
            let current = inner.source.current();
            let source_of = |name: &str| -> Option<&Arc<Service>> {
                match update.services.get(name) {
                    Some(new) => new.as_ref(),
                    None => current.get(name),
                }
            };
            let mut draining = inner.draining.clone();
            let placement = Placement {
                mesh: update.mesh.clone().unwrap_or_else(|| current.mesh.clone()),
                ..inner.placement.clone()
            };
            let mut effective: BTreeMap<&str, Option<Arc<Service>>> = BTreeMap::new();
            for &name in &dirty {
                let previous = inner.desired.get(name).map(|s| &**s);
                let merged = draining.merge_service(name, previous, source_of(name), now);
                let merged = merged
                    .map(|s| inner.overrides.overlay_service(s))
                    .map(|s| placement.overlay_service(s));
                effective.insert(name, merged);
            }
            let mut watch = inner.health_watch.clone();
            for (name, new) in &update.services {
                match new {
                    Some(svc) if svc.watches_health() => {
                        watch.insert(name.clone());
                    }
                    Some(_) => {}
                    None => {
                        watch.remove(name);
                    }
                }
            }
            // Health marks backends of the watched services unhealthy.
            let mut watched = DesiredState {
                services: watch
                    .iter()
                    .filter_map(|n| effective.get(n.as_str()).cloned().flatten())
                    .map(|s| (*s).clone())
                    .collect(),
                ..DesiredState::default()
            };
            let panicking = inner.health.overlay(&mut watched, now);
            for svc in watched.services {
                if let Some(slot) = effective.get_mut(svc.name.as_str()) {
                    *slot = Some(Arc::new(svc));
                }
            }
            let changes: Vec<(Option<&Service>, Option<&Service>)> = effective
                .iter()
                .map(|(name, new)| (inner.desired.get(name).map(|s| &**s), new.as_deref()))
                .filter(|(old, new)| old != new)
                .collect();
            let workloads = update
                .workloads
                .clone()
                .unwrap_or_else(|| current.workloads.clone());
            let report = self
                .redirect
                .around_service_changes(changes.iter().copied(), || {
                    if changes.is_empty() && update.workloads.is_none() {
                        return Ok(ApplyReport::default());
                    }
                    self.metrics
                        .reconcile
                        .time_apply(|| {
                            inner
                                .reconciler
                                .apply_changes(&changes, &workloads, &mut inner.maps)
                        })
                        .map_err(AgentError::from)
                })?;
            // The tunnel's view changes only with a backend's address or
            // node, a policy, the workloads or the mesh (not with health or
            // weights).
            let placement_changed = update.mesh.is_some()
                || update.workloads.is_some()
                || changes.iter().any(|(old, new)| {
                    placed(*old).ne(placed(*new))
                        || old.map(|s| &s.policy) != new.map(|s| &s.policy)
                });
            // Whose inbound entries to recompute (all when the mesh's
            // default mode may have changed).
            let inbound_names: Option<Vec<String>> = update.mesh.is_none().then(|| {
                changes
                    .iter()
                    .filter_map(|(old, new)| new.or(*old).map(|s| s.name.clone()))
                    .collect()
            });
            drop(changes);
            // Accepted: the source, health checks and overrides follow.
            let watched_source = DesiredState {
                services: watch
                    .iter()
                    .filter_map(|n| source_of(n))
                    .map(|s| (**s).clone())
                    .collect(),
                ..DesiredState::default()
            };
            inner.health.sync(&watched_source);
            for &name in &dirty {
                inner
                    .overrides
                    .prune_service(name, source_of(name).map(|s| &**s));
            }
            for (name, new) in effective {
                match (new, inner.desired.services.get_mut(name)) {
                    (Some(svc), Some(slot)) => *slot = svc,
                    (Some(svc), None) => {
                        inner.desired.services.insert(name.to_owned(), svc);
                    }
                    (None, _) => {
                        inner.desired.services.remove(name);
                    }
                }
            }
            watch.retain(|n| source_of(n).is_some());
            // Backends whose health metrics may change.
            let recorded = self.metrics.health.recorded_services();
            let metric_names: Vec<String> = dirty
                .iter()
                .filter(|n| {
                    watch.contains(**n) || recorded.binary_search_by(|r| r.as_str().cmp(n)).is_ok()
                })
                .map(|n| n.to_string())
                .collect();
            drop(dirty);
            inner.desired.workloads = workloads;
            inner.source.commit(update);
            inner.health_watch = watch;
            inner.draining = draining;
            inner.panicking = panicking;
            inner.placement = placement;
            sync_inbound(
                &mut inner.inbound,
                (&inner.desired, &inner.reconciler, &inner.placement),
                inbound_names.as_deref(),
                &report.new_service_ids,
            );
            if let Some(tunnel) = &self.tunnel
                && placement_changed
            {
                tunnel.update(TunnelView {
                    services: &inner.desired,
                    mesh: &inner.placement.mesh,
                    workloads: &inner.desired.workloads,
                    identities: inner.reconciler.identities(),
                });
            }
            for name in &metric_names {
                let Some(svc) = inner.desired.get(name) else {
                    self.metrics.health.forget(name, |_| false);
                    continue;
                };
                let addrs: BTreeSet<String> = svc
                    .backends
                    .iter()
                    .map(|b| b.socket_addr().to_string())
                    .collect();
                self.metrics.health.forget(name, |b| addrs.contains(b));
                for b in &svc.backends {
                    let health = inner.health.health(&svc.name, b.socket_addr(), now);
                    self.metrics.health.set_health(
                        &svc.name,
                        b.socket_addr(),
                        health == crate::health::Health::Healthy,
                    );
                }
            }
            Ok(report)
        });
        // After a large change (or many small ones, or a refusal, which may
        // have parsed a whole file), hand the memory it used back; a small
        // change reuses what the allocator keeps, which is faster.
        inner.changed_since_trim += result
            .as_ref()
            .map_or(TRIM_AFTER, |r| r.services_changed + r.services_removed);
        let big = inner.changed_since_trim >= TRIM_AFTER;
        let status = &mut inner.reloads;
        status.last_unix_ms = unix_ms();
        match result {
            Ok(report) => {
                self.metrics.applied_lazily();
                status.generation += 1;
                status.ok += 1;
                status.last_error = None;
                info!(
                    generation = status.generation,
                    load_ms = inner.load_time.as_secs_f64() * 1e3,
                    apply_ms = started.elapsed().as_secs_f64() * 1e3,
                    changed = report.services_changed,
                    removed = report.services_removed,
                    backends_added = report.backends_added,
                    backends_removed = report.removed_backends.len(),
                    "configuration applied"
                );
                if report.cleanup_failures > 0 {
                    warn!(
                        count = report.cleanup_failures,
                        "some stale map entries could not be deleted; retrying on the next reload"
                    );
                }
                if !report.removed_backends.is_empty() {
                    let cgroup = Path::new(&self.meta.cgroup);
                    match destroy::destroy_sockets(
                        cgroup,
                        &report.removed_backends,
                        &inner.maps.rev_nat,
                    ) {
                        Ok(0) => {}
                        Ok(n) => {
                            status.sockets_destroyed += n as u64;
                            self.metrics.reconcile.sockets_destroyed(n as u64);
                            info!(sockets = n, "destroyed sockets of removed backends");
                        }
                        Err(e) => warn!("could not destroy sockets of removed backends: {e}"),
                    }
                }
            }
            Err(e) => {
                self.metrics.refused();
                status.failed += 1;
                status.last_error = Some(e.to_string());
                error!(
                    "reload refused, still serving generation {}: {e}",
                    status.generation
                );
            }
        }
        inner.load_time = Duration::ZERO;
        if big {
            inner.changed_since_trim = 0;
            release_free_memory();
        }
    }
}

/// Brings `MESH_INBOUND` and `MESH_NODE_ADDRS` in step with the applied
/// state: the services `names` (None: all) are recomputed, the node's
/// interface addresses re-read. A failure is logged and retried on the
/// next apply; the maps keep what they held.
fn sync_inbound(
    inbound: &mut bpf::Inbound,
    (desired, reconciler, placement): (&ServiceSet, &Reconciler, &Placement),
    names: Option<&[String]>,
    new_service_ids: &[u32],
) {
    let contribution = |svc: &Service| {
        let id = bpf::tcp_service_id(svc, reconciler);
        bpf::contribution(svc, &placement.mesh, &placement.node, id)
    };
    match names {
        None => {
            inbound.clear_services();
            for svc in desired.iter() {
                inbound.set_service(&svc.name, Some(contribution(svc)));
            }
        }
        Some(names) => {
            for name in names {
                inbound.set_service(name, desired.get(name).map(|svc| contribution(svc)));
            }
        }
    }
    let interfaces = match crate::redirect::interface_addresses() {
        Ok(addrs) => addrs,
        Err(e) => {
            warn!("strict mTLS: {e}; the inbound maps stay as they are until the next apply");
            return;
        }
    };
    if let Err(e) = inbound.write(interfaces, new_service_ids) {
        warn!("strict mTLS: {e}; retrying on the next apply");
    }
}

/// Each backend of a service (if any) with its node: what the tunnel's
/// placement is built from.
fn placed(svc: Option<&Service>) -> impl Iterator<Item = (std::net::SocketAddr, Option<&str>)> {
    svc.into_iter()
        .flat_map(|s| &s.backends)
        .map(|b| (b.socket_addr(), b.node.as_deref()))
}

/// Hands memory freed by a large apply (parse trees, plans) back to the
/// system; glibc keeps it otherwise, and the agent's RSS would stay at its
/// peak.
fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the agent until SIGTERM or SIGINT. Programs and maps stay pinned
/// when it returns, so traffic keeps flowing until the next agent starts;
/// `mesh-agent cleanup` removes them.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    // A bad file at start is fatal: there is no earlier state to keep serving.
    let mut source = ConfigSource::new(&opts.config);
    let first = source.load(&Scope::All)?;
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
    let (mut health, health_changes) = HealthMonitor::new(opts.socket_mark);
    source.commit(first);
    let placement = Placement {
        node: opts.node_name.clone(),
        tunnel_on: opts.tunnel.is_some(),
        mesh: source.current().mesh.clone(),
    };
    let mut desired: ServiceSet = source.current().clone();
    for svc in desired.services.values_mut() {
        *svc = placement.overlay_service(svc.clone());
    }
    let health_watch: BTreeSet<String> = desired
        .iter()
        .filter(|s| s.watches_health())
        .map(|s| s.name.clone())
        .collect();
    health.sync(&desired.subset(&health_watch));
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
        (&desired, &reconciler, &placement),
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
                mesh: &placement.mesh,
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
            health_watch,
            load_time: Duration::ZERO,
            changed_since_trim: 0,
            draining: Draining::default(),
            desired,
            reconciler,
            maps,
            reloads: ReloadStatus {
                generation: 1,
                ok: 1,
                last_unix_ms: unix_ms(),
                ..Default::default()
            },
            events: VecDeque::with_capacity(EVENTS_KEPT),
            next_event: 0,
            overrides: Overrides::default(),
            health,
            panicking: Vec::new(),
            placement,
            inbound,
        }),
        meta: Meta {
            host_netns_cookie: agent_config.host_netns_cookie,
            config_path: opts.config.display().to_string(),
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

    watch(&opts, &shared, health_changes).await?;

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

/// Reloads on SIGHUP, when inotify reports a change of the config (a
/// directory: of its files), and whenever the poll sees the file's (or a
/// directory file's) size, times or inode change, which also catches the
/// symlink swap Kubernetes does for ConfigMaps; returns on SIGTERM or SIGINT.
async fn watch(
    opts: &AgentOptions,
    shared: &Shared,
    mut health_changes: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> Result<(), AgentError> {
    let path = opts.config.as_path();
    let mut hangup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut ticker = tokio::time::interval(opts.watch_interval);
    let is_dir = path.is_dir();
    let inotify = if opts.inotify {
        // A file is watched through its directory: editors and Kubernetes
        // replace files by renaming.
        let dir = if is_dir {
            path.to_owned()
        } else {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        };
        match crate::inotify::Inotify::watch(&dir) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(dir = %dir.display(), "inotify unavailable, polling every {:?}: {e}", opts.watch_interval);
                None
            }
        }
    } else {
        None
    };
    let mut last_stamp = file_stamp(path);
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                info!("SIGHUP: reloading {}", path.display());
                last_stamp = file_stamp(path);
                shared.reload(&Scope::All);
            }
            events = async { inotify.as_ref().expect("guarded").next().await }, if inotify.is_some() => {
                match events {
                    Ok(events) if events.overflow => shared.reload(&Scope::All),
                    Ok(events) if is_dir => {
                        if events.others {
                            shared.reload(&Scope::All);
                        } else if !events.paths.is_empty() {
                            shared.reload(&Scope::Paths(events.paths));
                        }
                    }
                    Ok(_) => {
                        let stamp = file_stamp(path);
                        if stamp != last_stamp {
                            info!("{} changed: reloading", path.display());
                            last_stamp = stamp;
                            shared.reload(&Scope::All);
                        }
                    }
                    Err(e) => warn!("reading inotify events failed: {e}"),
                }
            }
            _ = ticker.tick() => {
                let changed = if is_dir {
                    // Without inotify, a directory is scanned each tick
                    // (one stat per file; only changed files are read).
                    inotify.is_none()
                } else {
                    let stamp = file_stamp(path);
                    let changed = stamp != last_stamp;
                    last_stamp = stamp;
                    changed
                };
                if changed {
                    shared.reload(&Scope::All);
                } else if shared.drain_expired() || shared.observe_outliers() {
                    info!("drain timeout over or backend ejected: applying again");
                    shared.reapply(BTreeSet::new());
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

/// What tells whether a file changed without reading it (None: missing).
fn file_stamp(path: &Path) -> Option<(u64, i64, i64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
    ))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
