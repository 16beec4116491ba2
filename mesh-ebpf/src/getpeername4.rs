//! `cgroup/getpeername4`: an application that connected to a VIP sees the
//! VIP as its peer, not the backend the kernel picked.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{maps::MESH_ORIG_DST, sock_addr};

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername4(&ctx);
    // getpeername hooks must always return 1.
    sock_addr::ALLOW
}

#[inline(always)]
fn try_getpeername4(ctx: &SockAddrContext) {
    let cookie = sock_addr::socket_cookie(ctx);
    let Some(orig) = (unsafe { MESH_ORIG_DST.get(cookie).copied() }) else {
        return;
    };
    // Only undo our own rewrite: the socket may have been reused since.
    if sock_addr::user_ip4(ctx) == orig.backend[0] && sock_addr::user_port(ctx) == orig.backend_port
    {
        sock_addr::set_user_ip4(ctx, orig.vip[0]);
        sock_addr::set_user_port(ctx, orig.vip_port);
    }
}
