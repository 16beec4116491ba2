//! A Kubernetes API server for tests, since none can be installed here. It
//! speaks the real paths and protocol for what a node agent watches —
//! Services, EndpointSlices, Pods and Nodes — so that kube-rs's watcher,
//! kubectl and the agent meet it as they would a real kube-apiserver:
//!
//! - discovery (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`),
//!   and a `Status` object for every failure (404 for anything else);
//! - lists with the real `resourceVersion`/`resourceVersionMatch` semantics,
//!   `limit`/`continue` paging over one consistent snapshot, label and
//!   field selectors, and 410 Expired after [`KubeApi::compact`];
//! - watches as chunked JSON events from a given version, with selectors
//!   applied as the watch cache applies them, BOOKMARKs, the 410 ERROR
//!   event for a compacted version, `timeoutSeconds`, `sendInitialEvents`,
//!   and connections dropped on demand ([`KubeApi::break_watches`]).
//!
//! Objects are k8s-openapi values serialized by their own `Serialize`, as
//! the API server sends them. Plain HTTP on 127.0.0.1 only, one thread
//! (a current-thread tokio runtime), stopped and joined on drop.

mod http;
mod kinds;
mod list;
mod query;
mod selector;
mod serve;
mod status;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use thiserror::Error;
use tokio::sync::{Semaphore, watch as signal};

use kinds::KINDS;
use store::{Object, Store};

/// Connections served at once; more are closed at accept (a client
/// retries, as against an overloaded server).
const MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, Error)]
pub enum KubeApiError {
    #[error("test API server: cannot listen on 127.0.0.1: {0}")]
    Listen(#[source] std::io::Error),
    #[error("test API server: cannot start its thread or runtime: {0}")]
    Start(#[source] std::io::Error),
    #[error("cannot write the kubeconfig {path}: {source} (is its directory there and writable?)")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the server's connections and the test's calls share.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// The store's resourceVersion after each change: wakes watches.
    changes: signal::Sender<u64>,
    /// Bumped by `break_watches`: every open watch drops its connection.
    breaks: signal::Sender<u64>,
    bookmarks: signal::Sender<Option<Duration>>,
    requests: Mutex<Vec<String>>,
    watchers: AtomicUsize,
    /// `127.0.0.1:port`, for `/api`'s serverAddressByClientCIDRs.
    address: String,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self, line: String) {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }
}

/// A running test API server (see the module docs).
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: signal::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl KubeApi {
    /// Listens on 127.0.0.1 on a free port and serves on a thread of its own.
    pub fn start() -> Result<KubeApi, KubeApiError> {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(KubeApiError::Listen)?;
        listener
            .set_nonblocking(true)
            .map_err(KubeApiError::Listen)?;
        let addr = listener.local_addr().map_err(KubeApiError::Listen)?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes: signal::Sender::new(0),
            breaks: signal::Sender::new(0),
            bookmarks: signal::Sender::new(None),
            requests: Mutex::new(Vec::new()),
            watchers: AtomicUsize::new(0),
            address: addr.to_string(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(KubeApiError::Start)?;
        let (shutdown, stop) = signal::channel(false);
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kube-api".into())
            .spawn(move || {
                runtime.block_on(accept(listener, served, stop));
                // Dropping the runtime drops every connection task, and
                // with them their sockets.
                drop(runtime);
            })
            .map_err(KubeApiError::Start)?;
        Ok(KubeApi {
            shared,
            addr,
            shutdown,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig for this server (plain HTTP, no credentials)
    /// that kubectl and kube-rs both read; its context's namespace is
    /// "default".
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), KubeApiError> {
        let config = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: mesh-test\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: mesh-test\n  context:\n    cluster: mesh-test\n    user: mesh-test\n    namespace: default\n\
             current-context: mesh-test\n\
             preferences: {{}}\n\
             users:\n\
             - name: mesh-test\n  user: {{}}\n",
            url = self.url()
        );
        std::fs::write(path, config).map_err(|source| KubeApiError::Kubeconfig {
            path: path.to_owned(),
            source,
        })
    }

    /// Creates or replaces `object` (by kind, namespace and name) and
    /// returns its new resourceVersion, announcing ADDED or MODIFIED to
    /// watches. As the real server does, it sets `metadata.resourceVersion`,
    /// and on creation `uid` and `creationTimestamp` unless given; a
    /// namespaced object without a namespace goes to "default". A replace
    /// that changes nothing is no write: it returns the current version and
    /// no watch hears of it.
    ///
    /// Panics if `K` is not one of the served kinds or has no name: both
    /// are mistakes in the test, not conditions to handle.
    pub fn apply<K>(&self, object: &K) -> u64
    where
        K: k8s_openapi::Resource
            + k8s_openapi::Metadata<Ty = ObjectMeta>
            + serde::Serialize
            + Clone,
    {
        let kind = served_kind::<K>();
        let mut object = object.clone();
        let meta = object.metadata_mut();
        let Some(name) = meta.name.clone() else {
            panic!("KubeApi::apply: a {} without metadata.name", K::KIND);
        };
        if KINDS[kind].namespaced {
            meta.namespace.get_or_insert_with(|| "default".into());
        } else {
            meta.namespace = None;
        }
        let key = (meta.namespace.clone().unwrap_or_default(), name);

        let mut store = self.shared.store();
        let existing = store.get(kind, &key).cloned();
        let meta = object.metadata_mut();
        if let Some(existing) = &existing {
            if meta.uid.is_none() {
                meta.uid.clone_from(&existing.uid);
            }
            if meta.creation_timestamp.is_none() {
                meta.creation_timestamp.clone_from(&existing.created);
            }
            // Unchanged but for the version: no write, as the API server.
            meta.resource_version = Some(existing.resource_version.to_string());
            if serde_json::to_string(&object).is_ok_and(|json| json == existing.json) {
                return existing.resource_version;
            }
        } else {
            meta.uid.get_or_insert_with(new_uid);
            meta.creation_timestamp.get_or_insert_with(now);
        }
        let rv = store.next_version();
        object.metadata_mut().resource_version = Some(rv.to_string());
        let json = serde_json::to_string(&object).unwrap_or_default();
        let rv = store.put(kind, Object::new(kind, object.metadata(), json));
        drop(store);
        self.shared.changes.send_replace(rv);
        rv
    }

    /// Deletes the object `K` `namespace/name` (namespace None for
    /// cluster-scoped kinds, or "default"), announcing DELETED with its last
    /// state at the deletion's version, which is returned; None if absent.
    pub fn delete<K: k8s_openapi::Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<u64> {
        let kind = served_kind::<K>();
        let namespace = if KINDS[kind].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        let key = (namespace.to_owned(), name.to_owned());
        let rv = self.shared.store().remove(kind, &key, |last, rv| {
            Object::from_json(kind, last.json_at(rv))
        })?;
        self.shared.changes.send_replace(rv);
        Some(rv)
    }

    /// The stored `K` `namespace/name` as a client would read it.
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: k8s_openapi::Resource + serde::de::DeserializeOwned,
    {
        let kind = served_kind::<K>();
        let namespace = if KINDS[kind].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        let store = self.shared.store();
        let object = store.get(kind, &(namespace.to_owned(), name.to_owned()))?;
        serde_json::from_str(&object.json).ok()
    }

    /// The latest resourceVersion (of any kind, as etcd's revision).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Forgets the history up to now, as etcd's compaction does: a watch
    /// from an older resourceVersion gets a 410 Expired ERROR event, and a
    /// list at an older one (`resourceVersionMatch=Exact`, a continue
    /// token) a 410 Status. Watches already open carry on.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Drops every open watch connection at once, mid-stream (no final
    /// chunk): the client sees the connection end and must watch again.
    pub fn break_watches(&self) {
        self.shared
            .breaks
            .send_modify(|generation| *generation += 1);
    }

    /// Sends a BOOKMARK (with the current resourceVersion) this often on
    /// every watch that allowed them (`allowWatchBookmarks=true`); None,
    /// the default, sends none.
    pub fn set_bookmark_interval(&self, every: impl Into<Option<Duration>>) {
        self.shared.bookmarks.send_replace(every.into());
    }

    /// Every request so far, as `"GET /api/v1/services?limit=500"`.
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Watch streams open now.
    pub fn watchers(&self) -> usize {
        self.shared.watchers.load(Ordering::SeqCst)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: signal::Receiver<bool>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve::connection(stream, shared).await;
                    drop(slot);
                });
            }
            _ = stop.changed() => return,
        }
    }
}

/// The index of `K` among the served kinds; panics for another kind.
fn served_kind<K: k8s_openapi::Resource>() -> usize {
    kinds::by_type(K::API_VERSION, K::KIND).unwrap_or_else(|| {
        panic!(
            "KubeApi serves Services, EndpointSlices, Pods and Nodes, not {} {}",
            K::API_VERSION,
            K::KIND
        )
    })
}

fn now() -> Time {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Time(
        Timestamp::from_second(i64::try_from(seconds).unwrap_or(0))
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

/// A version-4-shaped UUID, unique within this process and unlikely to
/// repeat across processes.
fn new_uid() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x =
        nanos ^ (u64::from(std::process::id()) << 32) ^ NEXT.fetch_add(1, Ordering::Relaxed);
    let mut next = || {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (a, b) = (next(), next());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}
