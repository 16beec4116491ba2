//! `sock_ops` (cgroup): when a TCP connection becomes ESTABLISHED and both
//! of its ends are on this node, put the socket in `MESH_SOCKS` so that
//! `mesh_redir_msg` can hand its messages straight to the peer. When such a
//! socket closes, its `MESH_SOCK_STATE` entry goes too (the kernel takes it
//! out of the sockhash by itself).

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_ops,
    },
    helpers::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::{addr_of, read_volatile};
use mesh_common::{EndpointKey, SOCK_REDIRECT_OK, SockKey};

use crate::{
    lb,
    redirect::{self, Tuple, read_ip6},
    redirect_maps::{MESH_EXCL_EP, MESH_REDIR_EXCL, MESH_SOCK_STATE, MESH_SOCKS},
};

#[sock_ops]
pub fn mesh_redir_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    // The return value of sock_ops programs only matters for callbacks that
    // ask for a reply; ESTABLISHED ones do not.
    1
}

/// The kernel's TCP_CLOSE state.
const TCP_CLOSE: u32 = 7;

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    if op == BPF_SOCK_OPS_STATE_CB {
        if ctx.arg(1) == TCP_CLOSE {
            forget(ops);
        }
        return;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
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
    if segs_in != 0 || segs_out != 0 || !redirect::enabled() || excluded(&key) || agent_socket(ops)
    {
        redirect::count(|s| s.sockets_skipped += 1);
        return;
    }
    // Each namespace has its own loopback: keep their 4-tuples apart.
    if key.netns != 0 {
        key.netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    }
    if MESH_SOCK_STATE.insert(key, SOCK_REDIRECT_OK, 0).is_err() {
        redirect::count(|s| s.sockets_failed += 1);
        return;
    }
    match MESH_SOCKS.update(key, unsafe { &mut *ops }, 0) {
        Ok(()) => {
            redirect::count(|s| s.sockets_added += 1);
            // See the close, to drop the state entry with the socket rather
            // than leave it to the LRU (which, under churn, would evict
            // entries of live sockets and send them back to TCP for good).
            let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        Err(_) => {
            let _ = MESH_SOCK_STATE.remove(key);
            redirect::count(|s| s.sockets_failed += 1);
        }
    }
}

/// A closing socket's state entry goes. Also called for balanced sockets
/// that were never redirected (the load balancer watches their states
/// too); for them there is nothing to remove.
#[inline(always)]
fn forget(ops: *mut bpf_sock_ops) {
    let Some((mut key, loopback)) = redirect::key_of(&tuple(ops)) else {
        return;
    };
    if loopback {
        key.netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    }
    let _ = MESH_SOCK_STATE.remove(key);
}

#[inline(always)]
fn tuple(ops: *mut bpf_sock_ops) -> Tuple {
    unsafe {
        Tuple {
            family: read_volatile(addr_of!((*ops).family)),
            local_ip4: read_volatile(addr_of!((*ops).local_ip4)),
            remote_ip4: read_volatile(addr_of!((*ops).remote_ip4)),
            local_ip6: read_ip6(addr_of!((*ops).local_ip6)),
            remote_ip6: read_ip6(addr_of!((*ops).remote_ip6)),
            local_port: read_volatile(addr_of!((*ops).local_port)),
            remote_port: read_volatile(addr_of!((*ops).remote_port)),
        }
    }
}

/// The socket's key when both ends are node-local; `netns` is 1 as a marker
/// when the namespace cookie must be filled in.
#[inline(always)]
fn local_key(ops: *mut bpf_sock_ops) -> Option<SockKey> {
    let (mut key, loopback) = redirect::key_of(&tuple(ops))?;
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

/// The agent's own sockets (marked) are never touched.
#[inline(always)]
fn agent_socket(ops: *mut bpf_sock_ops) -> bool {
    let mark = unsafe {
        let sk = read_volatile(addr_of!((*ops).__bindgen_anon_2.sk));
        if sk.is_null() {
            return false;
        }
        read_volatile(addr_of!((*sk).mark))
    };
    lb::is_agent_socket(mark)
}
