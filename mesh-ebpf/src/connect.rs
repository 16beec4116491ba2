//! `cgroup/connect4` and `cgroup/connect6`: a connect to a service VIP
//! becomes a connect to one of its backends, before any packet exists. TCP
//! and connected UDP sockets both come through here.

use aya_ebpf::{
    helpers::generated::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext,
};

use crate::{
    lb::{self, Call, Outcome},
    sock_addr::{self, ALLOW, REJECT},
};

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let dst = sock_addr::user_addr4(&ctx);
    let outcome = lb::balance(&ctx, dst, sock_addr::user_port(&ctx), Call::Connect);
    apply(&ctx, outcome, sock_addr::set_user_addr4)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let dst = sock_addr::user_addr6(&ctx);
    let outcome = lb::balance(&ctx, dst, sock_addr::user_port(&ctx), Call::Connect);
    apply(&ctx, outcome, sock_addr::set_user_addr6)
}

/// Writes the backend into the context, or fails the call with the errno
/// the decision gave. Shared with sendmsg.
#[inline(always)]
pub fn apply(
    ctx: &SockAddrContext,
    outcome: Outcome,
    set_addr: fn(&SockAddrContext, sock_addr::Addr),
) -> i32 {
    match outcome {
        Outcome::Untouched => ALLOW,
        Outcome::Refuse(errno) => {
            // Fail at once with a meaningful errno: without this the call
            // would go to the VIP itself and hang or reach something else.
            unsafe { bpf_set_retval(-errno) };
            REJECT
        }
        Outcome::Forward(addr, port) => {
            set_addr(ctx, addr);
            sock_addr::set_user_port(ctx, port);
            ALLOW
        }
    }
}
