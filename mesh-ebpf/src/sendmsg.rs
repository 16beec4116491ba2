//! `cgroup/sendmsg4` and `cgroup/sendmsg6`: datagrams an unconnected UDP
//! socket sends to a VIP go to a backend, the same one for the socket's
//! whole life (per-socket balancing, like a connected socket).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    connect::apply,
    lb::{self, Call},
    sock_addr,
};

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    let dst = sock_addr::user_addr4(&ctx);
    let outcome = lb::balance(&ctx, dst, sock_addr::user_port(&ctx), Call::UnconnectedSend);
    apply(&ctx, outcome, sock_addr::set_user_addr4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    let dst = sock_addr::user_addr6(&ctx);
    let outcome = lb::balance(&ctx, dst, sock_addr::user_port(&ctx), Call::UnconnectedSend);
    apply(&ctx, outcome, sock_addr::set_user_addr6)
}
