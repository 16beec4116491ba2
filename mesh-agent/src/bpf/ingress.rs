//! Strict mTLS on the destination node: the `cgroup_skb/ingress` program
//! (`mesh-ebpf/src/ingress.rs`) and the maps it reads.
//!
//! After each applied state `MESH_INBOUND` holds exactly the local backends
//! (`node:` is this node) of TCP services whose mode is strict or
//! permissive, and `MESH_NODE_ADDRS` this node's interface addresses plus
//! the addresses of every backend on this node (a packet from one of them
//! did not come from another node). Both are written as a difference from
//! what they hold: additions and updates first, deletions last, and node
//! addresses added before the backends that need them and removed after,
//! so no reader ever sees a half-written state (a same-node client never
//! meets a strict entry before its address is known).
//!
//! Interface addresses are re-read on each apply (not on a timer): an
//! address added to the node between applies is treated as another node's
//! until the next apply.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{HashMap, IterableMap, MapData, PerCpuArray},
};
use mesh_common::{
    INBOUND_FLAG_STRICT, InboundKey, InboundStats, InboundValue, LocalAddrKey, PROTO_TCP,
    inbound_map_names, inbound_program_names,
};

use super::{
    BpfError,
    batch::{self, BatchError},
    maps::{MapsError, taken_from, typed},
};
use crate::redirect::key_of;
use crate::state::{Mesh, MtlsMode, Service};

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error(
        "{map} would need {wanted} entries but holds {capacity}: strict mTLS is not enforced \
         for the new entries; raise --max-backends (after `mesh-agent cleanup`) or list fewer \
         local backends"
    )]
    Full {
        map: &'static str,
        wanted: usize,
        capacity: u32,
    },
    #[error("{op} in {map} failed after {done} entries: {source}")]
    Write {
        map: &'static str,
        op: &'static str,
        done: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot count the CPUs for {map}: {0}", map = inbound_map_names::INBOUND_STATS)]
    Cpus(#[source] std::io::Error),
}

/// Attaches `mesh_ingress` to the cgroup (a pinned bpf link, like the
/// others); returns its name.
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup: &std::fs::File,
    links_dir: &std::path::Path,
) -> Result<&'static str, BpfError> {
    let name = inbound_program_names::INGRESS;
    super::attach_and_pin(ebpf, name, cgroup, links_dir)?;
    Ok(name)
}

/// What one service asks of the inbound maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    /// Its local backends, when its mode is strict or permissive and it
    /// carries TCP, sorted by key.
    pub entries: Vec<(InboundKey, InboundValue)>,
    /// The addresses of its backends on this node, whatever its mode.
    pub addrs: Vec<LocalAddrKey>,
}

/// The entries `svc` asks for on node `node`; `tcp_id` is its TCP service
/// id (None: it carries no TCP, or the kernel does not hold it).
pub fn contribution(svc: &Service, mesh: &Mesh, node: &str, tcp_id: Option<u32>) -> Contribution {
    let local: Vec<_> = svc
        .backends
        .iter()
        .filter(|b| b.node.as_deref() == Some(node))
        .collect();
    let mut addrs: Vec<LocalAddrKey> = local.iter().map(|b| key_of(b.address)).collect();
    addrs.sort_unstable();
    addrs.dedup();
    let flags = match svc.mtls_mode(mesh) {
        MtlsMode::Strict => Some(INBOUND_FLAG_STRICT),
        MtlsMode::Permissive => Some(0),
        MtlsMode::Disabled => None,
    };
    let mut entries = Vec::new();
    if let (Some(flags), Some(service_id)) = (flags, tcp_id) {
        for b in &local {
            let LocalAddrKey { addr, family, .. } = key_of(b.address);
            let key = InboundKey {
                addr,
                port: b.port.to_be(),
                family,
                _pad: 0,
            };
            let value = InboundValue {
                service_id,
                flags,
                _pad: [0; 3],
            };
            entries.push((key, value));
        }
    }
    entries.sort_unstable();
    entries.dedup_by_key(|(k, _)| *k);
    Contribution { entries, addrs }
}

/// The value of a backend several services list: strict if any of them is
/// (one listening socket serves them all, so one permissive service must
/// not open a strict one's backend), counted for the first such service by
/// name.
fn merged<'a>(mut values: impl Iterator<Item = &'a InboundValue>) -> Option<InboundValue> {
    let first = *values.next()?;
    Some(values.fold(first, |kept, v| {
        if kept.flags & INBOUND_FLAG_STRICT == 0 && v.flags & INBOUND_FLAG_STRICT != 0 {
            *v
        } else {
            kept
        }
    }))
}

/// What the maps should hold, from every service's contribution (in name
/// order) and the node's interface addresses.
pub fn wanted(
    contributions: &BTreeMap<String, Contribution>,
    interfaces: impl IntoIterator<Item = IpAddr>,
) -> (BTreeMap<InboundKey, InboundValue>, BTreeSet<LocalAddrKey>) {
    let mut by_key: BTreeMap<InboundKey, Vec<&InboundValue>> = BTreeMap::new();
    let mut addrs: BTreeSet<LocalAddrKey> = interfaces.into_iter().map(key_of).collect();
    for c in contributions.values() {
        for (k, v) in &c.entries {
            by_key.entry(*k).or_default().push(v);
        }
        addrs.extend(c.addrs.iter().copied());
    }
    let entries = by_key
        .into_iter()
        .filter_map(|(k, vs)| merged(vs.into_iter()).map(|v| (k, v)))
        .collect();
    (entries, addrs)
}

/// What one write changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundReport {
    pub entries: usize,
    pub entries_written: usize,
    pub entries_removed: usize,
    pub addrs: usize,
}

/// The inbound maps and the agent's record of what they hold.
pub struct Inbound {
    entries: HashMap<MapData, InboundKey, InboundValue>,
    node_addrs: HashMap<MapData, LocalAddrKey, u32>,
    stats: PerCpuArray<MapData, InboundStats>,
    /// What the maps hold (found at start, then as written).
    written: BTreeMap<InboundKey, InboundValue>,
    written_addrs: BTreeSet<LocalAddrKey>,
    /// Each service's contribution, by name.
    services: BTreeMap<String, Contribution>,
}

impl Inbound {
    /// Takes the maps out of a freshly loaded object (after [`attach`]) and
    /// reads what an earlier agent left in them, so the first write removes
    /// only what is no longer wanted and never opens a gap.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let o = &mut taken_from(ebpf);
        let entries: HashMap<MapData, InboundKey, InboundValue> =
            typed(o, inbound_map_names::INBOUND)?;
        let node_addrs: HashMap<MapData, LocalAddrKey, u32> =
            typed(o, inbound_map_names::NODE_ADDRS)?;
        let stats = typed(o, inbound_map_names::INBOUND_STATS)?;
        let written = entries.iter().flatten().collect();
        let written_addrs = node_addrs.keys().flatten().collect();
        Ok(Self {
            entries,
            node_addrs,
            stats,
            written,
            written_addrs,
            services: BTreeMap::new(),
        })
    }

    /// Records what the services named now ask for (None: removed).
    pub fn set_service(&mut self, name: &str, contribution: Option<Contribution>) {
        match contribution {
            Some(c) if c != Contribution::default() => {
                self.services.insert(name.to_owned(), c);
            }
            _ => {
                self.services.remove(name);
            }
        }
    }

    /// Forgets every service (before recording them all again).
    pub fn clear_services(&mut self) {
        self.services.clear();
    }

    /// Makes the maps hold what the recorded services ask for, with
    /// `interfaces` as the node's addresses. `new_service_ids` (ids the
    /// reconciler has just given out) get their counters zeroed first, so
    /// a new service never inherits a removed one's counts.
    pub fn write(
        &mut self,
        interfaces: impl IntoIterator<Item = IpAddr>,
        new_service_ids: &[u32],
    ) -> Result<InboundReport, InboundError> {
        let (entries, addrs) = wanted(&self.services, interfaces);
        let capacity = self
            .entries
            .map()
            .info()
            .map_or(u32::MAX, |i| i.max_entries());
        if entries.len() > capacity as usize {
            return Err(InboundError::Full {
                map: inbound_map_names::INBOUND,
                wanted: entries.len(),
                capacity,
            });
        }
        let addr_capacity = self
            .node_addrs
            .map()
            .info()
            .map_or(u32::MAX, |i| i.max_entries());
        if addrs.len() > addr_capacity as usize {
            return Err(InboundError::Full {
                map: inbound_map_names::NODE_ADDRS,
                wanted: addrs.len(),
                capacity: addr_capacity,
            });
        }
        if !new_service_ids.is_empty() {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| InboundError::Cpus(e))?;
            batch::zero_per_cpu::<InboundStats>(fd(self.stats.map()), new_service_ids, cpus)
                .map_err(write_error(inbound_map_names::INBOUND_STATS, "reset"))?;
        }
        // 1. New node addresses, before any entry that relies on them.
        let new_addrs: Vec<LocalAddrKey> = addrs.difference(&self.written_addrs).copied().collect();
        let ones = vec![1u32; new_addrs.len()];
        let result = batch::update(fd(self.node_addrs.map()), &new_addrs, &ones);
        let done = result
            .as_ref()
            .map_or_else(|e| e.done, |()| new_addrs.len());
        self.written_addrs.extend(&new_addrs[..done]);
        result.map_err(write_error(inbound_map_names::NODE_ADDRS, "insert"))?;
        // 2. New and changed backends.
        let (keys, values): (Vec<InboundKey>, Vec<InboundValue>) = entries
            .iter()
            .filter(|(k, v)| self.written.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .unzip();
        let result = batch::update(fd(self.entries.map()), &keys, &values);
        let done = result.as_ref().map_or_else(|e| e.done, |()| keys.len());
        self.written.extend(
            keys[..done]
                .iter()
                .copied()
                .zip(values[..done].iter().copied()),
        );
        result.map_err(write_error(inbound_map_names::INBOUND, "insert"))?;
        // 3. Backends no longer listed. A failed delete stays in the record
        // and is retried on the next write.
        let stale: Vec<InboundKey> = self
            .written
            .keys()
            .filter(|k| !entries.contains_key(k))
            .copied()
            .collect();
        batch::delete_present(fd(self.entries.map()), &stale);
        for k in &stale {
            if self.entries.get(k, 0).is_err() {
                self.written.remove(k);
            }
        }
        // 4. Node addresses no longer wanted, last.
        let stale_addrs: Vec<LocalAddrKey> =
            self.written_addrs.difference(&addrs).copied().collect();
        batch::delete_present(fd(self.node_addrs.map()), &stale_addrs);
        for k in &stale_addrs {
            if self.node_addrs.get(k, 0).is_err() {
                self.written_addrs.remove(k);
            }
        }
        Ok(InboundReport {
            entries: self.written.len(),
            entries_written: keys.len(),
            entries_removed: stale.len(),
            addrs: self.written_addrs.len(),
        })
    }

    /// What `MESH_INBOUND` holds, as written.
    pub fn entries(&self) -> &BTreeMap<InboundKey, InboundValue> {
        &self.written
    }
}

fn fd(map: &MapData) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd as _;
    map.fd().as_fd()
}

fn write_error(map: &'static str, op: &'static str) -> impl FnOnce(BatchError) -> InboundError {
    move |e| InboundError::Write {
        map,
        op,
        done: e.done,
        source: e.source,
    }
}

/// The TCP service id the reconciler gave `svc`, if it holds it.
pub fn tcp_service_id(svc: &Service, reconciler: &crate::reconcile::Reconciler) -> Option<u32> {
    crate::reconcile::service_keys(svc)
        .filter(|k| k.proto == PROTO_TCP)
        .find_map(|k| reconciler.service(&k).map(|p| p.id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Algorithm, Backend, BackendState, Policy, Protocol};
    use mesh_common::{FAMILY_V4, FAMILY_V6};

    fn backend(address: &str, port: u16, node: Option<&str>) -> Backend {
        Backend {
            address: address.parse().unwrap(),
            port,
            weight: 1,
            state: BackendState::Active,
            node: node.map(str::to_owned),
            tunnel: false,
            priority: crate::state::PRIORITY_PREFERRED,
        }
    }

    fn service(name: &str, mtls: Option<MtlsMode>, backends: Vec<Backend>) -> Service {
        Service {
            name: name.into(),
            vip: "127.77.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            algorithm: Algorithm::Weighted,
            affinity_timeout_s: None,
            policy: Policy::default(),
            drain_timeout_s: 0,
            destroy_on_removal: None,
            same_node_redirect: true,
            health_check: None,
            outlier_detection: None,
            panic_mode: Default::default(),
            mtls,
            backends,
            origin: None,
        }
    }

    #[test]
    fn only_this_nodes_backends_of_strict_and_permissive_services_are_listed() {
        let mesh = Mesh::default();
        let backends = vec![
            backend("10.77.0.2", 9000, Some("node-b")),
            backend("fd77::2", 9001, Some("node-b")),
            backend("10.77.0.1", 9000, Some("node-a")),
            backend("10.77.0.9", 9000, None),
            // IPv4-mapped: the packets are IPv4.
            backend("::ffff:10.77.0.3", 9002, Some("node-b")),
        ];
        let strict = service("web", Some(MtlsMode::Strict), backends.clone());
        let c = contribution(&strict, &mesh, "node-b", Some(7));
        let listed: Vec<(IpAddr, u16, u8)> = c
            .entries
            .iter()
            .map(|(k, v)| {
                assert_eq!(v.service_id, 7);
                let ip = crate::reconcile::ip_from_words(k.family, k.addr);
                (ip, u16::from_be(k.port), v.flags)
            })
            .collect();
        let s = INBOUND_FLAG_STRICT;
        let want: BTreeSet<(IpAddr, u16, u8)> = [
            ("10.77.0.2".parse().unwrap(), 9000, s),
            ("fd77::2".parse().unwrap(), 9001, s),
            ("10.77.0.3".parse().unwrap(), 9002, s),
        ]
        .into();
        assert_eq!(listed.iter().copied().collect::<BTreeSet<_>>(), want);
        assert_eq!(listed.len(), 3);
        let families: BTreeSet<u8> = c.entries.iter().map(|(k, _)| k.family).collect();
        assert_eq!(families, [FAMILY_V4, FAMILY_V6].into());
        // Backends on this node are this node's addresses, whatever the mode.
        assert_eq!(c.addrs.len(), 3);

        let permissive = service("web", Some(MtlsMode::Permissive), backends.clone());
        let c = contribution(&permissive, &mesh, "node-b", Some(7));
        assert!(c.entries.iter().all(|(_, v)| v.flags == 0));
        assert_eq!(c.entries.len(), 3);

        let disabled = service("web", Some(MtlsMode::Disabled), backends.clone());
        let c = contribution(&disabled, &mesh, "node-b", Some(7));
        assert!(c.entries.is_empty());
        assert_eq!(c.addrs.len(), 3);

        // The mesh's default applies when the service names no mode.
        let default_strict = Mesh {
            default_mtls: MtlsMode::Strict,
            ..Mesh::default()
        };
        let inherit = service("web", None, backends.clone());
        let c = contribution(&inherit, &default_strict, "node-b", Some(7));
        assert!(c.entries.iter().all(|(_, v)| v.flags == s) && c.entries.len() == 3);

        // No TCP id (UDP only, or not programmed): nothing to enforce.
        let c = contribution(&strict, &mesh, "node-b", None);
        assert!(c.entries.is_empty());
        // Another node sees only its own.
        let c = contribution(&strict, &mesh, "node-a", Some(7));
        assert_eq!(c.entries.len(), 1);
    }

    #[test]
    fn a_shared_backend_is_strict_if_any_service_is_and_interfaces_count_as_local() {
        let mesh = Mesh::default();
        let shared = || vec![backend("10.77.0.2", 9000, Some("node-b"))];
        let mut services = BTreeMap::new();
        services.insert(
            "a-open".to_owned(),
            contribution(
                &service("a-open", Some(MtlsMode::Permissive), shared()),
                &mesh,
                "node-b",
                Some(1),
            ),
        );
        services.insert(
            "b-closed".to_owned(),
            contribution(
                &service("b-closed", Some(MtlsMode::Strict), shared()),
                &mesh,
                "node-b",
                Some(2),
            ),
        );
        let interfaces: Vec<IpAddr> =
            vec!["10.77.0.2".parse().unwrap(), "fd77::2".parse().unwrap()];
        let (entries, addrs) = wanted(&services, interfaces);
        assert_eq!(entries.len(), 1);
        let value = entries.values().next().unwrap();
        assert_eq!((value.service_id, value.flags), (2, INBOUND_FLAG_STRICT));
        // The backend's address and the interfaces, once each.
        assert_eq!(addrs.len(), 2);
        services.remove("b-closed");
        let (entries, _) = wanted(&services, Vec::new());
        let value = entries.values().next().unwrap();
        assert_eq!((value.service_id, value.flags), (1, 0));
    }
}
