//! The JSON documents of the admin API, shared by the agent and meshctl.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusResponse {
    pub ready: bool,
    pub version: String,
    pub config_path: String,
    /// Incremented by every configuration that reached the kernel.
    pub config_generation: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Why the last reload was refused, while the previous state serves.
    pub last_reload_error: Option<String>,
    pub last_reload_unix_ms: u64,
    /// Established sockets destroyed because their backend was removed.
    pub sockets_destroyed: u64,
    /// Services whose backends are all unhealthy, served in panic mode.
    pub panic_services: Vec<String>,
    /// How full the maps the agent writes are.
    pub maps: Vec<MapFill>,
    pub cgroup: String,
    pub bpffs: String,
    pub programs: Vec<String>,
    pub services: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`ip:port`,
    /// the chosen port when started with port 0); None when off.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Kernel-side debug logs on (`MESH_CONFIG` as the kernel reads it).
    #[serde(default)]
    pub kernel_debug_log: bool,
    /// The programs were loaded without their log sites
    /// (`--kernel-debug-log never`): the switch cannot turn them on.
    #[serde(default)]
    pub kernel_log_sites_removed: bool,
}

/// `GET /v1/tunnels`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TunnelsResponse {
    /// This node's name in the mesh.
    pub node: String,
    /// False: no `--identity-dir`, so nothing leaves this node encrypted
    /// (strict services' remote backends are refused).
    pub enabled: bool,
    /// The certificate this node presents.
    pub certificate: Option<crate::identity::CertInfo>,
    pub peers: Vec<crate::tunnel::PeerSnapshot>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicesResponse {
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub algorithm: String,
    /// Session affinity timeout, when affinity is on.
    pub affinity_timeout_s: Option<u32>,
    /// false: the service opted out of same-node redirect.
    #[serde(default = "yes")]
    pub same_node_redirect: bool,
    /// TCP connections and connected UDP sockets the kernel balanced.
    pub connections: u64,
    /// Unconnected UDP sockets the kernel balanced.
    pub udp_flows: u64,
    /// Connects refused because no backend was usable.
    pub no_backend: u64,
    /// Connects refused by policy.
    pub denied: u64,
    /// mTLS mode for backends on other nodes (strict, permissive, disabled).
    #[serde(default)]
    pub mtls: String,
    /// The Kubernetes Service it was made from (Kubernetes source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<crate::state::Origin>,
    /// TCP connections sent through the tunnel to another node.
    #[serde(default)]
    pub tunnelled: u64,
    /// UDP sent directly to a backend on another node.
    #[serde(default)]
    pub udp_direct_remote: u64,
    pub backends: Vec<BackendView>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// active, or draining (no new connections).
    pub state: String,
    /// Slots this backend holds in the service's selection table.
    pub slots: u32,
    /// Connections the kernel sent here.
    pub connections: u64,
    /// Unconnected UDP sockets the kernel sent here.
    pub udp_flows: u64,
    /// TCP connections to this backend open right now.
    pub active: u64,
    /// healthy, unhealthy (failed active checks) or ejected (outlier).
    pub health: String,
    pub health_transitions: u64,
    /// A runtime override from meshctl, in words; none when the config rules.
    pub overridden: Option<String>,
    /// The node hosting it, when the config names one.
    #[serde(default)]
    pub node: Option<String>,
    /// Reached through the mTLS tunnel to its node.
    #[serde(default)]
    pub tunnel: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventsResponse {
    /// Oldest first.
    pub events: Vec<EventView>,
    /// The sequence number the next event will get (`after` for following).
    pub next: u64,
}

/// One balancing decision the kernel made.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventView {
    pub seq: u64,
    pub unix_ms: u64,
    pub service: String,
    pub protocol: String,
    /// forwarded, no-backend or denied.
    pub verdict: String,
    /// The chosen backend, when forwarded.
    pub backend: Option<String>,
    pub algorithm: String,
    /// The slot the algorithm picked (none on an affinity hit).
    pub slot: Option<u32>,
    pub affinity_hit: bool,
    /// The client's cgroup id, and its network-namespace cookie or cgroup id.
    pub cgroup_id: u64,
    pub client: u64,
    /// The client's identity, when the service has a policy.
    pub identity: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

/// `GET /v1/certs`: the identities this node holds, one row each (today the
/// node's own; identities of the workloads it speaks for can join as rows).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertsResponse {
    pub node: String,
    /// Empty when the node has no identity (no --identity-dir).
    pub identities: Vec<crate::identity::HeldIdentity>,
    /// The workload identities this node's streams claim, each under the
    /// node certificate above (empty without one).
    #[serde(default)]
    pub workloads: Vec<SpokenIdentity>,
}

/// A workload identity this node speaks for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpokenIdentity {
    pub workload: String,
    pub spiffe_id: String,
    pub cgroup: String,
    /// Whether the configuration names this node as its host: only then do
    /// peers believe the claim (else they answer 401 not_hosted).
    pub claimable: bool,
}
