//! Access to `bpf_sock_addr` fields. The verifier wants each context field
//! read and written with exactly its own width, so every access is volatile:
//! the compiler may not merge or split it.

use aya_ebpf::{bindings::bpf_sock_addr, programs::SockAddrContext};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

/// Return values of cgroup sock_addr programs.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

#[inline(always)]
fn raw(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> u32 {
    unsafe { read_volatile(addr_of!((*raw(ctx)).protocol)) }
}

/// Destination IPv4 address, network byte order.
#[inline(always)]
pub fn user_ip4(ctx: &SockAddrContext) -> u32 {
    unsafe { read_volatile(addr_of!((*raw(ctx)).user_ip4)) }
}

/// Destination port, network byte order.
#[inline(always)]
pub fn user_port(ctx: &SockAddrContext) -> u16 {
    unsafe { read_volatile(addr_of!((*raw(ctx)).user_port)) as u16 }
}

#[inline(always)]
pub fn set_user_ip4(ctx: &SockAddrContext, ip: u32) {
    unsafe { write_volatile(addr_of_mut!((*raw(ctx)).user_ip4), ip) }
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
