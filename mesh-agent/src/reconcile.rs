//! Turns the desired model into map writes, all or nothing.
//!
//! An update happens in three phases, so the kernel never sees a half-written
//! state:
//! 1. write new backends, policy and workload entries, and each changed
//!    service's slot table under a new generation (nothing reads them yet);
//! 2. flip every changed service entry, one map update each;
//! 3. delete what nothing points at any more (old generations, removed
//!    services, backends, policy and workload entries).
//!
//! A failure in phase 1 or 2 undoes every write made so far and leaves the
//! previous state serving. Capacity is checked before anything is written, so
//! a full map is reported with what to change instead of failing half way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use aya::maps::MapError;
use mesh_common::{
    ALGORITHM_LEAST_CONN, ALGORITHM_MAGLEV, ALGORITHM_WEIGHTED, BACKEND_ACTIVE, BACKEND_DRAINING,
    BackendId, BackendStats, BackendValue, FAMILY_V4, FAMILY_V6, PolicyKey, PolicyValue,
    SERVICE_AFFINITY, SERVICE_DEFAULT_DENY, SERVICE_POLICY, ServiceKey, ServiceStats, ServiceValue,
    SlotKey, VERDICT_ALLOW, VERDICT_DENY, limits, map_names,
};

use crate::bpf::Maps;
use crate::bpf::batch;
use crate::state::{Algorithm, BackendState, DesiredState, Service, Workload};
use crate::{maglev, slots};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(
        "map {map} is too small: this configuration needs {needed} entries and the map holds {capacity}; {}; the previous state is still serving",
        raise_hint(map)
    )]
    MapFull {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error(
        "workload '{name}': cannot read cgroup {}: {source}; create the cgroup first or fix the path (the previous state is still serving)",
        path.display()
    )]
    Workload {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot size per-CPU counters: {0}")]
    PerCpu(#[source] std::io::Error),
    #[error("writing {map} failed ({op}): {source}; the previous state is still serving")]
    MapWrite {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
}

/// How many entries each map can hold.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
    pub slots_per_service: u32,
    pub maglev_table: u32,
    pub workloads: u32,
    pub policy: u32,
}

impl Capacity {
    /// The capacity of the maps as the kernel created them.
    pub fn of(maps: &Maps) -> Self {
        use aya::maps::IterableMap as _;
        let max = |data: &aya::maps::MapData| data.info().map_or(0, |i| i.max_entries());
        Self {
            // Ids index the stats arrays, so the smaller of each pair counts.
            services: max(maps.services.map()).min(maps.service_stats.len()),
            backends: max(maps.backends.map())
                .min(maps.backend_stats.len())
                .min(maps.active.len()),
            slots: max(maps.slots.map()),
            slots_per_service: limits::MAX_SLOTS_PER_SERVICE,
            maglev_table: limits::MAX_MAGLEV_TABLE,
            workloads: max(maps.workloads.map()),
            policy: max(maps.policy.map()),
        }
    }
}

/// What to change when a map is too small.
fn raise_hint(map: &str) -> &'static str {
    match map {
        m if m == map_names::SERVICES => "raise --max-services or remove services",
        m if m == map_names::BACKENDS => "raise --max-backends or remove backends",
        m if m == map_names::WORKLOADS => "remove workloads",
        m if m == map_names::POLICY => "shorten the policies' allow and deny lists",
        _ => {
            "raise --max-slots or lower the weights (a weighted service takes sum(weights)/gcd slots, up to 16384; a maglev service a prime above 100 per backend; twice while it is updated)"
        }
    }
}

/// A backend's identity within its service.
pub type BackendAddr = (IpAddr, u16);

/// What the kernel holds for one service on one protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgrammedService {
    pub name: String,
    pub value: ServiceValue,
    /// Backend id of every slot, in slot order.
    pub slots: Vec<BackendId>,
    pub backends: BackendIds,
    /// Destroy sockets to a backend when it is removed.
    pub destroy_on_removal: bool,
}

/// A service's backend ids by address, sorted by address. A boxed slice,
/// not a map: the agent keeps one per service for as long as it runs, and
/// for the usual handful of backends a map node is mostly empty room.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendIds(Box<[(BackendAddr, BackendId)]>);

impl BackendIds {
    pub fn get(&self, addr: &BackendAddr) -> Option<&BackendId> {
        self.0
            .binary_search_by(|(a, _)| a.cmp(addr))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn values(&self) -> impl Iterator<Item = &BackendId> {
        self.0.iter().map(|(_, id)| id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&BackendAddr, &BackendId)> {
        self.0.iter().map(|(addr, id)| (addr, id))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The last id given for an address wins, as with a map's `insert`.
impl FromIterator<(BackendAddr, BackendId)> for BackendIds {
    fn from_iter<I: IntoIterator<Item = (BackendAddr, BackendId)>>(iter: I) -> Self {
        let mut ids: Vec<(BackendAddr, BackendId)> = iter.into_iter().collect();
        // Stable, so equal addresses keep their order and the last is kept.
        ids.sort_by_key(|&(addr, _)| addr);
        ids.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = later.1;
            }
            same
        });
        Self(ids.into_boxed_slice())
    }
}

impl ProgrammedService {
    pub fn id(&self) -> u32 {
        self.value.service_id
    }
}

/// The agent's record of what it wrote, kept in step with the maps.
#[derive(Clone, Debug)]
pub struct Reconciler {
    capacity: Capacity,
    services: BTreeMap<ServiceKey, ProgrammedService>,
    /// Identity names and the ids the kernel knows them by.
    identities: BTreeMap<String, u32>,
    /// cgroup id → identity id, as written to MESH_WORKLOADS.
    workloads: BTreeMap<u64, u32>,
    policy: BTreeMap<PolicyKey, u8>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// Slots and backends of all services (kept so an apply that touches a
    /// few services need not count them all).
    live_slots: usize,
    live_backends: usize,
    /// This node's name: workloads of other nodes get no cgroup entry.
    /// `None`: every workload is this node's.
    node: Option<String>,
}

/// What one apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub services_changed: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    /// Backends no longer in the kernel, whose sockets may need destroying.
    pub removed_backends: Vec<RemovedBackend>,
    /// Stale entries that could not be deleted; harmless, retried next time.
    pub cleanup_failures: usize,
    /// Service ids given out by this apply (their counters start at zero).
    pub new_service_ids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedBackend {
    pub addr: SocketAddr,
    /// IP protocol of the sockets that were balanced to it.
    pub proto: u8,
    pub destroy_sockets: bool,
}

/// Writes that can be undone, in the order they were made.
enum Undo {
    /// Changed in place; the previous value.
    Backend(BackendId, BackendValue),
    /// Were absent.
    NewBackends(Vec<BackendId>),
    /// A slot table written under a new generation (perhaps only in part:
    /// undoing deletes whichever of its slots are there).
    Table {
        service_id: u32,
        generation: u32,
        count: u32,
    },
    Service(ServiceKey, ServiceValue),
    NewServices(Vec<ServiceKey>),
    Policy(PolicyKey, Option<PolicyValue>),
    Workload(u64, Option<u32>),
}

impl Reconciler {
    /// Rebuilds the record from maps an earlier agent left pinned, and drops
    /// whatever that agent left half done (old generations, orphans).
    pub fn recover(capacity: Capacity, maps: &mut Maps) -> Self {
        let live: Vec<(ServiceKey, ServiceValue)> =
            maps.services.iter().filter_map(Result::ok).collect();
        let generations: BTreeMap<u32, u32> = live
            .iter()
            .map(|(_, v)| (v.service_id, v.generation))
            .collect();
        let mut slots_by_service: BTreeMap<u32, BTreeMap<u32, BackendId>> = BTreeMap::new();
        let mut stale_slots = Vec::new();
        for (key, backend) in maps.slots.iter().filter_map(Result::ok) {
            if generations.get(&key.service_id) == Some(&key.generation) {
                slots_by_service
                    .entry(key.service_id)
                    .or_default()
                    .insert(key.slot, backend);
            } else {
                stale_slots.push(key);
            }
        }
        let mut backends_by_service: BTreeMap<u32, Vec<(BackendAddr, BackendId)>> = BTreeMap::new();
        let mut orphans = Vec::new();
        for (id, value) in maps.backends.iter().filter_map(Result::ok) {
            if generations.contains_key(&value.service_id) {
                let addr = (
                    ip_from_words(value.family, value.addr),
                    u16::from_be(value.port),
                );
                backends_by_service
                    .entry(value.service_id)
                    .or_default()
                    .push((addr, id));
            } else {
                orphans.push(id);
            }
        }
        let services: BTreeMap<ServiceKey, ProgrammedService> = live
            .into_iter()
            .map(|(key, value)| {
                let programmed = ProgrammedService {
                    name: String::new(),
                    // Unknown until the next apply: the default for the protocol.
                    destroy_on_removal: key.proto == mesh_common::PROTO_UDP,
                    value,
                    slots: slots_by_service
                        .remove(&value.service_id)
                        .unwrap_or_default()
                        .into_values()
                        .collect(),
                    backends: backends_by_service
                        .remove(&value.service_id)
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                };
                (key, programmed)
            })
            .collect();
        for key in stale_slots {
            let _ = maps.slots.remove(&key);
        }
        for id in orphans {
            let _ = maps.backends.remove(&id);
        }
        // Identity names are not in the kernel; the next apply assigns ids
        // afresh and replaces these entries.
        let workloads = maps.workloads.iter().filter_map(Result::ok).collect();
        let policy = maps
            .policy
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.verdict))
            .collect();
        let service_ids = IdPool::from_used(services.values().map(|s| s.id()), capacity.services);
        let backend_ids = IdPool::from_used(
            services.values().flat_map(|s| s.backends.values().copied()),
            capacity.backends,
        );
        let live_slots = services.values().map(|s| s.slots.len()).sum();
        let live_backends = services.values().map(|s| s.backends.len()).sum();
        Self {
            capacity,
            services,
            identities: BTreeMap::new(),
            workloads,
            policy,
            service_ids,
            backend_ids,
            live_slots,
            live_backends,
            node: None,
        }
    }

    /// Registers only the cgroups of workloads on `node` (`Workload::is_on`).
    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    /// Identity names and the ids the kernel knows them by.
    pub fn identities(&self) -> &BTreeMap<String, u32> {
        &self.identities
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &ProgrammedService)> {
        self.services.iter()
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&ProgrammedService> {
        self.services.get(key)
    }

    /// Entries and capacity of the maps this record covers.
    pub fn fill(&self) -> Vec<(&'static str, u64, u64)> {
        let c = &self.capacity;
        vec![
            (
                map_names::SERVICES,
                self.services.len() as u64,
                c.services.into(),
            ),
            (
                map_names::BACKENDS,
                self.live_backends as u64,
                c.backends.into(),
            ),
            (map_names::SLOTS, self.live_slots as u64, c.slots.into()),
            (
                map_names::WORKLOADS,
                self.workloads.len() as u64,
                c.workloads.into(),
            ),
            (map_names::POLICY, self.policy.len() as u64, c.policy.into()),
        ]
    }

    /// The name of an identity id, for events.
    pub fn identity_name(&self, id: u32) -> Option<&str> {
        self.identities
            .iter()
            .find(|&(_, &i)| i == id)
            .map(|(name, _)| name.as_str())
    }

    /// Makes the maps hold `desired`, or leaves them as they were. Every
    /// service is looked at (and only what differs is written); see
    /// [`Reconciler::apply_changes`] for an update of a few services.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        maps: &mut Maps,
    ) -> Result<ApplyReport, ReconcileError> {
        self.apply_set(desired.services.iter(), &desired.workloads, maps)
    }

    /// `apply` for services given one by one.
    pub fn apply_set<'a>(
        &mut self,
        services: impl Iterator<Item = &'a Service>,
        workloads: &[Workload],
        maps: &mut Maps,
    ) -> Result<ApplyReport, ReconcileError> {
        let mut holders: BTreeMap<ServiceKey, &Service> = BTreeMap::new();
        for svc in services {
            for key in service_keys(svc) {
                holders.insert(key, svc);
            }
        }
        let touched: BTreeSet<ServiceKey> = self
            .services
            .keys()
            .copied()
            .chain(holders.keys().copied())
            .collect();
        self.apply_keys(&touched, &holders, workloads, maps)
    }

    /// Makes the maps hold a state that differs from the applied one only
    /// in the services of `changes` (each: what it was, what it becomes;
    /// `None` for absent), or leaves them as they were. Services not named
    /// cost nothing: no planning, no new generation, no map write.
    /// `workloads` is the complete list (identities for policy).
    pub fn apply_changes(
        &mut self,
        changes: &[(Option<&Service>, Option<&Service>)],
        workloads: &[Workload],
        maps: &mut Maps,
    ) -> Result<ApplyReport, ReconcileError> {
        let mut holders: BTreeMap<ServiceKey, &Service> = BTreeMap::new();
        let mut touched = BTreeSet::new();
        for (old, new) in changes {
            if let Some(old) = old {
                touched.extend(service_keys(old));
            }
            if let Some(new) = new {
                for key in service_keys(new) {
                    touched.insert(key);
                    holders.insert(key, new);
                }
            }
        }
        self.apply_keys(&touched, &holders, workloads, maps)
    }

    fn apply_keys(
        &mut self,
        touched: &BTreeSet<ServiceKey>,
        holders: &BTreeMap<ServiceKey, &Service>,
        workloads: &[Workload],
        maps: &mut Maps,
    ) -> Result<ApplyReport, ReconcileError> {
        let plan = self.plan(touched, holders, workloads)?;
        let mut undo = Vec::new();
        if let Err(e) = write_plan(&plan, holders, self, maps, &mut undo) {
            rollback(undo, maps);
            return Err(e);
        }
        let mut report = cleanup(self, &plan, maps);
        report.new_service_ids = plan.new_service_ids.clone();
        self.commit(plan);
        Ok(report)
    }

    fn commit(&mut self, plan: Plan) {
        self.service_ids
            .commit(plan.service_ids_next, &plan.new_service_ids);
        self.backend_ids
            .commit(plan.backend_ids_next, &plan.new_backends);
        for (key, new) in plan.services {
            let old = match new {
                Some(new) => {
                    self.live_slots += new.slots.len();
                    self.live_backends += new.backends.len();
                    self.services.insert(key, new)
                }
                None => self.services.remove(&key),
            };
            if let Some(old) = old {
                self.live_slots -= old.slots.len();
                self.live_backends -= old.backends.len();
                let kept = self.services.get(&key);
                if kept.is_none() {
                    self.service_ids.release(old.id());
                }
                let kept: BTreeSet<BackendId> = kept
                    .map(|k| k.backends.values().copied().collect())
                    .unwrap_or_default();
                for id in old.backends.values() {
                    if !kept.contains(id) {
                        self.backend_ids.release(*id);
                    }
                }
            }
        }
        for (key, verdict) in plan.policy {
            match verdict {
                Some(v) => self.policy.insert(key, v),
                None => self.policy.remove(&key),
            };
        }
        self.identities = plan.identities;
        self.workloads = plan.workloads;
    }

    fn plan(
        &self,
        touched: &BTreeSet<ServiceKey>,
        holders: &BTreeMap<ServiceKey, &Service>,
        workloads: &[Workload],
    ) -> Result<Plan, ReconcileError> {
        let cap = self.capacity;
        let mut service_ids = self.service_ids.allocator();
        let mut backend_ids = self.backend_ids.allocator();
        let mut plan = Plan {
            identities: identity_ids(workloads, &self.identities),
            ..Plan::default()
        };
        let local = |w: &&Workload| self.node.as_deref().is_none_or(|n| w.is_on(n));
        for w in workloads.iter().filter(local) {
            let cgroup_id = std::fs::metadata(&w.cgroup)
                .map_err(|source| ReconcileError::Workload {
                    name: w.name.clone(),
                    path: w.cgroup.clone(),
                    source,
                })?
                .ino();
            plan.workloads
                .insert(cgroup_id, plan.identities[&w.identity]);
        }
        check_capacity(map_names::WORKLOADS, plan.workloads.len(), cap.workloads)?;

        let mut services_after = self.services.len();
        let mut new_policy = 0usize;
        let mut new_slots = 0usize;
        for key in touched {
            let old = self.services.get(key);
            let Some(svc) = holders.get(key).copied() else {
                if let Some(old) = old {
                    services_after -= 1;
                    for (identity, _) in self.policy_of(old.id()) {
                        plan.policy.insert(
                            PolicyKey {
                                identity,
                                service_id: old.id(),
                            },
                            None,
                        );
                    }
                    plan.services.insert(*key, None);
                }
                continue;
            };
            let service_id = match old {
                Some(old) => old.id(),
                None => {
                    services_after += 1;
                    let id = service_ids
                        .allocate()
                        .ok_or_else(|| full(map_names::SERVICES, cap.services))?;
                    plan.new_service_ids.push(id);
                    id
                }
            };
            let mut backends = Vec::with_capacity(svc.backends.len());
            let mut ids = Vec::with_capacity(svc.backends.len());
            for b in &svc.backends {
                let addr = (b.address, b.port);
                let value = backend_value(b, service_id);
                let id = match old.and_then(|o| o.backends.get(&addr)) {
                    Some(&existing) => {
                        plan.backend_values.push((existing, value));
                        existing
                    }
                    None => {
                        let id = backend_ids
                            .allocate()
                            .ok_or_else(|| full(map_names::BACKENDS, cap.backends))?;
                        plan.new_backends.push(id);
                        id
                    }
                };
                backends.push((addr, id));
                ids.push(id);
            }
            let slots = selection_table(svc, &ids, old.map(|o| o.slots.as_slice()), &cap);
            let generation = match old {
                Some(old) if old.slots == slots => old.value.generation,
                Some(old) => {
                    plan.new_tables.insert(*key);
                    new_slots += slots.len();
                    old.value.generation.wrapping_add(1)
                }
                None => {
                    plan.new_tables.insert(*key);
                    new_slots += slots.len();
                    1
                }
            };
            // This service's verdicts: the new ones, and removal of old ones
            // that are gone.
            let mut verdicts: BTreeMap<u32, u8> = BTreeMap::new();
            for name in &svc.policy.allow {
                verdicts.insert(plan.identities[name], VERDICT_ALLOW);
            }
            for name in &svc.policy.deny {
                verdicts.insert(plan.identities[name], VERDICT_DENY);
            }
            if old.is_some() {
                for (identity, _) in self.policy_of(service_id) {
                    if !verdicts.contains_key(&identity) {
                        plan.policy.insert(
                            PolicyKey {
                                identity,
                                service_id,
                            },
                            None,
                        );
                    }
                }
            }
            for (identity, verdict) in verdicts {
                let key = PolicyKey {
                    identity,
                    service_id,
                };
                if !self.policy.contains_key(&key) {
                    new_policy += 1;
                }
                plan.policy.insert(key, Some(verdict));
            }
            let value = service_value(svc, service_id, generation, slots.len() as u32);
            plan.services.insert(
                *key,
                Some(ProgrammedService {
                    name: svc.name.clone(),
                    value,
                    slots,
                    backends: backends.into_iter().collect(),
                    destroy_on_removal: svc.destroys_sockets(key.proto),
                }),
            );
        }
        plan.service_ids_next = service_ids.next;
        plan.backend_ids_next = backend_ids.next;
        check_capacity(map_names::SERVICES, services_after, cap.services)?;
        check_capacity(
            map_names::POLICY,
            self.policy.len() + new_policy,
            cap.policy,
        )?;
        // Old and new generations coexist until phase 3.
        check_capacity(map_names::SLOTS, self.live_slots + new_slots, cap.slots)?;
        Ok(plan)
    }

    /// The policy entries of one service id, as recorded.
    fn policy_of(&self, service_id: u32) -> Vec<(u32, u8)> {
        if self.policy.is_empty() {
            return Vec::new();
        }
        self.policy
            .iter()
            .filter(|(k, _)| k.service_id == service_id)
            .map(|(k, &v)| (k.identity, v))
            .collect()
    }
}

#[derive(Default)]
struct Plan {
    /// The new record of every touched key; `None`: removed.
    services: BTreeMap<ServiceKey, Option<ProgrammedService>>,
    /// Services whose slot table is written under a new generation.
    new_tables: BTreeSet<ServiceKey>,
    /// Backends of the touched services that were there, with their value.
    backend_values: Vec<(BackendId, BackendValue)>,
    /// Ids allocated by this plan (ascending, as allocated), and values.
    new_backends: Vec<BackendId>,
    new_service_ids: Vec<u32>,
    service_ids_next: u32,
    backend_ids_next: u32,
    identities: BTreeMap<String, u32>,
    workloads: BTreeMap<u64, u32>,
    /// Policy entries of the touched services: written, or removed (None).
    policy: BTreeMap<PolicyKey, Option<u8>>,
}

/// One kernel key per IP protocol the service answers on.
pub fn service_keys(svc: &Service) -> impl Iterator<Item = ServiceKey> + '_ {
    let (addr, family) = ip_to_words(svc.vip);
    svc.protocol
        .ip_protocols()
        .iter()
        .map(move |&proto| ServiceKey {
            addr,
            port: svc.port.to_be(),
            proto,
            family,
        })
}

/// Identity ids: kept for names seen before, fresh ones for new names.
fn identity_ids(workloads: &[Workload], previous: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let names: BTreeSet<&str> = workloads.iter().map(|w| w.identity.as_str()).collect();
    let pool = IdPool::from_used(previous.values().copied(), u32::MAX);
    let mut ids = pool.allocator();
    names
        .into_iter()
        .map(|name| {
            let id = previous
                .get(name)
                .copied()
                .or_else(|| ids.allocate())
                .expect("fewer identities than u32::MAX");
            (name.to_owned(), id)
        })
        .collect()
}

/// The backend id of every slot, as the service's algorithm lays them out.
fn selection_table(
    svc: &Service,
    ids: &[BackendId],
    previous: Option<&[BackendId]>,
    cap: &Capacity,
) -> Vec<BackendId> {
    match svc.algorithm {
        Algorithm::Maglev => {
            let backends: Vec<(SocketAddr, u32)> = svc
                .backends
                .iter()
                .map(|b| (b.socket_addr(), b.effective_weight()))
                .collect();
            let size = maglev::table_size(backends.len(), cap.maglev_table);
            maglev::build(&backends, size)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect()
        }
        Algorithm::Weighted | Algorithm::LeastConn => {
            let weights: Vec<u32> = svc.backends.iter().map(|b| b.effective_weight()).collect();
            let counts: Vec<(BackendId, u32)> = ids
                .iter()
                .copied()
                .zip(slots::slot_counts(&weights, cap.slots_per_service))
                .collect();
            slots::stable_layout(previous.unwrap_or_default(), &counts)
        }
    }
}

fn service_value(svc: &Service, service_id: u32, generation: u32, slot_count: u32) -> ServiceValue {
    let mut flags = 0;
    if svc.affinity_timeout_s.is_some() {
        flags |= SERVICE_AFFINITY;
    }
    if svc.policy.is_active() {
        flags |= SERVICE_POLICY;
    }
    if svc.policy.default_deny {
        flags |= SERVICE_DEFAULT_DENY;
    }
    ServiceValue {
        service_id,
        generation,
        slot_count,
        affinity_timeout_s: svc.affinity_timeout_s.unwrap_or(0),
        algorithm: match svc.algorithm {
            Algorithm::Weighted => ALGORITHM_WEIGHTED,
            Algorithm::Maglev => ALGORITHM_MAGLEV,
            Algorithm::LeastConn => ALGORITHM_LEAST_CONN,
        },
        flags,
        _pad: [0; 2],
    }
}

fn write_plan(
    plan: &Plan,
    holders: &BTreeMap<ServiceKey, &Service>,
    old: &Reconciler,
    maps: &mut Maps,
    undo: &mut Vec<Undo>,
) -> Result<(), ReconcileError> {
    use aya::maps::IterableMap as _;
    // Phase 1a: backends (new, or changed in place, e.g. draining). New ids
    // get zeroed counters first, then every new entry in one batch.
    if !plan.new_backends.is_empty() {
        let cpus = cpus()?;
        batch::zero_per_cpu::<BackendStats>(fd(maps.backend_stats.map()), &plan.new_backends, cpus)
            .map_err(batch_error(map_names::BACKEND_STATS, "reset"))?;
        batch::zero::<u64>(fd(maps.active.map()), &plan.new_backends)
            .map_err(batch_error(map_names::ACTIVE, "reset"))?;
        batch::zero::<mesh_common::BackendHealth>(
            fd(maps.backend_health.map()),
            &plan.new_backends,
        )
        .map_err(batch_error(map_names::BACKEND_HEALTH, "reset"))?;
    }
    for &(id, value) in &plan.backend_values {
        let previous = maps.backends.get(&id, 0).ok();
        if previous == Some(value) {
            continue;
        }
        maps.backends
            .insert(id, value, 0)
            .map_err(write_error(map_names::BACKENDS, "insert"))?;
        match previous {
            Some(p) => undo.push(Undo::Backend(id, p)),
            None => undo.push(Undo::NewBackends(vec![id])),
        }
    }
    // New backends' values, built and written in chunks (a large config
    // needs no list of them all).
    let mut ids = Vec::with_capacity(SLOT_CHUNK);
    let mut values = Vec::with_capacity(SLOT_CHUNK);
    let flush = |ids: &mut Vec<BackendId>,
                 values: &mut Vec<BackendValue>,
                 maps: &Maps,
                 undo: &mut Vec<Undo>| {
        // Undone whole even if the batch stops part way: deleting an
        // entry that was never written is skipped.
        undo.push(Undo::NewBackends(ids.clone()));
        let result = batch::update(fd(maps.backends.map()), ids, values);
        ids.clear();
        values.clear();
        result.map_err(batch_error(map_names::BACKENDS, "insert"))
    };
    for (key, programmed) in &plan.services {
        let (Some(programmed), Some(svc)) = (programmed, holders.get(key)) else {
            continue;
        };
        let before = old.services.get(key);
        for b in &svc.backends {
            let addr = (b.address, b.port);
            let Some(&id) = programmed.backends.get(&addr) else {
                continue;
            };
            if before.is_some_and(|o| o.backends.get(&addr) == Some(&id)) {
                continue;
            }
            ids.push(id);
            values.push(backend_value(b, programmed.id()));
            if ids.len() == SLOT_CHUNK {
                flush(&mut ids, &mut values, maps, undo)?;
            }
        }
    }
    if !ids.is_empty() {
        flush(&mut ids, &mut values, maps, undo)?;
    }
    drop((ids, values));
    // Phase 1b: policy before workloads, so a client never gets an identity
    // whose verdicts are not there yet.
    for (&key, &verdict) in &plan.policy {
        let Some(verdict) = verdict else { continue };
        if old.policy.get(&key) == Some(&verdict) {
            continue;
        }
        let previous = maps.policy.get(&key, 0).ok();
        let value = PolicyValue {
            verdict,
            _pad: [0; 3],
        };
        maps.policy
            .insert(key, value, 0)
            .map_err(write_error(map_names::POLICY, "insert"))?;
        undo.push(Undo::Policy(key, previous));
    }
    for (&cgroup, &identity) in &plan.workloads {
        if old.workloads.get(&cgroup) == Some(&identity) {
            continue;
        }
        let previous = maps.workloads.get(&cgroup, 0).ok();
        maps.workloads
            .insert(cgroup, identity, 0)
            .map_err(write_error(map_names::WORKLOADS, "insert"))?;
        undo.push(Undo::Workload(cgroup, previous));
    }
    // Phase 1c: slot tables under their new generation.
    if !plan.new_service_ids.is_empty() {
        batch::zero_per_cpu::<ServiceStats>(
            fd(maps.service_stats.map()),
            &plan.new_service_ids,
            cpus()?,
        )
        .map_err(batch_error(map_names::SERVICE_STATS, "reset"))?;
    }
    // In chunks, so a large configuration needs no list of every slot.
    let mut slot_keys = Vec::with_capacity(SLOT_CHUNK);
    let mut slot_values = Vec::with_capacity(SLOT_CHUNK);
    let flush = |keys: &mut Vec<SlotKey>, values: &mut Vec<BackendId>, maps: &Maps| {
        let result = batch::update(fd(maps.slots.map()), keys, values);
        keys.clear();
        values.clear();
        result.map_err(batch_error(map_names::SLOTS, "insert"))
    };
    for key in &plan.new_tables {
        let Some(svc) = &plan.services[key] else {
            continue;
        };
        undo.push(Undo::Table {
            service_id: svc.id(),
            generation: svc.value.generation,
            count: svc.slots.len() as u32,
        });
        for (slot, backend) in svc.slots.iter().enumerate() {
            slot_keys.push(SlotKey {
                service_id: svc.id(),
                generation: svc.value.generation,
                slot: slot as u32,
            });
            slot_values.push(*backend);
            if slot_keys.len() == SLOT_CHUNK {
                flush(&mut slot_keys, &mut slot_values, maps)?;
            }
        }
    }
    if !slot_keys.is_empty() {
        flush(&mut slot_keys, &mut slot_values, maps)?;
    }
    drop((slot_keys, slot_values));
    // Phase 2: flip each changed service entry. New services go in one
    // batch; each is a single-element update the kernel applies whole.
    let mut new_keys = Vec::new();
    let mut new_svc_values = Vec::new();
    for (key, svc) in &plan.services {
        let Some(svc) = svc else { continue };
        match old.services.get(key).map(|o| o.value) {
            Some(previous) if previous == svc.value => {}
            Some(previous) => {
                maps.services
                    .insert(key, svc.value, 0)
                    .map_err(write_error(map_names::SERVICES, "insert"))?;
                undo.push(Undo::Service(*key, previous));
            }
            None => {
                new_keys.push(*key);
                new_svc_values.push(svc.value);
            }
        }
    }
    if !new_keys.is_empty() {
        let result = batch::update(fd(maps.services.map()), &new_keys, &new_svc_values);
        let done = result.as_ref().err().map_or(new_keys.len(), |e| e.done);
        new_keys.truncate(done);
        undo.push(Undo::NewServices(new_keys));
        result.map_err(batch_error(map_names::SERVICES, "insert"))?;
    }
    Ok(())
}

/// Slots written per batch.
const SLOT_CHUNK: usize = 8192;

fn fd(map: &aya::maps::MapData) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd as _;
    map.fd().as_fd()
}

fn cpus() -> Result<usize, ReconcileError> {
    aya::util::nr_cpus().map_err(|(_, e)| ReconcileError::PerCpu(e))
}

/// Undoes writes in reverse order. Best effort: a failure here leaves an
/// entry nothing points at, which the next apply or restart removes.
fn rollback(undo: Vec<Undo>, maps: &mut Maps) {
    use aya::maps::IterableMap as _;
    for step in undo.into_iter().rev() {
        match step {
            Undo::Service(key, v) => {
                let _ = maps.services.insert(key, v, 0);
            }
            Undo::NewServices(keys) => {
                batch::delete_present(fd(maps.services.map()), &keys);
            }
            Undo::Table {
                service_id,
                generation,
                count,
            } => {
                let keys: Vec<SlotKey> = (0..count)
                    .map(|slot| SlotKey {
                        service_id,
                        generation,
                        slot,
                    })
                    .collect();
                batch::delete_present(fd(maps.slots.map()), &keys);
            }
            Undo::Backend(id, v) => {
                let _ = maps.backends.insert(id, v, 0);
            }
            Undo::NewBackends(ids) => {
                batch::delete_present(fd(maps.backends.map()), &ids);
            }
            Undo::Policy(key, Some(v)) => {
                let _ = maps.policy.insert(key, v, 0);
            }
            Undo::Policy(key, None) => {
                let _ = maps.policy.remove(&key);
            }
            Undo::Workload(cgroup, Some(id)) => {
                let _ = maps.workloads.insert(cgroup, id, 0);
            }
            Undo::Workload(cgroup, None) => {
                let _ = maps.workloads.remove(&cgroup);
            }
        }
    }
}

/// Phase 3: remove what the new state no longer references.
fn cleanup(old: &Reconciler, plan: &Plan, maps: &mut Maps) -> ApplyReport {
    use aya::maps::IterableMap as _;
    let mut report = ApplyReport {
        services_changed: plan
            .services
            .iter()
            .filter_map(|(k, s)| s.as_ref().map(|s| (k, s)))
            .filter(|(k, s)| old.services.get(k).map(|o| o.value) != Some(s.value))
            .count(),
        backends_added: plan.new_backends.len(),
        ..ApplyReport::default()
    };
    let mut removed_services = Vec::new();
    let mut stale_slots = Vec::new();
    let mut removed_backends = Vec::new();
    for (key, current) in &plan.services {
        let Some(svc) = old.services.get(key) else {
            continue;
        };
        let current = current.as_ref();
        if current.is_none() {
            removed_services.push(*key);
            report.services_removed += 1;
        }
        if current.is_none_or(|c| c.value.generation != svc.value.generation) {
            stale_slots.extend((0..svc.slots.len() as u32).map(|slot| SlotKey {
                service_id: svc.id(),
                generation: svc.value.generation,
                slot,
            }));
        }
        for (&(ip, port), id) in svc.backends.iter() {
            if current.is_some_and(|c| c.backends.get(&(ip, port)) == Some(id)) {
                continue;
            }
            removed_backends.push(*id);
            // The service's current setting wins over the one it had.
            let destroy_sockets = current.map_or(svc.destroy_on_removal, |c| c.destroy_on_removal);
            report.removed_backends.push(RemovedBackend {
                addr: SocketAddr::new(ip, port),
                proto: key.proto,
                destroy_sockets,
            });
        }
    }
    let mut failures = 0;
    failures += batch::delete_present(fd(maps.services.map()), &removed_services);
    failures += batch::delete_present(fd(maps.slots.map()), &stale_slots);
    failures += batch::delete_present(fd(maps.backends.map()), &removed_backends);
    for (key, verdict) in &plan.policy {
        if verdict.is_none() && maps.policy.remove(key).is_err() {
            failures += 1;
        }
    }
    for cgroup in old.workloads.keys() {
        if !plan.workloads.contains_key(cgroup) && maps.workloads.remove(cgroup).is_err() {
            failures += 1;
        }
    }
    report.cleanup_failures = failures;
    report
}

fn write_error(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> ReconcileError {
    move |source| ReconcileError::MapWrite { map, op, source }
}

fn batch_error(
    map: &'static str,
    op: &'static str,
) -> impl FnOnce(batch::BatchError) -> ReconcileError {
    move |e| ReconcileError::MapWrite {
        map,
        op,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_batch",
            io_error: e.source,
        }),
    }
}

fn full(map: &'static str, capacity: u32) -> ReconcileError {
    ReconcileError::MapFull {
        map,
        needed: capacity as usize + 1,
        capacity,
    }
}

fn check_capacity(map: &'static str, needed: usize, capacity: u32) -> Result<(), ReconcileError> {
    if needed > capacity as usize {
        return Err(ReconcileError::MapFull {
            map,
            needed,
            capacity,
        });
    }
    Ok(())
}

/// Ids in use, handed out smallest free first from 1 up (0 means "none" to
/// the kernel), below `limit` because ids index per-CPU arrays of that size.
/// Every id below `next` is in use unless it is in `free`.
#[derive(Clone, Debug)]
struct IdPool {
    free: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl IdPool {
    fn from_used(used: impl IntoIterator<Item = u32>, limit: u32) -> Self {
        let used: BTreeSet<u32> = used.into_iter().filter(|&id| id > 0).collect();
        let next = used.last().map_or(1, |&max| max + 1);
        Self {
            free: (1..next).filter(|id| !used.contains(id)).collect(),
            next,
            limit,
        }
    }

    /// Hands out ids for one plan without changing the pool; `commit`
    /// takes them for good.
    fn allocator(&self) -> IdAllocator<'_> {
        IdAllocator {
            free: self.free.iter(),
            next: self.next,
            limit: self.limit,
        }
    }

    fn commit(&mut self, next: u32, taken: &[u32]) {
        for id in taken {
            self.free.remove(id);
        }
        self.next = self.next.max(next);
    }

    fn release(&mut self, id: u32) {
        if id > 0 && id < self.next {
            self.free.insert(id);
        }
    }
}

struct IdAllocator<'a> {
    free: std::collections::btree_set::Iter<'a, u32>,
    next: u32,
    limit: u32,
}

impl IdAllocator<'_> {
    fn allocate(&mut self) -> Option<u32> {
        if let Some(&id) = self.free.next() {
            return Some(id);
        }
        if self.next < self.limit {
            self.next += 1;
            return Some(self.next - 1);
        }
        None
    }
}

fn backend_value(b: &crate::state::Backend, service_id: u32) -> BackendValue {
    let (addr, family) = ip_to_words(b.address);
    BackendValue {
        addr,
        port: b.port.to_be(),
        family,
        state: match b.state {
            BackendState::Active => BACKEND_ACTIVE,
            // Unhealthy backends, like draining ones, take no new connections.
            BackendState::Draining | BackendState::Unhealthy | BackendState::Standby => {
                BACKEND_DRAINING
            }
        },
        service_id,
        flags: if b.tunnel {
            mesh_common::BACKEND_FLAG_TUNNEL
        } else {
            0
        },
        _pad: [0; 3],
    }
}

/// Addresses as the kernel sees them: network byte order words.
pub fn ip_to_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    }
}

pub fn ip_from_words(family: u8, words: [u32; 4]) -> IpAddr {
    if family == FAMILY_V6 {
        let mut octets = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(octets)
    } else {
        IpAddr::from(words[0].to_ne_bytes())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn backend_ids_look_up_by_address_and_keep_the_last_id_given() {
        let a = |last: u8, port| (std::net::IpAddr::from([10, 0, 0, last]), port);
        let ids: BackendIds = [(a(3, 80), 7), (a(1, 80), 5), (a(3, 80), 9), (a(1, 81), 6)]
            .into_iter()
            .collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids.get(&a(3, 80)), Some(&9));
        assert_eq!(ids.get(&a(1, 81)), Some(&6));
        assert_eq!(ids.get(&a(2, 80)), None);
        assert_eq!(ids.values().copied().collect::<Vec<_>>(), [5, 6, 9]);
    }

    use super::*;

    #[test]
    fn addresses_round_trip_through_kernel_words() {
        for ip in ["127.10.0.1", "10.96.0.10", "::1", "fd00::1:2"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (words, family) = ip_to_words(ip);
            assert_eq!(ip_from_words(family, words), ip);
        }
        // Network byte order: the first octet is the lowest byte in memory.
        let (words, _) = ip_to_words("127.0.0.1".parse().unwrap());
        assert_eq!(words[0].to_ne_bytes(), [127, 0, 0, 1]);
    }

    #[test]
    fn ids_start_at_one_and_skip_used_ones() {
        let pool = IdPool::from_used([1, 3], 5);
        let mut ids = pool.allocator();
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), Some(4));
        assert_eq!(ids.allocate(), None);
    }

    #[test]
    fn released_ids_are_reused_smallest_first_after_commit() {
        let mut pool = IdPool::from_used([], 100);
        let mut ids = pool.allocator();
        let taken: Vec<u32> = (0..5).map(|_| ids.allocate().unwrap()).collect();
        let next = ids.next;
        assert_eq!(taken, [1, 2, 3, 4, 5]);
        // Nothing is taken until the plan commits.
        assert_eq!(pool.allocator().allocate(), Some(1));
        pool.commit(next, &taken);
        pool.release(4);
        pool.release(2);
        let mut ids = pool.allocator();
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), Some(4));
        assert_eq!(ids.allocate(), Some(6));
    }
}
