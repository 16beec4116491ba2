//! The desired model of what this node should do, independent of where it
//! came from (config file today, Kubernetes later). Sources produce a
//! `DesiredState`; `reconcile` turns it into map writes.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Serialize;

/// Everything the node should serve. Services are kept sorted by name so two
/// equal configurations compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: Vec<Service>,
    /// Which cgroups hold which identity, for L4 policy.
    pub workloads: Vec<Workload>,
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
    /// May be empty only when the source allows it: connects then fail fast.
    pub backends: Vec<Backend>,
}

impl Service {
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
}

impl Backend {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The weight the selection table gets: draining backends take no new
    /// connections.
    pub fn effective_weight(&self) -> u32 {
        match self.state {
            BackendState::Active => self.weight,
            BackendState::Draining => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Active,
    /// No new connections; established ones continue.
    Draining,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
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
    pub identity: String,
}
