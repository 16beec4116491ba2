//! `cgroup/recvmsg4` and `cgroup/recvmsg6`: a UDP reply from a backend is
//! shown to the application as coming from the VIP it sent to.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    lb,
    sock_addr::{self, ALLOW},
};

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    let source = sock_addr::user_addr4(&ctx);
    let cookie = sock_addr::socket_cookie(&ctx);
    if let Some((vip, port)) = lb::reverse(cookie, source, sock_addr::user_port(&ctx)) {
        sock_addr::set_user_addr4(&ctx, vip);
        sock_addr::set_user_port(&ctx, port);
    }
    // recvmsg hooks must return 1.
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    let source = sock_addr::user_addr6(&ctx);
    let cookie = sock_addr::socket_cookie(&ctx);
    if let Some((vip, port)) = lb::reverse(cookie, source, sock_addr::user_port(&ctx)) {
        sock_addr::set_user_addr6(&ctx, vip);
        sock_addr::set_user_port(&ctx, port);
    }
    ALLOW
}
