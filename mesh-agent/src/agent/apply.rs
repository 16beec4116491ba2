//! One apply, as a pipeline: the source's change → the desired model →
//! the overlays (`overlay.rs`) → the reconciler's map writes → what follows
//! from the applied state (strict-mTLS maps, the tunnel's view, health
//! metrics, sockets of removed backends). Only services that changed are
//! planned and written: the kernel keeps the others as they are, with no
//! new generation.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{AgentError, Inner, Shared, TRIM_AFTER, unix_ms};
use crate::bpf;
use crate::destroy;
use crate::overlay::{Plan, SourceView};
use crate::placement::Placement;
use crate::reconcile::{ApplyReport, Reconciler};
use crate::source::{Changed, SourceError, Update};
use crate::state::{Service, ServiceSet, Workload};
use crate::tunnel::TunnelView;

impl Shared {
    /// Reads the kernel's connect failures; true when an ejection started or
    /// ended, so the state must be applied again.
    pub(super) fn observe_outliers(&self) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let overlays = &mut inner.overlays;
        let watched = inner.desired.subset(&overlays.health_watch);
        overlays.health.observe_outliers(
            &watched,
            &inner.reconciler,
            &mut inner.maps,
            Instant::now(),
        )
    }

    /// True when a draining backend is due for removal.
    pub(super) fn drain_expired(&self) -> bool {
        self.lock().overlays.draining.has_expired(Instant::now())
    }

    /// Applies the last accepted state again to `services` (after an
    /// override), and to every service a drain or backend health may have
    /// changed; the others are not looked at.
    pub(super) fn reapply(&self, services: BTreeSet<String>) {
        let mut inner = self.lock();
        self.apply(&mut inner, Ok(None), services);
    }

    /// Reads what `changed` names of the source again and applies what
    /// differs.
    pub(super) fn reload(&self, changed: &Changed) {
        let mut inner = self.lock();
        let started = Instant::now();
        let Some(update) = inner.source.load(changed) else {
            return;
        };
        inner.load_time = started.elapsed();
        self.apply(&mut inner, update.map(Some), BTreeSet::new());
    }

    /// Applies a change of the source (None: none) plus anything due in
    /// `services`, or records why it was refused.
    fn apply(
        &self,
        inner: &mut MutexGuard<'_, Inner>,
        update: Result<Option<Update>, SourceError>,
        services: BTreeSet<String>,
    ) {
        let inner = &mut **inner;
        let started = Instant::now();
        let result = update
            .map_err(AgentError::from)
            .and_then(|update| self.apply_update(inner, update.unwrap_or_default(), services));
        self.record(inner, result, started);
    }

    fn apply_update(
        &self,
        inner: &mut Inner,
        update: Update,
        mut due: BTreeSet<String>,
    ) -> Result<ApplyReport, AgentError> {
        if update.services.len() >= 256 {
            // Reading a large change left garbage behind; hand it back
            // before the plan takes its own memory.
            release_free_memory();
        }
        let now = Instant::now();
        let Inner {
            desired,
            source,
            overlays,
            reconciler,
            maps,
            inbound,
            ..
        } = inner;
        let view = SourceView {
            current: source.current(),
            update: &update,
        };
        // What to look at: the source's changes, and whatever else is due.
        due.extend(overlays.due(now));
        if update.workloads.is_some() || update.mesh.is_some() {
            // Identities, and so any policy, may have changed; or where
            // backends are, and so which are tunnelled.
            due.extend(desired.services.keys().cloned());
            due.extend(view.current.services.keys().cloned());
        }
        let dirty: BTreeSet<&str> = update
            .services
            .keys()
            .chain(due.iter())
            .map(String::as_str)
            .collect();
        let plan = overlays.plan(desired, view, &dirty, now);
        let changes = plan.changes(desired);
        let workloads = update
            .workloads
            .clone()
            .unwrap_or_else(|| view.current.workloads.clone());
        let report = self
            .redirect
            .around_service_changes(changes.iter().copied(), || {
                if changes.is_empty() && update.workloads.is_none() {
                    return Ok(ApplyReport::default());
                }
                self.metrics
                    .reconcile
                    .time_apply(|| reconciler.apply_changes(&changes, &workloads, maps))
                    .map_err(AgentError::from)
            })?;
        // Accepted: what follows from it is worked out before the plan is
        // taken apart.
        let follow = FollowUp::of(&update, &changes, &plan, &dirty, &self.metrics);
        drop(changes);
        // The layers, the applied state and the source follow.
        for (name, new) in overlays.commit(plan, view) {
            match new {
                Some(svc) => {
                    desired.services.insert(name.to_owned(), svc);
                }
                None => {
                    desired.services.remove(name);
                }
            }
        }
        if update.workloads.is_some() {
            self.redirect_workload_addresses(&workloads, &overlays.placement.node);
        }
        desired.workloads = workloads;
        drop(dirty);
        source.commit(update);
        sync_inbound(
            inbound,
            (desired, reconciler, &overlays.placement),
            follow.inbound_names.as_deref(),
            &report.new_service_ids,
        );
        if let Some(tunnel) = &self.tunnel
            && follow.placement_changed
        {
            tunnel.update(TunnelView {
                services: desired,
                mesh: &overlays.placement.mesh,
                workloads: &desired.workloads,
                identities: reconciler.identities(),
            });
        }
        for name in &follow.health_metrics {
            let Some(svc) = desired.get(name) else {
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
                let health = overlays.health.health(&svc.name, b.socket_addr(), now);
                self.metrics.health.set_health(
                    &svc.name,
                    b.socket_addr(),
                    health == crate::health::Health::Healthy,
                );
            }
        }
        Ok(report)
    }

    /// Hands same-node redirect the addresses of this node's workloads.
    pub(super) fn redirect_workload_addresses(&self, workloads: &[Workload], node: &str) {
        let addresses = workloads
            .iter()
            .filter(|w| w.is_on(node))
            .flat_map(|w| w.addresses.iter().copied())
            .collect();
        if let Err(e) = self.redirect.lock().set_workload_addresses(addresses) {
            warn!("same-node redirect: {e}; the pods' addresses are retried on the next change");
        }
    }

    /// Records an apply's outcome for `meshctl status` and the log, and
    /// destroys the sockets of removed backends.
    fn record(&self, inner: &mut Inner, result: Result<ApplyReport, AgentError>, started: Instant) {
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

/// What an accepted apply changes beyond the service maps.
struct FollowUp {
    /// The tunnel's view changes only with a backend's address or node, a
    /// policy, the workloads or the mesh (not with health or weights).
    placement_changed: bool,
    /// Whose inbound entries to recompute (None: all, when the mesh's
    /// default mode may have changed).
    inbound_names: Option<Vec<String>>,
    /// Services whose backends' health metrics may change.
    health_metrics: Vec<String>,
}

impl FollowUp {
    fn of(
        update: &Update,
        changes: &[(Option<&Service>, Option<&Service>)],
        plan: &Plan<'_>,
        dirty: &BTreeSet<&str>,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        let placement_changed = update.mesh.is_some()
            || update.workloads.is_some()
            || changes.iter().any(|(old, new)| {
                placed(*old).ne(placed(*new)) || old.map(|s| &s.policy) != new.map(|s| &s.policy)
            });
        let inbound_names = update.mesh.is_none().then(|| {
            changes
                .iter()
                .filter_map(|(old, new)| new.or(*old).map(|s| s.name.clone()))
                .collect()
        });
        let recorded = metrics.health.recorded_services();
        let health_metrics = dirty
            .iter()
            .filter(|n| plan.watches(n) || recorded.binary_search_by(|r| r.as_str().cmp(n)).is_ok())
            .map(|n| n.to_string())
            .collect();
        Self {
            placement_changed,
            inbound_names,
            health_metrics,
        }
    }
}

/// Brings `MESH_INBOUND` and `MESH_NODE_ADDRS` in step with the applied
/// state: the services `names` (None: all) are recomputed, the node's
/// interface addresses re-read. A failure is logged and retried on the
/// next apply; the maps keep what they held.
pub(super) fn sync_inbound(
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
pub(super) fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
