//! What the admin API reads of the agent: status, services, tunnels,
//! certificates, events, explain and authorization checks.

use std::path::Path;
use std::time::Instant;

use mesh_common::Event;

use super::{EVENTS_KEPT, Shared};
use crate::admin::{
    self, BackendView, EventsResponse, ServiceView, ServicesResponse, StatusResponse,
};
use crate::bpf::LogSites;
use crate::events::{self, EventFilter};
use crate::explain::{self, ExplainError, ExplainResponse};
use crate::overrides::{Action, OverrideError};
use crate::reconcile::service_keys;
use crate::tunnel::NodeTunnel;
use tracing::info;

impl Shared {
    pub fn status(&self) -> StatusResponse {
        let (kernel_debug_log, sites) = {
            let switch = self.debug_log();
            (switch.enabled(), switch.sites())
        };
        let inner = self.lock();
        StatusResponse {
            ready: inner.reloads.generation > 0,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_path: inner.source.describe(),
            config_generation: inner.reloads.generation,
            reloads_ok: inner.reloads.ok,
            reloads_failed: inner.reloads.failed,
            last_reload_error: inner.reloads.last_error.clone(),
            last_reload_unix_ms: inner.reloads.last_unix_ms,
            sockets_destroyed: inner.reloads.sockets_destroyed,
            panic_services: inner.overlays.panicking.clone(),
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
        let node = self.lock().overlays.placement.node.clone();
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
        let node = &inner.overlays.placement.node;
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
                    mtls: svc.mtls_mode(&inner.overlays.placement.mesh).to_string(),
                    origin: svc.origin.clone(),
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
                                .overlays
                                .health
                                .health(&svc.name, b.socket_addr(), Instant::now())
                                .as_str()
                                .to_owned(),
                            health_transitions: inner
                                .overlays
                                .health
                                .transitions(&svc.name, b.socket_addr()),
                            overridden: inner
                                .overlays
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

    pub(super) fn record_events(&self, batch: Vec<Event>) {
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
            inner.overlays.overrides.set_in(
                inner.source.current().iter(),
                backend,
                service,
                action,
            )?
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
                node: &inner.overlays.placement.node,
                trust_domain: &trust_domain,
            },
        )
    }
}
