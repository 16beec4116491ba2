//! Loading, attaching and pinning the kernel programs, and typed access to
//! their maps.
//!
//! Everything lives under one bpffs directory (default `/sys/fs/bpf/mesh`):
//! `v<schema>/maps/<MAP>` and `v<schema>/links/<program>`. Pinned links keep
//! the programs attached while no agent runs, and pinned maps keep their
//! contents, so a restarted agent picks up where the last one stopped.

pub mod batch;
mod ingress;
mod maps;
mod mounts;
mod redirect;
mod tunnel;

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program, ProgramError, links::FdLink},
};
use mesh_common::{SCHEMA_VERSION, inbound_map_names, limits, map_names, program_names};
use tracing::{info, warn};

pub use ingress::{
    Contribution, Inbound, InboundError, InboundReport, contribution, tcp_service_id, wanted,
};
pub use maps::{Maps, MapsError, sum_over_cpus};
pub use mounts::{MountError, cgroup2_mount, ensure_bpffs};
pub use redirect::{REDIRECT_PROGRAMS, RedirectMaps};
pub use tunnel::{Captured, TunnelOrigins};

/// The kernel object built from `mesh-ebpf` by build.rs.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// The programs the agent attaches to the cgroup, by name in the object.
pub const PROGRAMS: [&str; 9] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::SENDMSG4,
    program_names::SENDMSG6,
    program_names::RECVMSG4,
    program_names::RECVMSG6,
    program_names::GETPEERNAME4,
    program_names::GETPEERNAME6,
    program_names::SOCKOPS,
];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot prepare bpffs directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("loading the kernel object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {name} is missing from the kernel object")]
    MissingProgram { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {path}: {source} (is it a directory on the cgroup v2 mount?)")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("cannot pin link of {name} at {path}: {reason}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// Where one agent's pins live: `<root>/v<schema>/{maps,links}`.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
    version: u32,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            version: SCHEMA_VERSION,
        }
    }

    /// The same root with another schema version (upgrade tests).
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn versioned(&self) -> PathBuf {
        self.root.join(format!("v{}", self.version))
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.versioned().join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.versioned().join("links")
    }

    /// Pin directories of other schema versions: what an agent of another
    /// layout left, still attached and serving until removed.
    pub fn other_versions(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let ours = format!("v{}", self.version);
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| {
                name != &ours
                    && name
                        .strip_prefix('v')
                        .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .map(|name| self.root.join(name))
            .collect()
    }

    /// Removes every pin: programs detach once their link pins are gone, maps
    /// are freed once no program holds them.
    pub fn remove_all(&self) -> io::Result<bool> {
        match std::fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Whether the programs keep their kernel debug-log sites (switchable at run
/// time) or are loaded with them removed (`--kernel-debug-log never`): a
/// read-only global the verifier treats as a constant, so it drops the
/// sites as dead code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogSites {
    #[default]
    Kept,
    Removed,
}

/// The global of `mesh-ebpf/src/debug_log.rs`.
const LOG_SITES_GLOBAL: &str = "MESH_LOG_SITES";

/// How many entries the maps are created with. Maps that an earlier agent
/// pinned keep the size they were created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: limits::MAX_SERVICES,
            backends: limits::MAX_BACKENDS,
            slots: limits::MAX_SLOTS,
        }
    }
}

/// The loaded, attached data path of this node.
pub struct Datapath {
    /// Holds the programs' file descriptors for the agent's lifetime.
    pub ebpf: Ebpf,
    pub maps: Maps,
    /// Decision events from the kernel.
    pub events: RingBuf<MapData>,
    pub attached: Vec<&'static str>,
}

impl Datapath {
    /// Loads the programs, reusing maps pinned by an earlier agent, attaches
    /// them to `cgroup` and pins their links. An earlier agent's links are
    /// replaced only after the new ones are attached, so no connect is ever
    /// missed in between.
    pub fn load(
        pins: &PinLayout,
        cgroup: &Path,
        sizes: MapSizes,
        log_sites: LogSites,
    ) -> Result<Self, BpfError> {
        ensure_bpffs(pins.root())?;
        for dir in [pins.maps_dir(), pins.links_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| BpfError::PinDir { path: dir, source })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps_dir())
            .map_max_entries(map_names::SERVICES, sizes.services)
            // Ids index the per-CPU stats arrays, so they share the sizes.
            .map_max_entries(map_names::SERVICE_STATS, sizes.services)
            .map_max_entries(map_names::BACKENDS, sizes.backends)
            .map_max_entries(map_names::BACKEND_STATS, sizes.backends)
            .map_max_entries(map_names::ACTIVE, sizes.backends)
            .map_max_entries(map_names::BACKEND_HEALTH, sizes.backends)
            .map_max_entries(map_names::SLOTS, sizes.slots)
            // Local backends are backends; their counters are by service id.
            .map_max_entries(inbound_map_names::INBOUND, sizes.backends)
            .map_max_entries(inbound_map_names::INBOUND_STATS, sizes.services)
            .override_global(
                LOG_SITES_GLOBAL,
                &u8::from(log_sites == LogSites::Kept),
                true,
            )
            .load(KERNEL_OBJECT)
            .map_err(BpfError::Load)?;
        remove_stale_map_pins(&pins.maps_dir(), &ebpf);
        let cgroup_file = File::open(cgroup).map_err(|source| BpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let mut attached = Vec::new();
        for name in PROGRAMS {
            attach_and_pin(&mut ebpf, name, &cgroup_file, &pins.links_dir())?;
            attached.push(name);
        }
        // Same-node redirect (sk_msg on MESH_SOCKS, sock_ops on the cgroup).
        attached.extend(redirect::attach(
            &mut ebpf,
            &cgroup_file,
            &pins.links_dir(),
        )?);
        // Strict mTLS on this node (cgroup_skb/ingress).
        attached.push(ingress::attach(&mut ebpf, &cgroup_file, &pins.links_dir())?);
        let maps = Maps::take_from(&mut ebpf)?;
        let events = ebpf
            .take_map(map_names::EVENTS)
            .ok_or(MapsError::Missing {
                name: map_names::EVENTS,
            })?
            .try_into()
            .map_err(|source| MapsError::Layout {
                name: map_names::EVENTS,
                source,
            })?;
        Ok(Self {
            ebpf,
            maps,
            events,
            attached,
        })
    }
}

/// Removes the pins of maps this build no longer has, left by an earlier
/// agent of the same layout (e.g. a map that became socket-local storage):
/// nothing reads them any more, and a pin would keep the map's memory for
/// good. Programs still using such a map (the old `sk_msg` of sockets
/// redirected before) keep it alive until they go.
fn remove_stale_map_pins(maps_dir: &Path, ebpf: &Ebpf) {
    let known: BTreeSet<&str> = ebpf.maps().map(|(name, _)| name).collect();
    let Ok(entries) = std::fs::read_dir(maps_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if known.contains(&*name) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => info!(map = %name, "removed the pin of a map this agent no longer has"),
            Err(e) => {
                warn!(map = %name, "cannot remove the pin of a map this agent no longer has: {e}")
            }
        }
    }
}

/// Loads cgroup program `name` (sock_ops, sock_addr or skb ingress), attaches it to
/// `cgroup` through a bpf link and pins the link as `links_dir/name`.
fn attach_and_pin(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    links_dir: &Path,
) -> Result<(), BpfError> {
    let program_error = |source| BpfError::Program { name, source };
    let link_error = |e: aya::programs::links::LinkError| BpfError::PinLink {
        name,
        path: links_dir.to_owned(),
        reason: error_chain(&e),
    };
    // A bpf_link (kernel >= 5.7) always attaches in multi mode and takes no
    // flags: a new agent's program runs beside the old one until the old link
    // is released. Running both briefly is harmless: the second sees a
    // backend address, not a VIP, and a socket already counted.
    macro_rules! attach {
        ($program:expr $(, $attach_type:expr)?) => {{
            let program = $program;
            program.load().map_err(program_error)?;
            let id = program
                .attach(cgroup, $($attach_type,)? CgroupAttachMode::Single)
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            link.try_into().map_err(link_error)?
        }};
    }
    let link: FdLink = match ebpf
        .program_mut(name)
        .ok_or(BpfError::MissingProgram { name })?
    {
        Program::SockOps(program) => attach!(program),
        Program::CgroupSockAddr(program) => attach!(program),
        Program::CgroupSkb(program) => attach!(program, CgroupSkbAttachType::Ingress),
        _ => return Err(program_error(ProgramError::UnexpectedProgramType)),
    };
    // Pin under a temporary name, then rename over the old pin: the old link
    // is detached only when its last reference (the old pin) goes.
    let final_path = links_dir.join(name);
    // bpffs refuses names containing '.', hence the suffix.
    let staging = links_dir.join(format!("{name}_new"));
    let _ = std::fs::remove_file(&staging);
    let pin_error = |reason: String| BpfError::PinLink {
        name,
        path: final_path.clone(),
        reason,
    };
    link.pin(&staging).map_err(|e| pin_error(error_chain(&e)))?;
    std::fs::rename(&staging, &final_path).map_err(|e| pin_error(e.to_string()))?;
    Ok(())
}

/// aya's errors keep the errno in their source; show it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}
