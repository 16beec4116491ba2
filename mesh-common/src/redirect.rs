//! Same-node acceleration: the sockhash of node-local TCP sockets, the
//! addresses the agent declares node-local, and the redirect counters.
//!
//! A socket whose both ends are on this node is put in `MESH_SOCKS` under its
//! own 4-tuple when it becomes ESTABLISHED; `sk_msg` then hands every message
//! straight to the peer socket's receive queue (looked up under the swapped
//! 4-tuple), so the bytes never cross loopback or a veth.

/// Names of the pinned maps used only by same-node redirect (≤ 15 bytes
/// each). `MESH_SOCK_REDIR` is socket-local storage: it lives with the
/// programs and the sockets, never pinned.
pub mod redirect_map_names {
    pub const SOCKS: &str = "MESH_SOCKS";
    pub const LOCAL_ADDRS: &str = "MESH_LOCAL_ADDR";
    pub const REDIRECT_STATS: &str = "MESH_REDIR_STAT";
    pub const EXCLUDED_PORTS: &str = "MESH_REDIR_EXCL";
    pub const EXCLUDED_ENDPOINTS: &str = "MESH_EXCL_EP";
    pub const ALL: [&str; 5] = [
        SOCKS,
        LOCAL_ADDRS,
        REDIRECT_STATS,
        EXCLUDED_PORTS,
        EXCLUDED_ENDPOINTS,
    ];
}

/// Names of the redirect programs in the kernel object.
pub mod redirect_program_names {
    pub const SOCK_OPS: &str = "mesh_redir_sockops";
    pub const SK_MSG: &str = "mesh_redir_msg";
}

/// `ConfigValue::flags` bit: same-node redirect is on. Read by both programs
/// on every call, so the agent can switch it at runtime without detaching.
pub const CONFIG_FLAG_SAME_NODE_REDIRECT: u32 = 1 << 0;

/// Capacities of the redirect maps.
pub mod redirect_limits {
    /// Sockets (two per same-node connection) the sockhash holds.
    pub const MAX_REDIRECT_SOCKETS: u32 = 131_072;
    /// Addresses the agent can declare node-local.
    pub const MAX_LOCAL_ADDRS: u32 = 16_384;
    /// Ports whose connections are never redirected.
    pub const MAX_EXCLUDED_PORTS: u32 = 1024;
    /// Backend endpoints of services that opted out of redirect.
    pub const MAX_EXCLUDED_ENDPOINTS: u32 = 65_536;
}

/// Key of `MESH_SOCKS`: one socket's own view of its connection. The peer's
/// key is the same with local and remote swapped.
///
/// `netns` is the socket's network-namespace cookie when either end is a
/// loopback address (every namespace has its own 127.0.0.1, so the 4-tuple
/// alone could name sockets of two namespaces), and 0 otherwise: node and pod
/// addresses are unique on a node, and two ends of a pod-to-pod connection
/// live in different namespaces.
///
/// IPv4 sockets, and IPv6 sockets talking IPv4-mapped addresses, use
/// `family == FAMILY_V4` with the address in word 0, so both ends agree.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    /// Network byte order.
    pub local_port: u16,
    /// Network byte order.
    pub remote_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

impl SockKey {
    /// The key the peer socket is stored under.
    #[inline(always)]
    pub fn peer(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
            _pad: [0; 3],
        }
    }
}

/// A redirected socket's own storage (`MESH_SOCK_REDIR`, socket-local): set
/// by the sock_ops program when the socket enters the sockhash, read by
/// `sk_msg` on every message, freed by the kernel with the socket. Holding
/// the peer's key here spares each message building a key and a hash
/// lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRedirect {
    /// The key the peer socket has in `MESH_SOCKS`.
    pub peer: SockKey,
    /// `SOCK_REDIRECT_OK` or `SOCK_REDIRECT_NEVER`.
    pub state: u32,
    pub _pad: u32,
}

/// `SockRedirect::state`: may this socket's messages be redirected?
///
/// A socket starts `SOCK_REDIRECT_OK` when it enters the sockhash. The first
/// message that cannot be redirected (peer not in the map yet, or the switch
/// is off) makes it `SOCK_REDIRECT_NEVER` for good: bytes that went through
/// TCP may still sit unread in the peer's receive queue, and the kernel reads
/// redirected bytes first, so redirecting again could reorder the stream.
/// Redirected-then-TCP is safe (older bytes are read first), so that
/// direction needs no state.
pub const SOCK_REDIRECT_OK: u32 = 1;
pub const SOCK_REDIRECT_NEVER: u32 = 2;

/// Key of `MESH_LOCAL_ADDR`: an address of this node (node addresses, local
/// pods). Loopback (127.0.0.0/8, ::1) is always local and needs no entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalAddrKey {
    /// IPv4: the address in `addr[0]`, the rest zero. Network byte order.
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Key of `MESH_EXCL_EP`: a backend endpoint of a service configured with
/// `same_node_redirect: false`. A connection with either end here is never
/// redirected, so its server socket is never in the sockhash either (and
/// reads it exactly as with redirect off).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey {
    /// IPv4: the address in `addr[0]`, the rest zero. Network byte order.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// Per-CPU counters of same-node redirect (single entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectStats {
    /// Sockets put in the sockhash (both ends node-local).
    pub sockets_added: u64,
    /// Sockets that could not be put in the sockhash (map full, ULP, …).
    pub sockets_failed: u64,
    /// ESTABLISHED sockets left alone: an end is not node-local, an end's
    /// port is excluded (`MESH_REDIR_EXCL`) or is a backend of a service that
    /// opted out (`MESH_EXCL_EP`), payload was already exchanged
    /// (TCP Fast Open), the switch is off, an MPTCP subflow, or the agent's
    /// own.
    pub sockets_skipped: u64,
    pub msgs_redirected: u64,
    pub bytes_redirected: u64,
    /// Messages of sockets in the sockhash sent the normal way (peer not in
    /// the map, switch off, or redirect refused by the kernel).
    pub msgs_fallback: u64,
    pub bytes_fallback: u64,
}

/// Summing the per-CPU copies.
impl core::ops::AddAssign for RedirectStats {
    fn add_assign(&mut self, o: Self) {
        self.sockets_added += o.sockets_added;
        self.sockets_failed += o.sockets_failed;
        self.sockets_skipped += o.sockets_skipped;
        self.msgs_redirected += o.msgs_redirected;
        self.bytes_redirected += o.bytes_redirected;
        self.msgs_fallback += o.msgs_fallback;
        self.bytes_fallback += o.bytes_fallback;
    }
}

const _: () = {
    assert!(core::mem::size_of::<SockKey>() == 48);
    assert!(core::mem::size_of::<SockRedirect>() == 56);
    assert!(core::mem::size_of::<LocalAddrKey>() == 20);
    assert!(core::mem::size_of::<EndpointKey>() == 20);
    assert!(core::mem::size_of::<RedirectStats>() == 56);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit
    // pattern is valid.
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for LocalAddrKey {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for RedirectStats {}
}
