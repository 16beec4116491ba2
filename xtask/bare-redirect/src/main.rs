//! The bare mechanism the same-node benchmark measures mesh against: every
//! established IPv4 TCP socket of the cgroup goes into a sockhash under its
//! 4-tuple, and every message is redirected to its peer's receive queue when
//! the peer is there. Nothing else: no node-local check, no state, no
//! counters, no switch. Loaded by `cargo xtask bench` only, never by mesh.
//!
//! Gated on the BPF target like mesh-ebpf, so host builds see an empty
//! binary; `xtask/src/bench/bare.rs` builds it for BPF.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{
            BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS,
        },
        macros::{map, sk_msg, sock_ops},
        maps::SockHash,
        programs::{SkMsgContext, SockOpsContext},
    };

    const AF_INET: u32 = 2;

    /// A socket's 4-tuple; ports in network byte order.
    #[repr(C)]
    struct Key {
        local_ip: u32,
        remote_ip: u32,
        local_port: u16,
        remote_port: u16,
    }

    #[map]
    static BARE_SOCKS: SockHash<Key> = SockHash::with_max_entries(65_536, 0);

    #[sock_ops]
    pub fn bare_sockops(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
            && ctx.family() == AF_INET
        {
            let mut key = Key {
                local_ip: ctx.local_ip4(),
                remote_ip: ctx.remote_ip4(),
                // local_port is host order; remote_port is network order in
                // the upper half.
                local_port: (ctx.local_port() as u16).to_be(),
                remote_port: (ctx.remote_port() >> 16) as u16,
            };
            // A full map only means this socket takes the normal path.
            let _ = BARE_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
        }
        0
    }

    #[sk_msg]
    pub fn bare_msg(ctx: SkMsgContext) -> u32 {
        // SAFETY: the kernel hands a valid sk_msg_md for the program's run.
        let md = unsafe { &*ctx.msg };
        if md.family == AF_INET {
            // The peer's key: this socket's tuple seen from the other end.
            let mut peer = Key {
                local_ip: md.remote_ip4,
                remote_ip: md.local_ip4,
                local_port: (md.remote_port >> 16) as u16,
                remote_port: (md.local_port as u16).to_be(),
            };
            // Not found leaves the message on the normal path: SK_PASS
            // without a redirect target passes it.
            let _ = BARE_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
        }
        SK_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any path that could panic; never executed.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("bare-redirect is built for the BPF target by `cargo xtask bench`");
}
