//! The contract between mesh's kernel programs (`mesh-ebpf`) and its agent.
//!
//! Every key and value is `#[repr(C)]`, spells out its padding and has a
//! compile-time size check, so both sides agree byte for byte. Addresses and
//! ports are stored in network byte order, exactly as the kernel hands them to
//! the programs; the agent converts once, when it writes.
#![no_std]

/// Bumped whenever a map's layout changes; maps are pinned under
/// `<bpffs>/v<SCHEMA_VERSION>/` so a new agent never misreads old maps.
pub const SCHEMA_VERSION: u32 = 2;

mod inbound;
mod redirect;
pub use inbound::*;
pub use redirect::*;

/// Names of the maps, as the kernel object declares them (at most 15 bytes:
/// the kernel keeps 16 with the NUL).
pub mod map_names {
    pub const SERVICES: &str = "MESH_SERVICES";
    pub const SLOTS: &str = "MESH_SLOTS";
    pub const BACKENDS: &str = "MESH_BACKENDS";
    pub const REV_NAT: &str = "MESH_REV_NAT";
    pub const SOCK_LB: &str = "MESH_SOCK_LB";
    pub const CONNS: &str = "MESH_CONNS";
    pub const ACTIVE: &str = "MESH_ACTIVE";
    pub const BACKEND_HEALTH: &str = "MESH_BE_HEALTH";
    pub const AFFINITY: &str = "MESH_AFFINITY";
    pub const WORKLOADS: &str = "MESH_WORKLOADS";
    pub const POLICY: &str = "MESH_POLICY";
    pub const BACKEND_STATS: &str = "MESH_BE_STATS";
    pub const SERVICE_STATS: &str = "MESH_SVC_STATS";
    pub const EVENTS: &str = "MESH_EVENTS";
    pub const CONFIG: &str = "MESH_CONFIG";
    pub const TUNNEL_PENDING: &str = "MESH_TUN_PEND";
    pub const TUNNEL_ORIG: &str = "MESH_TUN_ORIG";
}

/// Names of the programs in the kernel object.
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    pub const RECVMSG6: &str = "mesh_recvmsg6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    pub const SOCKOPS: &str = "mesh_sockops";
}

/// Default capacities; the agent may change them at load time.
pub mod limits {
    pub const MAX_SERVICES: u32 = 65_536;
    pub const MAX_BACKENDS: u32 = 65_536;
    /// Slots across all services, counting two generations of a service that
    /// is being replaced.
    pub const MAX_SLOTS: u32 = 1 << 20;
    /// Largest weighted slot table of one service (weights are scaled into it).
    pub const MAX_SLOTS_PER_SERVICE: u32 = 16_384;
    /// Largest Maglev table of one service (a prime).
    pub const MAX_MAGLEV_TABLE: u32 = 131_071;
    /// Sockets whose balancing decision is remembered (LRU maps).
    pub const MAX_TRACKED_SOCKETS: u32 = 262_144;
    pub const MAX_AFFINITY: u32 = 262_144;
    pub const MAX_WORKLOADS: u32 = 65_536;
    pub const MAX_POLICY: u32 = 262_144;
    /// Bytes of the decision-event ring buffer.
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Tunnelled connections between their connect() and the agent's
    /// accept() (LRU: an entry the agent never claims ages out).
    pub const MAX_TUNNEL_PENDING: u32 = 65_536;
}

/// Bytes waiting in the event ring at which a program wakes the agent at
/// once instead of leaving the events for the agent's periodic read.
pub const EVENTS_WAKEUP_BYTES: u64 = limits::EVENTS_BYTES as u64 / 4;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Errno returned by `connect()`/`sendmsg()` when a service has no usable
/// backend, and when policy denies the client.
pub const ECONNREFUSED: i32 = 111;
pub const EPERM: i32 = 1;

/// `ServiceValue::algorithm`.
pub const ALGORITHM_WEIGHTED: u8 = 0;
pub const ALGORITHM_MAGLEV: u8 = 1;
pub const ALGORITHM_LEAST_CONN: u8 = 2;

/// `ServiceValue::flags`.
pub const SERVICE_AFFINITY: u8 = 1;
/// Policy applies to this service (some allow/deny entry or default deny).
pub const SERVICE_POLICY: u8 = 1 << 1;
/// Clients without an explicit allow are denied.
pub const SERVICE_DEFAULT_DENY: u8 = 1 << 2;

/// `BackendValue::state`.
pub const BACKEND_ACTIVE: u8 = 0;
/// Takes no new connections; established ones continue.
pub const BACKEND_DRAINING: u8 = 1;

/// `BackendValue::flags`: connections go to the local agent's tunnel
/// listener (`ConfigValue::tunnel_*`), which carries them over mTLS to the
/// backend's node. TCP only: UDP to such a backend goes directly.
pub const BACKEND_FLAG_TUNNEL: u8 = 1;

/// `PolicyValue::verdict`.
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// `ConfigValue::flags` (bit 0 is `CONFIG_FLAG_SAME_NODE_REDIRECT`).
pub const CONFIG_EVENTS: u32 = 1 << 1;
/// Kernel-side debug logs (aya-log) at the balancing decisions. Checked
/// before any log call, so with it off a decision pays one branch per site.
pub const CONFIG_FLAG_DEBUG_LOG: u32 = 1 << 2;

/// `Event::verdict`.
pub const EVENT_FORWARDED: u8 = 0;
pub const EVENT_NO_BACKEND: u8 = 1;
pub const EVENT_DENIED: u8 = 2;

/// splitmix64's finaliser: spreads client ids evenly over a Maglev table.
/// Shared so the agent's `meshctl explain` computes exactly what the kernel
/// does.
#[inline(always)]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The Maglev slot of a client in a service's table.
#[inline(always)]
pub fn maglev_slot(client: u64, service_id: u32, slot_count: u32) -> u32 {
    (mix64(client ^ u64::from(service_id)) % u64::from(slot_count)) as u32
}

/// Identity 0: a client whose cgroup maps to no workload.
pub const IDENTITY_UNKNOWN: u32 = 0;

/// A service's virtual address as a connecting socket names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// IPv4: the address in `addr[0]`, the rest zero. IPv6: all four words.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub service_id: u32,
    /// Which generation of the slot table is live; see `SlotKey`.
    pub generation: u32,
    /// Zero: the service exists but has no usable backend, so connects fail.
    pub slot_count: u32,
    /// Session affinity timeout (with `SERVICE_AFFINITY`).
    pub affinity_timeout_s: u32,
    pub algorithm: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// One slot of a service's selection table. A new table is written under a new
/// generation, then the service flips to it in one update, then the old one is
/// deleted: a reader never sees a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    pub generation: u32,
    pub slot: u32,
}

/// Value of `MESH_SLOTS`: the backend id a slot points at.
pub type BackendId = u32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub state: u8,
    pub service_id: u32,
    /// `BACKEND_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// The chosen backend as a socket sees its peer, to find the VIP again for
/// `getpeername()` and `recvmsg()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// The backend an unconnected UDP socket was given for one service, so all
/// its datagrams to that VIP go to one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbKey {
    pub cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbValue {
    pub backend_id: BackendId,
    pub _pad: u32,
}

/// A balanced TCP socket, keyed by cookie, for live-connection counting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnValue {
    pub backend_id: BackendId,
    /// 1 once counted in `MESH_ACTIVE`, so a close decrements exactly once.
    pub counted: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub service_id: u32,
    pub _pad: u32,
    /// Network-namespace cookie, or cgroup id for host-network clients.
    pub client: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: BackendId,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last connect that used this entry.
    pub last_used_ns: u64,
}

/// `MESH_POLICY` key: may `identity` connect to `service_id`?
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub identity: u32,
    pub service_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub verdict: u8,
    pub _pad: [u8; 3],
}

/// Per-CPU counters of one backend, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// TCP connections and connected UDP sockets sent here.
    pub connections: u64,
    /// Unconnected UDP sockets sent here (one per socket, not per datagram).
    pub udp_flows: u64,
}

/// Summing the per-CPU copies.
impl core::ops::AddAssign for BackendStats {
    fn add_assign(&mut self, o: Self) {
        self.connections += o.connections;
        self.udp_flows += o.udp_flows;
    }
}

/// Connect outcomes of one backend, kept by sock_ops for outlier detection;
/// indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendHealth {
    /// Connects that failed since the last one that succeeded.
    pub consecutive_failures: u32,
    pub _pad: u32,
    /// Connects that never got established (refused, timed out), ever.
    pub failures: u64,
}

/// Per-CPU counters of one service, indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub connections: u64,
    pub udp_flows: u64,
    /// Connects refused because the service had no usable backend.
    pub no_backend: u64,
    /// Connects refused by policy.
    pub denied: u64,
    /// TCP connections sent to the local agent's tunnel (a backend on
    /// another node, mTLS on).
    pub tunnelled: u64,
    /// UDP sent directly to a backend the tunnel would carry if it were
    /// TCP (HBONE carries TCP only; a permissive service's UDP).
    pub udp_direct_remote: u64,
}

/// Summing the per-CPU copies.
impl core::ops::AddAssign for ServiceStats {
    fn add_assign(&mut self, o: Self) {
        self.connections += o.connections;
        self.udp_flows += o.udp_flows;
        self.no_backend += o.no_backend;
        self.denied += o.denied;
        self.tunnelled += o.tunnelled;
        self.udp_direct_remote += o.udp_direct_remote;
    }
}

/// One balancing decision, sent to the agent through `MESH_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ns: u64,
    pub cgroup_id: u64,
    pub client: u64,
    pub service_id: u32,
    pub backend_id: BackendId,
    pub slot: u32,
    pub identity: u32,
    pub algorithm: u8,
    pub verdict: u8,
    pub affinity_hit: u8,
    pub proto: u8,
    pub _pad: [u8; 4],
}

/// The single entry of `MESH_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigValue {
    /// Sockets carrying this mark (the agent's own) are never touched.
    pub agent_mark: u32,
    pub flags: u32,
    /// Clients in this network namespace (the host's) are told apart by
    /// cgroup instead, since they all share it.
    pub host_netns_cookie: u64,
    /// The local agent's outbound tunnel listener, where connections to
    /// tunnelled backends go: IPv4 address (network order; IPv4 clients,
    /// and IPv6 sockets naming IPv4-mapped VIPs), IPv6 address, and port
    /// (network order). Port 0: no tunnel on this node, so tunnelled
    /// backends are refused (`ECONNREFUSED`) rather than sent in plaintext.
    pub tunnel_v4: u32,
    pub tunnel_port: u16,
    pub _pad: u16,
    pub tunnel_v6: [u32; 4],
}

/// A tunnelled connection as the agent's accepted socket sees it: the
/// client's address and port and the listener's, family `FAMILY_V4` or
/// `FAMILY_V6` (IPv4-mapped IPv6 sockets in IPv4 form). Addresses and
/// ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelKey {
    pub client_addr: [u32; 4],
    pub listener_addr: [u32; 4],
    pub client_port: u16,
    pub listener_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// What the connecting program decided for a tunnelled connection: the
/// backend it chose (address and port in network order) and who asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelValue {
    /// The client's cgroup (the source of its workload identity).
    pub cgroup_id: u64,
    pub backend_addr: [u32; 4],
    pub service_id: u32,
    pub backend_id: BackendId,
    /// The client's identity id (`MESH_WORKLOADS`), `IDENTITY_UNKNOWN` if none.
    pub identity: u32,
    pub backend_port: u16,
    pub family: u8,
    pub _pad: u8,
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 20);
    assert!(core::mem::size_of::<SlotKey>() == 12);
    assert!(core::mem::size_of::<BackendValue>() == 28);
    assert!(core::mem::size_of::<TunnelKey>() == 40);
    assert!(core::mem::size_of::<TunnelValue>() == 40);
    assert!(core::mem::size_of::<RevNatKey>() == 32);
    assert!(core::mem::size_of::<RevNatValue>() == 20);
    assert!(core::mem::size_of::<SockLbKey>() == 16);
    assert!(core::mem::size_of::<SockLbValue>() == 8);
    assert!(core::mem::size_of::<ConnValue>() == 8);
    assert!(core::mem::size_of::<AffinityKey>() == 16);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<PolicyKey>() == 8);
    assert!(core::mem::size_of::<PolicyValue>() == 4);
    assert!(core::mem::size_of::<BackendStats>() == 16);
    assert!(core::mem::size_of::<ServiceStats>() == 48);
    assert!(core::mem::size_of::<BackendHealth>() == 16);
    assert!(core::mem::size_of::<Event>() == 48);
    assert!(core::mem::size_of::<ConfigValue>() == 40);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit
    // pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for SockLbKey {}
    unsafe impl aya::Pod for SockLbValue {}
    unsafe impl aya::Pod for ConnValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for BackendHealth {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for ConfigValue {}
    unsafe impl aya::Pod for TunnelKey {}
    unsafe impl aya::Pod for TunnelValue {}
}
