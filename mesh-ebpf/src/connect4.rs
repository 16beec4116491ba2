//! `cgroup/connect4`: turns a connect to a service VIP into a connect to one
//! of its backends, before any packet exists.

use aya_ebpf::{
    helpers::generated::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use mesh_common::{ECONNREFUSED, FAMILY_V4, OrigDstValue, PROTO_TCP, ServiceKey};

use crate::{
    backend::{self, Decision},
    maps::MESH_ORIG_DST,
    sock_addr::{self, ALLOW, REJECT},
};

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> i32 {
    if sock_addr::protocol(ctx) != u32::from(PROTO_TCP) {
        return ALLOW;
    }
    let vip = sock_addr::user_ip4(ctx);
    let vip_port = sock_addr::user_port(ctx);
    let key = ServiceKey {
        addr: [vip, 0, 0, 0],
        port: vip_port,
        proto: PROTO_TCP,
        family: FAMILY_V4,
    };
    let Some(svc) = backend::lookup_service(&key) else {
        return ALLOW;
    };
    if backend::is_agent_socket(sock_addr::socket_mark(ctx)) {
        return ALLOW;
    }
    match backend::select_backend(&svc) {
        Decision::NoBackend => {
            backend::count_service(&svc, false);
            // Refuse at once; without this the connect would go to the VIP
            // itself and hang or reach something unrelated.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
        Decision::Forward(be) => {
            backend::count_service(&svc, true);
            sock_addr::set_user_ip4(ctx, be.addr[0]);
            sock_addr::set_user_port(ctx, be.port);
            let orig = OrigDstValue {
                vip: [vip, 0, 0, 0],
                backend: be.addr,
                vip_port,
                backend_port: be.port,
                family: FAMILY_V4,
                _pad: [0; 3],
            };
            let _ = MESH_ORIG_DST.insert(sock_addr::socket_cookie(ctx), orig, 0);
            ALLOW
        }
    }
}
