//! Typed handles on the programs' maps.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use mesh_common::{
    AffinityKey, AffinityValue, BackendHealth, BackendId, BackendStats, BackendValue, ConfigValue,
    PolicyKey, PolicyValue, RevNatKey, RevNatValue, ServiceKey, ServiceStats, ServiceValue,
    SlotKey, map_names,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from the kernel object")]
    Missing { name: &'static str },
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open pinned map {path}: {source}")]
    Pin {
        path: String,
        #[source]
        source: MapError,
    },
}

pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, BackendId>,
    pub backends: HashMap<MapData, BackendId, BackendValue>,
    pub backend_stats: PerCpuArray<MapData, BackendStats>,
    pub service_stats: PerCpuArray<MapData, ServiceStats>,
    /// Live TCP connections per backend id.
    pub active: Array<MapData, u64>,
    /// Connect failures per backend id, for outlier detection.
    pub backend_health: Array<MapData, BackendHealth>,
    /// cgroup id → identity id.
    pub workloads: HashMap<MapData, u64, u32>,
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    /// (service, client) → backend and last use, for session affinity.
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// (socket cookie, backend) → VIP: which sockets the kernel balanced.
    pub rev_nat: HashMap<MapData, RevNatKey, RevNatValue>,
    pub config: Array<MapData, ConfigValue>,
}

/// Opens a map by name, as an untyped handle.
pub(super) trait OpenMap: FnMut(&'static str) -> Result<Map, MapsError> {}
impl<F: FnMut(&'static str) -> Result<Map, MapsError>> OpenMap for F {}

/// Maps taken out of a freshly loaded object.
pub(super) fn taken_from(ebpf: &mut Ebpf) -> impl OpenMap + '_ {
    |name| ebpf.take_map(name).ok_or(MapsError::Missing { name })
}

/// Map `name`, as the typed handle `T`.
pub(super) fn typed<T>(open: &mut impl OpenMap, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    open(name)?
        .try_into()
        .map_err(|source| MapsError::Layout { name, source })
}

impl Maps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::build(taken_from(ebpf))
    }

    /// Opens the maps an agent pinned under `maps_dir`, e.g. for a read-only
    /// view while no agent runs.
    pub fn from_pins(maps_dir: &Path) -> Result<Self, MapsError> {
        Self::build(|name| {
            let path = maps_dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| MapsError::Pin {
                path: path.display().to_string(),
                source,
            })?;
            Map::from_map_data(data).map_err(|source| MapsError::Layout { name, source })
        })
    }

    fn build(mut open: impl OpenMap) -> Result<Self, MapsError> {
        let o = &mut open;
        Ok(Self {
            services: typed(o, map_names::SERVICES)?,
            slots: typed(o, map_names::SLOTS)?,
            backends: typed(o, map_names::BACKENDS)?,
            backend_stats: typed(o, map_names::BACKEND_STATS)?,
            service_stats: typed(o, map_names::SERVICE_STATS)?,
            active: typed(o, map_names::ACTIVE)?,
            backend_health: typed(o, map_names::BACKEND_HEALTH)?,
            workloads: typed(o, map_names::WORKLOADS)?,
            policy: typed(o, map_names::POLICY)?,
            rev_nat: typed(o, map_names::REV_NAT)?,
            affinity: typed(o, map_names::AFFINITY)?,
            config: typed(o, map_names::CONFIG)?,
        })
    }

    /// A backend's counters, summed over CPUs.
    pub fn backend_stats(&self, id: BackendId) -> BackendStats {
        sum_over_cpus(&self.backend_stats, id)
    }

    /// Live TCP connections to a backend right now.
    pub fn backend_active(&self, id: BackendId) -> u64 {
        self.active.get(&id, 0).unwrap_or(0)
    }

    /// A service's counters, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> ServiceStats {
        sum_over_cpus(&self.service_stats, id)
    }
}

/// Entry `index` of a per-CPU counters map, summed over CPUs; zero when it
/// cannot be read.
pub fn sum_over_cpus<T, V>(map: &PerCpuArray<T, V>, index: u32) -> V
where
    T: std::borrow::Borrow<MapData>,
    V: aya::Pod + Default + std::ops::AddAssign,
{
    let mut total = V::default();
    if let Ok(per_cpu) = map.get(&index, 0) {
        for s in per_cpu.iter() {
            total += *s;
        }
    }
    total
}
