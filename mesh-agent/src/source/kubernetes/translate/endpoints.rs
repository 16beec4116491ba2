//! EndpointSlice endpoints → one frontend's backends: which endpoints
//! count (port, family, conditions), which are preferred on this node
//! (topology), and one backend per address and port across all slices.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};

use super::{Family, ThisNode};
use crate::state::{
    Backend, BackendState, PRIORITY_FALLBACK, PRIORITY_PREFERRED, PRIORITY_TERMINATING,
};

/// The legacy switch for zone hints (before `trafficDistribution`).
const TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// Its older name, still honoured by the EndpointSlice controller.
const TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";

/// Which slice port a service port takes its numbers from.
pub(super) struct PortMatch<'a> {
    /// Empty for an unnamed port (the API leaves it out or empty).
    pub name: &'a str,
    /// As the API spells it: `TCP` or `UDP`.
    pub protocol: &'a str,
}

/// What the Service asks of topology, for this node's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Topology {
    /// Every endpoint alike.
    Cluster,
    /// `internalTrafficPolicy: Local`: this node's endpoints only.
    NodeLocal,
    /// `trafficDistribution: PreferClose` or `PreferSameZone` (or the
    /// `topology-mode: Auto` annotation): endpoints hinted for this zone
    /// first, when the hints can be trusted.
    PreferSameZone,
    /// `trafficDistribution: PreferSameNode`: this node's endpoints first.
    PreferSameNode,
}

impl Topology {
    pub fn of(svc: &KubeService) -> Self {
        let spec = svc.spec.as_ref();
        // kube-proxy: the internal policy wins over any distribution.
        if spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local") {
            return Topology::NodeLocal;
        }
        match spec.and_then(|s| s.traffic_distribution.as_deref()) {
            Some("PreferClose" | "PreferSameZone") => return Topology::PreferSameZone,
            Some("PreferSameNode") => return Topology::PreferSameNode,
            // Values of later Kubernetes versions: no preference, as an
            // older kube-proxy does.
            _ => {}
        }
        let annotations = svc.metadata.annotations.as_ref();
        let auto = [TOPOLOGY_MODE, TOPOLOGY_AWARE_HINTS].iter().any(|key| {
            annotations
                .and_then(|a| a.get(*key))
                .is_some_and(|mode| mode == "Auto" || mode == "auto")
        });
        if auto {
            Topology::PreferSameZone
        } else {
            Topology::Cluster
        }
    }
}

/// What an endpoint's conditions make of it (the API's defaults: nil
/// ready and nil serving are true, nil terminating is false).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Condition {
    /// Takes new connections.
    Ready,
    /// Shutting down but still serving: used only when nothing else is.
    ServingTerminating,
    /// Not ready and not going away (starting, or failing its probe):
    /// kept for the connections it has, never chosen.
    NotReady,
    /// Terminating and no longer serving: left out.
    Gone,
}

impl Condition {
    pub fn of(conditions: Option<&EndpointConditions>) -> Self {
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        match (ready, serving, terminating) {
            (true, _, _) => Condition::Ready,
            (false, true, true) => Condition::ServingTerminating,
            (false, false, true) => Condition::Gone,
            (false, _, false) => Condition::NotReady,
        }
    }
}

/// An endpoint that counts for this frontend, before topology.
struct Candidate<'a> {
    address: SocketAddr,
    endpoint: &'a Endpoint,
    condition: Condition,
}

/// The backends of frontend `frontend` (family `family`, port `port`):
/// every endpoint of `slices` that counts, one backend per address and
/// port, sorted by address then port.
///
/// An endpoint's first address is its address (as kube-proxy reads it;
/// the EndpointSlice controller writes exactly one). Endpoints whose
/// address is not of `family`, or is the frontend itself (connections
/// would loop), are left out.
pub(super) fn backends(
    slices: &[&EndpointSlice],
    family: Family,
    port: &PortMatch,
    topology: Topology,
    node: &ThisNode,
    frontend: SocketAddr,
) -> Vec<Backend> {
    let mut candidates: Vec<Candidate> = Vec::new();
    for slice in slices {
        let Some(number) = slice_port(slice, port) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(address) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .filter(|a| Family::of(*a) == family)
            else {
                continue;
            };
            let address = SocketAddr::new(address, number);
            let condition = Condition::of(endpoint.conditions.as_ref());
            // A node name the API server would have refused never reaches a log.
            let bad_node = endpoint
                .node_name
                .as_deref()
                .is_some_and(|n| n.chars().any(char::is_control));
            if address == frontend || condition == Condition::Gone || bad_node {
                continue;
            }
            if topology == Topology::NodeLocal && !is_on(endpoint, node) {
                continue;
            }
            candidates.push(Candidate {
                address,
                endpoint,
                condition,
            });
        }
    }

    let zone = match topology {
        Topology::PreferSameZone => hinted_zone(&candidates, node.zone),
        _ => None,
    };
    let mut backends: BTreeMap<SocketAddr, Backend> = BTreeMap::new();
    for candidate in candidates {
        let preferred = match topology {
            Topology::Cluster | Topology::NodeLocal => true,
            Topology::PreferSameZone => {
                zone.is_none_or(|zone| hinted_for_zone(candidate.endpoint, zone))
            }
            Topology::PreferSameNode => {
                is_on(candidate.endpoint, node) || hinted_for_node(candidate.endpoint, node.name)
            }
        };
        let by_topology = if preferred {
            PRIORITY_PREFERRED
        } else {
            PRIORITY_FALLBACK
        };
        let (state, priority) = match candidate.condition {
            Condition::Ready => (BackendState::Active, by_topology),
            Condition::ServingTerminating => (BackendState::Active, PRIORITY_TERMINATING),
            Condition::NotReady | Condition::Gone => (BackendState::Draining, by_topology),
        };
        let backend = Backend {
            address: candidate.address.ip(),
            port: candidate.address.port(),
            weight: 1,
            state,
            node: candidate.endpoint.node_name.clone(),
            tunnel: false,
            priority,
        };
        // The same endpoint in two slices (moving between them): the
        // better of the two, whichever slice came first.
        match backends.entry(candidate.address) {
            Entry::Vacant(entry) => {
                entry.insert(backend);
            }
            Entry::Occupied(mut entry) => {
                if rank(&backend) < rank(entry.get()) {
                    entry.insert(backend);
                }
            }
        }
    }
    backends.into_values().collect()
}

/// Lower is better: usable before draining, then by priority; the node
/// only breaks ties, so the result never depends on the slices' order.
fn rank(backend: &Backend) -> (u8, u8, Option<&str>) {
    let state = match backend.state {
        BackendState::Active => 0,
        _ => 1,
    };
    (state, backend.priority, backend.node.as_deref())
}

/// The port number `slice` gives the service port `port`, matched by name
/// and protocol (a named target port may resolve differently per slice).
fn slice_port(slice: &EndpointSlice, port: &PortMatch) -> Option<u16> {
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| {
            p.name.as_deref().unwrap_or_default() == port.name
                && p.protocol.as_deref().unwrap_or("TCP") == port.protocol
        })
        .and_then(|p| p.port)
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| n != 0)
}

/// This node's zone, when zone hints decide: every ready endpoint has zone
/// hints and at least one names this zone. Otherwise (a hint missing, this
/// node's zone unknown, no endpoint for it) `None`: every endpoint alike.
/// Only ready endpoints count, as in kube-proxy: a terminating pod the
/// controller no longer hints does not turn topology off.
fn hinted_zone<'a>(candidates: &[Candidate], zone: Option<&'a str>) -> Option<&'a str> {
    let zone = zone.filter(|z| !z.is_empty())?;
    let mut ready = candidates
        .iter()
        .filter(|c| c.condition == Condition::Ready)
        .map(|c| c.endpoint)
        .peekable();
    ready.peek()?;
    let mut matched = false;
    for endpoint in ready {
        let zones = endpoint.hints.as_ref().and_then(|h| h.for_zones.as_ref());
        match zones {
            Some(zones) if !zones.is_empty() => {
                matched |= zones.iter().any(|z| z.name == zone);
            }
            _ => return None,
        }
    }
    matched.then_some(zone)
}

fn hinted_for_zone(endpoint: &Endpoint, zone: &str) -> bool {
    endpoint
        .hints
        .as_ref()
        .and_then(|h| h.for_zones.as_ref())
        .is_some_and(|zones| zones.iter().any(|z| z.name == zone))
}

fn hinted_for_node(endpoint: &Endpoint, node: &str) -> bool {
    endpoint
        .hints
        .as_ref()
        .and_then(|h| h.for_nodes.as_ref())
        .is_some_and(|nodes| nodes.iter().any(|n| n.name == node))
}

fn is_on(endpoint: &Endpoint, node: &ThisNode) -> bool {
    endpoint.node_name.as_deref() == Some(node.name)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::EndpointHints;

    use super::super::fixtures::*;
    use super::super::{ThisNode, translate};
    use crate::state::BackendState::{Active, Draining};
    use crate::state::{BackendState, PRIORITY_FALLBACK, PRIORITY_PREFERRED, PRIORITY_TERMINATING};

    /// What became of one endpoint: its backend's state and priority, or
    /// `None` when it was left out.
    type Outcome = Option<(BackendState, u8)>;

    const PREFERRED: Outcome = Some((Active, PRIORITY_PREFERRED));
    const FALLBACK: Outcome = Some((Active, PRIORITY_FALLBACK));
    const TERMINATING: Outcome = Some((Active, PRIORITY_TERMINATING));
    const DRAINING: Outcome = Some((Draining, PRIORITY_PREFERRED));
    const OUT: Outcome = None;

    /// The outcome of each of `addresses`, after translating one TCP port
    /// of a Service with `endpoints` in one slice.
    fn outcomes(
        svc: &k8s_openapi::api::core::v1::Service,
        endpoints: Vec<k8s_openapi::api::discovery::v1::Endpoint>,
        node: &ThisNode,
        addresses: &[&str],
    ) -> Vec<Outcome> {
        let slice = slice(
            "shop",
            "web",
            "web-1",
            "IPv4",
            &[slice_port(None, "TCP", 8080)],
            endpoints,
        );
        let services = translate(svc, [&slice], node).expect("a valid Service");
        let [service] = &services[..] else {
            panic!("one frontend: {services:?}");
        };
        addresses
            .iter()
            .map(|address| {
                service
                    .backends
                    .iter()
                    .find(|b| b.address.to_string() == *address)
                    .map(|b| (b.state, b.priority))
            })
            .collect()
    }

    fn web() -> k8s_openapi::api::core::v1::Service {
        service("shop", "web", &["10.96.0.10"], &[port(None, "TCP", 80)])
    }

    /// Every combination of ready, serving and terminating (each true,
    /// false or left out), as the API defines the defaults (nil ready and
    /// nil serving are true, nil terminating is false).
    #[test]
    fn endpoint_condition_table() {
        /// A condition: true, false, or left out.
        type Flag = Option<bool>;
        const N: Option<bool> = None;
        const T: Option<bool> = Some(true);
        const F: Option<bool> = Some(false);
        #[rustfmt::skip]
        let table: [(Flag, Flag, Flag, Outcome); 27] = [
            // ready (or unknown, which counts as ready): active, whatever else.
            (N, N, N, PREFERRED),
            (N, N, T, PREFERRED),
            (N, N, F, PREFERRED),
            (N, T, N, PREFERRED),
            (N, T, T, PREFERRED),
            (N, T, F, PREFERRED),
            (N, F, N, PREFERRED),
            (N, F, T, PREFERRED),
            (N, F, F, PREFERRED),
            (T, N, N, PREFERRED),
            (T, N, T, PREFERRED),
            (T, N, F, PREFERRED),
            (T, T, N, PREFERRED),
            (T, T, T, PREFERRED),
            (T, T, F, PREFERRED),
            (T, F, N, PREFERRED),
            (T, F, T, PREFERRED),
            (T, F, F, PREFERRED),
            // Not ready and not terminating: kept, never chosen.
            (F, N, N, DRAINING),
            (F, T, N, DRAINING),
            (F, F, N, DRAINING),
            (F, N, F, DRAINING),
            (F, T, F, DRAINING),
            (F, F, F, DRAINING),
            // Terminating: serving (unknown counts as serving) is the last
            // resort; not serving is gone.
            (F, N, T, TERMINATING),
            (F, T, T, TERMINATING),
            (F, F, T, OUT),
        ];
        let node = ThisNode {
            name: "node-a",
            zone: None,
        };
        for (ready, serving, terminating, expected) in table {
            let endpoint = conditions(endpoint("10.1.0.1"), ready, serving, terminating);
            let got = outcomes(&web(), vec![endpoint], &node, &["10.1.0.1"]);
            assert_eq!(
                got,
                [expected],
                "ready {ready:?}, serving {serving:?}, terminating {terminating:?}"
            );
        }
        // No conditions at all: ready.
        let bare = endpoint("10.1.0.1");
        assert!(bare.conditions.is_none());
        assert_eq!(
            outcomes(&web(), vec![bare], &node, &["10.1.0.1"]),
            [PREFERRED]
        );
    }

    /// The endpoints of the topology table, on this node `node-a` in zone
    /// `zone-a` unless a row says otherwise:
    /// .1 on node-a, hinted for zone-a; .2 on node-b, hinted for zone-a;
    /// .3 on node-c, hinted for zone-b; .4 on node-a, terminating and
    /// serving, no hints (the controller hints ready endpoints only);
    /// .5 on node-c, hinted for zone-b and for node node-a.
    fn topology_endpoints() -> Vec<k8s_openapi::api::discovery::v1::Endpoint> {
        vec![
            zone_hints(on_node(endpoint("10.1.0.1"), "node-a"), &["zone-a"]),
            zone_hints(on_node(endpoint("10.1.0.2"), "node-b"), &["zone-a"]),
            zone_hints(on_node(endpoint("10.1.0.3"), "node-c"), &["zone-b"]),
            terminating_serving(on_node(endpoint("10.1.0.4"), "node-a")),
            node_hints(
                zone_hints(on_node(endpoint("10.1.0.5"), "node-c"), &["zone-b"]),
                &["node-a"],
            ),
        ]
    }

    const ADDRESSES: [&str; 5] = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5"];

    struct Row {
        case: &'static str,
        internal_traffic_policy: Option<&'static str>,
        traffic_distribution: Option<&'static str>,
        annotation: Option<(&'static str, &'static str)>,
        node: &'static str,
        zone: Option<&'static str>,
        /// Changes to the endpoints of `topology_endpoints`, by index.
        tweak: fn(&mut [k8s_openapi::api::discovery::v1::Endpoint]),
        expected: [Outcome; 5],
    }

    const ROW: Row = Row {
        case: "",
        internal_traffic_policy: None,
        traffic_distribution: None,
        annotation: None,
        node: "node-a",
        zone: Some("zone-a"),
        tweak: |_| {},
        expected: [OUT; 5],
    };

    #[test]
    fn topology_table() {
        let table = [
            Row {
                case: "no topology: hints are ignored, every endpoint preferred",
                expected: [PREFERRED, PREFERRED, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "internalTrafficPolicy Local: this node's endpoints only",
                internal_traffic_policy: Some("Local"),
                expected: [PREFERRED, OUT, OUT, TERMINATING, OUT],
                ..ROW
            },
            Row {
                case: "internalTrafficPolicy Local with no endpoint here: none",
                internal_traffic_policy: Some("Local"),
                node: "node-z",
                expected: [OUT; 5],
                ..ROW
            },
            Row {
                case: "internalTrafficPolicy Local wins over PreferClose",
                internal_traffic_policy: Some("Local"),
                traffic_distribution: Some("PreferClose"),
                expected: [PREFERRED, OUT, OUT, TERMINATING, OUT],
                ..ROW
            },
            Row {
                case: "internalTrafficPolicy Cluster: every endpoint",
                internal_traffic_policy: Some("Cluster"),
                expected: [PREFERRED, PREFERRED, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "PreferClose in zone-a (the unhinted terminating endpoint does not count)",
                traffic_distribution: Some("PreferClose"),
                expected: [PREFERRED, PREFERRED, FALLBACK, TERMINATING, FALLBACK],
                ..ROW
            },
            Row {
                case: "PreferSameZone in zone-b",
                traffic_distribution: Some("PreferSameZone"),
                zone: Some("zone-b"),
                expected: [FALLBACK, FALLBACK, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "topology-mode: Auto",
                annotation: Some(("service.kubernetes.io/topology-mode", "Auto")),
                expected: [PREFERRED, PREFERRED, FALLBACK, TERMINATING, FALLBACK],
                ..ROW
            },
            Row {
                case: "topology-aware-hints: auto (the older annotation)",
                annotation: Some(("service.kubernetes.io/topology-aware-hints", "auto")),
                expected: [PREFERRED, PREFERRED, FALLBACK, TERMINATING, FALLBACK],
                ..ROW
            },
            Row {
                case: "topology-mode: Disabled",
                annotation: Some(("service.kubernetes.io/topology-mode", "Disabled")),
                expected: [PREFERRED, PREFERRED, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "PreferClose, hints missing on one ready endpoint: all preferred",
                traffic_distribution: Some("PreferClose"),
                tweak: |endpoints| endpoints[2].hints = None,
                expected: [PREFERRED, PREFERRED, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "PreferClose, an empty forZones counts as missing",
                traffic_distribution: Some("PreferClose"),
                tweak: |endpoints| {
                    endpoints[1].hints = Some(EndpointHints {
                        for_zones: Some(vec![]),
                        for_nodes: None,
                    })
                },
                expected: [PREFERRED, PREFERRED, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "PreferClose, no hint names this node's zone: all preferred",
                traffic_distribution: Some("PreferClose"),
                zone: Some("zone-c"),
                expected: [PREFERRED, PREFERRED, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "PreferClose, this node's zone unknown: all preferred",
                traffic_distribution: Some("PreferClose"),
                zone: None,
                expected: [PREFERRED, PREFERRED, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "PreferClose, a not-ready endpoint without hints does not count",
                traffic_distribution: Some("PreferClose"),
                tweak: |endpoints| {
                    endpoints[2].hints = None;
                    endpoints[2].conditions = Some(Default::default());
                    if let Some(c) = endpoints[2].conditions.as_mut() {
                        c.ready = Some(false);
                    }
                },
                expected: [
                    PREFERRED,
                    PREFERRED,
                    Some((Draining, PRIORITY_FALLBACK)),
                    TERMINATING,
                    FALLBACK,
                ],
                ..ROW
            },
            Row {
                case: "PreferSameNode: this node's endpoints, by nodeName or forNodes, first",
                traffic_distribution: Some("PreferSameNode"),
                expected: [PREFERRED, FALLBACK, FALLBACK, TERMINATING, PREFERRED],
                ..ROW
            },
            Row {
                case: "PreferSameNode without hints: by nodeName",
                traffic_distribution: Some("PreferSameNode"),
                tweak: |endpoints| endpoints.iter_mut().for_each(|e| e.hints = None),
                expected: [PREFERRED, FALLBACK, FALLBACK, TERMINATING, FALLBACK],
                ..ROW
            },
            Row {
                case: "PreferSameNode with nothing on this node: all fallback",
                traffic_distribution: Some("PreferSameNode"),
                node: "node-z",
                expected: [FALLBACK, FALLBACK, FALLBACK, TERMINATING, FALLBACK],
                ..ROW
            },
            Row {
                case: "a trafficDistribution this version does not know: no preference",
                traffic_distribution: Some("PreferSomewhereNew"),
                expected: [PREFERRED, PREFERRED, PREFERRED, TERMINATING, PREFERRED],
                ..ROW
            },
        ];
        for row in table {
            let mut svc = web();
            if let Some(spec) = svc.spec.as_mut() {
                spec.internal_traffic_policy = row.internal_traffic_policy.map(str::to_owned);
                spec.traffic_distribution = row.traffic_distribution.map(str::to_owned);
            }
            if let Some((key, value)) = row.annotation {
                svc.metadata.annotations = Some([(key.to_owned(), value.to_owned())].into());
            }
            let mut endpoints = topology_endpoints();
            (row.tweak)(&mut endpoints);
            let node = ThisNode {
                name: row.node,
                zone: row.zone,
            };
            let got = outcomes(&svc, endpoints, &node, &ADDRESSES);
            assert_eq!(got, row.expected, "{}", row.case);
        }
    }
}
