//! `sk_msg` on `MESH_SOCKS`: every message a node-local socket sends goes
//! straight into the peer socket's receive queue (`BPF_F_INGRESS`) when the
//! peer is in the map; otherwise it takes the normal TCP path, untouched.
//! The program never drops: every path returns `SK_PASS`.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS, sk_msg_md},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use core::ptr::{addr_of, read_volatile};
use mesh_common::{SOCK_REDIRECT_NEVER, SOCK_REDIRECT_OK};

use crate::{
    redirect::{self, Tuple, read_ip6},
    redirect_maps::{MESH_SOCK_STATE, MESH_SOCKS},
};

#[sk_msg]
pub fn mesh_redir_msg(ctx: SkMsgContext) -> u32 {
    try_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_msg(ctx: &SkMsgContext) {
    let md: *mut sk_msg_md = ctx.msg;
    let (t, size) = unsafe {
        (
            Tuple {
                family: read_volatile(addr_of!((*md).family)),
                local_ip4: read_volatile(addr_of!((*md).local_ip4)),
                remote_ip4: read_volatile(addr_of!((*md).remote_ip4)),
                local_ip6: read_ip6(addr_of!((*md).local_ip6)),
                remote_ip6: read_ip6(addr_of!((*md).remote_ip6)),
                local_port: read_volatile(addr_of!((*md).local_port)),
                remote_port: read_volatile(addr_of!((*md).remote_port)),
            },
            u64::from(read_volatile(addr_of!((*md).size))),
        )
    };
    let fallback = |s: &mut mesh_common::RedirectStats| {
        s.msgs_fallback += 1;
        s.bytes_fallback += size;
    };
    let Some((mut key, loopback)) = redirect::key_of(&t) else {
        redirect::count(fallback);
        return;
    };
    if loopback {
        key.netns = unsafe { bpf_get_netns_cookie(md.cast()) };
    }
    let allowed = unsafe { MESH_SOCK_STATE.get(key).copied() } == Some(SOCK_REDIRECT_OK);
    if !allowed {
        redirect::count(fallback);
        return;
    }
    if redirect::enabled() {
        let verdict = MESH_SOCKS.redirect_msg(ctx, key.peer(), u64::from(BPF_F_INGRESS));
        if verdict == i64::from(SK_PASS) {
            redirect::count(|s| {
                s.msgs_redirected += 1;
                s.bytes_redirected += size;
            });
            return;
        }
    }
    // This message goes through TCP, so later ones must too: the peer reads
    // redirected bytes before TCP ones, and these may still be unread.
    let _ = MESH_SOCK_STATE.insert(key, SOCK_REDIRECT_NEVER, 0);
    redirect::count(fallback);
}
