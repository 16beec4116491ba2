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
