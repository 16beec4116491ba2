//! Strict mTLS on the destination node: which local backends refuse
//! plaintext from other nodes, this node's own addresses, and the counts of
//! plaintext connections the `cgroup_skb/ingress` program let in or refused.
//!
//! A TCP packet whose destination is in `MESH_INBOUND` and whose source is
//! neither loopback nor in `MESH_NODE_ADDRS` came straight from another
//! node, not through the tunnel (the tunnel's inbound side connects to the
//! backend from an address of this node). Strict: dropped. Permissive:
//! passed. Either way its SYN is counted per service.

/// Names of the pinned maps of inbound enforcement (≤ 15 bytes each).
pub mod inbound_map_names {
    pub const INBOUND: &str = "MESH_INBOUND";
    pub const NODE_ADDRS: &str = "MESH_NODE_ADDRS";
    pub const INBOUND_STATS: &str = "MESH_IN_STATS";
    pub const SYN_SEEN: &str = "MESH_IN_SYN";
    pub const ALL: [&str; 4] = [INBOUND, NODE_ADDRS, INBOUND_STATS, SYN_SEEN];
}

/// Names of the inbound programs in the kernel object.
pub mod inbound_program_names {
    pub const INGRESS: &str = "mesh_ingress";
}

/// Capacities of the inbound maps (`MESH_INBOUND` and `MESH_IN_STATS` are
/// sized like the backends and services maps at load time).
pub mod inbound_limits {
    pub const MAX_INBOUND: u32 = 65_536;
    /// Interface addresses of the node plus the addresses of its backends.
    pub const MAX_NODE_ADDRS: u32 = 65_536 + 4_096;
    /// Recent plaintext SYNs, so a retransmitted SYN is counted once (LRU).
    pub const MAX_SYN_SEEN: u32 = 65_536;
}

/// `InboundValue::flags`: plaintext from other nodes is dropped.
pub const INBOUND_FLAG_STRICT: u8 = 1;

/// Key of `MESH_INBOUND`: a local backend as packets name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InboundKey {
    /// IPv4: the address in `addr[0]`, the rest zero. Network byte order.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InboundValue {
    /// Whose counters (`MESH_IN_STATS`) a connection adds to: the
    /// service's TCP id, as in `MESH_SVC_STATS`.
    pub service_id: u32,
    /// `INBOUND_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Key of `MESH_IN_SYN`: one connection attempt, as its SYN names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Per-CPU plaintext connections of one service from other nodes, indexed
/// by service id (counted on the SYN; a retransmitted SYN once).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundStats {
    /// Passed: the service is permissive.
    pub accepted: u64,
    /// Dropped: the service is strict.
    pub refused: u64,
}

/// Summing the per-CPU copies.
impl core::ops::AddAssign for InboundStats {
    fn add_assign(&mut self, o: Self) {
        self.accepted += o.accepted;
        self.refused += o.refused;
    }
}

const _: () = {
    assert!(core::mem::size_of::<InboundKey>() == 20);
    assert!(core::mem::size_of::<InboundValue>() == 8);
    assert!(core::mem::size_of::<SynKey>() == 40);
    assert!(core::mem::size_of::<InboundStats>() == 16);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit
    // pattern is valid.
    unsafe impl aya::Pod for InboundKey {}
    unsafe impl aya::Pod for InboundValue {}
    unsafe impl aya::Pod for SynKey {}
    unsafe impl aya::Pod for InboundStats {}
}
