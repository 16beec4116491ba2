//! Every map the programs share with the agent. Pinned by name so a
//! restarted agent reopens the same maps and traffic never stops.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use mesh_common::{
    BackendId, BackendStats, BackendValue, ConfigValue, OrigDstValue, ServiceKey, ServiceStats,
    ServiceValue, SlotKey, limits,
};

#[map(name = "MESH_SERVICES")]
pub static MESH_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(limits::MAX_SERVICES, 0);

#[map(name = "MESH_SLOTS")]
pub static MESH_SLOTS: HashMap<SlotKey, BackendId> = HashMap::pinned(limits::MAX_SLOTS, 0);

#[map(name = "MESH_BACKENDS")]
pub static MESH_BACKENDS: HashMap<BackendId, BackendValue> =
    HashMap::pinned(limits::MAX_BACKENDS, 0);

/// Socket cookie → what `connect()` rewrote. LRU: entries of closed sockets
/// age out without any bookkeeping on the hot path.
#[map(name = "MESH_ORIG_DST")]
pub static MESH_ORIG_DST: LruHashMap<u64, OrigDstValue> =
    LruHashMap::pinned(limits::MAX_TRACKED_SOCKETS, 0);

#[map(name = "MESH_BE_STATS")]
pub static MESH_BE_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(limits::MAX_BACKENDS, 0);

#[map(name = "MESH_SVC_STATS")]
pub static MESH_SVC_STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(limits::MAX_SERVICES, 0);

#[map(name = "MESH_CONFIG")]
pub static MESH_CONFIG: Array<ConfigValue> = Array::pinned(1, 0);
