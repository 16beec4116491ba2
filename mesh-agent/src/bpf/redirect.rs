//! Same-node redirect: attaching `mesh_redir_msg` to the `MESH_SOCKS`
//! sockhash and `mesh_redir_sockops` to the cgroup, and typed handles on the
//! redirect maps.
//!
//! The `sock_ops` program attaches through a bpf link, pinned beside the
//! others, like every cgroup program. The `sk_msg` program attaches to the
//! map itself (`BPF_PROG_ATTACH`, as aya 0.14 does it): the pinned map holds
//! the program, so it stays attached while no agent runs, and a new agent's
//! attach replaces it in one step. It goes away with the map (when
//! `mesh-agent cleanup` removes the pins).

use std::{fs::File, path::Path};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::SkMsg,
};
use mesh_common::{
    EndpointKey, LocalAddrKey, RedirectStats, SockKey, redirect_map_names, redirect_program_names,
};

use super::{
    BpfError, MapsError,
    maps::{taken_from, typed},
};

/// The redirect programs, in the order they are attached (sk_msg first: a
/// socket picks up the map's programs when it enters the map).
pub const REDIRECT_PROGRAMS: [&str; 2] = [
    redirect_program_names::SK_MSG,
    redirect_program_names::SOCK_OPS,
];

/// Attaches both redirect programs; returns their names.
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup: &File,
    links_dir: &Path,
) -> Result<Vec<&'static str>, BpfError> {
    attach_sk_msg(ebpf)?;
    super::attach_and_pin(ebpf, redirect_program_names::SOCK_OPS, cgroup, links_dir)?;
    Ok(REDIRECT_PROGRAMS.to_vec())
}

fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    let name = redirect_program_names::SK_MSG;
    let map_name = redirect_map_names::SOCKS;
    let map_fd = {
        let map = ebpf
            .map(map_name)
            .ok_or(MapsError::Missing { name: map_name })?;
        let socks: SockHash<&MapData, SockKey> =
            map.try_into().map_err(|source| MapsError::Layout {
                name: map_name,
                source,
            })?;
        socks.fd().try_clone().map_err(|e| BpfError::PinLink {
            name,
            path: map_name.into(),
            reason: format!("cannot duplicate the map's descriptor: {e}"),
        })?
    };
    let program_error = |source| BpfError::Program { name, source };
    let program: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or(BpfError::MissingProgram { name })?
        .try_into()
        .map_err(program_error)?;
    program.load().map_err(program_error)?;
    let id = program.attach(&map_fd).map_err(program_error)?;
    // Dropping the link would detach the program from the map; the pinned
    // map keeps it attached instead, beyond this agent's life.
    let link = program.take_link(id).map_err(program_error)?;
    std::mem::forget(link);
    Ok(())
}

/// Typed handles on the redirect maps.
pub struct RedirectMaps {
    pub socks: SockHash<MapData, SockKey>,
    pub local_addrs: HashMap<MapData, LocalAddrKey, u32>,
    pub stats: PerCpuArray<MapData, RedirectStats>,
    /// Ports (network byte order) never redirected.
    pub excluded_ports: HashMap<MapData, u16, u32>,
    /// Backends of services that opted out of redirect.
    pub excluded_endpoints: HashMap<MapData, EndpointKey, u32>,
}

impl RedirectMaps {
    /// Takes the maps out of a freshly loaded object (after [`attach`]).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let o = &mut taken_from(ebpf);
        Ok(Self {
            socks: typed(o, redirect_map_names::SOCKS)?,
            local_addrs: typed(o, redirect_map_names::LOCAL_ADDRS)?,
            stats: typed(o, redirect_map_names::REDIRECT_STATS)?,
            excluded_ports: typed(o, redirect_map_names::EXCLUDED_PORTS)?,
            excluded_endpoints: typed(o, redirect_map_names::EXCLUDED_ENDPOINTS)?,
        })
    }

    /// The counters, summed over CPUs.
    pub fn stats(&self) -> RedirectStats {
        super::sum_over_cpus(&self.stats, 0)
    }

    /// Sockets in the sockhash right now (at most `limit` are counted).
    pub fn sockets_in_map(&self, limit: usize) -> usize {
        self.socks.keys().take(limit).filter(Result::is_ok).count()
    }
}
