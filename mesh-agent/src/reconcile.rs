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

use aya::maps::{MapError, PerCpuValues};
use mesh_common::{
    ALGORITHM_LEAST_CONN, ALGORITHM_MAGLEV, ALGORITHM_WEIGHTED, BACKEND_ACTIVE, BACKEND_DRAINING,
    BackendId, BackendStats, BackendValue, FAMILY_V4, FAMILY_V6, PolicyKey, PolicyValue,
    SERVICE_AFFINITY, SERVICE_DEFAULT_DENY, SERVICE_POLICY, ServiceKey, ServiceStats, ServiceValue,
    SlotKey, VERDICT_ALLOW, VERDICT_DENY, limits, map_names,
};

use crate::bpf::Maps;
use crate::state::{Algorithm, BackendState, DesiredState, Service};
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
    pub backends: BTreeMap<BackendAddr, BackendId>,
    /// Destroy sockets to a backend when it is removed.
    pub destroy_on_removal: bool,
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedBackend {
    pub addr: SocketAddr,
    /// IP protocol of the sockets that were balanced to it.
    pub proto: u8,
    pub destroy_sockets: bool,
}

/// A write that can be undone.
enum Undo {
    Backend(BackendId, Option<BackendValue>),
    Slot(SlotKey),
    Service(ServiceKey, Option<ServiceValue>),
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
        let mut backends_by_service: BTreeMap<u32, BTreeMap<BackendAddr, BackendId>> =
            BTreeMap::new();
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
                    .insert(addr, id);
            } else {
                orphans.push(id);
            }
        }
        let services = live
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
                        .unwrap_or_default(),
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
        Self {
            capacity,
            services,
            identities: BTreeMap::new(),
            workloads,
            policy,
        }
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &ProgrammedService)> {
        self.services.iter()
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&ProgrammedService> {
        self.services.get(key)
    }

    /// Entries and capacity of the maps this record covers.
    pub fn fill(&self) -> Vec<(&'static str, u64, u64)> {
        let backends: usize = self.services.values().map(|s| s.backends.len()).sum();
        let slots: usize = self.services.values().map(|s| s.slots.len()).sum();
        let c = &self.capacity;
        vec![
            (
                map_names::SERVICES,
                self.services.len() as u64,
                c.services.into(),
            ),
            (map_names::BACKENDS, backends as u64, c.backends.into()),
            (map_names::SLOTS, slots as u64, c.slots.into()),
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

    /// Makes the maps hold `desired`, or leaves them as they were.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        maps: &mut Maps,
    ) -> Result<ApplyReport, ReconcileError> {
        let plan = self.plan(desired)?;
        let mut undo = Vec::new();
        if let Err(e) = write_plan(&plan, self, maps, &mut undo) {
            rollback(undo, maps);
            return Err(e);
        }
        let report = cleanup(self, &plan, maps);
        self.services = plan.services;
        self.identities = plan.identities;
        self.workloads = plan.workloads;
        self.policy = plan.policy;
        Ok(report)
    }

    fn plan(&self, desired: &DesiredState) -> Result<Plan, ReconcileError> {
        let cap = self.capacity;
        let mut service_ids =
            IdAllocator::new(self.services.values().map(|s| s.id()), cap.services);
        let mut backend_ids = IdAllocator::new(
            self.services
                .values()
                .flat_map(|s| s.backends.values().copied()),
            cap.backends,
        );
        let mut plan = Plan {
            identities: identity_ids(desired, &self.identities),
            ..Plan::default()
        };
        for w in &desired.workloads {
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

        for svc in &desired.services {
            for key in service_keys(svc) {
                let old = self.services.get(&key);
                let service_id = match old {
                    Some(old) => old.id(),
                    None => service_ids
                        .allocate()
                        .ok_or_else(|| full(map_names::SERVICES, cap.services))?,
                };
                let mut backends = BTreeMap::new();
                let mut ids = Vec::with_capacity(svc.backends.len());
                for b in &svc.backends {
                    let addr = (b.address, b.port);
                    let id = match old.and_then(|o| o.backends.get(&addr)) {
                        Some(&existing) => existing,
                        None => {
                            let id = backend_ids
                                .allocate()
                                .ok_or_else(|| full(map_names::BACKENDS, cap.backends))?;
                            plan.new_backends.push(id);
                            id
                        }
                    };
                    backends.insert(addr, id);
                    ids.push(id);
                    plan.backend_values.insert(id, backend_value(b, service_id));
                }
                let slots = selection_table(svc, &ids, old.map(|o| o.slots.as_slice()), &cap);
                let generation = match old {
                    Some(old) if old.slots == slots => old.value.generation,
                    Some(old) => {
                        plan.new_tables.insert(key);
                        old.value.generation.wrapping_add(1)
                    }
                    None => {
                        plan.new_tables.insert(key);
                        1
                    }
                };
                for name in &svc.policy.allow {
                    plan.policy.insert(
                        PolicyKey {
                            identity: plan.identities[name],
                            service_id,
                        },
                        VERDICT_ALLOW,
                    );
                }
                for name in &svc.policy.deny {
                    plan.policy.insert(
                        PolicyKey {
                            identity: plan.identities[name],
                            service_id,
                        },
                        VERDICT_DENY,
                    );
                }
                let value = service_value(svc, service_id, generation, slots.len() as u32);
                plan.services.insert(
                    key,
                    ProgrammedService {
                        name: svc.name.clone(),
                        value,
                        slots,
                        backends,
                        destroy_on_removal: svc.destroys_sockets(key.proto),
                    },
                );
            }
        }
        check_capacity(map_names::SERVICES, plan.services.len(), cap.services)?;
        check_capacity(
            map_names::POLICY,
            plan.policy.len() + self.policy.len(),
            cap.policy,
        )?;
        // Old and new generations coexist until phase 3.
        let live_slots: usize = self.services.values().map(|s| s.slots.len()).sum();
        let new_slots: usize = plan
            .new_tables
            .iter()
            .map(|k| plan.services[k].slots.len())
            .sum();
        check_capacity(map_names::SLOTS, live_slots + new_slots, cap.slots)?;
        Ok(plan)
    }
}

#[derive(Default)]
struct Plan {
    services: BTreeMap<ServiceKey, ProgrammedService>,
    /// Services whose slot table is written under a new generation.
    new_tables: BTreeSet<ServiceKey>,
    backend_values: BTreeMap<BackendId, BackendValue>,
    new_backends: Vec<BackendId>,
    identities: BTreeMap<String, u32>,
    workloads: BTreeMap<u64, u32>,
    policy: BTreeMap<PolicyKey, u8>,
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
fn identity_ids(desired: &DesiredState, previous: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let names: BTreeSet<&str> = desired
        .workloads
        .iter()
        .map(|w| w.identity.as_str())
        .collect();
    let mut ids = IdAllocator::new(previous.values().copied(), u32::MAX);
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
    old: &Reconciler,
    maps: &mut Maps,
    undo: &mut Vec<Undo>,
) -> Result<(), ReconcileError> {
    // Phase 1a: backends (new, or changed in place, e.g. draining).
    for (&id, value) in &plan.backend_values {
        let previous = maps.backends.get(&id, 0).ok();
        if previous == Some(*value) {
            continue;
        }
        if previous.is_none() {
            reset_backend_counters(maps, id)?;
        }
        maps.backends
            .insert(id, value, 0)
            .map_err(write_error(map_names::BACKENDS, "insert"))?;
        undo.push(Undo::Backend(id, previous));
    }
    // Phase 1b: policy before workloads, so a client never gets an identity
    // whose verdicts are not there yet.
    for (&key, &verdict) in &plan.policy {
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
    for key in &plan.new_tables {
        let svc = &plan.services[key];
        if !old.services.contains_key(key) {
            reset_service_stats(maps, svc.id())?;
        }
        for (slot, backend) in svc.slots.iter().enumerate() {
            let slot_key = SlotKey {
                service_id: svc.id(),
                generation: svc.value.generation,
                slot: slot as u32,
            };
            maps.slots
                .insert(slot_key, backend, 0)
                .map_err(write_error(map_names::SLOTS, "insert"))?;
            undo.push(Undo::Slot(slot_key));
        }
    }
    // Phase 2: flip each changed service entry.
    for (key, svc) in &plan.services {
        let previous = old.services.get(key).map(|o| o.value);
        if previous == Some(svc.value) {
            continue;
        }
        maps.services
            .insert(key, svc.value, 0)
            .map_err(write_error(map_names::SERVICES, "insert"))?;
        undo.push(Undo::Service(*key, previous));
    }
    Ok(())
}

/// Undoes writes in reverse order. Best effort: a failure here leaves an
/// entry nothing points at, which the next apply or restart removes.
fn rollback(undo: Vec<Undo>, maps: &mut Maps) {
    for step in undo.into_iter().rev() {
        let _ = match step {
            Undo::Service(key, Some(v)) => maps.services.insert(key, v, 0),
            Undo::Service(key, None) => maps.services.remove(&key),
            Undo::Slot(key) => maps.slots.remove(&key),
            Undo::Backend(id, Some(v)) => maps.backends.insert(id, v, 0),
            Undo::Backend(id, None) => maps.backends.remove(&id),
            Undo::Policy(key, Some(v)) => maps.policy.insert(key, v, 0),
            Undo::Policy(key, None) => maps.policy.remove(&key),
            Undo::Workload(cgroup, Some(id)) => maps.workloads.insert(cgroup, id, 0),
            Undo::Workload(cgroup, None) => maps.workloads.remove(&cgroup),
        };
    }
}

/// Phase 3: remove what the new state no longer references.
fn cleanup(old: &Reconciler, plan: &Plan, maps: &mut Maps) -> ApplyReport {
    let mut report = ApplyReport {
        services_changed: plan
            .services
            .iter()
            .filter(|(k, s)| old.services.get(k).map(|o| o.value) != Some(s.value))
            .count(),
        backends_added: plan.new_backends.len(),
        ..ApplyReport::default()
    };
    let mut failures = 0;
    let mut count = |r: Result<(), MapError>| {
        if r.is_err() {
            failures += 1;
        }
    };
    for (key, svc) in &old.services {
        let current = plan.services.get(key);
        if current.is_none() {
            count(maps.services.remove(key));
            report.services_removed += 1;
        }
        if current.is_none_or(|c| c.value.generation != svc.value.generation) {
            for slot in 0..svc.slots.len() as u32 {
                count(maps.slots.remove(&SlotKey {
                    service_id: svc.id(),
                    generation: svc.value.generation,
                    slot,
                }));
            }
        }
        for (&(ip, port), id) in &svc.backends {
            if !plan.backend_values.contains_key(id) {
                count(maps.backends.remove(id));
                // The service's current setting wins over the one it had.
                let destroy_sockets =
                    current.map_or(svc.destroy_on_removal, |c| c.destroy_on_removal);
                report.removed_backends.push(RemovedBackend {
                    addr: SocketAddr::new(ip, port),
                    proto: key.proto,
                    destroy_sockets,
                });
            }
        }
    }
    for key in old.policy.keys() {
        if !plan.policy.contains_key(key) {
            count(maps.policy.remove(key));
        }
    }
    for cgroup in old.workloads.keys() {
        if !plan.workloads.contains_key(cgroup) {
            count(maps.workloads.remove(cgroup));
        }
    }
    report.cleanup_failures = failures;
    report
}

/// Counters of a reused id must start from zero.
fn reset_backend_counters(maps: &mut Maps, id: BackendId) -> Result<(), ReconcileError> {
    let zeros = per_cpu_zeros::<BackendStats>()?;
    maps.backend_stats
        .set(id, zeros, 0)
        .map_err(write_error(map_names::BACKEND_STATS, "reset"))?;
    maps.active
        .set(id, 0, 0)
        .map_err(write_error(map_names::ACTIVE, "reset"))?;
    maps.backend_health
        .set(id, mesh_common::BackendHealth::default(), 0)
        .map_err(write_error(map_names::BACKEND_HEALTH, "reset"))
}

fn reset_service_stats(maps: &mut Maps, id: u32) -> Result<(), ReconcileError> {
    let zeros = per_cpu_zeros::<ServiceStats>()?;
    maps.service_stats
        .set(id, zeros, 0)
        .map_err(write_error(map_names::SERVICE_STATS, "reset"))
}

fn per_cpu_zeros<T: aya::Pod + Default + Clone>() -> Result<PerCpuValues<T>, ReconcileError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| ReconcileError::PerCpu(e))?;
    PerCpuValues::try_from(vec![T::default(); cpus]).map_err(ReconcileError::PerCpu)
}

fn write_error(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> ReconcileError {
    move |source| ReconcileError::MapWrite { map, op, source }
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

/// Smallest free ids from 1 up (0 means "none" to the kernel), below `limit`
/// because ids index per-CPU arrays of that size.
struct IdAllocator {
    used: BTreeSet<u32>,
    limit: u32,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>, limit: u32) -> Self {
        Self {
            used: used.into_iter().collect(),
            limit,
            next: 1,
        }
    }

    fn allocate(&mut self) -> Option<u32> {
        while self.next < self.limit {
            let candidate = self.next;
            self.next += 1;
            if self.used.insert(candidate) {
                return Some(candidate);
            }
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
            BackendState::Draining | BackendState::Unhealthy => BACKEND_DRAINING,
        },
        service_id,
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
        let mut ids = IdAllocator::new([1, 3], 5);
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), Some(4));
        assert_eq!(ids.allocate(), None);
    }
}
