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
        local_cert_not_after: Option<SystemTime>,
    ) -> Registration {
        let state = Arc::new(ConnState {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            direction,
            peer_node,
            peer_addr,
            opened: Instant::now(),
            local_cert_not_after,
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
}
