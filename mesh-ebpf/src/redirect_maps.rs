//! Maps of same-node redirect. Kept apart from `maps.rs` so the load
//! balancer's maps and these evolve independently.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
};
use mesh_common::{EndpointKey, LocalAddrKey, RedirectStats, SockKey, redirect_limits};

/// Node-local TCP sockets by their own 4-tuple; `mesh_redir_msg` is
/// attached to it. The kernel removes a socket when it closes.
#[map(name = "MESH_SOCKS")]
pub static MESH_SOCKS: SockHash<SockKey> =
    SockHash::pinned(redirect_limits::MAX_REDIRECT_SOCKETS, 0);

/// Whether a socket in `MESH_SOCKS` may still be redirected (see
/// `mesh_common::SOCK_REDIRECT_NEVER`). `mesh_redir_sockops` removes a
/// socket's entry when it closes; the LRU only bounds the map, and a socket
/// whose entry is gone is treated as "never", which is safe.
#[map(name = "MESH_SOCK_STATE")]
pub static MESH_SOCK_STATE: LruHashMap<SockKey, u32> =
    LruHashMap::pinned(redirect_limits::MAX_REDIRECT_SOCKETS, 0);

/// Addresses of this node and its pods, written by the agent.
#[map(name = "MESH_LOCAL_ADDR")]
pub static MESH_LOCAL_ADDR: HashMap<LocalAddrKey, u32> =
    HashMap::pinned(redirect_limits::MAX_LOCAL_ADDRS, 0);

/// Ports (network byte order) whose connections stay on the normal path:
/// workloads that read in ways sockmap cannot serve (splice from the socket).
#[map(name = "MESH_REDIR_EXCL")]
pub static MESH_REDIR_EXCL: HashMap<u16, u32> =
    HashMap::pinned(redirect_limits::MAX_EXCLUDED_PORTS, 0);

/// Backend endpoints of services with `same_node_redirect: false`, written
/// by the agent: connections with either end here stay on the normal path.
#[map(name = "MESH_EXCL_EP")]
pub static MESH_EXCL_EP: HashMap<EndpointKey, u32> =
    HashMap::pinned(redirect_limits::MAX_EXCLUDED_ENDPOINTS, 0);

#[map(name = "MESH_REDIR_STAT")]
pub static MESH_REDIR_STAT: PerCpuArray<RedirectStats> = PerCpuArray::pinned(1, 0);
