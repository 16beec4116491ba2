//! Turns the desired model into map writes, all or nothing.
//!
//! An update happens in three phases, so the kernel never sees a half-written
//! state:
//! 1. write new backends and each changed service's slot table under a new
//!    generation (nothing reads them yet);
//! 2. flip every service entry to its new generation, one map update each;
//! 3. delete what nothing points at any more (old generations, removed
//!    services and backends).
//!
//! A failure in phase 1 or 2 undoes every write made so far and leaves the
//! previous state serving. Capacity is checked before anything is written, so
//! a full map is reported with what to change instead of failing half way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use aya::maps::{MapError, PerCpuValues};
use mesh_common::{
    ALGORITHM_WEIGHTED, BACKEND_ACTIVE, BackendId, BackendStats, BackendValue, FAMILY_V4,
    FAMILY_V6, PROTO_TCP, ServiceKey, ServiceStats, ServiceValue, SlotKey, limits, map_names,
};

use crate::bpf::Maps;
use crate::slots::weighted_table;
use crate::state::{DesiredState, Protocol, Service};

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
}

impl Capacity {
    /// The capacity of the maps as the kernel created them.
    pub fn of(maps: &Maps) -> Self {
        use aya::maps::IterableMap as _;
        let max = |data: &aya::maps::MapData| data.info().map_or(0, |i| i.max_entries());
        Self {
            // Ids index the stats arrays, so the smaller of each pair counts.
            services: max(maps.services.map()).min(maps.service_stats.len()),
            backends: max(maps.backends.map()).min(maps.backend_stats.len()),
            slots: max(maps.slots.map()),
            slots_per_service: limits::MAX_SLOTS_PER_SERVICE,
        }
    }
}

/// What to change when a map is too small.
fn raise_hint(map: &str) -> &'static str {
    match map {
        m if m == map_names::SERVICES => "raise --max-services or remove services",
        m if m == map_names::BACKENDS => "raise --max-backends or remove backends",
        _ => {
            "raise --max-slots or lower the weights (a service takes sum(weights)/gcd slots, up to 16384, twice while it is updated)"
        }
    }
}

/// A backend's identity within its service.
type BackendAddr = (IpAddr, u16);

/// What the kernel holds for one service.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgrammedService {
    pub name: String,
    pub id: u32,
    pub generation: u32,
    /// Backend id of every slot, in slot order.
    pub slots: Vec<BackendId>,
    pub backends: BTreeMap<BackendAddr, BackendId>,
}

/// The agent's record of what it wrote, kept in step with the maps.
#[derive(Clone, Debug)]
pub struct Reconciler {
    capacity: Capacity,
    services: BTreeMap<ServiceKey, ProgrammedService>,
}

/// Counts of what one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub services_changed: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Stale entries that could not be deleted; harmless, retried next time.
    pub cleanup_failures: usize,
}

/// A write that can be undone.
enum Undo {
    Backend(BackendId, Option<BackendValue>),
    Slot(SlotKey),
    Service(ServiceKey, Option<ServiceValue>),
}

impl Reconciler {
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            services: BTreeMap::new(),
        }
    }

    /// Rebuilds the record from maps an earlier agent left pinned, and drops
    /// whatever that agent left half done (old generations, orphans).
    pub fn recover(capacity: Capacity, maps: &mut Maps) -> Self {
        let mut services = BTreeMap::new();
        let live: Vec<(ServiceKey, ServiceValue)> =
            maps.services.iter().filter_map(Result::ok).collect();
        let mut slots_by_service: BTreeMap<(u32, u32), BTreeMap<u32, BackendId>> = BTreeMap::new();
        let mut stale_slots = Vec::new();
        let generations: BTreeMap<u32, u32> = live
            .iter()
            .map(|(_, v)| (v.service_id, v.generation))
            .collect();
        for (key, backend) in maps.slots.iter().filter_map(Result::ok) {
            if generations.get(&key.service_id) == Some(&key.generation) {
                slots_by_service
                    .entry((key.service_id, key.generation))
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
                backends_by_service
                    .entry(value.service_id)
                    .or_default()
                    .insert(
                        (
                            ip_from_words(value.family, value.addr),
                            u16::from_be(value.port),
                        ),
                        id,
                    );
            } else {
                orphans.push(id);
            }
        }
        for (key, value) in live {
            let slots = slots_by_service
                .remove(&(value.service_id, value.generation))
                .unwrap_or_default()
                .into_values()
                .collect();
            services.insert(
                key,
                ProgrammedService {
                    name: String::new(),
                    id: value.service_id,
                    generation: value.generation,
                    slots,
                    backends: backends_by_service
                        .remove(&value.service_id)
                        .unwrap_or_default(),
                },
            );
        }
        for key in stale_slots {
            let _ = maps.slots.remove(&key);
        }
        for id in orphans {
            let _ = maps.backends.remove(&id);
        }
        Self { capacity, services }
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &ProgrammedService)> {
        self.services.iter()
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&ProgrammedService> {
        self.services.get(key)
    }

    /// Makes the maps hold `desired`, or leaves them as they were.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        maps: &mut Maps,
    ) -> Result<ApplyReport, ReconcileError> {
        let plan = self.plan(desired)?;
        let mut undo = Vec::new();
        if let Err(e) = write_plan(&plan, &self.services, maps, &mut undo) {
            rollback(undo, maps);
            return Err(e);
        }
        let report = cleanup(&self.services, &plan.services, maps, plan.report);
        self.services = plan.services;
        Ok(report)
    }

    fn plan(&self, desired: &DesiredState) -> Result<Plan, ReconcileError> {
        let mut ids =
            IdAllocator::new(self.services.values().map(|s| s.id), self.capacity.services);
        let mut backend_ids = IdAllocator::new(
            self.services
                .values()
                .flat_map(|s| s.backends.values().copied()),
            self.capacity.backends,
        );
        let mut plan = Plan::default();
        check_capacity(
            map_names::SERVICES,
            desired.services.len(),
            self.capacity.services,
        )?;
        for svc in &desired.services {
            let key = service_key(svc);
            let old = self.services.get(&key);
            let id = match old {
                Some(old) => old.id,
                None => ids
                    .allocate()
                    .ok_or(full(map_names::SERVICES, self.capacity.services))?,
            };
            let mut backends = BTreeMap::new();
            let mut slot_backends = Vec::with_capacity(svc.backends.len());
            for b in &svc.backends {
                let addr = (b.address, b.port);
                let backend_id = match old.and_then(|o| o.backends.get(&addr)) {
                    Some(&existing) => existing,
                    None => {
                        let new_id = backend_ids
                            .allocate()
                            .ok_or(full(map_names::BACKENDS, self.capacity.backends))?;
                        plan.new_backends.push(new_id);
                        new_id
                    }
                };
                backends.insert(addr, backend_id);
                plan.backend_values.insert(backend_id, backend_value(b, id));
                slot_backends.push(backend_id);
            }
            let weights: Vec<u32> = svc.backends.iter().map(|b| b.weight).collect();
            let slots: Vec<BackendId> = weighted_table(&weights, self.capacity.slots_per_service)
                .into_iter()
                .map(|i| slot_backends[i as usize])
                .collect();
            let generation = match old {
                Some(old) if old.slots == slots => old.generation,
                Some(old) => {
                    plan.changed.insert(key);
                    old.generation.wrapping_add(1)
                }
                None => {
                    plan.changed.insert(key);
                    1
                }
            };
            plan.services.insert(
                key,
                ProgrammedService {
                    name: svc.name.clone(),
                    id,
                    generation,
                    slots,
                    backends,
                },
            );
        }
        // Old and new generations coexist until phase 3.
        let live_slots: usize = self.services.values().map(|s| s.slots.len()).sum();
        let new_slots: usize = plan
            .changed
            .iter()
            .map(|k| plan.services[k].slots.len())
            .sum();
        check_capacity(
            map_names::SLOTS,
            live_slots + new_slots,
            self.capacity.slots,
        )?;
        plan.report.services_changed = plan.changed.len();
        plan.report.backends_added = plan.new_backends.len();
        Ok(plan)
    }
}

#[derive(Default)]
struct Plan {
    services: BTreeMap<ServiceKey, ProgrammedService>,
    /// Services whose slot table is written under a new generation.
    changed: BTreeSet<ServiceKey>,
    backend_values: BTreeMap<BackendId, BackendValue>,
    new_backends: Vec<BackendId>,
    report: ApplyReport,
}

fn write_plan(
    plan: &Plan,
    old: &BTreeMap<ServiceKey, ProgrammedService>,
    maps: &mut Maps,
    undo: &mut Vec<Undo>,
) -> Result<(), ReconcileError> {
    // Phase 1a: backends (new, or changed in place).
    for (&id, value) in &plan.backend_values {
        let previous = maps.backends.get(&id, 0).ok();
        if previous == Some(*value) {
            continue;
        }
        if previous.is_none() {
            reset_backend_stats(maps, id)?;
        }
        maps.backends
            .insert(id, value, 0)
            .map_err(write_error(map_names::BACKENDS, "insert"))?;
        undo.push(Undo::Backend(id, previous));
    }
    // Phase 1b: slot tables under their new generation.
    for key in &plan.changed {
        let svc = &plan.services[key];
        if !old.contains_key(key) {
            reset_service_stats(maps, svc.id)?;
        }
        for (slot, backend) in svc.slots.iter().enumerate() {
            let slot_key = SlotKey {
                service_id: svc.id,
                generation: svc.generation,
                slot: slot as u32,
            };
            maps.slots
                .insert(slot_key, backend, 0)
                .map_err(write_error(map_names::SLOTS, "insert"))?;
            undo.push(Undo::Slot(slot_key));
        }
    }
    // Phase 2: flip each changed service to its new table.
    for key in &plan.changed {
        let svc = &plan.services[key];
        let value = ServiceValue {
            service_id: svc.id,
            generation: svc.generation,
            slot_count: svc.slots.len() as u32,
            algorithm: ALGORITHM_WEIGHTED,
            flags: 0,
            _pad: [0; 2],
        };
        let previous = maps.services.get(key, 0).ok();
        maps.services
            .insert(key, value, 0)
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
        };
    }
}

/// Phase 3: remove what the new state no longer references.
fn cleanup(
    old: &BTreeMap<ServiceKey, ProgrammedService>,
    new: &BTreeMap<ServiceKey, ProgrammedService>,
    maps: &mut Maps,
    mut report: ApplyReport,
) -> ApplyReport {
    let mut failures = 0;
    let mut count = |r: Result<(), MapError>| {
        if r.is_err() {
            failures += 1;
        }
    };
    let live_backends: BTreeSet<BackendId> = new
        .values()
        .flat_map(|s| s.backends.values().copied())
        .collect();
    for (key, svc) in old {
        let current = new.get(key);
        if current.is_none() {
            count(maps.services.remove(key));
            report.services_removed += 1;
        }
        if current.is_none_or(|c| c.generation != svc.generation) {
            for slot in 0..svc.slots.len() as u32 {
                count(maps.slots.remove(&SlotKey {
                    service_id: svc.id,
                    generation: svc.generation,
                    slot,
                }));
            }
        }
        for id in svc.backends.values() {
            if !live_backends.contains(id) {
                count(maps.backends.remove(id));
                report.backends_removed += 1;
            }
        }
    }
    report.cleanup_failures = failures;
    report
}

/// Counters of a reused id must start from zero.
fn reset_backend_stats(maps: &mut Maps, id: BackendId) -> Result<(), ReconcileError> {
    let zeros = per_cpu_zeros::<BackendStats>()?;
    maps.backend_stats
        .set(id, zeros, 0)
        .map_err(write_error(map_names::BACKEND_STATS, "reset"))
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

pub fn service_key(svc: &Service) -> ServiceKey {
    let (addr, family) = ip_to_words(svc.vip);
    ServiceKey {
        addr,
        port: svc.port.to_be(),
        proto: match svc.protocol {
            Protocol::Tcp => PROTO_TCP,
        },
        family,
    }
}

fn backend_value(b: &crate::state::Backend, service_id: u32) -> BackendValue {
    let (addr, family) = ip_to_words(b.address);
    BackendValue {
        addr,
        port: b.port.to_be(),
        family,
        state: BACKEND_ACTIVE,
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
