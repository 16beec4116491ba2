//! The live connection table behind `meshctl tunnels`: every tunnel
//! connection registers here for its lifetime and counts its streams and
//! bytes in atomics the copy loops bump.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::lifetime::{self, Lifetime, RetireReason};
use super::metrics::Direction;

/// One tunnel connection's live state.
#[derive(Debug)]
pub(crate) struct ConnState {
    pub(crate) id: u64,
    pub(crate) direction: Direction,
    pub(crate) peer_node: String,
    pub(crate) peer_addr: SocketAddr,
    pub(crate) opened: Instant,
    pub(crate) local_cert_not_after: Option<SystemTime>,
    /// What it was opened with: generation and both ends' certificates.
    pub(crate) lifetime: Lifetime,
    /// Why it takes no new streams, once retired.
    pub(crate) retired: Mutex<Option<RetireReason>>,
    pub(crate) streams: AtomicUsize,
    /// Payload bytes into / out of the tunnel on this connection.
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    /// Set once the connection must not take new streams.
    pub(crate) dead: AtomicBool,
}

impl ConnState {
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub(crate) fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }

    /// Takes no new streams from now on, for `reason`; true the first time.
    pub(crate) fn retire(&self, reason: RetireReason) -> bool {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        self.mark_dead();
        if retired.is_some() {
            return false;
        }
        *retired = Some(reason);
        true
    }

    pub(crate) fn retired(&self) -> Option<RetireReason> {
        *self.retired.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
pub(crate) struct Tracker {
    next_id: AtomicU64,
    conns: Arc<Mutex<HashMap<u64, Arc<ConnState>>>>,
}

/// Removes the connection from the table when dropped.
pub(crate) struct Registration {
    conns: Arc<Mutex<HashMap<u64, Arc<ConnState>>>>,
    pub(crate) state: Arc<ConnState>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(&self.state.id);
        }
    }
}

impl Tracker {
    pub(crate) fn register(
        &self,
        direction: Direction,
        peer_node: String,
        peer_addr: SocketAddr,
        lifetime: Lifetime,
    ) -> Registration {
        let state = Arc::new(ConnState {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            direction,
            peer_node,
            peer_addr,
            opened: Instant::now(),
            local_cert_not_after: lifetime.local.map(|v| v.not_after),
            lifetime,
            retired: Mutex::new(None),
            streams: AtomicUsize::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        });
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(state.id, state.clone());
        }
        Registration {
            conns: self.conns.clone(),
            state,
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<PeerSnapshot> {
        let conns: Vec<Arc<ConnState>> = match self.conns.lock() {
            Ok(conns) => conns.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let mut peers: BTreeMap<String, PeerSnapshot> = BTreeMap::new();
        for conn in conns {
            let peer = peers
                .entry(conn.peer_node.clone())
                .or_insert_with(|| PeerSnapshot {
                    node: conn.peer_node.clone(),
                    connections: 0,
                    streams: 0,
                    bytes_sent: 0,
                    bytes_received: 0,
                    conns: Vec::new(),
                });
            let c = ConnSnapshot {
                id: conn.id,
                direction: conn.direction,
                peer_addr: conn.peer_addr,
                age_secs: conn.opened.elapsed().as_secs_f64(),
                streams: conn.streams.load(Ordering::Relaxed),
                bytes_sent: conn.bytes_sent.load(Ordering::Relaxed),
                bytes_received: conn.bytes_received.load(Ordering::Relaxed),
                draining: conn.is_dead(),
                local_cert_not_after_unix: conn
                    .local_cert_not_after
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                peer_cert_not_after_unix: conn
                    .lifetime
                    .peer
                    .and_then(|v| lifetime::unix_secs(v.not_after)),
                opened_unix_ms: conn
                    .lifetime
                    .opened
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                generation: conn.lifetime.generation,
                retire_at_unix: conn.lifetime.retire_at().and_then(lifetime::unix_secs),
                close_at_unix: conn.lifetime.close_at().and_then(lifetime::unix_secs),
                retired: conn.retired().map(|r| r.as_str().to_owned()),
            };
            peer.connections += 1;
            peer.streams += c.streams;
            peer.bytes_sent += c.bytes_sent;
            peer.bytes_received += c.bytes_received;
            peer.conns.push(c);
        }
        let mut out: Vec<PeerSnapshot> = peers.into_values().collect();
        for peer in &mut out {
            peer.conns.sort_by_key(|c| c.id);
        }
        out
    }
}

/// One peer node's tunnel connections (both directions).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct PeerSnapshot {
    pub node: String,
    pub connections: usize,
    pub streams: usize,
    /// Payload bytes this node sent to / received from the peer.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub conns: Vec<ConnSnapshot>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ConnSnapshot {
    pub id: u64,
    pub direction: Direction,
    pub peer_addr: SocketAddr,
    pub age_secs: f64,
    pub streams: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// No longer takes new streams (GOAWAY, ping timeout, shutdown).
    pub draining: bool,
    /// Our certificate's notAfter on this connection, if the TLS layer said.
    pub local_cert_not_after_unix: Option<u64>,
    /// The peer's certificate's notAfter.
    #[serde(default)]
    pub peer_cert_not_after_unix: Option<u64>,
    /// When it was opened (wall clock, ms).
    #[serde(default)]
    pub opened_unix_ms: u64,
    /// This node's credentials generation it was opened with.
    #[serde(default)]
    pub generation: u64,
    /// From when it takes no new streams for expiry, and when it is closed
    /// outright (streams still open are reset): see docs/HBONE.md.
    #[serde(default)]
    pub retire_at_unix: Option<u64>,
    #[serde(default)]
    pub close_at_unix: Option<u64>,
    /// `rotation` or `expiry` once retired (it then takes no new streams
    /// and closes when its last stream ends).
    #[serde(default)]
    pub retired: Option<String>,
}
