//! The desired model of what this node should do, independent of where it
//! came from (config file today, Kubernetes later). Sources produce a
//! `DesiredState`; `reconcile` turns it into map writes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

/// Everything the node should serve. Services are kept sorted by name so two
/// equal configurations compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: Vec<Service>,
    /// Which cgroups hold which identity, for L4 policy.
    pub workloads: Vec<Workload>,
    /// The mesh's nodes and mesh-wide defaults (cross-node tunnel).
    pub mesh: Mesh,
}

/// The agent's working form of a desired state: services by name, each
/// shared (`Arc`), so that a change to one service copies nothing else and
/// two versions of the state can share every service they have in common.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSet {
    pub services: BTreeMap<String, Arc<Service>>,
    pub workloads: Arc<Vec<Workload>>,
    pub mesh: Arc<Mesh>,
}

impl ServiceSet {
    pub fn get(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Services in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Service> {
        self.services.values().map(|s| &**s)
    }

    /// A `DesiredState` of the named services only (those that exist).
    pub fn subset<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> DesiredState {
        DesiredState {
            services: names
                .into_iter()
                .filter_map(|n| self.services.get(n))
                .map(|s| (**s).clone())
                .collect(),
            workloads: (*self.workloads).clone(),
            mesh: (*self.mesh).clone(),
        }
    }
}

impl From<DesiredState> for ServiceSet {
    fn from(state: DesiredState) -> Self {
        Self {
            services: state
                .services
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
            workloads: Arc::new(state.workloads),
            mesh: Arc::new(state.mesh),
        }
    }
}

impl From<&ServiceSet> for DesiredState {
    fn from(set: &ServiceSet) -> Self {
        Self {
            services: set.iter().cloned().collect(),
            workloads: (*set.workloads).clone(),
            mesh: (*set.mesh).clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
    /// Session affinity: a client keeps its backend for this many seconds
    /// after its last connect.
    pub affinity_timeout_s: Option<u32>,
    pub policy: Policy,
    /// A backend that leaves the service first drains this long (no new
    /// connections, existing ones continue), then is removed.
    pub drain_timeout_s: u32,
    /// Destroy established sockets to a backend when it is removed, so
    /// clients reconnect instead of hanging. `None`: UDP sockets yes, TCP no.
    pub destroy_on_removal: Option<bool>,
    /// Connections to the backends may use same-node redirect (when it is
    /// on for the node). `false` keeps them on the normal TCP path, for
    /// workloads that read in ways sockmap cannot serve (splice from the
    /// socket) or that mind a blocking read returning EAGAIN once.
    pub same_node_redirect: bool,
    /// Active health checking of the backends.
    pub health_check: Option<HealthCheck>,
    /// Passive detection: eject backends whose connects keep failing.
    pub outlier_detection: Option<OutlierDetection>,
    /// What to do when every backend is unhealthy.
    pub panic_mode: PanicMode,
    /// mTLS for connections to backends on other nodes; `None`: the mesh's
    /// default (`Mesh::default_mtls`).
    pub mtls: Option<MtlsMode>,
    /// May be empty only when the source allows it: connects then fail fast.
    pub backends: Vec<Backend>,
    /// The object this service was made from, when a source other than the
    /// file made it (a Kubernetes Service's namespace and name).
    pub origin: Option<Origin>,
}

/// Where a service came from, for people (`meshctl services`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct Origin {
    pub namespace: String,
    pub name: String,
}

impl Service {
    /// Whether backend health (checks or outlier ejection) can change what
    /// the kernel gets for this service.
    pub fn watches_health(&self) -> bool {
        self.health_check.is_some() || self.outlier_detection.is_some()
    }

    /// The service's mTLS mode, its own or the mesh's default.
    pub fn mtls_mode(&self, mesh: &Mesh) -> MtlsMode {
        self.mtls.unwrap_or(mesh.default_mtls)
    }

    pub fn frontend(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }

    /// Whether sockets of IP protocol `proto` to a removed backend are
    /// destroyed.
    pub fn destroys_sockets(&self, proto: u8) -> bool {
        self.destroy_on_removal
            .unwrap_or(proto == mesh_common::PROTO_UDP)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    /// Relative share of new connections; zero means none.
    pub weight: u32,
    pub state: BackendState,
    /// The node that hosts it (a name in `Mesh::nodes`); `None`: reached
    /// directly, wherever it is, as before nodes existed.
    pub node: Option<String>,
    /// Connections to it go through the local agent's tunnel to its node
    /// (mTLS). Set by the agent (its placement overlay), never by a source.
    pub tunnel: bool,
    /// Preference: new connections go to the backends of the lowest
    /// priority that has a usable (active, healthy) backend; the others
    /// stand by (`PRIORITY_*`). A file's backends are all preferred.
    pub priority: u8,
}

/// A backend chosen first (this node's or zone's, where topology says so).
pub const PRIORITY_PREFERRED: u8 = 0;
/// A backend used when no preferred one is usable.
pub const PRIORITY_FALLBACK: u8 = 1;
/// A backend that is going away but still serves (a terminating pod): used
/// only when nothing else is left, as kube-proxy does.
pub const PRIORITY_TERMINATING: u8 = u8::MAX;

impl Backend {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The weight the selection table gets: draining backends take no new
    /// connections.
    pub fn effective_weight(&self) -> u32 {
        match self.state {
            BackendState::Active => self.weight,
            BackendState::Draining | BackendState::Unhealthy | BackendState::Standby => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Active,
    /// No new connections; established ones continue.
    Draining,
    /// Failed its health checks or was ejected: no new connections until it
    /// recovers. Set by the agent, never by a source.
    Unhealthy,
    /// A fallback while backends of a lower priority are usable: no new
    /// connections, established ones continue. Set by the agent.
    Standby,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Standby => "standby",
        })
    }
}

/// Which transport protocols a service answers on its VIP and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// TCP and UDP on the same VIP and port (DNS, for example).
    Both,
}

impl Protocol {
    /// The IP protocol numbers the kernel keys services by.
    pub fn ip_protocols(self) -> &'static [u8] {
        use mesh_common::{PROTO_TCP, PROTO_UDP};
        match self {
            Protocol::Tcp => &[PROTO_TCP],
            Protocol::Udp => &[PROTO_UDP],
            Protocol::Both => &[PROTO_TCP, PROTO_UDP],
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Both => "both",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Weighted random over a slot table.
    Weighted,
    /// Maglev consistent hashing of the client: one client keeps one backend
    /// across backend changes, with minimal disruption.
    Maglev,
    /// Power of two choices over live connection counts.
    LeastConn,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Weighted => "weighted",
            Algorithm::Maglev => "maglev",
            Algorithm::LeastConn => "least-conn",
        })
    }
}

/// L4 authorization of a service: who may connect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Deny identities that are not explicitly allowed.
    pub default_deny: bool,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl Policy {
    /// True when the kernel must look up the client's identity at all.
    pub fn is_active(&self) -> bool {
        self.default_deny || !self.allow.is_empty() || !self.deny.is_empty()
    }
}

/// A group of processes (a cgroup and everything below it) with an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: String,
    pub cgroup: PathBuf,
    /// The name policies use: a SPIFFE ID, or a short name that stands for
    /// `spiffe://<trust-domain>/ns/default/sa/<name>` (see [`spiffe_id_of`]).
    pub identity: String,
    /// The node that hosts it. `None`: the node of whichever agent reads
    /// the configuration; such a workload is never accepted from a peer.
    pub node: Option<String>,
    /// Its own addresses (a pod's IPs), which same-node redirect treats as
    /// this node's when the workload is on it. Empty for a file's
    /// workloads: the redirect finds their network namespaces itself.
    pub addresses: Vec<std::net::IpAddr>,
}

impl Workload {
    /// Whether the agent of node `node` runs this workload's processes.
    pub fn is_on(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node)
    }

    /// Whether a peer node `node` may speak for this workload.
    pub fn is_hosted_by(&self, node: &str) -> bool {
        self.node.as_deref() == Some(node)
    }
}

/// The trust domain of a node without a tunnel identity (the one Istio and
/// Kubernetes use by default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The SPIFFE ID a policy identity stands for in trust domain `td`: itself
/// when it is one, `spiffe://<td>/ns/default/sa/<name>` for a short name.
pub fn spiffe_id_of(identity: &str, td: &str) -> String {
    if identity.starts_with("spiffe://") {
        identity.to_owned()
    } else {
        format!("spiffe://{td}/ns/default/sa/{identity}")
    }
}

/// How and how often the agent probes each backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
    /// Each interval is stretched by up to this share, so checks of many
    /// backends do not all fire at once.
    pub jitter_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum CheckKind {
    /// A TCP connect that succeeds.
    Tcp,
    /// `GET path` answered with `expected_status`.
    Http { path: String, expected_status: u16 },
}

/// Ejection of backends whose connects keep failing, counted by the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// Failed connects in a row (no success between) that eject a backend.
    pub consecutive_failures: u32,
    /// First ejection time; doubles for each ejection in a row, up to 10×.
    pub ejection_ms: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PanicMode {
    /// Keep sending to all backends (as Envoy does): better than nothing.
    #[default]
    All,
    /// Refuse connections at once.
    None,
}

/// How a service's connections to backends on other nodes travel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only through the mTLS tunnel: no plaintext fallback.
    Strict,
    /// Through the tunnel where the backend's node is known; plaintext is
    /// still accepted (for migration), and UDP goes directly.
    #[default]
    Permissive,
    /// Never through the tunnel.
    Disabled,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
            MtlsMode::Disabled => "disabled",
        })
    }
}

/// The mesh around this node: its nodes and mesh-wide defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Mesh {
    /// The mode of services that name none.
    pub default_mtls: MtlsMode,
    /// Sorted by name.
    pub nodes: Vec<Node>,
}

impl Mesh {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }
}

/// A node of the mesh, as the tunnel reaches its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub address: IpAddr,
    /// The agent's inbound tunnel port (HBONE), 15008 unless set.
    pub tunnel_port: u16,
}

/// The agent's inbound tunnel port when a node names none (as ztunnel's).
pub const DEFAULT_TUNNEL_PORT: u16 = 15008;

impl Node {
    pub fn tunnel_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.tunnel_port)
    }
}
