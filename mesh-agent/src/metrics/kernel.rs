//! The kernel's counters as Prometheus families, read from the per-CPU maps
//! at scrape time by a prometheus-client [`Collector`]: values are exact,
//! nothing is copied on a timer, and the programs pay nothing extra.
//!
//! The collector opens its own handles on the pinned maps, so a scrape
//! never waits for the agent's state lock. What ids mean (service names,
//! backend addresses, states) comes from a [`View`] the agent publishes
//! after every apply; a scrape only clones an `Arc` under a lock.

use std::{
    fmt,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use mesh_common::{
    BackendId, BackendStats, InboundStats, PROTO_TCP, PROTO_UDP, RedirectStats, ServiceStats,
    inbound_map_names, map_names, redirect_map_names,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use super::MetricsError;
use crate::{
    bpf::sum_over_cpus,
    reconcile::{Capacity, Reconciler, service_keys},
    state::{BackendState, DesiredState, Service},
};

/// Read-only handles on the maps the collector reads, opened from their pins.
pub struct KernelMaps {
    service_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    active: Array<MapData, u64>,
    redirect: PerCpuArray<MapData, RedirectStats>,
    inbound: PerCpuArray<MapData, InboundStats>,
}

impl fmt::Debug for KernelMaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelMaps").finish_non_exhaustive()
    }
}

impl KernelMaps {
    /// Opens the counters pinned under `maps_dir` (`<bpffs>/v1/maps`).
    pub fn open(maps_dir: &Path) -> Result<Self, MetricsError> {
        fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
            maps_dir: &Path,
            name: &str,
        ) -> Result<T, MetricsError> {
            let path = maps_dir.join(name);
            let error = |source| MetricsError::Map {
                path: path.display().to_string(),
                source,
            };
            let data = MapData::from_pin(&path).map_err(error)?;
            Map::from_map_data(data)
                .and_then(T::try_from)
                .map_err(error)
        }
        Ok(Self {
            service_stats: open(maps_dir, map_names::SERVICE_STATS)?,
            backend_stats: open(maps_dir, map_names::BACKEND_STATS)?,
            active: open(maps_dir, map_names::ACTIVE)?,
            redirect: open(maps_dir, redirect_map_names::REDIRECT_STATS)?,
            inbound: open(maps_dir, inbound_map_names::INBOUND_STATS)?,
        })
    }

    fn service(&self, id: u32) -> ServiceStats {
        sum_over_cpus(&self.service_stats, id)
    }

    fn backend(&self, id: BackendId) -> (BackendStats, u64) {
        let active = self.active.get(&id, 0).unwrap_or(0);
        (sum_over_cpus(&self.backend_stats, id), active)
    }

    fn redirect(&self) -> RedirectStats {
        sum_over_cpus(&self.redirect, 0)
    }

    fn inbound(&self, id: u32) -> InboundStats {
        sum_over_cpus(&self.inbound, id)
    }
}

/// One kernel service entry: a service on one protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub service: String,
    pub protocol: &'static str,
    pub id: u32,
}

/// One backend of one service, over all of the service's protocols (a
/// `both` service has a backend id per protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub service: String,
    /// `ip:port`, `[ip]:port` for IPv6.
    pub backend: String,
    pub state: BackendState,
    pub ids: Vec<BackendId>,
}

/// Entries the agent wrote to a map, and what the map holds at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// What the kernel's ids mean, as of the last apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub services: Vec<ServiceEntry>,
    pub backends: Vec<BackendEntry>,
    pub maps: Vec<MapFill>,
}

fn protocol_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "other",
    }
}

impl View {
    /// The view of what `reconciler` programmed for `desired`. Map entries
    /// come from the reconciler's record, which mirrors the maps (counting
    /// a hash map's entries in the kernel would take one syscall each).
    pub fn build(desired: &DesiredState, reconciler: &Reconciler, capacity: Capacity) -> Self {
        Self::build_from(desired.services.iter(), reconciler, capacity)
    }

    /// The same from services in name order.
    pub fn build_from<'a>(
        services: impl Iterator<Item = &'a Service>,
        reconciler: &Reconciler,
        capacity: Capacity,
    ) -> Self {
        let mut view = View::default();
        for svc in services {
            let programmed: Vec<_> = service_keys(svc)
                .filter_map(|key| reconciler.service(&key).map(|p| (key, p)))
                .collect();
            for (key, p) in &programmed {
                view.services.push(ServiceEntry {
                    service: svc.name.clone(),
                    protocol: protocol_name(key.proto),
                    id: p.id(),
                });
            }
            for b in &svc.backends {
                let ids: Vec<BackendId> = programmed
                    .iter()
                    .filter_map(|(_, p)| p.backends.get(&(b.address, b.port)).copied())
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                view.backends.push(BackendEntry {
                    service: svc.name.clone(),
                    backend: b.socket_addr().to_string(),
                    state: b.state,
                    ids,
                });
            }
        }
        let (mut services, mut backends, mut slots) = (0u64, 0u64, 0u64);
        for (_, p) in reconciler.services() {
            services += 1;
            backends += p.backends.len() as u64;
            slots += p.slots.len() as u64;
        }
        view.maps = vec![
            MapFill {
                map: map_names::SERVICES,
                entries: services,
                capacity: capacity.services.into(),
            },
            MapFill {
                map: map_names::BACKENDS,
                entries: backends,
                capacity: capacity.backends.into(),
            },
            MapFill {
                map: map_names::SLOTS,
                entries: slots,
                capacity: capacity.slots.into(),
            },
        ];
        view
    }
}

/// Builds the view when a scrape needs it (from the agent's state).
pub type ViewSource = Box<dyn Fn() -> Option<View> + Send + Sync>;

/// Reads the kernel's counters on every scrape.
#[derive(Default)]
pub struct KernelCollector {
    maps: OnceLock<KernelMaps>,
    capacity: OnceLock<Capacity>,
    view: Mutex<Arc<View>>,
    /// When set, the view is built on each scrape instead of on each apply:
    /// an apply then costs nothing here, however many services there are.
    source: OnceLock<ViewSource>,
}

impl fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelCollector").finish_non_exhaustive()
    }
}

impl KernelCollector {
    /// Gives the collector its map handles and the maps' capacity, once the
    /// data path is loaded. Until then it reports families without samples;
    /// a second call changes nothing.
    pub fn attach(&self, maps: KernelMaps, capacity: Capacity) {
        let _ = self.maps.set(maps);
        let _ = self.capacity.set(capacity);
    }

    /// The maps' capacity, once attached.
    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity.get().copied()
    }

    /// Publishes what the ids mean after an apply.
    pub fn publish(&self, view: View) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
    }

    pub fn view(&self) -> Arc<View> {
        if let Some(view) = self.source.get().and_then(|source| source()) {
            return Arc::new(view);
        }
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Builds the view from `source` on every scrape from now on.
    pub fn set_source(&self, source: ViewSource) {
        let _ = self.source.set(source);
    }
}

/// A family of constant samples, each `(labels, value)`.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A family of one unlabelled sample, or of none when `value` is None.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    value: Option<M>,
) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    match value {
        Some(value) => value.encode(metric),
        None => Ok(()),
    }
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let view = self.view();
        let maps = self.maps.get();

        // Per service and protocol.
        let services: Vec<_> = view
            .services
            .iter()
            .map(|s| {
                let stats = maps.map(|m| m.service(s.id)).unwrap_or_default();
                (
                    [("service", s.service.as_str()), ("protocol", s.protocol)],
                    stats,
                )
            })
            .collect();
        let service_counter = |encoder: &mut DescriptorEncoder,
                               name: &str,
                               help: &str,
                               value: fn(&ServiceStats) -> u64| {
            family(
                encoder,
                name,
                help,
                None,
                MetricType::Counter,
                services.iter().map(|(l, s)| (*l, counter(value(s)))),
            )
        };
        service_counter(
            &mut encoder,
            "mesh_service_connections",
            "TCP connections and connected UDP sockets the kernel balanced",
            |s| s.connections,
        )?;
        service_counter(
            &mut encoder,
            "mesh_service_udp_flows",
            "Unconnected UDP sockets the kernel balanced (one per socket)",
            |s| s.udp_flows,
        )?;
        service_counter(
            &mut encoder,
            "mesh_service_no_backend",
            "Connects refused at once because the service had no usable backend",
            |s| s.no_backend,
        )?;
        service_counter(
            &mut encoder,
            "mesh_service_policy_denials",
            "Connects refused by the service's L4 policy",
            |s| s.denied,
        )?;
        service_counter(
            &mut encoder,
            "mesh_service_tunnelled",
            "TCP connections the kernel sent to the local agent's mTLS tunnel (backend on another node)",
            |s| s.tunnelled,
        )?;
        service_counter(
            &mut encoder,
            "mesh_service_udp_direct_remote",
            "UDP sent directly to a backend on another node (HBONE carries TCP only)",
            |s| s.udp_direct_remote,
        )?;

        // Plaintext connections from other nodes to this node's backends,
        // by the service's TCP id (the ingress program's counters).
        let plaintext: Vec<_> = view
            .services
            .iter()
            .filter(|s| s.protocol == "tcp")
            .map(|s| {
                let stats = maps.map(|m| m.inbound(s.id)).unwrap_or_default();
                (s.service.as_str(), stats)
            })
            .collect();
        family(
            &mut encoder,
            "mesh_service_plaintext_connections",
            "Plaintext TCP connections from other nodes straight to this node's backends of the service (not through the tunnel): accepted (permissive) or refused in the kernel (strict); counted on the SYN",
            None,
            MetricType::Counter,
            plaintext.iter().flat_map(|(service, s)| {
                [("accepted", s.accepted), ("refused", s.refused)]
                    .map(|(verdict, v)| ([("service", *service), ("verdict", verdict)], counter(v)))
            }),
        )?;

        // Per backend, summed over the service's protocols.
        let backends: Vec<_> = view
            .backends
            .iter()
            .map(|b| {
                let (mut stats, mut active) = (BackendStats::default(), 0u64);
                for &id in &b.ids {
                    if let Some((s, a)) = maps.map(|m| m.backend(id)) {
                        stats.connections += s.connections;
                        stats.udp_flows += s.udp_flows;
                        active += a;
                    }
                }
                let labels = [
                    ("service", b.service.as_str()),
                    ("backend", b.backend.as_str()),
                ];
                (labels, b.state, stats, active)
            })
            .collect();
        family(
            &mut encoder,
            "mesh_backend_connections",
            "TCP connections and connected UDP sockets the kernel sent to this backend",
            None,
            MetricType::Counter,
            backends
                .iter()
                .map(|(l, _, s, _)| (*l, counter(s.connections))),
        )?;
        family(
            &mut encoder,
            "mesh_backend_udp_flows",
            "Unconnected UDP sockets the kernel sent to this backend",
            None,
            MetricType::Counter,
            backends
                .iter()
                .map(|(l, _, s, _)| (*l, counter(s.udp_flows))),
        )?;
        family(
            &mut encoder,
            "mesh_backend_active_connections",
            "TCP connections to this backend open right now (kept by sock_ops)",
            None,
            MetricType::Gauge,
            backends.iter().map(|(l, _, _, a)| (*l, gauge(*a))),
        )?;
        let states = [
            ("active", BackendState::Active),
            ("draining", BackendState::Draining),
        ];
        family(
            &mut encoder,
            "mesh_backend_state",
            "1 for the backend's current state (active: takes new connections; draining: only keeps existing ones), 0 for the others",
            None,
            MetricType::Gauge,
            backends
                .iter()
                .flat_map(|([service, backend], state, _, _)| {
                    states.iter().map(move |(name, s)| {
                        (
                            [*service, *backend, ("state", *name)],
                            gauge(u64::from(s == state)),
                        )
                    })
                }),
        )?;

        // Same-node redirect (one set of counters for the node).
        let r = maps.map(KernelMaps::redirect);
        let sockets = r.iter().flat_map(|r| {
            [
                ("added", r.sockets_added),
                ("failed", r.sockets_failed),
                ("skipped", r.sockets_skipped),
            ]
        });
        family(
            &mut encoder,
            "mesh_redirect_sockets",
            "ESTABLISHED sockets seen by same-node redirect: added to the sockhash, failed to be added, or skipped (an end not node-local, an excluded port or a backend of a service that opted out, switch off, an MPTCP subflow, the agent's own)",
            None,
            MetricType::Counter,
            sockets.map(|(result, v)| ([("result", result)], counter(v))),
        )?;
        let node_counter = |encoder: &mut DescriptorEncoder,
                            name: &str,
                            help: &str,
                            unit: Option<&Unit>,
                            value: fn(&RedirectStats) -> u64| {
            single(
                encoder,
                name,
                help,
                unit,
                MetricType::Counter,
                r.as_ref().map(|r| counter(value(r))),
            )
        };
        node_counter(
            &mut encoder,
            "mesh_redirect_messages",
            "Messages handed straight to the peer socket, skipping the TCP/IP stack",
            None,
            |r| r.msgs_redirected,
        )?;
        node_counter(
            &mut encoder,
            "mesh_redirect",
            "Bytes handed straight to the peer socket, skipping the TCP/IP stack",
            Some(&Unit::Bytes),
            |r| r.bytes_redirected,
        )?;
        node_counter(
            &mut encoder,
            "mesh_redirect_fallback_messages",
            "Messages of redirected sockets that went through TCP instead (peer not in the map, switch off)",
            None,
            |r| r.msgs_fallback,
        )?;
        node_counter(
            &mut encoder,
            "mesh_redirect_fallback",
            "Bytes of redirected sockets that went through TCP instead",
            Some(&Unit::Bytes),
            |r| r.bytes_fallback,
        )?;

        // Map fill levels.
        let fill = |encoder: &mut DescriptorEncoder,
                    name: &str,
                    help: &str,
                    value: fn(&MapFill) -> u64| {
            family(
                encoder,
                name,
                help,
                None,
                MetricType::Gauge,
                view.maps
                    .iter()
                    .map(|m| ([("map", m.map)], gauge(value(m)))),
            )
        };
        fill(
            &mut encoder,
            "mesh_map_entries",
            "Entries the agent has written to a kernel map",
            |m| m.entries,
        )?;
        fill(
            &mut encoder,
            "mesh_map_capacity",
            "Entries a kernel map can hold (--max-services, --max-backends, --max-slots)",
            |m| m.capacity,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn encode(collector: Arc<KernelCollector>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn unattached_collector_names_its_families_with_labels_from_the_view() {
        let collector = Arc::new(KernelCollector::default());
        let text = encode(collector.clone());
        for name in [
            "mesh_service_connections counter",
            "mesh_backend_state gauge",
            "mesh_redirect_bytes counter",
            "mesh_redirect_fallback_bytes counter",
            "mesh_map_capacity gauge",
            "mesh_service_plaintext_connections counter",
        ] {
            assert!(text.contains(&format!("# TYPE {name}\n")), "{name}: {text}");
        }
        assert!(!text.contains("mesh_redirect_messages_total"), "{text}");

        collector.publish(View {
            services: vec![ServiceEntry {
                service: "dns".into(),
                protocol: "udp",
                id: 3,
            }],
            backends: vec![BackendEntry {
                service: "dns".into(),
                backend: "[::1]:53".into(),
                state: BackendState::Draining,
                ids: vec![4, 5],
            }],
            maps: vec![MapFill {
                map: map_names::SLOTS,
                entries: 7,
                capacity: 1 << 20,
            }],
        });
        let text = encode(collector);
        for line in [
            "mesh_service_connections_total{service=\"dns\",protocol=\"udp\"} 0\n",
            "mesh_backend_connections_total{service=\"dns\",backend=\"[::1]:53\"} 0\n",
            "mesh_backend_state{service=\"dns\",backend=\"[::1]:53\",state=\"active\"} 0\n",
            "mesh_backend_state{service=\"dns\",backend=\"[::1]:53\",state=\"draining\"} 1\n",
            "mesh_map_entries{map=\"MESH_SLOTS\"} 7\n",
            "mesh_map_capacity{map=\"MESH_SLOTS\"} 1048576\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // Plaintext counts are kept for TCP only.
        assert!(
            !text.contains("mesh_service_plaintext_connections_total{"),
            "{text}"
        );
    }

    #[test]
    fn protocol_names() {
        assert_eq!(protocol_name(PROTO_TCP), "tcp");
        assert_eq!(protocol_name(PROTO_UDP), "udp");
        assert_eq!(protocol_name(1), "other");
    }
}
