//! The index of everything watched, and what was last handed to the
//! agent: relists diffed at their end, only touched Services translated
//! again, only changed frontends handed over.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt as _};
use tracing::{info, warn};

use super::nodes::NodeFacts;
use super::{Kind, KubeOptions, Shared, Watched, cgroups, mark, translate};
use crate::state::{DEFAULT_TUNNEL_PORT, Mesh, Node, Service, Workload};

type Key = (String, String);

fn key_of<K: Resource>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// One kind's objects, and the relist in progress if any.
struct Objects<K> {
    by_key: BTreeMap<Key, Arc<K>>,
    relist: Option<BTreeMap<Key, Arc<K>>>,
    synced: bool,
}

impl<K: Resource> Objects<K> {
    fn new() -> Self {
        Self {
            by_key: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }

    /// Takes one event; returns the objects it changed (old and new
    /// versions), so their dependents can be recomputed.
    fn take(&mut self, event: Event<K>) -> Vec<Arc<K>> {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            Event::InitApply(obj) => {
                let obj = Arc::new(obj);
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key_of(&*obj), obj);
                Vec::new()
            }
            Event::InitDone => {
                self.synced = true;
                let listed = self.relist.take().unwrap_or_default();
                let mut touched = Vec::new();
                // Deleted during the gap.
                self.by_key.retain(|k, old| {
                    let keep = listed.contains_key(k);
                    if !keep {
                        touched.push(old.clone());
                    }
                    keep
                });
                for (k, obj) in listed {
                    let same = self
                        .by_key
                        .get(&k)
                        .is_some_and(|old| old.resource_version() == obj.resource_version());
                    if !same {
                        if let Some(old) = self.by_key.insert(k, obj.clone()) {
                            touched.push(old);
                        }
                        touched.push(obj);
                    }
                }
                touched
            }
            Event::Apply(obj) => {
                let obj = Arc::new(obj);
                let old = self.by_key.insert(key_of(&*obj), obj.clone());
                if old
                    .as_ref()
                    .is_some_and(|o| o.resource_version() == obj.resource_version())
                {
                    return Vec::new();
                }
                old.into_iter().chain([obj]).collect()
            }
            Event::Delete(obj) => self.by_key.remove(&key_of(&obj)).into_iter().collect(),
        }
    }
}

/// Of every node's pods, only which node hosts which identity (a whole
/// Pod of every node would cost far more memory than this needs).
struct PeerPods {
    by_key: BTreeMap<Key, (String, String)>,
    relist: Option<BTreeMap<Key, (String, String)>>,
    synced: bool,
}

impl PeerPods {
    /// Synced from the start when not watched.
    fn new(watched: bool) -> Self {
        Self {
            by_key: BTreeMap::new(),
            relist: None,
            synced: !watched,
        }
    }

    /// The (node, identity) a running pod of another node than `this`
    /// gives.
    fn facts(pod: &Pod, this: &str, trust_domain: &str) -> Option<(String, String)> {
        let spec = pod.spec.as_ref()?;
        let node = spec
            .node_name
            .as_deref()
            .filter(|n| !n.is_empty() && *n != this)?;
        if node.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return None;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let sa = spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let namespace = pod.metadata.namespace.as_deref()?;
        let id = crate::identity::SpiffeId::workload(trust_domain, namespace, sa).ok()?;
        Some((node.to_owned(), id.to_string()))
    }

    /// Takes one event; true when which node hosts what may have changed.
    fn take(&mut self, event: Event<Pod>, this: &str, trust_domain: &str) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(pod) => {
                if let Some(facts) = Self::facts(&pod, this, trust_domain) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key_of(&pod), facts);
                }
                false
            }
            Event::InitDone => {
                self.synced = true;
                let listed = self.relist.take().unwrap_or_default();
                let changed = listed != self.by_key;
                self.by_key = listed;
                changed
            }
            Event::Apply(pod) => {
                let key = key_of(&pod);
                match Self::facts(&pod, this, trust_domain) {
                    Some(facts) => self.by_key.insert(key, facts.clone()) != Some(facts),
                    None => self.by_key.remove(&key).is_some(),
                }
            }
            Event::Delete(pod) => self.by_key.remove(&key_of(&pod)).is_some(),
        }
    }
}

/// Everything watched, and what was last handed to the agent.
pub(super) struct Index {
    node: String,
    trust_domain: String,
    layout: cgroups::Layout,
    services: Objects<KubeService>,
    slices: Objects<EndpointSlice>,
    pods: Objects<Pod>,
    /// Which node hosts which identity, of every node's pods.
    peers: PeerPods,
    /// Slices by their Service (namespace, service-name label).
    slices_of: BTreeMap<Key, BTreeSet<Key>>,
    nodes: BTreeMap<String, NodeFacts>,
    nodes_read: bool,
    /// Frontends last handed over, per Service.
    frontends: BTreeMap<Key, Vec<Arc<Service>>>,
    /// Services to translate again on the next publish.
    dirty: BTreeSet<Key>,
    workloads_dirty: bool,
    mesh_dirty: bool,
    /// The last error of each Service refused, so it is logged once.
    refused: BTreeMap<Key, String>,
    /// The workloads and mesh last handed over.
    published: Option<(Arc<Vec<Workload>>, Arc<Mesh>)>,
}

impl Index {
    pub(super) fn new(opts: &KubeOptions) -> Self {
        Self {
            node: opts.node_name.clone(),
            trust_domain: opts.trust_domain.clone(),
            layout: opts.cgroups.clone(),
            services: Objects::new(),
            slices: Objects::new(),
            pods: Objects::new(),
            peers: PeerPods::new(opts.peer_identities),
            slices_of: BTreeMap::new(),
            nodes: BTreeMap::new(),
            nodes_read: false,
            frontends: BTreeMap::new(),
            dirty: BTreeSet::new(),
            workloads_dirty: true,
            mesh_dirty: true,
            refused: BTreeMap::new(),
            published: None,
        }
    }

    /// Takes one event; returns its kind unless it changed nothing.
    pub(super) fn take(&mut self, event: Watched, shared: &Shared) -> Option<Kind> {
        let metrics = &shared.metrics;
        let (kind, relisted) = match event {
            Watched::Service(e) => {
                let done = matches!(e, Event::InitDone);
                if !matches!(e, Event::Init | Event::InitDone) {
                    metrics.event(Kind::Service.name());
                }
                for svc in self.services.take(e) {
                    self.dirty.insert(key_of(&*svc));
                }
                (Kind::Service, done)
            }
            Watched::Slice(e) => {
                let done = matches!(e, Event::InitDone);
                if !matches!(e, Event::Init | Event::InitDone) {
                    metrics.event(Kind::EndpointSlice.name());
                }
                for slice in self.slices.take(e) {
                    self.reindex_slice(&slice);
                }
                (Kind::EndpointSlice, done)
            }
            Watched::Pod(e) => {
                let done = matches!(e, Event::InitDone);
                if !matches!(e, Event::Init | Event::InitDone) {
                    metrics.event(Kind::Pod.name());
                }
                if !self.pods.take(e).is_empty() {
                    self.workloads_dirty = true;
                }
                (Kind::Pod, done)
            }
            Watched::PeerPod(e) => {
                let done = matches!(e, Event::InitDone);
                if !matches!(e, Event::Init | Event::InitDone) {
                    metrics.event(Kind::PeerPod.name());
                }
                if self.peers.take(e, &self.node, &self.trust_domain) {
                    self.workloads_dirty = true;
                }
                (Kind::PeerPod, done)
            }
            Watched::Nodes(nodes) => {
                metrics.event(Kind::Node.name());
                self.nodes_read = true;
                let zone = |n: &BTreeMap<String, NodeFacts>| {
                    n.get(&self.node).and_then(|f| f.zone.clone())
                };
                if zone(&nodes) != zone(&self.nodes) {
                    // Topology of every Service may change.
                    self.dirty.extend(self.services.by_key.keys().cloned());
                }
                self.nodes = nodes;
                self.mesh_dirty = true;
                return Some(Kind::Node);
            }
            Watched::Failed(kind, e) => {
                metrics.watch_error(kind.name());
                mark(shared, kind, true);
                warn!(
                    kind = kind.name(),
                    "kubernetes: watch failed, retrying with backoff: {e}"
                );
                return None;
            }
        };
        mark(shared, kind, false);
        if relisted {
            metrics.relist(kind.name());
            info!(kind = kind.name(), "kubernetes: list done");
        }
        Some(kind)
    }

    /// Files `slice` under its Service (a changed label moves it) and marks
    /// that Service for translation.
    fn reindex_slice(&mut self, slice: &EndpointSlice) {
        let key = key_of(slice);
        for keys in self.slices_of.values_mut() {
            keys.remove(&key);
        }
        let owner = |s: &EndpointSlice| {
            s.labels()
                .get(translate::SERVICE_NAME_LABEL)
                .map(|name| (key.0.clone(), name.clone()))
        };
        if let Some(current) = self.slices.by_key.get(&key)
            && let Some(service) = owner(current)
        {
            self.slices_of
                .entry(service)
                .or_default()
                .insert(key.clone());
        }
        if let Some(service) = owner(slice) {
            self.dirty.insert(service);
        }
        self.slices_of.retain(|_, keys| !keys.is_empty());
    }

    /// Nodes whose facts the source needs: this one, and those hosting
    /// endpoints.
    pub(super) fn wanted_nodes(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::from([self.node.clone()]);
        for slice in self.slices.by_key.values() {
            for ep in &slice.endpoints {
                if let Some(n) = &ep.node_name {
                    names.insert(n.clone());
                }
            }
        }
        names
    }

    fn synced(&self) -> bool {
        self.services.synced
            && self.slices.synced
            && self.pods.synced
            && self.peers.synced
            && self.nodes_read
    }

    /// Translates what changed and hands the agent whatever differs from
    /// what it was handed before. Nothing before every kind's first list.
    pub(super) fn publish(&mut self, shared: &Shared, kinds: &BTreeSet<Kind>, arrived: Instant) {
        if !self.synced() {
            return;
        }
        let mut services: BTreeMap<String, Option<Arc<Service>>> = BTreeMap::new();
        let dirty = std::mem::take(&mut self.dirty);
        let zone = self.nodes.get(&self.node).and_then(|f| f.zone.clone());
        let this = translate::ThisNode {
            name: &self.node,
            zone: zone.as_deref(),
        };
        for key in dirty {
            let new = match self.services.by_key.get(&key) {
                None => Vec::new(),
                Some(svc) => match self.translate(&key, svc, &this) {
                    Ok(frontends) => {
                        self.refused.remove(&key);
                        frontends
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if self.refused.get(&key) != Some(&text) {
                            shared.metrics.refused();
                            warn!("kubernetes: {text}; its last good state keeps serving");
                            self.refused.insert(key.clone(), text);
                        }
                        continue;
                    }
                },
            };
            let old = self.frontends.remove(&key).unwrap_or_default();
            let mut kept = Vec::with_capacity(new.len());
            for svc in new {
                match old.iter().find(|o| o.name == svc.name) {
                    Some(o) if **o == svc => kept.push(o.clone()),
                    _ => {
                        let svc = Arc::new(svc);
                        services.insert(svc.name.clone(), Some(svc.clone()));
                        kept.push(svc);
                    }
                }
            }
            for o in &old {
                if !kept.iter().any(|k| k.name == o.name) {
                    services.insert(o.name.clone(), None);
                }
            }
            if !kept.is_empty() {
                self.frontends.insert(key, kept);
            }
        }
        // Workloads and the mesh go over whole, and only when they differ
        // from what went before (a pod's status change usually changes
        // neither).
        let (mut workloads, mut mesh) = (None, None);
        if std::mem::take(&mut self.workloads_dirty) {
            let new = self.workloads();
            if self.published.as_ref().is_none_or(|(w, _)| *w != new) {
                workloads = Some(new);
            }
        }
        if std::mem::take(&mut self.mesh_dirty) {
            let new = Arc::new(self.mesh());
            if self.published.as_ref().is_none_or(|(_, m)| *m != new) {
                mesh = Some(new);
            }
        }
        let (last_w, last_m) = self.published.clone().unwrap_or_default();
        self.published = Some((
            workloads.clone().unwrap_or(last_w),
            mesh.clone().unwrap_or(last_m),
        ));
        {
            let mut pending = shared.pending();
            let added = !services.is_empty() || workloads.is_some() || mesh.is_some();
            if workloads.is_some() {
                pending.workloads = workloads;
            }
            if mesh.is_some() {
                pending.mesh = mesh;
            }
            pending.services.extend(services);
            if added {
                pending.version += 1;
                for &kind in kinds {
                    pending.arrived.entry(kind).or_insert(arrived);
                }
            }
        }
        let _ = shared.synced.set(());
        shared.changed.notify_one();
    }

    /// Every Service translated afresh from the objects (a Service that
    /// fails: its last good frontends), for the disagreement check.
    pub(super) fn view(&self) -> BTreeMap<String, Arc<Service>> {
        let zone = self.nodes.get(&self.node).and_then(|f| f.zone.clone());
        let this = translate::ThisNode {
            name: &self.node,
            zone: zone.as_deref(),
        };
        let mut out = BTreeMap::new();
        for (key, svc) in &self.services.by_key {
            match self.translate(key, svc, &this) {
                Ok(frontends) => {
                    out.extend(frontends.into_iter().map(|f| (f.name.clone(), Arc::new(f))));
                }
                Err(_) => {
                    for f in self.frontends.get(key).into_iter().flatten() {
                        out.insert(f.name.clone(), f.clone());
                    }
                }
            }
        }
        out
    }

    /// `svc` (filed under `key`) with the union of its slices.
    fn translate(
        &self,
        key: &Key,
        svc: &KubeService,
        this: &translate::ThisNode,
    ) -> Result<Vec<Service>, translate::TranslateError> {
        let slices = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.by_key.get(k))
            .map(|s| &**s);
        translate::translate(svc, slices, this)
    }

    /// This node's pods that are running here, as workloads.
    fn workloads(&self) -> Arc<Vec<Workload>> {
        let mut out = Vec::new();
        for pod in self.pods.by_key.values() {
            match cgroups::workload_of(pod, &self.layout, &self.trust_domain, &self.node) {
                Ok(Some(w)) => out.push(w),
                Ok(None) => {}
                Err(e) => warn!("kubernetes: pod skipped: {e}"),
            }
        }
        // Other nodes' identities: one entry per (node, identity), with no
        // cgroup (only the hosting node registers cgroups).
        let hosted: BTreeSet<&(String, String)> = self.peers.by_key.values().collect();
        out.extend(hosted.into_iter().map(|(node, identity)| Workload {
            name: format!("{node}:{identity}"),
            cgroup: PathBuf::new(),
            identity: identity.clone(),
            node: Some(node.clone()),
            addresses: Vec::new(),
        }));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Arc::new(out)
    }

    /// The nodes known with an address, for the tunnel.
    fn mesh(&self) -> Mesh {
        Mesh {
            default_mtls: Default::default(),
            nodes: self
                .nodes
                .iter()
                .filter_map(|(name, facts)| {
                    Some(Node {
                        name: name.clone(),
                        address: facts.address?,
                        tunnel_port: DEFAULT_TUNNEL_PORT,
                    })
                })
                .collect(),
        }
    }
}
