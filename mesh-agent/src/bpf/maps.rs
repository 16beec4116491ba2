//! Typed handles on the programs' maps.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use mesh_common::{
    BackendId, BackendStats, BackendValue, ConfigValue, ServiceKey, ServiceStats, ServiceValue,
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
    pub config: Array<MapData, ConfigValue>,
}

impl Maps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::build(|name| ebpf.take_map(name).ok_or(MapsError::Missing { name }))
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

    fn build(
        mut open: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        macro_rules! typed {
            ($name:expr) => {{
                let name = $name;
                open(name)?
                    .try_into()
                    .map_err(|source| MapsError::Layout { name, source })?
            }};
        }
        Ok(Self {
            services: typed!(map_names::SERVICES),
            slots: typed!(map_names::SLOTS),
            backends: typed!(map_names::BACKENDS),
            backend_stats: typed!(map_names::BACKEND_STATS),
            service_stats: typed!(map_names::SERVICE_STATS),
            config: typed!(map_names::CONFIG),
        })
    }

    /// Connections sent to a backend, summed over CPUs.
    pub fn backend_connections(&self, id: BackendId) -> u64 {
        self.backend_stats
            .get(&id, 0)
            .map(|per_cpu| per_cpu.iter().map(|s| s.connections).sum())
            .unwrap_or(0)
    }

    /// A service's counters, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> ServiceStats {
        let mut total = ServiceStats::default();
        if let Ok(per_cpu) = self.service_stats.get(&id, 0) {
            for s in per_cpu.iter() {
                total.connections += s.connections;
                total.no_backend += s.no_backend;
            }
        }
        total
    }
}
