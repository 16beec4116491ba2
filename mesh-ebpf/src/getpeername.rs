//! `cgroup/getpeername4` and `cgroup/getpeername6`: an application that
//! connected to a VIP sees the VIP as its peer, not the backend.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    lb,
    sock_addr::{self, ALLOW},
};

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    let peer = sock_addr::user_addr4(&ctx);
    let cookie = sock_addr::socket_cookie(&ctx);
    if let Some((vip, port)) = lb::reverse(cookie, peer, sock_addr::user_port(&ctx)) {
        sock_addr::set_user_addr4(&ctx, vip);
        sock_addr::set_user_port(&ctx, port);
    }
    // getpeername hooks must return 1.
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    let peer = sock_addr::user_addr6(&ctx);
    let cookie = sock_addr::socket_cookie(&ctx);
    if let Some((vip, port)) = lb::reverse(cookie, peer, sock_addr::user_port(&ctx)) {
        sock_addr::set_user_addr6(&ctx, vip);
        sock_addr::set_user_port(&ctx, port);
    }
    ALLOW
}
