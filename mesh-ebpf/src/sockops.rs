//! `sockops`: counts live TCP connections per backend for least-connections.
//! A balanced socket is counted once when it is established and uncounted
//! once when it closes, however it closes (FIN, RST, timeout).

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::lb;

/// `TCP_CLOSE` from the kernel's TCP state machine.
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => closed(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
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
        // Ask for state changes so the close is seen.
        let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(conn) = lb::conn(cookie) else {
        return;
    };
    let conn = unsafe { &mut *conn };
    if conn.counted == 1 {
        conn.counted = 0;
        lb::adjust_active(conn.backend_id, false);
    }
    lb::forget_conn(cookie);
}
