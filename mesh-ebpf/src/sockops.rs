//! `sockops`: counts live TCP connections per backend for least-connections,
//! and failed connects per backend for outlier detection. A balanced socket
//! is counted once when it is established and uncounted once when it closes,
//! however it closes (FIN, RST, timeout); a connect that closes before it
//! was ever established is a failure of its backend.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};

use mesh_common::TunnelKey;

use crate::{
    lb,
    redirect::{self, Tuple},
};

/// States from the kernel's TCP state machine.
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => closed(&ctx, ctx.arg(0)),
        _ => {}
    }
    1
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// Ask for state changes of a balanced socket, so a connect that never
/// gets established, and the close of one that does, are both seen.
#[inline(always)]
fn watch_states(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn connecting(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    if lb::conn(cookie).is_some() {
        watch_states(ctx);
        lb::tunnel_connecting(cookie, || tunnel_key(ctx));
    }
}

/// The connection as the agent's end will see it: this socket's address
/// and port are the client's, its peer's the tunnel listener's.
#[inline(always)]
fn tunnel_key(ctx: &SockOpsContext) -> Option<TunnelKey> {
    let (key, _) = redirect::key_of(&Tuple::of_sock_ops(ctx.ops))?;
    Some(TunnelKey {
        client_addr: key.local_addr,
        listener_addr: key.remote_addr,
        client_port: key.local_port,
        listener_port: key.remote_port,
        family: key.family,
        _pad: [0; 3],
    })
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    let Some(conn) = lb::conn(cookie(ctx)) else {
        return;
    };
    let conn = unsafe { &mut *conn };
    if conn.counted == 0 {
        conn.counted = 1;
        lb::adjust_active(conn.backend_id, true);
        lb::connect_succeeded(conn.backend_id);
        watch_states(ctx);
    }
}

#[inline(always)]
fn closed(ctx: &SockOpsContext, old_state: u32) {
    let cookie = cookie(ctx);
    let Some(conn) = lb::conn(cookie) else {
        return;
    };
    let conn = unsafe { &mut *conn };
    if conn.counted == 1 {
        conn.counted = 0;
        lb::adjust_active(conn.backend_id, false);
    } else if old_state == TCP_SYN_SENT {
        lb::connect_failed(conn.backend_id);
    }
    lb::forget_conn(cookie, conn.backend_id);
}
