//! The Kubernetes source: Services and EndpointSlices of the cluster, the
//! Pods of this node and this node's Node, watched through the API with
//! kube-rs watchers (default backoff, bookmarks, 410 → relist), turned
//! into the desired model (`translate`, `cgroups`).
//!
//! Two halves. A task on the agent's runtime owns the watchers and an index
//! of the objects; it translates only the Services an event touched and
//! hands the agent the frontends whose translation changed (`Pending`). The
//! agent's half ([`KubeSource`]) turns those into an [`Update`] and drops
//! them once committed, so a refused apply is retried with what is pending
//! then, and an identical resync hands over nothing at all.
//!
//! Correctness across restarts and resyncs (Cilium #26912, #48050):
//! - nothing is handed over until every kind has finished its first list
//!   (the agent waits, and the pinned maps keep serving meanwhile);
//! - a relist (a broken watch, 410 Gone) is buffered and diffed against
//!   the index when it ends: objects missing from it are deleted, changed
//!   ones replaced, the rest not touched;
//! - `/readyz` fails until the first lists are done, and again while any
//!   watch has been failing for longer than `--watch-stale-seconds`.

pub mod cgroups;
mod index;
mod metrics;
mod nodes;
pub mod translate;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use tokio::sync::Notify;
use tracing::info;

use self::index::Index;
pub use self::metrics::KubeMetrics;
use self::nodes::{NodeFacts, poll_nodes};
use crate::config::Update;
use crate::state::{Mesh, Service, ServiceSet, Workload};

/// Label selector of the Services and EndpointSlices served: kube-proxy's
/// (another proxy's services, and headless services' slices, are skipped
/// by the API server).
const PROXIED: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How `--source=kubernetes` reaches the API and finds this node's pods.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// A kubeconfig file; None: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// Of the workloads' SPIFFE IDs.
    pub trust_domain: String,
    /// Where the kubelet makes pod cgroups: the cgroup v2 mount and the
    /// kubelet's `--cgroup-root`.
    pub cgroups: cgroups::Layout,
    /// `/readyz` fails while a watch has been failing this long.
    pub stale_after: Duration,
    /// How often Nodes (this one's zone, peers' addresses) are read again.
    pub node_refresh: Duration,
    /// Also watch every node's Pods, keeping only which node hosts which
    /// service account: with the tunnel on, a stream from a peer node may
    /// claim only identities that node hosts (docs/SECURITY.md).
    pub peer_identities: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot read the kubeconfig {path}: {source}; pass a valid --kubeconfig, or none inside a pod"
    )]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes API to talk to: {0}; inside a pod the service account must be mounted, outside one pass --kubeconfig"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// The kinds watched, as metrics and logs name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Pod,
    /// Pods of every node, for which node hosts which identity.
    PeerPod,
    Node,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::PeerPod => "PeerPod",
            Kind::Node => "Node",
        }
    }
}

/// What the task has translated and the agent has not committed yet.
#[derive(Default)]
struct Pending {
    services: BTreeMap<String, Option<Arc<Service>>>,
    workloads: Option<Arc<Vec<Workload>>>,
    mesh: Option<Arc<Mesh>>,
    /// The earliest arrival of an event behind what is pending, per kind.
    arrived: BTreeMap<Kind, Instant>,
    /// Bumped whenever the task adds to what is pending.
    version: u64,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.workloads.is_none() && self.mesh.is_none()
    }
}

/// How long a change the agent refused (a full map, say) waits before it
/// is tried again, unless a new one comes first.
const RETRY_REFUSED: Duration = Duration::from_secs(1);

/// What the task shares with the agent's half and with `/readyz`.
struct Shared {
    pending: Mutex<Pending>,
    changed: Notify,
    /// Set once every kind has finished its first list.
    synced: std::sync::OnceLock<()>,
    /// Per watched kind, since when its watch has been failing.
    broken_since: Mutex<BTreeMap<Kind, Instant>>,
    stale_after: Duration,
    metrics: KubeMetrics,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Asks the task for every Service translated afresh from its objects.
type ViewRequest = tokio::sync::oneshot::Sender<BTreeMap<String, Arc<Service>>>;

/// A way to ask for the source's view without holding the agent's lock.
#[derive(Clone)]
pub struct ViewHandle(tokio::sync::mpsc::UnboundedSender<ViewRequest>);

impl ViewHandle {
    /// Every service as the API's objects say now (None: the task ended).
    pub async fn get(&self) -> Option<BTreeMap<String, Arc<Service>>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.send(tx).ok()?;
        rx.await.ok()
    }
}

/// The agent's half: the committed state and the task's pending changes.
pub struct KubeSource {
    current: ServiceSet,
    /// An update was handed out and not committed yet.
    loaded: bool,
    shared: Arc<Shared>,
    views: ViewHandle,
    /// The watchers' task; ended when the source is dropped.
    task: tokio::task::JoinHandle<()>,
}

/// How the agent's loop learns of pending changes.
pub struct KubeChanges {
    shared: Arc<Shared>,
    /// `Pending::version` when this last reported a change.
    seen: u64,
    /// When a change still pending then is tried again (kept across
    /// calls: the loop drops this future whenever another event wins).
    retry_at: tokio::time::Instant,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeSource {
    /// Connects, starts the watchers and waits until every kind has been
    /// listed once; returns the whole first state.
    pub async fn open(
        opts: &KubeOptions,
        metrics: KubeMetrics,
    ) -> Result<(Self, Update), KubeError> {
        let client = client(opts).await?;
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            changed: Notify::new(),
            synced: std::sync::OnceLock::new(),
            broken_since: Mutex::default(),
            stale_after: opts.stale_after,
            metrics,
        });
        let (views, view_requests) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run(client, opts.clone(), shared.clone(), view_requests));
        info!(node = %opts.node_name, "kubernetes: listing Services, EndpointSlices, this node's Pods and Node");
        let started = Instant::now();
        while shared.synced.get().is_none() {
            shared.changed.notified().await;
        }
        info!(
            ms = started.elapsed().as_millis() as u64,
            "kubernetes: first lists done"
        );
        let mut source = Self {
            current: ServiceSet::default(),
            loaded: false,
            shared,
            views: ViewHandle(views),
            task,
        };
        let first = source.load();
        Ok((source, first))
    }

    pub fn changes(&self) -> KubeChanges {
        KubeChanges {
            shared: self.shared.clone(),
            seen: 0,
            retry_at: tokio::time::Instant::now(),
        }
    }

    pub fn current(&self) -> &ServiceSet {
        &self.current
    }

    pub fn views(&self) -> ViewHandle {
        self.views.clone()
    }

    /// Services with a change on its way to the agent.
    pub fn in_flight(&self) -> BTreeSet<String> {
        self.shared.pending().services.keys().cloned().collect()
    }

    /// What is pending, as an update of the committed state.
    ///
    /// When the last update handed out was refused (loaded again before
    /// any commit) and removals are pending, only those go this time: a
    /// removal never needs room in the maps, and the rest may fit once
    /// it is done (an apply writes new services before it deletes old
    /// ones, so a remove and an add at a full map need room for both).
    pub fn load(&mut self) -> Update {
        let refused = std::mem::replace(&mut self.loaded, true);
        let pending = self.shared.pending();
        let removals: BTreeMap<String, Option<Arc<Service>>> = pending
            .services
            .iter()
            .filter(|(_, svc)| svc.is_none())
            .map(|(name, _)| (name.clone(), None))
            .collect();
        if refused && !removals.is_empty() && removals.len() < pending.services.len() {
            return Update::new(removals, None, None);
        }
        Update::new(
            pending.services.clone(),
            pending.workloads.clone(),
            pending.mesh.clone(),
        )
    }

    /// `update` reached the kernel: it becomes the committed state, and
    /// what of it is still pending (nothing newer came meanwhile) is done.
    pub fn commit(&mut self, update: Update) {
        self.loaded = false;
        let mut pending = self.shared.pending();
        let same = |a: &Option<Arc<Service>>, b: &Option<Arc<Service>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        for (name, svc) in &update.services {
            if pending.services.get(name).is_some_and(|p| same(p, svc)) {
                pending.services.remove(name);
            }
        }
        if let Some(w) = &update.workloads
            && pending
                .workloads
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, w))
        {
            pending.workloads = None;
        }
        if let Some(m) = &update.mesh
            && pending.mesh.as_ref().is_some_and(|p| Arc::ptr_eq(p, m))
        {
            pending.mesh = None;
        }
        let done =
            pending.services.is_empty() && pending.workloads.is_none() && pending.mesh.is_none();
        if done {
            let now = Instant::now();
            for (kind, at) in std::mem::take(&mut pending.arrived) {
                self.shared
                    .metrics
                    .to_kernel(kind.name(), now.duration_since(at).as_secs_f64());
            }
        }
        drop(pending);
        for (name, svc) in update.services {
            match svc {
                Some(svc) => {
                    self.current.services.insert(name, svc);
                }
                None => {
                    self.current.services.remove(&name);
                }
            }
        }
        if let Some(w) = update.workloads {
            self.current.workloads = w;
        }
        if let Some(m) = update.mesh {
            self.current.mesh = m;
        }
    }

    /// Why the agent is not ready: a watch failing for too long.
    pub fn readiness(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || {
            let broken = shared
                .broken_since
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match broken
                .iter()
                .find(|(_, since)| since.elapsed() > shared.stale_after)
            {
                Some((kind, since)) => Err(format!(
                    "the {} watch has been failing for {} s",
                    kind.name(),
                    since.elapsed().as_secs()
                )),
                None => Ok(()),
            }
        }
    }
}

impl KubeChanges {
    /// Waits until something new is pending, or until a change still
    /// pending (the agent refused it) is due to be tried again.
    /// Cancel-safe.
    pub async fn next(&mut self) {
        loop {
            let notified = self.shared.changed.notified();
            let (empty, version) = {
                let p = self.shared.pending();
                (p.is_empty(), p.version)
            };
            if !empty && version != self.seen {
                self.seen = version;
                self.retry_at = tokio::time::Instant::now() + RETRY_REFUSED;
                return;
            }
            if empty {
                notified.await;
                continue;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(self.retry_at) => {
                    self.retry_at = tokio::time::Instant::now() + RETRY_REFUSED;
                    return;
                }
            }
        }
    }
}

async fn client(opts: &KubeOptions) -> Result<Client, KubeError> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let fail = |source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(fail)?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(fail)?
        }
        None => kube::Config::incluster().map_err(KubeError::InCluster)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// One watcher event of any kind. Each is moved once, from the stream to
/// the index, so the size of the largest does not matter.
#[allow(clippy::large_enum_variant)]
enum Watched {
    Service(Event<KubeService>),
    Slice(Event<EndpointSlice>),
    Pod(Event<Pod>),
    PeerPod(Event<Pod>),
    Failed(Kind, watcher::Error),
    Nodes(BTreeMap<String, NodeFacts>),
}

type Events = Pin<Box<dyn Stream<Item = Watched> + Send>>;

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(Event<K>) -> Watched,
) -> Events
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    Box::pin(
        watcher::watcher(api, config)
            .default_backoff()
            .map(move |r| match r {
                Ok(e) => wrap(e),
                Err(e) => Watched::Failed(kind, e),
            }),
    )
}

/// The watchers' task: runs until the source is dropped.
async fn run(
    client: Client,
    opts: KubeOptions,
    shared: Arc<Shared>,
    mut views: tokio::sync::mpsc::UnboundedReceiver<ViewRequest>,
) {
    let streams = vec![
        watch(
            Api::<KubeService>::all(client.clone()),
            watcher::Config::default().labels(PROXIED),
            Kind::Service,
            Watched::Service,
        ),
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(PROXIED),
            Kind::EndpointSlice,
            Watched::Slice,
        ),
        watch(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name)),
            Kind::Pod,
            Watched::Pod,
        ),
    ];
    let mut streams = streams;
    if opts.peer_identities {
        streams.push(watch(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            Kind::PeerPod,
            Watched::PeerPod,
        ));
    }
    let (nodes_tx, nodes_rx) = tokio::sync::mpsc::unbounded_channel();
    let (wanted_tx, wanted_rx) =
        tokio::sync::watch::channel(BTreeSet::from([opts.node_name.clone()]));
    let poller = tokio::spawn(poll_nodes(
        Api::<KubeNode>::all(client),
        opts.node_name.clone(),
        wanted_rx,
        opts.node_refresh,
        nodes_tx,
        shared.clone(),
    ));
    let nodes = Box::pin(tokio_stream_from(nodes_rx).map(Watched::Nodes)) as Events;
    let mut events = futures_util::stream::select_all(streams.into_iter().chain([nodes]));
    let mut index = Index::new(&opts);
    loop {
        let first = tokio::select! {
            first = events.next() => match first {
                Some(first) => first,
                None => break,
            },
            Some(reply) = views.recv() => {
                let _ = reply.send(index.view());
                continue;
            }
        };
        let arrived = Instant::now();
        let mut kinds = BTreeSet::new();
        // Take every event already waiting: one translation for a burst.
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match futures_util::FutureExt::now_or_never(events.next()) {
                Some(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        for event in batch {
            if let Some(kind) = index.take(event, &shared) {
                kinds.insert(kind);
            }
        }
        let _ = wanted_tx.send_if_modified(|wanted| {
            let now = index.wanted_nodes();
            let changed = *wanted != now;
            *wanted = now;
            changed
        });
        index.publish(&shared, &kinds, arrived);
    }
    poller.abort();
}

/// An unbounded receiver as a stream (without pulling in tokio-stream).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Records whether `kind`'s watch is failing now.
fn mark(shared: &Shared, kind: Kind, failing: bool) {
    let mut broken = shared
        .broken_since
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if failing {
        broken.entry(kind).or_insert_with(Instant::now);
    } else {
        broken.remove(&kind);
    }
}
