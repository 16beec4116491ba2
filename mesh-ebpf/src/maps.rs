//! Every map the programs share with the agent. Pinned by name so a
//! restarted agent reopens the same maps and traffic never stops.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use mesh_common::{
    AffinityKey, AffinityValue, BackendHealth, BackendId, BackendStats, BackendValue, ConfigValue,
    ConnValue, InboundKey, InboundStats, InboundValue, LocalAddrKey, PolicyKey, PolicyValue,
    RevNatKey, RevNatValue, ServiceKey, ServiceStats, ServiceValue, SlotKey, SockLbKey,
    SockLbValue, SynKey, TunnelKey, TunnelValue, inbound_limits, limits,
};

#[map(name = "MESH_SERVICES")]
pub static MESH_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(limits::MAX_SERVICES, 0);

#[map(name = "MESH_SLOTS")]
pub static MESH_SLOTS: HashMap<SlotKey, BackendId> = HashMap::pinned(limits::MAX_SLOTS, 0);

#[map(name = "MESH_BACKENDS")]
pub static MESH_BACKENDS: HashMap<BackendId, BackendValue> =
    HashMap::pinned(limits::MAX_BACKENDS, 0);

/// (socket, backend it was sent to) → the VIP, for getpeername and recvmsg.
/// LRU: entries of closed sockets age out with no bookkeeping on the hot path.
#[map(name = "MESH_REV_NAT")]
pub static MESH_REV_NAT: LruHashMap<RevNatKey, RevNatValue> =
    LruHashMap::pinned(limits::MAX_TRACKED_SOCKETS, 0);

/// (unconnected UDP socket, service) → its backend.
#[map(name = "MESH_SOCK_LB")]
pub static MESH_SOCK_LB: LruHashMap<SockLbKey, SockLbValue> =
    LruHashMap::pinned(limits::MAX_TRACKED_SOCKETS, 0);

/// Balanced TCP sockets by cookie, for live-connection counting.
#[map(name = "MESH_CONNS")]
pub static MESH_CONNS: LruHashMap<u64, ConnValue> =
    LruHashMap::pinned(limits::MAX_TRACKED_SOCKETS, 0);

/// Live TCP connections per backend id (least-connections).
#[map(name = "MESH_ACTIVE")]
pub static MESH_ACTIVE: Array<u64> = Array::pinned(limits::MAX_BACKENDS, 0);

/// Connect failures per backend id (outlier detection).
#[map(name = "MESH_BE_HEALTH")]
pub static MESH_BE_HEALTH: Array<BackendHealth> = Array::pinned(limits::MAX_BACKENDS, 0);

#[map(name = "MESH_AFFINITY")]
pub static MESH_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(limits::MAX_AFFINITY, 0);

/// cgroup id → identity id.
#[map(name = "MESH_WORKLOADS")]
pub static MESH_WORKLOADS: HashMap<u64, u32> = HashMap::pinned(limits::MAX_WORKLOADS, 0);

#[map(name = "MESH_POLICY")]
pub static MESH_POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(limits::MAX_POLICY, 0);

#[map(name = "MESH_BE_STATS")]
pub static MESH_BE_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(limits::MAX_BACKENDS, 0);

#[map(name = "MESH_SVC_STATS")]
pub static MESH_SVC_STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(limits::MAX_SERVICES, 0);

#[map(name = "MESH_EVENTS")]
pub static MESH_EVENTS: RingBuf = RingBuf::pinned(limits::EVENTS_BYTES, 0);

#[map(name = "MESH_CONFIG")]
pub static MESH_CONFIG: Array<ConfigValue> = Array::pinned(1, 0);

/// Tunnelled TCP sockets by cookie, from connect() until sock_ops knows
/// their source port (at `TCP_CONNECT_CB`, before the SYN) and moves the
/// entry to `MESH_TUN_ORIG`.
#[map(name = "MESH_TUN_PEND")]
pub static MESH_TUN_PEND: LruHashMap<u64, TunnelValue> =
    LruHashMap::pinned(limits::MAX_TUNNEL_PENDING, 0);

/// Tunnelled connections by 4-tuple: what the agent's outbound listener
/// looks up (and deletes) for each socket it accepts.
#[map(name = "MESH_TUN_ORIG")]
pub static MESH_TUN_ORIG: LruHashMap<TunnelKey, TunnelValue> =
    LruHashMap::pinned(limits::MAX_TUNNEL_PENDING, 0);

/// Local backends of strict and permissive services (`ingress.rs`), written
/// by the agent.
#[map(name = "MESH_INBOUND")]
pub static MESH_INBOUND: HashMap<InboundKey, InboundValue> =
    HashMap::pinned(inbound_limits::MAX_INBOUND, 0);

/// This node's interface addresses and the addresses of its backends: a
/// packet from one of them did not come from another node.
#[map(name = "MESH_NODE_ADDRS")]
pub static MESH_NODE_ADDRS: HashMap<LocalAddrKey, u32> =
    HashMap::pinned(inbound_limits::MAX_NODE_ADDRS, 0);

/// Plaintext connections from other nodes per service id.
#[map(name = "MESH_IN_STATS")]
pub static MESH_IN_STATS: PerCpuArray<InboundStats> = PerCpuArray::pinned(limits::MAX_SERVICES, 0);

/// The initial sequence number of recent plaintext SYNs, so a
/// retransmitted SYN is not counted as a second connection.
#[map(name = "MESH_IN_SYN")]
pub static MESH_IN_SYN: LruHashMap<SynKey, u32> =
    LruHashMap::pinned(inbound_limits::MAX_SYN_SEEN, 0);
