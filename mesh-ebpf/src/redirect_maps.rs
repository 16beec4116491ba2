//! Maps of same-node redirect. Kept apart from `maps.rs` so the load
//! balancer's maps and these evolve independently.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{HashMap, PerCpuArray, SockHash},
};
use mesh_common::{
    EndpointKey, LocalAddrKey, RedirectStats, SockKey, SockRedirect, redirect_limits,
};

/// Node-local TCP sockets by their own 4-tuple; `mesh_redir_msg` is
/// attached to it. The kernel removes a socket when it closes.
#[map(name = "MESH_SOCKS")]
pub static MESH_SOCKS: SockHash<SockKey> =
    SockHash::pinned(redirect_limits::MAX_REDIRECT_SOCKETS, 0);

/// Each socket in `MESH_SOCKS` carries its `SockRedirect` here, in the
/// socket itself: no size to choose, nothing to evict, and the kernel frees
/// it with the socket. Not pinned: the programs hold it, and each socket's
/// psock keeps the `sk_msg` program it was given, and so the storage map
/// that program reads, across agent restarts and upgrades.
#[btf_map]
static MESH_SOCK_REDIR: SkStorage<SockRedirect> = SkStorage::new();

fn sock_state_map() -> *mut c_void {
    ptr::from_ref(&MESH_SOCK_REDIR).cast_mut().cast()
}

/// The socket's redirect state, if it has one.
#[inline(always)]
pub fn sock_state(sk: *mut bpf_sock) -> Option<&'static mut SockRedirect> {
    let p = unsafe { bpf_sk_storage_get(sock_state_map(), sk.cast(), ptr::null_mut(), 0) };
    unsafe { p.cast::<SockRedirect>().as_mut() }
}

/// Gives the socket `state` as its redirect state; false if the kernel
/// could not allocate it.
#[inline(always)]
pub fn set_sock_state(sk: *mut bpf_sock, mut state: SockRedirect) -> bool {
    let flags = u64::from(BPF_SK_STORAGE_GET_F_CREATE);
    let p = unsafe {
        bpf_sk_storage_get(
            sock_state_map(),
            sk.cast(),
            ptr::from_mut(&mut state).cast(),
            flags,
        )
    };
    // An existing value is returned as it is: overwrite it.
    match unsafe { p.cast::<SockRedirect>().as_mut() } {
        Some(slot) => {
            *slot = state;
            true
        }
        None => false,
    }
}

#[inline(always)]
pub fn forget_sock_state(sk: *mut bpf_sock) {
    unsafe { bpf_sk_storage_delete(sock_state_map(), sk.cast()) };
}

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
/// Allocated as entries come (few services opt out, and a preallocated
/// table this size would hold megabytes of kernel memory for nothing).
#[map(name = "MESH_EXCL_EP")]
pub static MESH_EXCL_EP: HashMap<EndpointKey, u32> =
    HashMap::pinned(redirect_limits::MAX_EXCLUDED_ENDPOINTS, BPF_F_NO_PREALLOC);

#[map(name = "MESH_REDIR_STAT")]
pub static MESH_REDIR_STAT: PerCpuArray<RedirectStats> = PerCpuArray::pinned(1, 0);
