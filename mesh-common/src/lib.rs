//! The contract between mesh's kernel programs (`mesh-ebpf`) and its agent.
//!
//! Every key and value is `#[repr(C)]`, spells out its padding and has a
//! compile-time size check, so both sides agree byte for byte. Addresses and
//! ports are stored in network byte order, exactly as the kernel hands them to
//! the programs; the agent converts once, when it writes.
#![no_std]

/// Bumped whenever a map's layout changes; maps are pinned under
/// `<bpffs>/v<SCHEMA_VERSION>/` so a new agent never misreads old maps.
pub const SCHEMA_VERSION: u32 = 1;

mod redirect;
pub use redirect::*;

/// Names of the maps, as the kernel object declares them (at most 15 bytes:
/// the kernel keeps 16 with the NUL).
pub mod map_names {
    pub const SERVICES: &str = "MESH_SERVICES";
    pub const SLOTS: &str = "MESH_SLOTS";
    pub const BACKENDS: &str = "MESH_BACKENDS";
    pub const ORIG_DST: &str = "MESH_ORIG_DST";
    pub const BACKEND_STATS: &str = "MESH_BE_STATS";
    pub const SERVICE_STATS: &str = "MESH_SVC_STATS";
    pub const CONFIG: &str = "MESH_CONFIG";
    /// Every map the agent pins, in the order `meshctl status` lists them.
    pub const ALL: [&str; 7] = [
        SERVICES,
        SLOTS,
        BACKENDS,
        ORIG_DST,
        BACKEND_STATS,
        SERVICE_STATS,
        CONFIG,
    ];
}

/// Names of the programs in the kernel object.
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
}

/// Default capacities; the agent may raise them at load time.
pub mod limits {
    pub const MAX_SERVICES: u32 = 65_536;
    pub const MAX_BACKENDS: u32 = 65_536;
    /// Slots across all services, counting two generations of a service that
    /// is being replaced.
    pub const MAX_SLOTS: u32 = 1 << 20;
    /// Largest slot table a single service gets (weights are scaled into it).
    pub const MAX_SLOTS_PER_SERVICE: u32 = 16_384;
    pub const MAX_TRACKED_SOCKETS: u32 = 262_144;
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Errno returned by `connect()` when a service has no usable backend.
pub const ECONNREFUSED: i32 = 111;

/// `ServiceValue::algorithm`.
pub const ALGORITHM_WEIGHTED: u8 = 0;

/// `BackendValue::state`.
pub const BACKEND_ACTIVE: u8 = 0;

/// A service's virtual address as a connecting socket names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// IPv4: the address in `addr[0]`, the rest zero. IPv6: all four words.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub service_id: u32,
    /// Which generation of the slot table is live; see `SlotKey`.
    pub generation: u32,
    /// Zero: the service exists but has no usable backend, so connects fail.
    pub slot_count: u32,
    pub algorithm: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// One slot of a service's selection table. A new table is written under a new
/// generation, then the service flips to it in one update, then the old one is
/// deleted: a reader never sees a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    pub generation: u32,
    pub slot: u32,
}

/// Value of `MESH_SLOTS`: the backend id a slot points at.
pub type BackendId = u32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub state: u8,
    pub service_id: u32,
}

/// What `connect()` rewrote, keyed by socket cookie, so `getpeername()` can
/// show the application the address it asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDstValue {
    pub vip: [u32; 4],
    pub backend: [u32; 4],
    pub vip_port: u16,
    pub backend_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Per-CPU counters of one backend, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub connections: u64,
}

/// Per-CPU counters of one service, indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub connections: u64,
    /// Connects refused because the service had no usable backend.
    pub no_backend: u64,
}

/// The single entry of `MESH_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigValue {
    /// Sockets carrying this mark (the agent's own) are never touched.
    pub agent_mark: u32,
    pub flags: u32,
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<SlotKey>() == 12);
    assert!(core::mem::size_of::<BackendValue>() == 24);
    assert!(core::mem::size_of::<OrigDstValue>() == 40);
    assert!(core::mem::size_of::<BackendStats>() == 8);
    assert!(core::mem::size_of::<ServiceStats>() == 16);
    assert!(core::mem::size_of::<ConfigValue>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit
    // pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for OrigDstValue {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for ConfigValue {}
}
