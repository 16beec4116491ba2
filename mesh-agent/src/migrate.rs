//! Carries socket-level state from another schema version's pinned maps into
//! this agent's fresh maps during an upgrade (or downgrade), so sockets
//! opened under the old programs keep their reverse translation, their
//! live-connection count, their UDP backend and their clients' affinity.
//!
//! Ids are the reconciler's and differ between agents, so every id-bearing
//! entry is translated through the service key (service) and service key +
//! address + port + family (backend); entries whose service or backend is
//! gone are dropped. A map is decoded only when the kernel's key and value
//! sizes match this build's types; otherwise it is skipped with a warning.
//! Nothing here can fail the upgrade: problems are logged and the agent
//! comes up with whatever was carried.
//!
//! Order (see `upgrade_from`): copy while both datapaths are attached (a
//! close then runs the old and the new sock_ops program, so it is seen on
//! both sides), detach the old programs, copy again what the old programs
//! recorded in between (insert-if-absent), then remove the old pins.
//! `MESH_ACTIVE` is never copied: it is derived from the carried
//! `MESH_CONNS` entries that are counted, so a socket is counted at most once.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{Array, HashMap, IterableMap, Map, MapData, MapError},
};
use mesh_common::{
    AffinityKey, AffinityValue, BackendHealth, BackendId, BackendValue, ConnValue, RevNatKey,
    RevNatValue, ServiceKey, ServiceValue, SockLbKey, SockLbValue, map_names,
};
use tracing::{info, warn};

use crate::bpf::batch::{
    BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_MAP_UPDATE_ELEM, ElemAttr, bpf,
};

/// `BPF_NOEXIST`: insert only if the key is absent.
const NOEXIST: u64 = 1;
/// Rounds of "derive the counts, write, read again" (see `derive_active`).
const ACTIVE_ROUNDS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot open pinned map {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "{map}: key/value sizes {key_size}/{value_size} bytes, this build expects \
         {want_key}/{want_value} (a layout this agent cannot decode)"
    )]
    Layout {
        map: &'static str,
        key_size: u32,
        value_size: u32,
        want_key: u32,
        want_value: u32,
        /// Entries left behind, for the log.
        entries: u64,
    },
    #[error("{map} has an unexpected map type: {source}")]
    Kind {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading {map} failed: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

impl MigrateError {
    /// Entries of the old map that this error leaves behind, when known.
    fn entries(&self) -> u64 {
        match self {
            Self::Layout { entries, .. } => *entries,
            _ => 0,
        }
    }
}

/// What happened to one map's entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Written into the new map.
    pub carried: u64,
    /// Their service or backend no longer exists (or their socket closed
    /// while being copied).
    pub dropped: u64,
    /// Not decoded: layout mismatch or unreadable map.
    pub skipped: u64,
    /// Writes the kernel refused.
    pub failed: u64,
}

/// What an upgrade carried, per map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub rev_nat: Tally,
    pub sock_lb: Tally,
    pub conns: Tally,
    pub affinity: Tally,
    pub backend_health: Tally,
    /// Live TCP connections now counted in the new `MESH_ACTIVE`.
    pub live_connections: u64,
}

impl Report {
    /// Entries written into the new maps, all maps together.
    pub fn carried(&self) -> u64 {
        self.total(|t| t.carried)
    }

    fn total(&self, field: impl Fn(&Tally) -> u64) -> u64 {
        [
            self.rev_nat,
            self.sock_lb,
            self.conns,
            self.affinity,
            self.backend_health,
        ]
        .iter()
        .map(field)
        .sum()
    }
}

/// Migrates from the pins of another schema version (`old`, a `v<N>`
/// directory) into `new_maps`, then removes `old` (detaching its programs).
/// `cgroup`: the one the programs are attached to (its sockets).
/// Never fails: what could not be carried is logged.
pub fn upgrade_from(old: &Path, new_maps: &Path, cgroup: &Path) -> Report {
    let mut migration = Migration::open(&old.join("maps"), new_maps);
    migration.copy_while_both_attached();
    // The old programs detach when their link pins go (their agent is gone,
    // so nothing else holds the links).
    match std::fs::remove_dir_all(old.join("links")) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(pins = %old.display(), "could not detach the other layout's programs: {e}"),
    }
    migration.copy_new_arrivals(cgroup);
    let report = migration.report;
    match std::fs::remove_dir_all(old) {
        Ok(()) => info!(
            pins = %old.display(),
            rev_nat = report.rev_nat.carried,
            conns = report.conns.carried,
            live_connections = report.live_connections,
            sock_lb = report.sock_lb.carried,
            affinity = report.affinity.carried,
            backend_health = report.backend_health.carried,
            dropped = report.total(|t| t.dropped),
            skipped = report.total(|t| t.skipped),
            failed = report.total(|t| t.failed),
            "migrated: carried socket state, removed the other layout's programs and maps"
        ),
        Err(e) => warn!(pins = %old.display(), "could not remove the other layout's pins: {e}"),
    }
    report
}

/// One map in its old and new version.
struct Pair<T> {
    old: T,
    new: T,
    /// The old map's capacity: bounds every pass over it.
    old_capacity: usize,
}

type HashPair<K, V> = Pair<HashMap<MapData, K, V>>;

impl<K: Pod, V: Pod> HashPair<K, V> {
    /// The old map's entries. Bounded: a hash map whose entries change
    /// while it is walked may restart the walk.
    fn old_entries(&self) -> impl Iterator<Item = (K, V)> + '_ {
        self.old
            .iter()
            .take(self.old_capacity)
            .filter_map(Result::ok)
    }
}

/// Old id → new id, from both versions' service and backend maps.
#[derive(Debug, Default)]
struct Ids {
    services: StdHashMap<u32, u32>,
    backends: StdHashMap<BackendId, BackendId>,
    /// Every backend id of the new maps.
    new_backends: Vec<BackendId>,
}

impl Ids {
    fn build(old_dir: &Path, new_dir: &Path) -> Result<Self, MigrateError> {
        let old_services = read_all::<ServiceKey, ServiceValue>(old_dir, map_names::SERVICES)?;
        let new_services = read_all::<ServiceKey, ServiceValue>(new_dir, map_names::SERVICES)?;
        let old_backends = read_backends(old_dir)?;
        let new_backends = read_backends(new_dir)?;
        let new_service_by_key: StdHashMap<ServiceKey, u32> = new_services
            .iter()
            .map(|(k, v)| (*k, v.service_id))
            .collect();
        let services: StdHashMap<u32, u32> = old_services
            .iter()
            .filter_map(|(k, v)| Some((v.service_id, *new_service_by_key.get(k)?)))
            .collect();
        let identity = |b: &BackendPrefix, service: u32| (service, b.addr, b.port, b.family);
        let new_backend_by_identity: StdHashMap<_, BackendId> = new_backends
            .iter()
            .map(|(id, b)| (identity(b, b.service_id), *id))
            .collect();
        let backends = old_backends
            .iter()
            .filter_map(|(old_id, b)| {
                let service = *services.get(&b.service_id)?;
                Some((
                    *old_id,
                    *new_backend_by_identity.get(&identity(b, service))?,
                ))
            })
            .collect();
        Ok(Self {
            services,
            backends,
            new_backends: new_backends.iter().map(|(id, _)| *id).collect(),
        })
    }

    fn service(&self, old: u32) -> Option<u32> {
        self.services.get(&old).copied()
    }

    fn backend(&self, old: BackendId) -> Option<BackendId> {
        self.backends.get(&old).copied()
    }
}

/// The maps being migrated; a map that could not be opened on either side
/// is `None` and counted as skipped.
struct Migration {
    ids: Option<Ids>,
    rev_nat: Option<HashPair<RevNatKey, RevNatValue>>,
    sock_lb: Option<HashPair<SockLbKey, SockLbValue>>,
    conns: Option<HashPair<u64, ConnValue>>,
    affinity: Option<HashPair<AffinityKey, AffinityValue>>,
    backend_health: Option<Pair<Array<MapData, BackendHealth>>>,
    active: Option<Array<MapData, u64>>,
    report: Report,
}

impl Migration {
    fn open(old_dir: &Path, new_dir: &Path) -> Self {
        let mut report = Report::default();
        let ids = Ids::build(old_dir, new_dir)
            .inspect_err(|e| {
                warn!(
                    "service and backend ids cannot be translated, so no id-bearing socket \
                     state is carried: {e}"
                )
            })
            .ok();
        let has_ids = ids.is_some();
        let dirs = (old_dir, new_dir);
        let rev_nat = open_pair(dirs, map_names::REV_NAT, &mut report.rev_nat);
        // Without ids these maps cannot be translated: left behind (the
        // warning above says why).
        let sock_lb = has_ids
            .then(|| open_pair(dirs, map_names::SOCK_LB, &mut report.sock_lb))
            .flatten();
        let conns = has_ids
            .then(|| open_pair(dirs, map_names::CONNS, &mut report.conns))
            .flatten();
        let affinity = has_ids
            .then(|| open_pair(dirs, map_names::AFFINITY, &mut report.affinity))
            .flatten();
        let backend_health = has_ids
            .then(|| open_pair(dirs, map_names::BACKEND_HEALTH, &mut report.backend_health))
            .flatten();
        let active = open_typed(new_dir, map_names::ACTIVE)
            .map(|(map, _)| map)
            .inspect_err(|e| warn!("live-connection counts are not carried: {e}"))
            .ok();
        Self {
            ids,
            rev_nat,
            sock_lb,
            conns,
            affinity,
            backend_health,
            active,
            report,
        }
    }

    /// First pass, while the old and the new programs are both attached:
    /// the old ones balance every new socket (they run first and rewrite the
    /// VIP away), and both see every close.
    fn copy_while_both_attached(&mut self) {
        self.copy_hash_maps(true);
        self.copy_conns();
        if let (Some(ids), Some(pair)) = (&self.ids, &self.backend_health) {
            let tally = &mut self.report.backend_health;
            for (&old_id, &new_id) in &ids.backends {
                match pair.old.get(&old_id, 0) {
                    Ok(h) if h != BackendHealth::default() => {
                        // The new programs only count failures of sockets
                        // they track, so nothing newer is overwritten.
                        match set_array(&pair.new, new_id, h) {
                            Ok(()) => tally.carried += 1,
                            Err(_) => tally.failed += 1,
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tally.skipped += 1,
                }
            }
        }
        self.derive_active();
    }

    /// Second pass, after the old programs were detached: what they
    /// recorded after the first pass, inserted only where absent (the new
    /// programs' own entries win). `cgroup`: where the sockets live.
    fn copy_new_arrivals(&mut self, cgroup: &Path) {
        self.copy_hash_maps(false);
        self.copy_late_conns(cgroup);
    }

    /// Copies the maps without counters; `first`: drops are counted (the
    /// second pass sees them again).
    fn copy_hash_maps(&mut self, first: bool) {
        let report = &mut self.report;
        // Reverse translations carry no ids: a socket keeps its VIP even if
        // the service is gone.
        if let Some(pair) = &self.rev_nat {
            copy(pair, &mut report.rev_nat, first, |k, v| Some((k, v)));
        }
        let Some(ids) = &self.ids else {
            return;
        };
        if let Some(pair) = &self.sock_lb {
            copy(pair, &mut report.sock_lb, first, |k, v| {
                let key = SockLbKey {
                    service_id: ids.service(k.service_id)?,
                    ..k
                };
                let value = SockLbValue {
                    backend_id: ids.backend(v.backend_id)?,
                    ..v
                };
                Some((key, value))
            });
        }
        if let Some(pair) = &self.affinity {
            copy(pair, &mut report.affinity, first, |k, v| {
                let key = AffinityKey {
                    service_id: ids.service(k.service_id)?,
                    ..k
                };
                let value = AffinityValue {
                    backend_id: ids.backend(v.backend_id)?,
                    ..v
                };
                Some((key, value))
            });
        }
    }

    /// First pass of `MESH_CONNS` (both datapaths attached).
    fn copy_conns(&mut self) {
        let (Some(ids), Some(pair)) = (&self.ids, &self.conns) else {
            return;
        };
        let tally = &mut self.report.conns;
        let written = copy(pair, tally, true, |cookie, v| {
            let value = ConnValue {
                backend_id: ids.backend(v.backend_id)?,
                ..v
            };
            Some((cookie, value))
        });
        // A socket that closed between being read from the old map and
        // written to the new one left a stale entry (its close found nothing
        // on the new side). The old program forgets a socket at its close,
        // so an entry gone from the old map is one of those: delete it. A
        // close that comes later is handled by the new program.
        for cookie in written {
            if matches!(pair.old.get(&cookie, 0), Err(MapError::KeyNotFound))
                && remove(&pair.new, &cookie)
            {
                tally.carried -= 1;
                tally.dropped += 1;
            }
        }
    }

    /// Second pass of `MESH_CONNS`: sockets the old programs balanced after
    /// the first pass. Their closes from the detach on were seen by no
    /// program, so each is counted before its entry exists (a close the new
    /// program sees then takes back exactly that), and afterwards those no
    /// longer open (sock_diag) are taken back here.
    fn copy_late_conns(&mut self, cgroup: &Path) {
        let (Some(ids), Some(pair), Some(active)) = (&self.ids, &self.conns, &self.active) else {
            return;
        };
        let tally = &mut self.report.conns;
        let mut added = Vec::new();
        for (cookie, old) in pair.old_entries() {
            let Some(backend_id) = ids.backend(old.backend_id) else {
                continue;
            };
            if pair.new.get(&cookie, 0).is_ok() {
                continue;
            }
            let value = ConnValue { backend_id, ..old };
            let counted = value.counted == 1;
            if counted && add_active(active, backend_id, 1).is_err() {
                tally.failed += 1;
                continue;
            }
            match insert_absent(&pair.new, &cookie, &value) {
                Ok(true) => {
                    tally.carried += 1;
                    added.push((cookie, value));
                }
                result => {
                    if counted {
                        let _ = add_active(active, backend_id, -1);
                    }
                    tally.failed += u64::from(result.is_err());
                }
            }
        }
        if added.is_empty() {
            return;
        }
        let open = match crate::destroy::open_tcp_cookies(cgroup) {
            Ok(open) => open,
            Err(e) => {
                warn!(
                    sockets = added.len(),
                    "cannot tell which late sockets are still open, keeping them all: {e}"
                );
                self.report.live_connections +=
                    added.iter().filter(|(_, v)| v.counted == 1).count() as u64;
                return;
            }
        };
        for (cookie, value) in added {
            let counted = value.counted == 1;
            if open.contains(&cookie) {
                self.report.live_connections += u64::from(counted);
                continue;
            }
            // Closed. Unless the new program saw the close (entry gone or
            // uncounted: it took its count back), take entry and count back.
            let unchanged = pair.new.get(&cookie, 0).is_ok_and(|now| now == value);
            if unchanged && remove(&pair.new, &cookie) {
                if counted {
                    let _ = add_active(active, value.backend_id, -1);
                }
                tally.carried -= 1;
                tally.dropped += 1;
            }
        }
    }

    /// Sets every backend's live count in the new `MESH_ACTIVE` to the number
    /// of counted `MESH_CONNS` entries for it.
    ///
    /// Race windows left:
    /// - A carried socket that closes between reading `MESH_CONNS` and
    ///   writing its count: the new program's decrement is lost (it stops at
    ///   zero or is overwritten). Reading again and rewriting until nothing
    ///   changes (at most `ACTIVE_ROUNDS`) leaves only a close inside the
    ///   last round's read-to-write window (microseconds) counting one high.
    /// - Second pass (`copy_late_conns`): a close between reading an entry
    ///   and removing it, and the read-modify-writes of `MESH_ACTIVE` racing
    ///   the kernel's own updates of the same backend, can each leave one
    ///   count off; a socket established between the detach and its copy is
    ///   never counted (nor uncounted). Each needs a connect or close within
    ///   microseconds of the agent's own access to the same entry.
    fn derive_active(&mut self) {
        let (Some(ids), Some(conns), Some(active)) = (&self.ids, &self.conns, &self.active) else {
            return;
        };
        for _ in 0..ACTIVE_ROUNDS {
            let mut counts: StdHashMap<BackendId, u64> = StdHashMap::new();
            for (_, conn) in conns
                .new
                .iter()
                .take(conns.old_capacity)
                .filter_map(Result::ok)
            {
                if conn.counted == 1 {
                    *counts.entry(conn.backend_id).or_default() += 1;
                }
            }
            let backends: HashSet<BackendId> = ids
                .new_backends
                .iter()
                .chain(counts.keys())
                .copied()
                .collect();
            let mut rewrote = false;
            for id in backends {
                let want = counts.get(&id).copied().unwrap_or(0);
                if active.get(&id, 0).is_ok_and(|now| now != want) {
                    rewrote |= set_array(active, id, want).is_ok();
                }
            }
            self.report.live_connections = counts.values().sum();
            if !rewrote {
                break;
            }
        }
    }
}

/// Copies `pair.old` into `pair.new` through `translate` (None: dropped),
/// inserting only where absent; returns the new keys written.
fn copy<K: Pod, V: Pod>(
    pair: &HashPair<K, V>,
    tally: &mut Tally,
    count_drops: bool,
    translate: impl Fn(K, V) -> Option<(K, V)>,
) -> Vec<K> {
    let mut written = Vec::new();
    for (key, value) in pair.old_entries() {
        let Some((key, value)) = translate(key, value) else {
            if count_drops {
                tally.dropped += 1;
            }
            continue;
        };
        match insert_absent(&pair.new, &key, &value) {
            Ok(true) => {
                tally.carried += 1;
                written.push(key);
            }
            Ok(false) => {}
            Err(_) => tally.failed += 1,
        }
    }
    written
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_NOEXIST`; Ok(false) when the key exists.
/// Through the syscall itself: aya's `insert` wants `&mut` for a map the
/// kernel writes concurrently anyway.
fn insert_absent<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    value: &V,
) -> io::Result<bool> {
    match update_elem(map_fd(map), key, value, NOEXIST) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes a key; true when this call removed it.
fn remove<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, key: &K) -> bool {
    let mut attr = ElemAttr {
        map_fd: map_fd(map).as_raw_fd() as u32,
        key: key as *const K as u64,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).is_ok()
}

/// Adds `delta` to a live count, never below zero (read-modify-write: the
/// kernel's atomic adds cannot be joined from user space).
fn add_active(active: &Array<MapData, u64>, backend_id: BackendId, delta: i64) -> io::Result<()> {
    let now = active.get(&backend_id, 0).map_err(io::Error::other)?;
    set_array(active, backend_id, now.saturating_add_signed(delta))
}

fn set_array<V: Pod>(map: &Array<MapData, V>, index: u32, value: V) -> io::Result<()> {
    update_elem(map_fd(map), &index, &value, 0)
}

fn map_fd<K: Pod, V: Pod>(map: &impl IterableMap<K, V>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

fn update_elem<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// How many keys a map holds (at most `limit`), whatever its key size: for
/// the log when a map's layout cannot be decoded.
fn count_keys(fd: BorrowedFd<'_>, key_size: u32, limit: u32) -> u64 {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0u64;
    let mut first = true;
    while count < u64::from(limit) {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            // A null key asks for the first one.
            key: if first { 0 } else { key.as_ptr() as u64 },
            value: next.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() {
            break;
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        count += 1;
    }
    count
}

/// A typed map handle and the key and value sizes it decodes.
trait Typed: TryFrom<Map, Error = MapError> {
    const KEY_SIZE: usize;
    const VALUE_SIZE: usize;
}

impl<K: Pod, V: Pod> Typed for HashMap<MapData, K, V> {
    const KEY_SIZE: usize = size_of::<K>();
    const VALUE_SIZE: usize = size_of::<V>();
}

impl<V: Pod> Typed for Array<MapData, V> {
    const KEY_SIZE: usize = size_of::<u32>();
    const VALUE_SIZE: usize = size_of::<V>();
}

/// Opens a pinned map as `T` once the kernel's key and value sizes match
/// `T`'s; returns it with its capacity.
fn open_typed<T: Typed>(dir: &Path, map: &'static str) -> Result<(T, usize), MigrateError> {
    let path = dir.join(map);
    let data = MapData::from_pin(&path).map_err(|source| MigrateError::Open {
        path: path.clone(),
        source,
    })?;
    let info = data
        .info()
        .map_err(|source| MigrateError::Open { path, source })?;
    let (want_key, want_value) = (T::KEY_SIZE as u32, T::VALUE_SIZE as u32);
    if (info.key_size(), info.value_size()) != (want_key, want_value) {
        return Err(MigrateError::Layout {
            map,
            key_size: info.key_size(),
            value_size: info.value_size(),
            want_key,
            want_value,
            entries: count_keys(data.fd().as_fd(), info.key_size(), info.max_entries()),
        });
    }
    let typed = Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(|source| MigrateError::Kind { map, source })?;
    Ok((typed, info.max_entries() as usize))
}

/// Opens both versions of a map; on failure logs what is not carried and
/// why, and counts it as skipped.
fn open_pair<T: Typed>(
    (old_dir, new_dir): (&Path, &Path),
    map: &'static str,
    tally: &mut Tally,
) -> Option<Pair<T>> {
    let both = open_typed(old_dir, map)
        .and_then(|(old, old_capacity)| Ok((old, open_typed(new_dir, map)?.0, old_capacity)));
    match both {
        Ok((old, new, old_capacity)) => Some(Pair {
            old,
            new,
            old_capacity,
        }),
        Err(e) => {
            tally.skipped += e.entries();
            warn!(
                map,
                entries = e.entries(),
                "not carried into the new maps: {e}"
            );
            None
        }
    }
}

/// Every entry of a pinned hash map.
/// What migration matches backends by, as every layout so far stores it:
/// schema v1's `BackendValue` (24 bytes) is the start of v2's, which adds
/// the flags (the tunnel's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BackendPrefix {
    addr: [u32; 4],
    port: u16,
    family: u8,
    state: u8,
    service_id: u32,
}

// SAFETY: `#[repr(C)]` integers without padding; any bit pattern is valid.
unsafe impl Pod for BackendPrefix {}

const _: () = assert!(size_of::<BackendPrefix>() == 24);

/// A `MESH_BACKENDS` of this layout or of v1.
fn read_backends(dir: &Path) -> Result<Vec<(BackendId, BackendPrefix)>, MigrateError> {
    match read_all::<BackendId, BackendValue>(dir, map_names::BACKENDS) {
        Ok(all) => Ok(all
            .into_iter()
            .map(|(id, b)| {
                let prefix = BackendPrefix {
                    addr: b.addr,
                    port: b.port,
                    family: b.family,
                    state: b.state,
                    service_id: b.service_id,
                };
                (id, prefix)
            })
            .collect()),
        Err(MigrateError::Layout {
            key_size: 4,
            value_size: 24,
            ..
        }) => read_all::<BackendId, BackendPrefix>(dir, map_names::BACKENDS),
        Err(e) => Err(e),
    }
}

fn read_all<K: Pod, V: Pod>(dir: &Path, map: &'static str) -> Result<Vec<(K, V)>, MigrateError> {
    let (typed, capacity) = open_typed::<HashMap<MapData, K, V>>(dir, map)?;
    typed
        .iter()
        .take(capacity)
        .collect::<Result<_, _>>()
        .map_err(|source| MigrateError::Read { map, source })
}

#[cfg(test)]
mod tests {
    //! Real kernel maps pinned on bpffs (needs root, like every kernel test
    //! here), with the two layouts' pins made by hand: an old map whose
    //! layout does not match, maps missing on both sides, and ids that
    //! differ between the layouts.

    use mesh_common::{FAMILY_V4, PROTO_TCP};

    use super::*;

    const HASH: u32 = 1;
    const ARRAY: u32 = 2;
    const LRU_HASH: u32 = 9;

    /// A bpffs directory of this test's own, removed on drop.
    struct PinDir(PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn pinned_map(dir: &Path, name: &str, map_type: u32, key: usize, value: usize) -> MapData {
        let fd = crate::bpf::batch::create_map(map_type, key as u32, value as u32, 16)
            .unwrap_or_else(|e| panic!("creating a BPF map (run as root): {e}"));
        let data = MapData::from_fd(fd).unwrap();
        data.pin(dir.join(name)).unwrap();
        data
    }

    fn put<K: Pod, V: Pod>(map: &MapData, key: K, value: V) {
        update_elem(map.fd().as_fd(), &key, &value, 0).unwrap();
    }

    fn hash<K: Pod, V: Pod>(dir: &Path, name: &'static str) -> HashMap<MapData, K, V> {
        open_typed(dir, name).unwrap().0
    }

    fn service_key(last: u8) -> ServiceKey {
        ServiceKey {
            addr: [u32::from_ne_bytes([127, 0, 0, last]), 0, 0, 0],
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        }
    }

    fn backend(service_id: u32, port: u16) -> BackendValue {
        BackendValue {
            addr: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
            port: port.to_be(),
            family: FAMILY_V4,
            state: 0,
            service_id,
            ..BackendValue::default()
        }
    }

    fn service(service_id: u32) -> ServiceValue {
        ServiceValue {
            service_id,
            ..ServiceValue::default()
        }
    }

    #[test]
    fn translates_ids_drops_the_gone_and_skips_a_layout_it_cannot_read() {
        let root = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/mesh-unit-migrate-{}",
            std::process::id()
        )));
        // Not left to whichever test (or agent) happened to mount it first.
        crate::bpf::ensure_bpffs(&root.0).unwrap_or_else(|e| panic!("{e} (run as root)"));
        let (old, new_maps) = (root.0.join("v1"), root.0.join("v2/maps"));
        let old_maps = old.join("maps");
        for dir in [&old_maps, &new_maps] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let conn = |backend_id, counted| ConnValue {
            backend_id,
            counted,
        };
        let affinity = |service_id, client| AffinityKey {
            service_id,
            _pad: 0,
            client,
        };
        let sticky = |backend_id| AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: 42,
        };

        // Old layout: services 7 (kept) and 8 (gone); backends 70 (kept),
        // 71 (left service 7), 80 (of service 8).
        let m = pinned_map(&old_maps, map_names::SERVICES, HASH, 20, 20);
        put(&m, service_key(1), service(7));
        put(&m, service_key(2), service(8));
        let m = pinned_map(&old_maps, map_names::BACKENDS, HASH, 4, 24);
        put(&m, 70u32, backend(7, 1000));
        put(&m, 71u32, backend(7, 1001));
        put(&m, 80u32, backend(8, 2000));
        let m = pinned_map(&old_maps, map_names::CONNS, LRU_HASH, 8, 8);
        put(&m, 100u64, conn(70, 1));
        put(&m, 101u64, conn(71, 1));
        put(&m, 102u64, conn(80, 1));
        put(&m, 103u64, conn(70, 0));
        let m = pinned_map(&old_maps, map_names::AFFINITY, LRU_HASH, 16, 16);
        put(&m, affinity(7, 5), sticky(70));
        put(&m, affinity(8, 5), sticky(80));
        // A reverse-translation map of another layout (value 4 bytes longer).
        let m = pinned_map(&old_maps, map_names::REV_NAT, LRU_HASH, 32, 24);
        put(&m, [1u64; 4], [9u64; 3]);
        put(&m, [2u64; 4], [9u64; 3]);

        // New layout: service 7 is now 1, backend 70 is now 3.
        let m = pinned_map(&new_maps, map_names::SERVICES, HASH, 20, 20);
        put(&m, service_key(1), service(1));
        // This build's layout; the old one is v1's, without the flags.
        let m = pinned_map(
            &new_maps,
            map_names::BACKENDS,
            HASH,
            4,
            size_of::<BackendValue>(),
        );
        put(&m, 3u32, backend(1, 1000));
        pinned_map(&new_maps, map_names::CONNS, LRU_HASH, 8, 8);
        pinned_map(&new_maps, map_names::AFFINITY, LRU_HASH, 16, 16);
        pinned_map(&new_maps, map_names::REV_NAT, LRU_HASH, 32, 20);
        pinned_map(&new_maps, map_names::ACTIVE, ARRAY, 4, 8);
        // MESH_SOCK_LB and MESH_BE_HEALTH are missing on both sides.

        // Every entry goes in the first pass, so no socket is looked up.
        let report = upgrade_from(&old, &new_maps, Path::new("/nonexistent"));

        assert_eq!(
            report.conns,
            Tally {
                carried: 2,
                dropped: 2,
                ..Tally::default()
            }
        );
        assert_eq!(
            report.affinity,
            Tally {
                carried: 1,
                dropped: 1,
                ..Tally::default()
            }
        );
        assert_eq!(report.rev_nat.skipped, 2, "{report:?}");
        assert_eq!(report.rev_nat.carried, 0);
        assert_eq!(report.live_connections, 1);
        assert_eq!(report.carried(), 3);

        let conns: HashMap<MapData, u64, ConnValue> = hash(&new_maps, map_names::CONNS);
        let mut carried: Vec<_> = conns.iter().map(Result::unwrap).collect();
        carried.sort_by_key(|(cookie, _)| *cookie);
        assert_eq!(carried, [(100, conn(3, 1)), (103, conn(3, 0))]);
        let sticky_now: HashMap<MapData, AffinityKey, AffinityValue> =
            hash(&new_maps, map_names::AFFINITY);
        let entries: Vec<_> = sticky_now.iter().map(Result::unwrap).collect();
        assert_eq!(entries, [(affinity(1, 5), sticky(3))]);
        let rev_nat: HashMap<MapData, RevNatKey, RevNatValue> = hash(&new_maps, map_names::REV_NAT);
        assert_eq!(
            rev_nat.keys().count(),
            0,
            "an unreadable layout is not decoded"
        );
        let (active, _) = open_typed::<Array<MapData, u64>>(&new_maps, map_names::ACTIVE).unwrap();
        assert_eq!(
            active.get(&3, 0).unwrap(),
            1,
            "counted from the carried conns"
        );
        assert!(!old.exists(), "the old layout's pins are removed");
    }
}
