//! `sk_msg` on `MESH_SOCKS`: every message a node-local socket sends goes
//! straight into the peer socket's receive queue (`BPF_F_INGRESS`) when the
//! peer is in the map; otherwise it takes the normal TCP path, untouched.
//! The program never drops: every path returns `SK_PASS`.
//!
//! Per message it reads the socket's own storage (its verdict and its
//! peer's key, written by `mesh_redir_sockops`) and does the one sockhash
//! lookup the redirect needs: no key building, no other map lookup.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS, sk_msg_md},
    macros::sk_msg,
    programs::SkMsgContext,
};
use core::ptr::{addr_of, read_volatile};
use mesh_common::{RedirectStats, SOCK_REDIRECT_NEVER, SOCK_REDIRECT_OK};

use crate::{
    redirect,
    redirect_maps::{MESH_SOCKS, sock_state},
};

#[sk_msg]
pub fn mesh_redir_msg(ctx: SkMsgContext) -> u32 {
    try_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_msg(ctx: &SkMsgContext) {
    let md: *mut sk_msg_md = ctx.msg;
    let (sk, size) = unsafe {
        (
            read_volatile(addr_of!((*md).__bindgen_anon_3.sk)),
            u64::from(read_volatile(addr_of!((*md).size))),
        )
    };
    let fallback = |s: &mut RedirectStats| {
        s.msgs_fallback += 1;
        s.bytes_fallback += size;
    };
    // No state: another agent's sock_ops put the socket in the map (while
    // an upgrade swapped the programs); never redirect what this program's
    // sock_ops did not judge.
    let Some(state) = sock_state(sk) else {
        redirect::count(fallback);
        return;
    };
    if state.state != SOCK_REDIRECT_OK {
        redirect::count(fallback);
        return;
    }
    if redirect::enabled() {
        let verdict = MESH_SOCKS.redirect_msg(ctx, state.peer, u64::from(BPF_F_INGRESS));
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
    state.state = SOCK_REDIRECT_NEVER;
    redirect::count(fallback);
}
