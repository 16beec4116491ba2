//! Whether the source's view, the agent's state and the kernel's maps agree
//! (`meshctl diff`, `mesh_state_disagreements`). Cilium #48050 served stale
//! backends for half an hour after an API server reconnect and nothing
//! noticed; here a check runs all the time and says how long any
//! disagreement has stood.
//!
//! Two comparisons, each per service:
//! - **source**: what the source holds now, translated afresh from its
//!   objects (Kubernetes), against what the agent last accepted from it;
//!   changes still in flight are not counted.
//! - **kernel**: the backends the agent's state says new connections may
//!   go to, against the slot table the kernel has live for each frontend,
//!   and frontends in the kernel the agent does not know.
//!
//! A disagreement seen in one check and gone in the next is lag; one that
//! stands is a bug, and its age is what the metric and `meshctl diff` show.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_common::SlotKey;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::bpf::Maps;
use crate::reconcile::{ip_from_words, service_keys};
use crate::state::{Service, ServiceSet};

/// Which two views disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// The source's objects against the agent's accepted state.
    Source,
    /// The agent's state against the kernel's maps.
    Kernel,
}

impl Layer {
    fn as_str(self) -> &'static str {
        match self {
            Layer::Source => "source",
            Layer::Kernel => "kernel",
        }
    }
}

/// One standing disagreement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disagreement {
    pub layer: Layer,
    pub service: String,
    pub detail: String,
    /// How long it has stood, in milliseconds (0: seen by this check only).
    pub age_ms: u64,
}

/// `GET /v1/diff`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiffResponse {
    /// Whether the source can be compared (the file source has no view of
    /// its own apart from what the agent accepted).
    pub source_compared: bool,
    pub services_checked: usize,
    pub disagreements: Vec<Disagreement>,
}

/// The kernel's side of each of `services`: the backends its live slot
/// table for every frontend can give a new connection, against those the
/// agent's state allows. Reads only the maps.
pub fn kernel<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    maps: &Maps,
) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for svc in services {
        let want: BTreeSet<SocketAddr> = svc
            .backends
            .iter()
            .filter(|b| b.effective_weight() > 0)
            .map(|b| b.socket_addr())
            .collect();
        for key in service_keys(svc) {
            let proto = if key.proto == mesh_common::PROTO_UDP {
                "udp"
            } else {
                "tcp"
            };
            let Some(have) = live_backends(maps, &key) else {
                found.push((
                    svc.name.clone(),
                    format!("{}/{proto} has no entry in MESH_SERVICES", svc.frontend()),
                ));
                continue;
            };
            let extra: Vec<_> = have.difference(&want).map(|a| a.to_string()).collect();
            let missing: Vec<_> = want.difference(&have).map(|a| a.to_string()).collect();
            if !extra.is_empty() {
                found.push((
                    svc.name.clone(),
                    format!(
                        "{}/{proto}: the kernel still sends to {} (not in the agent's state)",
                        svc.frontend(),
                        extra.join(", ")
                    ),
                ));
            }
            if !missing.is_empty() {
                found.push((
                    svc.name.clone(),
                    format!(
                        "{}/{proto}: the kernel never chooses {} (in the agent's state)",
                        svc.frontend(),
                        missing.join(", ")
                    ),
                ));
            }
        }
    }
    found
}

/// The backends of `key`'s live slot table (None: no such frontend). A
/// generation flip while reading is read again (a few times: a frontend
/// flipping without pause shows its last read).
fn live_backends(maps: &Maps, key: &mesh_common::ServiceKey) -> Option<BTreeSet<SocketAddr>> {
    let mut entry = maps.services.get(key, 0).ok()?;
    let mut have = BTreeSet::new();
    for _ in 0..3 {
        have.clear();
        for slot in 0..entry.slot_count {
            let slot = SlotKey {
                service_id: entry.service_id,
                generation: entry.generation,
                slot,
            };
            if let Ok(b) = maps
                .slots
                .get(&slot, 0)
                .and_then(|id| maps.backends.get(&id, 0))
            {
                have.insert(SocketAddr::new(
                    ip_from_words(b.family, b.addr),
                    u16::from_be(b.port),
                ));
            }
        }
        let now = maps.services.get(key, 0).ok()?;
        if now == entry {
            break;
        }
        entry = now;
    }
    Some(have)
}

/// The service name under which frontends no service has are filed.
pub const ORPHANS: &str = "-";

/// Frontends the kernel serves that no service of `desired` has, filed
/// under [`ORPHANS`].
pub fn kernel_orphans(desired: &ServiceSet, maps: &Maps) -> Vec<(String, String)> {
    let known: BTreeSet<_> = desired
        .iter()
        .flat_map(|s| service_keys(s).map(|k| (k.addr, k.port, k.proto, k.family)))
        .collect();
    maps.services
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !known.contains(&(k.addr, k.port, k.proto, k.family)))
        .map(|k| {
            let frontend = SocketAddr::new(ip_from_words(k.family, k.addr), u16::from_be(k.port));
            (
                ORPHANS.to_owned(),
                format!("{frontend} is in MESH_SERVICES but in no service of the agent's state"),
            )
        })
        .collect()
}

/// The source's view (`view`: every service as its objects say now)
/// against what the agent accepted from it; `in_flight` names services
/// with a change on its way.
pub fn source(
    view: &BTreeMap<String, Arc<Service>>,
    accepted: &ServiceSet,
    in_flight: &BTreeSet<String>,
) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (name, svc) in view {
        if in_flight.contains(name) {
            continue;
        }
        match accepted.get(name) {
            None => found.push((
                name.clone(),
                "in the source, not in the agent's state".to_owned(),
            )),
            Some(have) if **have != **svc => {
                let addrs = |s: &Service| -> BTreeSet<String> {
                    s.backends
                        .iter()
                        .map(|b| format!("{} {}", b.socket_addr(), b.state))
                        .collect()
                };
                let (want, got) = (addrs(svc), addrs(have));
                let detail = if want == got {
                    "settings differ between the source and the agent's state".to_owned()
                } else {
                    format!(
                        "backends: the source has [{}], the agent [{}]",
                        want.difference(&got)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        got.difference(&want)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                found.push((name.clone(), detail));
            }
            Some(_) => {}
        }
    }
    for name in accepted.services.keys() {
        if !view.contains_key(name) && !in_flight.contains(name) {
            found.push((
                name.clone(),
                "in the agent's state, no longer in the source".to_owned(),
            ));
        }
    }
    found
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    layer: &'static str,
}

/// Standing disagreements, with when each was first seen; the metrics.
pub struct Tracker {
    seen: BTreeMap<(Layer, String, String), Instant>,
    standing: Family<LayerLabels, Gauge>,
    oldest_ms: Family<LayerLabels, Gauge>,
    total: Family<LayerLabels, Counter>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("standing", &self.seen.len())
            .finish()
    }
}

impl Tracker {
    pub fn new(registry: &mut Registry) -> Self {
        let tracker = Self {
            seen: BTreeMap::new(),
            standing: Family::default(),
            oldest_ms: Family::default(),
            total: Family::default(),
        };
        let sub = registry.sub_registry_with_prefix("mesh_state");
        sub.register(
            "disagreements",
            "Disagreements standing now between the source and the agent's state (layer=source) or the agent's state and the kernel's maps (layer=kernel)",
            tracker.standing.clone(),
        );
        sub.register(
            "disagreements_seen",
            "Disagreements found, each counted once however long it stands",
            tracker.total.clone(),
        );
        sub.register(
            "disagreement_oldest_milliseconds",
            "How long the oldest standing disagreement has stood",
            tracker.oldest_ms.clone(),
        );
        tracker
    }

    /// Takes what a check of `layer` over `services` found (None: every
    /// service of the layer was checked): disagreements of those services
    /// that are gone are forgotten, new ones start their clock.
    pub fn observe(
        &mut self,
        layer: Layer,
        services: Option<&BTreeSet<String>>,
        found: Vec<(String, String)>,
        now: Instant,
    ) {
        let found: BTreeSet<(Layer, String, String)> = found
            .into_iter()
            .map(|(service, detail)| (layer, service, detail))
            .collect();
        self.seen.retain(|k, _| {
            k.0 != layer
                || found.contains(k)
                || services.is_some_and(|checked| !checked.contains(&k.1))
        });
        for k in found {
            if !self.seen.contains_key(&k) {
                self.total
                    .get_or_create(&LayerLabels {
                        layer: layer.as_str(),
                    })
                    .inc();
                self.seen.insert(k, now);
            }
        }
        for layer in [Layer::Source, Layer::Kernel] {
            let labels = LayerLabels {
                layer: layer.as_str(),
            };
            let of_layer = self.seen.iter().filter(|(k, _)| k.0 == layer);
            self.standing
                .get_or_create(&labels)
                .set(of_layer.clone().count() as i64);
            let oldest = of_layer
                .map(|(_, since)| now.duration_since(*since))
                .max()
                .unwrap_or(Duration::ZERO);
            self.oldest_ms
                .get_or_create(&labels)
                .set(oldest.as_millis() as i64);
        }
    }

    /// Forgets `layer`'s disagreements of services `keep` says are gone
    /// (removed from the agent's state, so no check looks at them again).
    pub fn forget_unless(&mut self, layer: Layer, keep: impl Fn(&str) -> bool) {
        self.seen.retain(|k, _| k.0 != layer || keep(&k.1));
    }

    /// Every standing disagreement, oldest first.
    pub fn standing(&self, now: Instant) -> Vec<Disagreement> {
        let mut out: Vec<_> = self
            .seen
            .iter()
            .map(|((layer, service, detail), since)| Disagreement {
                layer: *layer,
                service: service.clone(),
                detail: detail.clone(),
                age_ms: now.duration_since(*since).as_millis() as u64,
            })
            .collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.age_ms));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(yaml_backends: &[&str]) -> ServiceSet {
        let mut yaml = String::from(
            "services:\n  - name: web\n    vip: 127.0.0.5\n    port: 80\n    backends:\n",
        );
        for b in yaml_backends {
            yaml += &format!("      - {{address: 127.0.0.1, port: {b}}}\n");
        }
        crate::config::parse_str(&yaml, "test").unwrap().into()
    }

    #[test]
    fn the_source_and_the_agent_agree_or_say_how_they_differ() {
        let accepted = set(&["81", "82"]);
        let view: BTreeMap<_, _> = set(&["81", "83"]).services;
        let found = source(&view, &accepted, &BTreeSet::new());
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.contains("127.0.0.1:83"), "{found:?}");
        assert!(found[0].1.contains("127.0.0.1:82"), "{found:?}");
        // In flight: not counted.
        let in_flight = BTreeSet::from(["web".to_owned()]);
        assert!(source(&view, &accepted, &in_flight).is_empty());
        // Equal: nothing.
        assert!(source(&accepted.services, &accepted, &BTreeSet::new()).is_empty());
        // Gone from the source.
        let found = source(&BTreeMap::new(), &accepted, &BTreeSet::new());
        assert!(found[0].1.contains("no longer in the source"), "{found:?}");
    }

    #[test]
    fn a_standing_disagreement_keeps_its_first_sighting_and_goes_when_resolved() {
        let mut tracker = Tracker::new(&mut Registry::default());
        let t0 = Instant::now();
        let one = || vec![("web".to_owned(), "differs".to_owned())];
        tracker.observe(Layer::Kernel, None, one(), t0);
        tracker.observe(Layer::Kernel, None, one(), t0 + Duration::from_secs(5));
        let standing = tracker.standing(t0 + Duration::from_secs(5));
        assert_eq!(standing.len(), 1);
        assert_eq!(standing[0].age_ms, 5_000);
        // A partial check of other services leaves it standing.
        let others = BTreeSet::from(["api".to_owned()]);
        tracker.observe(Layer::Kernel, Some(&others), Vec::new(), t0);
        assert_eq!(tracker.standing(t0).len(), 1);
        // A check of its service that finds nothing resolves it.
        tracker.observe(Layer::Kernel, None, Vec::new(), t0);
        assert!(tracker.standing(t0).is_empty());
    }
}
