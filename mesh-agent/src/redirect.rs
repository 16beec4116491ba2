//! Same-node acceleration, the agent's side: the on/off switch (a bit of
//! `MESH_CONFIG.flags`, read by the programs on every call, so switching
//! needs no detach), the node-local addresses the kernel checks
//! (`MESH_LOCAL_ADDR`), and the counters shown by `/v1/redirect`.
//!
//! Node-local addresses are this node's own interface addresses and those of
//! the network namespaces its workloads (the processes of the agent's
//! cgroup) live in (`workloads.rs`), both found with getifaddrs and
//! refreshed periodically, plus those given with `--local-address`.
//! Loopback is always local and never stored.

mod exclusions;
mod workloads;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use aya::maps::{Array, Map, MapData, MapError};
use mesh_common::{
    CONFIG_FLAG_SAME_NODE_REDIRECT, ConfigValue, EndpointKey, FAMILY_V4, FAMILY_V6, LocalAddrKey,
    map_names, redirect_limits, redirect_map_names,
};
use tracing::{info, warn};

use crate::{
    admin::{RedirectCounters, RedirectResponse},
    bpf::RedirectMaps,
    state::Service,
};

use exclusions::{Exclusions, Plan as ExclusionPlan};

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot open pinned map {path}: {source}")]
    ConfigPin {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("reading {map} failed: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing {map} failed: {source}")]
    Write {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "{count} --redirect-exclude-port values do not fit in {map} ({capacity} ports); exclude fewer ports"
    )]
    TooManyPorts {
        map: &'static str,
        capacity: u32,
        count: usize,
    },
    #[error(
        "services with `same_node_redirect: false` have {count} backend endpoints; {map} holds \
         {capacity}"
    )]
    TooManyEndpoints {
        map: &'static str,
        capacity: u32,
        count: usize,
    },
    #[error("cannot list this node's addresses (getifaddrs): {0}")]
    Interfaces(#[source] std::io::Error),
    #[error(
        "{map} is full ({capacity} addresses); {count} node-local addresses do not fit (fewer --local-address)"
    )]
    TooManyAddresses {
        map: &'static str,
        capacity: u32,
        count: usize,
    },
}

/// What `--same-node-redirect` and the admin API configure.
#[derive(Clone, Debug, Default)]
pub struct RedirectOptions {
    pub enabled: bool,
    /// Addresses declared node-local besides the node's own interfaces.
    pub local_addresses: Vec<IpAddr>,
    /// Whether the node's interface addresses, and those of its workloads'
    /// namespaces, count as local.
    pub discover: bool,
    /// The cgroup whose processes are this node's workloads: the addresses
    /// of their network namespaces are node-local.
    pub workload_cgroup: Option<PathBuf>,
    /// Ports never redirected (either end): for receivers that splice()
    /// from their socket, which cannot see redirected bytes.
    pub exclude_ports: Vec<u16>,
}

pub struct Redirect {
    maps: RedirectMaps,
    config: Array<MapData, ConfigValue>,
    options: RedirectOptions,
    /// What MESH_LOCAL_ADDR holds, as this agent wrote it.
    programmed: BTreeSet<IpAddr>,
    /// Workload namespaces read by the last sync.
    workload_namespaces: usize,
    /// Addresses left out by the last sync because two namespaces have them.
    ambiguous: BTreeSet<IpAddr>,
    /// This node's workloads' addresses as the source gives them.
    source_addresses: BTreeSet<IpAddr>,
    /// Backends of services that opted out, as MESH_EXCL_EP holds them.
    exclusions: Exclusions,
}

/// Shared between the agent's loop, the refresher and the admin API.
#[derive(Clone)]
pub struct RedirectHandle(Arc<Mutex<Redirect>>);

impl RedirectHandle {
    pub fn lock(&self) -> MutexGuard<'_, Redirect> {
        // Every method leaves the maps consistent, so a poisoned lock is usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `write_services` (the reconciler programming `changes`, each an
    /// old and a new service) inside the redirect exclusions they bring:
    /// backends a change opts out are excluded before it, those it lets
    /// back in are removed after, and if it fails the new ones are taken
    /// back. The lock is not held while it runs.
    pub fn around_service_changes<'a, T, E: From<RedirectError>>(
        &self,
        changes: impl IntoIterator<Item = (Option<&'a Service>, Option<&'a Service>)>,
        write_services: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let plan = {
            let mut redirect = self.lock();
            let plan = redirect.exclusions.plan(changes);
            redirect.exclude(&plan)?;
            plan
        };
        match write_services() {
            Ok(written) => {
                self.lock().commit_exclusions(plan);
                Ok(written)
            }
            Err(e) => {
                self.lock().unexclude(&plan.added);
                Err(e)
            }
        }
    }

    /// Refreshes the node-local addresses every `interval`, forever.
    pub fn spawn_refresher(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let handle = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                if let Err(e) = handle.lock().sync_local_addrs() {
                    warn!("refreshing node-local addresses: {e}");
                }
            }
        })
    }
}

impl Redirect {
    /// Takes the maps, opens `MESH_CONFIG` from its pin, applies the switch
    /// and writes the node-local addresses.
    pub fn start(
        maps: RedirectMaps,
        maps_dir: &Path,
        options: RedirectOptions,
    ) -> Result<RedirectHandle, RedirectError> {
        let path = maps_dir.join(map_names::CONFIG);
        let config = MapData::from_pin(&path)
            .and_then(|data| Array::try_from(Map::Array(data)))
            .map_err(|source| RedirectError::ConfigPin {
                path: path.display().to_string(),
                source,
            })?;
        // Addresses first, so the first socket the switch lets in is judged
        // against the full set.
        let mut redirect = Redirect {
            maps,
            config,
            options,
            programmed: BTreeSet::new(),
            workload_namespaces: 0,
            ambiguous: BTreeSet::new(),
            source_addresses: BTreeSet::new(),
            exclusions: Exclusions::default(),
        };
        redirect.recover_from_maps();
        redirect.sync_excluded_ports()?;
        redirect.sync_local_addrs()?;
        redirect.set_enabled(redirect.options.enabled)?;
        Ok(RedirectHandle(Arc::new(Mutex::new(redirect))))
    }

    /// Sets or clears the switch, keeping every other bit of the flags.
    pub fn set_enabled(&mut self, on: bool) -> Result<(), RedirectError> {
        let mut value = self
            .config
            .get(&0, 0)
            .map_err(|source| RedirectError::Read {
                map: map_names::CONFIG,
                source,
            })?;
        if on {
            value.flags |= CONFIG_FLAG_SAME_NODE_REDIRECT;
        } else {
            value.flags &= !CONFIG_FLAG_SAME_NODE_REDIRECT;
        }
        self.config
            .set(0, value, 0)
            .map_err(|source| RedirectError::Write {
                map: map_names::CONFIG,
                source,
            })?;
        if on != self.options.enabled {
            info!(enabled = on, "same-node redirect switched");
        }
        self.options.enabled = on;
        Ok(())
    }

    /// The switch as the kernel sees it.
    pub fn enabled(&self) -> bool {
        self.config
            .get(&0, 0)
            .is_ok_and(|v| v.flags & CONFIG_FLAG_SAME_NODE_REDIRECT != 0)
    }

    /// What an earlier agent left in the pinned maps (node-local addresses,
    /// opted-out endpoints), so stale entries are removed by the next sync
    /// or apply.
    fn recover_from_maps(&mut self) {
        let keys: Vec<LocalAddrKey> = self
            .maps
            .local_addrs
            .keys()
            .filter_map(Result::ok)
            .collect();
        self.programmed = keys.iter().filter_map(addr_of_key).collect();
        let endpoints: Vec<SocketAddr> = self
            .maps
            .excluded_endpoints
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| endpoint_of_key(&k))
            .collect();
        self.exclusions = Exclusions::recovered(endpoints);
    }

    /// Writes the endpoints the plan brings, before the services' maps
    /// change. On failure nothing it wrote stays.
    fn exclude(&mut self, plan: &ExclusionPlan) -> Result<(), RedirectError> {
        let map = redirect_map_names::EXCLUDED_ENDPOINTS;
        let count = self.exclusions.planned(plan);
        if count > redirect_limits::MAX_EXCLUDED_ENDPOINTS as usize {
            return Err(RedirectError::TooManyEndpoints {
                map,
                capacity: redirect_limits::MAX_EXCLUDED_ENDPOINTS,
                count,
            });
        }
        for (i, ep) in plan.added.iter().enumerate() {
            if let Err(source) = self.maps.excluded_endpoints.insert(endpoint_key(*ep), 1, 0) {
                self.unexclude(&plan.added[..i]);
                return Err(RedirectError::Write { map, source });
            }
        }
        Ok(())
    }

    /// The apply went through: the plan is the state, and endpoints no
    /// longer opted out leave the map (a failed delete is retried by the
    /// next apply; an endpoint left over only stays off the fast path).
    fn commit_exclusions(&mut self, plan: ExclusionPlan) {
        let gone = self.exclusions.commit(plan);
        self.unexclude(&gone);
    }

    fn unexclude(&mut self, endpoints: &[SocketAddr]) {
        for ep in endpoints {
            match self.maps.excluded_endpoints.remove(&endpoint_key(*ep)) {
                Ok(()) | Err(MapError::KeyNotFound) => self.exclusions.removed(ep),
                Err(e) => warn!(endpoint = %ep, "cannot remove a redirect exclusion: {e}"),
            }
        }
    }

    /// Makes `MESH_REDIR_EXCL` hold exactly the excluded ports (an earlier
    /// agent's list included): adds first, then removes the others.
    fn sync_excluded_ports(&mut self) -> Result<(), RedirectError> {
        let map = mesh_common::redirect_map_names::EXCLUDED_PORTS;
        let wanted: BTreeSet<u16> = self.options.exclude_ports.iter().copied().collect();
        if wanted.len() > redirect_limits::MAX_EXCLUDED_PORTS as usize {
            return Err(RedirectError::TooManyPorts {
                map,
                capacity: redirect_limits::MAX_EXCLUDED_PORTS,
                count: wanted.len(),
            });
        }
        let write_error = |source| RedirectError::Write { map, source };
        let ports = &mut self.maps.excluded_ports;
        for port in &wanted {
            ports.insert(port.to_be(), 1, 0).map_err(write_error)?;
        }
        let stale: Vec<u16> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&u16::from_be(*k)))
            .collect();
        for key in stale {
            match ports.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(write_error(source)),
            }
        }
        Ok(())
    }

    /// The addresses the source says this node's workloads have (a
    /// Kubernetes source: the IPs of this node's pods); written at once.
    pub fn set_workload_addresses(
        &mut self,
        addresses: BTreeSet<IpAddr>,
    ) -> Result<(), RedirectError> {
        if addresses == self.source_addresses {
            return Ok(());
        }
        self.source_addresses = addresses;
        self.sync_local_addrs()
    }

    /// Makes `MESH_LOCAL_ADDR` hold exactly the wanted set: adds first, then
    /// removes, so an address that stays is never briefly missing.
    pub fn sync_local_addrs(&mut self) -> Result<(), RedirectError> {
        let mut wanted: BTreeSet<IpAddr> = self
            .options
            .local_addresses
            .iter()
            .chain(&self.source_addresses)
            .copied()
            .filter(|a| !a.is_loopback())
            .collect();
        if self.options.discover {
            let node: BTreeSet<IpAddr> = interface_addresses()?
                .into_iter()
                .filter(|a| !a.is_loopback())
                .collect();
            if let Some(cgroup) = &self.options.workload_cgroup {
                let scan = workloads::scan(cgroup, &node);
                if scan.ambiguous != self.ambiguous && !scan.ambiguous.is_empty() {
                    warn!(
                        addresses = ?scan.ambiguous,
                        "addresses found in more than one network namespace are not treated as node-local"
                    );
                }
                self.workload_namespaces = scan.namespaces;
                self.ambiguous = scan.ambiguous;
                wanted.extend(scan.addresses);
            }
            wanted.extend(node);
        }
        // The map stores ::ffff:a.b.c.d as IPv4, and `programmed` is read
        // back from it: compare in the same form, or a sync would remove
        // the key it has just written.
        let wanted: BTreeSet<IpAddr> = wanted.into_iter().map(|a| a.to_canonical()).collect();
        if wanted.len() > redirect_limits::MAX_LOCAL_ADDRS as usize {
            return Err(RedirectError::TooManyAddresses {
                map: mesh_common::redirect_map_names::LOCAL_ADDRS,
                capacity: redirect_limits::MAX_LOCAL_ADDRS,
                count: wanted.len(),
            });
        }
        let write_error = |source| RedirectError::Write {
            map: mesh_common::redirect_map_names::LOCAL_ADDRS,
            source,
        };
        for addr in wanted.difference(&self.programmed.clone()) {
            self.maps
                .local_addrs
                .insert(key_of(*addr), 1, 0)
                .map_err(write_error)?;
            self.programmed.insert(*addr);
        }
        let stale: Vec<IpAddr> = self.programmed.difference(&wanted).copied().collect();
        for addr in stale {
            match self.maps.local_addrs.remove(&key_of(addr)) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.programmed.remove(&addr);
                }
                Err(source) => return Err(write_error(source)),
            }
        }
        Ok(())
    }

    pub fn view(&self) -> RedirectResponse {
        let s = self.maps.stats();
        RedirectResponse {
            enabled: self.enabled(),
            sockets_in_map: self
                .maps
                .sockets_in_map(redirect_limits::MAX_REDIRECT_SOCKETS as usize)
                as u64,
            local_addresses: self.programmed.iter().copied().collect(),
            workload_namespaces: self.workload_namespaces as u64,
            exclude_ports: self
                .options
                .exclude_ports
                .iter()
                .copied()
                .collect::<BTreeSet<u16>>()
                .into_iter()
                .collect(),
            ambiguous_addresses: self.ambiguous.iter().copied().collect(),
            excluded_endpoints: self.exclusions.endpoints(),
            counters: RedirectCounters {
                sockets_added: s.sockets_added,
                sockets_failed: s.sockets_failed,
                sockets_skipped: s.sockets_skipped,
                msgs_redirected: s.msgs_redirected,
                bytes_redirected: s.bytes_redirected,
                msgs_fallback: s.msgs_fallback,
                bytes_fallback: s.bytes_fallback,
            },
        }
    }
}

/// The map key of an address; IPv4-mapped IPv6 is stored as IPv4, as the
/// programs normalize it.
pub fn key_of(addr: IpAddr) -> LocalAddrKey {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    match addr {
        IpAddr::V4(v4) => LocalAddrKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: FAMILY_V4,
            _pad: [0; 3],
        },
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            LocalAddrKey {
                addr: [word(0), word(4), word(8), word(12)],
                family: FAMILY_V6,
                _pad: [0; 3],
            }
        }
    }
}

/// The `MESH_EXCL_EP` key of a backend endpoint.
fn endpoint_key(ep: SocketAddr) -> EndpointKey {
    let LocalAddrKey { addr, family, .. } = key_of(ep.ip());
    EndpointKey {
        addr,
        port: ep.port().to_be(),
        family,
        _pad: 0,
    }
}

fn endpoint_of_key(key: &EndpointKey) -> Option<SocketAddr> {
    let ip = addr_of_key(&LocalAddrKey {
        addr: key.addr,
        family: key.family,
        _pad: [0; 3],
    })?;
    Some(SocketAddr::new(ip, u16::from_be(key.port)))
}

fn addr_of_key(key: &LocalAddrKey) -> Option<IpAddr> {
    match key.family {
        FAMILY_V4 => Some(IpAddr::from(key.addr[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in key.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::from(o))
        }
        _ => None,
    }
}

/// Every IPv4 and IPv6 address of this network namespace's interfaces.
pub fn interface_addresses() -> Result<Vec<IpAddr>, RedirectError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(RedirectError::Interfaces(std::io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it names.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                    out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                    out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_network_order_and_round_trip() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let k = key_of(v4);
        assert_eq!(k.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!((k.family, k.addr[1], k.addr[3]), (FAMILY_V4, 0, 0));
        assert_eq!(addr_of_key(&k), Some(v4));
        let v6: IpAddr = "fd00::1:2".parse().unwrap();
        let k6 = key_of(v6);
        assert_eq!(k6.family, FAMILY_V6);
        assert_eq!(k6.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(addr_of_key(&k6), Some(v6));
    }

    #[test]
    fn endpoint_keys_round_trip_with_the_port_in_network_order() {
        for ep in ["10.1.2.3:8080", "[fd00::7]:443"] {
            let ep: SocketAddr = ep.parse().unwrap();
            let k = endpoint_key(ep);
            assert_eq!(k.port.to_ne_bytes(), ep.port().to_be_bytes());
            assert_eq!(endpoint_of_key(&k), Some(ep));
        }
    }

    #[test]
    fn mapped_v6_is_stored_as_v4() {
        let mapped: IpAddr = "::ffff:10.9.8.7".parse().unwrap();
        assert_eq!(key_of(mapped), key_of("10.9.8.7".parse().unwrap()));
    }

    #[test]
    fn this_node_has_interface_addresses() {
        let addrs = interface_addresses().unwrap();
        assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
    }
}
