//! Access to `bpf_sock_addr` fields. The verifier wants each context field
//! read and written with exactly its own width, so every access is volatile:
//! the compiler may not merge or split it.

use aya_ebpf::{bindings::bpf_sock_addr, programs::SockAddrContext};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use mesh_common::{FAMILY_V4, FAMILY_V6};

/// Return values of cgroup sock_addr programs.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An address as the maps hold it: IPv4 in `words[0]`, network byte order.
#[derive(Clone, Copy)]
pub struct Addr {
    pub words: [u32; 4],
    pub family: u8,
}

impl Addr {
    #[inline(always)]
    pub fn v4(ip: u32) -> Self {
        Self {
            words: [ip, 0, 0, 0],
            family: FAMILY_V4,
        }
    }

    /// An IPv6 socket address; IPv4-mapped ones become IPv4 so a v4 service
    /// is found whichever socket family reaches it.
    #[inline(always)]
    pub fn from_v6(words: [u32; 4]) -> Self {
        if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_PREFIX {
            Self::v4(words[3])
        } else {
            Self {
                words,
                family: FAMILY_V6,
            }
        }
    }

    /// The address as an IPv6 socket must see it.
    #[inline(always)]
    pub fn to_v6(self) -> [u32; 4] {
        if self.family == FAMILY_V4 {
            [0, 0, V4_MAPPED_PREFIX, self.words[0]]
        } else {
            self.words
        }
    }
}

#[inline(always)]
fn raw(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> u32 {
    unsafe { read_volatile(addr_of!((*raw(ctx)).protocol)) }
}

/// The address the application named (destination for connect/sendmsg,
/// source for recvmsg, peer for getpeername), IPv4 socket.
#[inline(always)]
pub fn user_addr4(ctx: &SockAddrContext) -> Addr {
    Addr::v4(unsafe { read_volatile(addr_of!((*raw(ctx)).user_ip4)) })
}

/// The same for an IPv6 socket.
#[inline(always)]
pub fn user_addr6(ctx: &SockAddrContext) -> Addr {
    let p = raw(ctx);
    let words = unsafe {
        [
            read_volatile(addr_of!((*p).user_ip6[0])),
            read_volatile(addr_of!((*p).user_ip6[1])),
            read_volatile(addr_of!((*p).user_ip6[2])),
            read_volatile(addr_of!((*p).user_ip6[3])),
        ]
    };
    Addr::from_v6(words)
}

/// Port, network byte order.
#[inline(always)]
pub fn user_port(ctx: &SockAddrContext) -> u16 {
    unsafe { read_volatile(addr_of!((*raw(ctx)).user_port)) as u16 }
}

#[inline(always)]
pub fn set_user_addr4(ctx: &SockAddrContext, addr: Addr) {
    unsafe { write_volatile(addr_of_mut!((*raw(ctx)).user_ip4), addr.words[0]) }
}

#[inline(always)]
pub fn set_user_addr6(ctx: &SockAddrContext, addr: Addr) {
    let p = raw(ctx);
    let words = addr.to_v6();
    unsafe {
        write_volatile(addr_of_mut!((*p).user_ip6[0]), words[0]);
        write_volatile(addr_of_mut!((*p).user_ip6[1]), words[1]);
        write_volatile(addr_of_mut!((*p).user_ip6[2]), words[2]);
        write_volatile(addr_of_mut!((*p).user_ip6[3]), words[3]);
    }
}

#[inline(always)]
pub fn set_user_port(ctx: &SockAddrContext, port: u16) {
    unsafe { write_volatile(addr_of_mut!((*raw(ctx)).user_port), u32::from(port)) }
}

/// The socket's `SO_MARK`.
#[inline(always)]
pub fn socket_mark(ctx: &SockAddrContext) -> u32 {
    unsafe {
        let sk = read_volatile(addr_of!((*raw(ctx)).__bindgen_anon_1.sk));
        if sk.is_null() {
            return 0;
        }
        read_volatile(addr_of!((*sk).mark))
    }
}

#[inline(always)]
pub fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { aya_ebpf::helpers::bpf_get_socket_cookie(raw(ctx).cast()) }
}

#[inline(always)]
pub fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { aya_ebpf::helpers::bpf_get_netns_cookie(raw(ctx).cast()) }
}
