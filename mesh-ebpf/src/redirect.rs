//! Shared logic of same-node redirect: building a socket's key from its
//! 4-tuple, deciding what is node-local, the on/off switch and the
//! counters.

use aya_ebpf::bindings::bpf_sock_ops;
use core::ptr::{addr_of, read_volatile};

use mesh_common::{
    CONFIG_FLAG_SAME_NODE_REDIRECT, FAMILY_V4, FAMILY_V6, LocalAddrKey, RedirectStats, SockKey,
};

use crate::{
    maps::MESH_CONFIG,
    redirect_maps::{MESH_LOCAL_ADDR, MESH_REDIR_STAT},
};

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// The socket fields both program types expose, read with their own widths.
pub struct Tuple {
    pub family: u32,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_ip6: [u32; 4],
    pub remote_ip6: [u32; 4],
    /// Host byte order, as the kernel gives it.
    pub local_port: u32,
    /// Network byte order in the upper 16 bits (the kernel shifts `skc_dport`
    /// left by 16 on little-endian machines).
    pub remote_port: u32,
}

impl Tuple {
    /// A sock_ops program's socket.
    #[inline(always)]
    pub fn of_sock_ops(ops: *mut bpf_sock_ops) -> Tuple {
        unsafe {
            Tuple {
                family: read_volatile(addr_of!((*ops).family)),
                local_ip4: read_volatile(addr_of!((*ops).local_ip4)),
                remote_ip4: read_volatile(addr_of!((*ops).remote_ip4)),
                local_ip6: read_ip6(addr_of!((*ops).local_ip6)),
                remote_ip6: read_ip6(addr_of!((*ops).remote_ip6)),
                local_port: read_volatile(addr_of!((*ops).local_port)),
                remote_port: read_volatile(addr_of!((*ops).remote_port)),
            }
        }
    }
}

/// Each word on its own: the verifier refuses wider loads of context fields.
#[inline(always)]
pub unsafe fn read_ip6(p: *const [u32; 4]) -> [u32; 4] {
    let w = p.cast::<u32>();
    unsafe {
        [
            read_volatile(w),
            read_volatile(w.add(1)),
            read_volatile(w.add(2)),
            read_volatile(w.add(3)),
        ]
    }
}

/// Whether the agent switched same-node redirect on.
#[inline(always)]
pub fn enabled() -> bool {
    match MESH_CONFIG.get(0) {
        Some(cfg) => cfg.flags & CONFIG_FLAG_SAME_NODE_REDIRECT != 0,
        None => false,
    }
}

/// IPv4-mapped IPv6 (::ffff:a.b.c.d): words 0 and 1 zero, word 2 0x0000ffff
/// in network order.
#[inline(always)]
fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::from_be(0x0000_ffff)
}

/// 127.0.0.0/8; the address is in network byte order.
#[inline(always)]
fn is_loopback4(a: u32) -> bool {
    u32::from_be(a) >> 24 == 127
}

#[inline(always)]
fn is_loopback6(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == u32::from_be(1)
}

/// The socket's key without the namespace cookie, and whether an end is a
/// loopback address (then the cookie goes in). None for non-IP families.
#[inline(always)]
pub fn key_of(t: &Tuple) -> Option<(SockKey, bool)> {
    let local_port = (t.local_port as u16).to_be();
    let remote_port = (t.remote_port >> 16) as u16;
    let (family, local_addr, remote_addr) = if t.family == AF_INET {
        (FAMILY_V4, [t.local_ip4, 0, 0, 0], [t.remote_ip4, 0, 0, 0])
    } else if t.family == AF_INET6 {
        if is_v4_mapped(&t.local_ip6) && is_v4_mapped(&t.remote_ip6) {
            (
                FAMILY_V4,
                [t.local_ip6[3], 0, 0, 0],
                [t.remote_ip6[3], 0, 0, 0],
            )
        } else {
            (FAMILY_V6, t.local_ip6, t.remote_ip6)
        }
    } else {
        return None;
    };
    let loopback = if family == FAMILY_V4 {
        is_loopback4(local_addr[0]) || is_loopback4(remote_addr[0])
    } else {
        is_loopback6(&local_addr) || is_loopback6(&remote_addr)
    };
    Some((
        SockKey {
            netns: 0,
            local_addr,
            remote_addr,
            local_port,
            remote_port,
            family,
            _pad: [0; 3],
        },
        loopback,
    ))
}

/// Loopback, or an address the agent declared node-local.
#[inline(always)]
pub fn is_local(addr: &[u32; 4], family: u8) -> bool {
    if family == FAMILY_V4 {
        if is_loopback4(addr[0]) {
            return true;
        }
    } else if is_loopback6(addr) {
        return true;
    }
    let key = LocalAddrKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    };
    unsafe { MESH_LOCAL_ADDR.get(key).is_some() }
}

#[inline(always)]
pub fn count(f: impl FnOnce(&mut RedirectStats)) {
    if let Some(stats) = MESH_REDIR_STAT.get_ptr_mut(0) {
        f(unsafe { &mut *stats });
    }
}
