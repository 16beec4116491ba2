//! Kernel-side debug logs: the programs' aya-log records forwarded into the
//! agent's own log (tracing, target `mesh_kernel`), and the switch the
//! programs read before any log call (`CONFIG_FLAG_DEBUG_LOG` in
//! `MESH_CONFIG`). Off by default: the hot path then pays one branch.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, Map, MapData},
};
use aya_log::EbpfLogger;
use mesh_common::{CONFIG_FLAG_DEBUG_LOG, ConfigValue, map_names};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::bpf::LogSites;

#[derive(Debug, thiserror::Error)]
pub enum KernelLogError {
    #[error("kernel log ring buffer (AYA_LOGS) not usable: {0}")]
    Logger(#[from] aya_log::Error),
    #[error("cannot watch the kernel log ring buffer: {0}")]
    Watch(#[source] std::io::Error),
    #[error("cannot open pinned map {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "the agent loaded the programs with --kernel-debug-log never, so they have no log \
         sites; restart it with --kernel-debug-log off (or on) to be able to switch them on"
    )]
    SitesRemoved,
}

/// `mesh-agent run --kernel-debug-log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelDebugLog {
    /// On from the start; switchable.
    On,
    /// Off from the start; switchable.
    #[default]
    Off,
    /// The programs are loaded without their log sites; the switch refuses.
    Never,
}

impl KernelDebugLog {
    pub fn log_sites(self) -> LogSites {
        match self {
            KernelDebugLog::Never => LogSites::Removed,
            KernelDebugLog::On | KernelDebugLog::Off => LogSites::Kept,
        }
    }
}

/// Writes each kernel record as one tracing event. Always at INFO: the
/// kernel switch already decides whether there is anything to say, so the
/// agent's own filter need not be lowered to see it.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(
            target: "mesh_kernel",
            level = %record.level(),
            "{}",
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Starts forwarding the programs' log records; must run inside tokio.
pub fn forward(ebpf: &mut Ebpf) -> Result<tokio::task::JoinHandle<()>, KernelLogError> {
    let logger = EbpfLogger::init_with_logger(ebpf, ToTracing)?;
    // SAFETY: the logger owns its ring buffer's fd for as long as the
    // AsyncFd (which owns the logger) lives, so the fd stays valid.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| KernelLogError::Watch(e.into()))?;
    Ok(tokio::spawn(async move {
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!("kernel log forwarding stopped: {e}");
                    return;
                }
            }
        }
    }))
}

/// The runtime switch: its own handle on the pinned `MESH_CONFIG`.
pub struct DebugLogSwitch {
    config: Array<MapData, ConfigValue>,
    sites: LogSites,
}

impl DebugLogSwitch {
    pub fn open(maps_dir: &Path, sites: LogSites) -> Result<Self, KernelLogError> {
        let path = maps_dir.join(map_names::CONFIG);
        let open_error = |source| KernelLogError::Open {
            path: path.display().to_string(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(open_error)?;
        let config = Array::try_from(Map::Array(data)).map_err(open_error)?;
        Ok(Self { config, sites })
    }

    /// Read-modify-write of the flags word; the caller serialises it with
    /// every other writer of `MESH_CONFIG`.
    pub fn set(&mut self, on: bool) -> Result<(), KernelLogError> {
        if on && self.sites == LogSites::Removed {
            return Err(KernelLogError::SitesRemoved);
        }
        let map_error = |source| KernelLogError::Map {
            map: map_names::CONFIG,
            source,
        };
        let mut value = self.config.get(&0, 0).map_err(map_error)?;
        if on {
            value.flags |= CONFIG_FLAG_DEBUG_LOG;
        } else {
            value.flags &= !CONFIG_FLAG_DEBUG_LOG;
        }
        self.config.set(0, value, 0).map_err(map_error)
    }

    pub fn sites(&self) -> LogSites {
        self.sites
    }

    /// The switch as the kernel reads it.
    pub fn enabled(&self) -> bool {
        self.config
            .get(&0, 0)
            .is_ok_and(|v| v.flags & CONFIG_FLAG_DEBUG_LOG != 0)
    }
}
