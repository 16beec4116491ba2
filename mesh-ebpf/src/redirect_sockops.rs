//! `sock_ops` (cgroup): when a TCP connection becomes ESTABLISHED and both
//! of its ends are on this node, give the socket its redirect state (its
//! peer's key, socket-local) and put it in `MESH_SOCKS`, so that
//! `mesh_redir_msg` can hand its messages straight to the peer. The kernel
//! takes a closing socket out of the sockhash and frees its state.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, bpf_sock,
        bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, generated::bpf_skc_to_mptcp_sock},
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::{addr_of, read_volatile};
use mesh_common::{EndpointKey, SOCK_REDIRECT_OK, SockKey, SockRedirect};

use crate::{
    lb,
    redirect::{self, Tuple},
    redirect_maps::{MESH_EXCL_EP, MESH_REDIR_EXCL, MESH_SOCKS, forget_sock_state, set_sock_state},
};

#[sock_ops]
pub fn mesh_redir_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    // The return value of sock_ops programs only matters for callbacks that
    // ask for a reply; ESTABLISHED ones do not.
    1
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return;
    }
    let sk = unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return;
    }
    let Some(mut key) = local_key(ops) else {
        redirect::count(|s| s.sockets_skipped += 1);
        return;
    };
    // A socket whose payload already crossed TCP (Fast Open data in the SYN)
    // could have bytes unread in the peer's queue: never redirect it.
    let (segs_in, segs_out) = unsafe {
        (
            read_volatile(addr_of!((*ops).data_segs_in)),
            read_volatile(addr_of!((*ops).data_segs_out)),
        )
    };
    if segs_in != 0
        || segs_out != 0
        || !redirect::enabled()
        || excluded(&key)
        || agent_socket(sk)
        || mptcp_subflow(sk)
    {
        redirect::count(|s| s.sockets_skipped += 1);
        return;
    }
    // Each namespace has its own loopback: keep their 4-tuples apart.
    if key.netns != 0 {
        key.netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    }
    let state = SockRedirect {
        peer: key.peer(),
        state: SOCK_REDIRECT_OK,
        _pad: 0,
    };
    if !set_sock_state(sk, state) {
        redirect::count(|s| s.sockets_failed += 1);
        return;
    }
    match MESH_SOCKS.update(key, unsafe { &mut *ops }, 0) {
        Ok(()) => redirect::count(|s| s.sockets_added += 1),
        Err(_) => {
            forget_sock_state(sk);
            redirect::count(|s| s.sockets_failed += 1);
        }
    }
}

/// The socket's key when both ends are node-local; `netns` is 1 as a marker
/// when the namespace cookie must be filled in.
#[inline(always)]
fn local_key(ops: *mut bpf_sock_ops) -> Option<SockKey> {
    let (mut key, loopback) = redirect::key_of(&Tuple::of_sock_ops(ops))?;
    if !redirect::is_local(&key.local_addr, key.family)
        || !redirect::is_local(&key.remote_addr, key.family)
    {
        return None;
    }
    if loopback {
        key.netns = 1;
    }
    Some(key)
}

/// An end's port is excluded by the operator, or an end is a backend of a
/// service that opted out. Both ends are checked, so the client and the
/// server side of such a connection both stay out.
#[inline(always)]
fn excluded(key: &SockKey) -> bool {
    let endpoint = |addr: [u32; 4], port: u16| EndpointKey {
        addr,
        port,
        family: key.family,
        _pad: 0,
    };
    unsafe {
        MESH_REDIR_EXCL.get(key.local_port).is_some()
            || MESH_REDIR_EXCL.get(key.remote_port).is_some()
            || MESH_EXCL_EP
                .get(endpoint(key.local_addr, key.local_port))
                .is_some()
            || MESH_EXCL_EP
                .get(endpoint(key.remote_addr, key.remote_port))
                .is_some()
    }
}

/// A subflow of an MPTCP socket: its reader reads through the MPTCP socket,
/// never the subflow's own queue, so it must not be a redirect target (the
/// kernel would refuse it in the sockhash anyway).
#[inline(always)]
fn mptcp_subflow(sk: *mut bpf_sock) -> bool {
    !unsafe { bpf_skc_to_mptcp_sock(sk.cast()) }.is_null()
}

/// The agent's own sockets (marked) are never touched.
#[inline(always)]
fn agent_socket(sk: *mut bpf_sock) -> bool {
    lb::is_agent_socket(unsafe { read_volatile(addr_of!((*sk).mark)) })
}
