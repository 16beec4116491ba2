//! The tunnel as one node runs it: this node's credentials (`identity`),
//! the kernel's capture (`bpf::TunnelOrigins`), and where each backend is
//! (from the applied state). The agent starts it, hands it every new
//! state, and shuts it down; everything else happens here.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{
    Admit, Authorizer, Deny, Destination, Inbound, InboundPolicy, InboundTls, InboundTlsConfig,
    Outbound, OutboundTls, OutboundTlsConfig, PeerInfo, PeerSnapshot, Tunnel, TunnelConfig,
    TunnelMetrics, socket,
    tls::{PeerRejected, TlsSetupError},
};
use crate::bpf::TunnelOrigins;
use crate::identity::{
    self, Authorization, CertInfo, HeldIdentity, IdentityError, IdentityMetrics, NodeCredentials,
    WatchSettings,
};
use crate::state::{Mesh, Node, ServiceSet, Workload, spiffe_id_of};

/// Receive buffer of the client leg's sockets (see `NodeTunnel::start`).
const CLIENT_RCVBUF: usize = 1 << 20;

/// Where the tunnel listens and who this node is to its peers.
#[derive(Clone, Debug)]
pub struct TunnelSettings {
    /// cert.pem, key.pem and bundle.pem of this node (`meshctl ca issue`).
    pub identity_dir: std::path::PathBuf,
    /// Where the kernel sends captured connections: one listener per family,
    /// on one port (the kernel keeps one).
    pub outbound_v4: std::net::SocketAddrV4,
    pub outbound_v6: std::net::SocketAddrV6,
    /// HBONE from other nodes' agents.
    pub inbound: SocketAddr,
    /// How long a stopping agent lets its tunnelled connections finish.
    pub drain_timeout: Duration,
    /// Data-plane threads. Each runs a single-threaded runtime with its own
    /// listeners (SO_REUSEPORT: the kernel spreads connections over them)
    /// and its own pool, so a connection's tasks, its h2 connection and its
    /// sockets stay on one thread: no cross-thread wakeup on any hop.
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeTunnelError {
    #[error("node identity in {dir}: {source}")]
    Identity {
        dir: String,
        #[source]
        source: IdentityError,
    },
    #[error(
        "the certificate in {dir} is node '{cert}''s, but this agent is --node-name '{flag}'; issue this node's own (meshctl ca issue --node {flag}) or fix --node-name"
    )]
    WrongNode {
        dir: String,
        cert: String,
        flag: String,
    },
    #[error("cannot start the tunnel's data-plane threads: {0}")]
    Threads(std::io::Error),
    #[error("cannot listen on {addr} for the tunnel: {source}; is another program using it?")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] super::ConfigError),
}

/// Why an accepted outbound socket has no destination (it is reset).
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("no address: {0}")]
    Address(#[from] std::io::Error),
    #[error("the kernel recorded no tunnelled connect from {0}")]
    NotCaptured(SocketAddr),
    #[error("backend {0} is on no known node (the configuration changed since the connect?)")]
    UnknownBackend(SocketAddr),
}

/// What the tunnel needs of one applied state.
pub struct TunnelView<'a> {
    pub services: &'a ServiceSet,
    pub mesh: &'a Mesh,
    pub workloads: &'a [Workload],
    /// Identity names and the ids the kernel records them by
    /// (`Reconciler::identities`).
    pub identities: &'a BTreeMap<String, u32>,
}

/// Where the backends are and who may reach this node's, as of the last
/// applied state.
#[derive(Debug, Default)]
struct Placement {
    nodes: BTreeMap<String, Node>,
    /// Backends on other nodes, by address, and their node.
    remote: HashMap<SocketAddr, String>,
    /// This node's backends (what inbound streams may ask for) and their
    /// policies.
    authorization: Authorization,
    /// Kernel identity id → the SPIFFE ID a stream from such a client claims.
    claims: HashMap<u32, String>,
}

impl Placement {
    fn of(node: &str, trust_domain: &str, view: TunnelView<'_>) -> Self {
        let mut placement = Placement {
            nodes: view
                .mesh
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            authorization: Authorization::of(
                node,
                trust_domain,
                view.services.iter(),
                view.workloads,
            ),
            claims: view
                .identities
                .iter()
                .map(|(name, &id)| (id, spiffe_id_of(name, trust_domain)))
                .collect(),
            ..Default::default()
        };
        for b in view.services.iter().flat_map(|s| &s.backends) {
            if let Some(n) = b.node.as_deref()
                && n != node
            {
                placement.remote.insert(b.socket_addr(), n.to_owned());
            }
        }
        placement
    }
}

/// The destination's check of each stream, against the current placement.
struct PlacementAuthorizer(Arc<RwLock<Arc<Placement>>>);

impl Authorizer for PlacementAuthorizer {
    fn authorize(
        &self,
        peer: &PeerInfo,
        source_identity: Option<&str>,
        backend: SocketAddr,
    ) -> Result<Admit, Deny> {
        read(&self.0)
            .authorization
            .authorize(&peer.identity, source_identity, backend)
            .map(|admitted| Some(admitted.service))
            .map_err(|refusal| Deny {
                reason: refusal.reason(),
                detail: refusal.to_string(),
            })
    }
}

/// This node's tunnel: outbound listeners for the kernel's captures, the
/// inbound HBONE listener, and the pool between them and other nodes.
pub struct NodeTunnel {
    tunnel: Tunnel,
    /// One per data-plane thread.
    shards: Vec<Shard>,
    /// Reads `placement`; given to inbound again after each update so that
    /// it checks its open streams against the new state.
    policy: InboundPolicy,
    credentials: NodeCredentials,
    node: String,
    placement: Arc<RwLock<Arc<Placement>>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    drain_timeout: Duration,
}

impl NodeTunnel {
    /// Loads the identity, binds the listeners (SO_REUSEPORT: a new agent
    /// takes new connections while an old one drains) and starts serving.
    pub fn start(
        settings: &TunnelSettings,
        node: &str,
        socket_mark: u32,
        origins: TunnelOrigins,
        metrics: TunnelMetrics,
        identity_metrics: IdentityMetrics,
    ) -> Result<NodeTunnel, NodeTunnelError> {
        let dir = settings.identity_dir.display().to_string();
        let credentials = NodeCredentials::load(&settings.identity_dir).map_err(|source| {
            NodeTunnelError::Identity {
                dir: dir.clone(),
                source,
            }
        })?;
        if credentials.node_name() != node {
            return Err(NodeTunnelError::WrongNode {
                dir,
                cert: credentials.node_name(),
                flag: node.to_owned(),
            });
        }
        let config = TunnelConfig {
            socket_mark: Some(socket_mark),
            ..TunnelConfig::default()
        };
        let tunnel = Tunnel::new(config, metrics)?;
        let tls = Arc::new(IdentityTls(credentials.clone()));
        let placement: Arc<RwLock<Arc<Placement>>> = Arc::default();
        let local = placement.clone();
        let policy = InboundPolicy::new(
            move |addr: SocketAddr| read(&local).authorization.is_local_backend(addr),
            PlacementAuthorizer(placement.clone()),
        );
        let listen = |addr: SocketAddr| {
            socket::reuseport_listener(addr)
                .map_err(|source| NodeTunnelError::Listen { addr, source })
        };
        let mut tasks = Vec::new();
        // Reload on change; the pool sees each new generation and replaces
        // its connections (see `tunnel::lifetime`).
        identity_metrics.hold(&credentials);
        tasks.push(identity::spawn_watcher(
            credentials.clone(),
            identity_metrics,
            WatchSettings::default(),
        ));
        let origins = Arc::new(origins);
        let source_identity = credentials.spiffe_id().to_string();
        let mut shards = Vec::new();
        let mut ipv6 = true;
        for index in 0..settings.threads.max(1) {
            let runtime = data_plane_runtime(index).map_err(NodeTunnelError::Threads)?;
            // Listeners register with the reactor of the runtime entered.
            let entered_runtime = runtime.clone();
            let _entered = entered_runtime.enter();
            let shard = Shard {
                outbound: tunnel.outbound(tls.clone()),
                inbound: tunnel.inbound(tls.clone(), policy.clone()),
                runtime,
            };
            let inbound_listener = listen(settings.inbound)?;
            {
                let inbound = shard.inbound.clone();
                tasks.push(
                    shard
                        .runtime
                        .spawn(async move { inbound.serve(inbound_listener).await }),
                );
            }
            let outbound_addrs = [
                Some(SocketAddr::V4(settings.outbound_v4)),
                ipv6.then_some(SocketAddr::V6(settings.outbound_v6)),
            ];
            for addr in outbound_addrs.into_iter().flatten() {
                let listener = match listen(addr) {
                    Ok(l) => l,
                    // A node without IPv6 keeps its IPv4 listener.
                    Err(e) if addr.is_ipv6() => {
                        warn!("{e}; IPv6 clients of tunnelled services will be refused");
                        ipv6 = false;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                // Accepted sockets inherit it. A client may write and reset
                // at once (an abortive close discards what it has not sent
                // yet), while the stream to the peer is still being opened:
                // a direct connection's peer takes about this much unread,
                // so the tunnel must too, or those bytes never leave the
                // client.
                if let Err(e) =
                    socket2::SockRef::from(&listener).set_recv_buffer_size(CLIENT_RCVBUF)
                {
                    warn!("cannot size the outbound listener's receive buffer: {e}");
                }
                tasks.push(spawn_outbound(
                    &shard,
                    listener,
                    origins.clone(),
                    placement.clone(),
                    source_identity.clone(),
                ));
            }
            drop(_entered);
            shards.push(shard);
        }
        info!(
            node,
            identity = %credentials.spiffe_id(),
            inbound = %settings.inbound,
            outbound = %settings.outbound_v4,
            threads = shards.len(),
            "tunnel listening"
        );
        Ok(NodeTunnel {
            tunnel,
            shards,
            policy,
            credentials,
            node: node.to_owned(),
            placement,
            tasks: std::sync::Mutex::new(tasks),
            drain_timeout: settings.drain_timeout,
        })
    }

    /// Takes the placement and policies of a newly applied state; open
    /// inbound streams that it denies are closed.
    pub fn update(&self, view: TunnelView<'_>) {
        let trust_domain = self.credentials.trust_domain();
        for w in view.workloads.iter().filter(|w| w.is_on(&self.node)) {
            let id = spiffe_id_of(&w.identity, &trust_domain);
            if !id.starts_with(&format!("spiffe://{trust_domain}/")) {
                warn!(
                    workload = %w.name,
                    identity = %id,
                    "workload identity is not of this node's trust domain {trust_domain}: \
                     every peer will refuse its streams; fix its `identity:`"
                );
            }
        }
        let next = Arc::new(Placement::of(&self.node, &trust_domain, view));
        *self.placement.write().unwrap_or_else(|e| e.into_inner()) = next;
        let revoked: usize = self
            .shards
            .iter()
            .map(|s| s.inbound.set_policy(self.policy.clone()))
            .sum();
        if revoked > 0 {
            info!(revoked, "closed open tunnel streams the new policy denies");
        }
    }

    pub fn snapshot(&self) -> Vec<PeerSnapshot> {
        self.tunnel.snapshot()
    }

    pub fn certificate(&self) -> CertInfo {
        self.credentials.info()
    }

    pub fn trust_domain(&self) -> String {
        self.credentials.trust_domain()
    }

    /// The identities this node holds (today: its own), for `meshctl certs`.
    pub fn identities(&self) -> Vec<HeldIdentity> {
        vec![self.credentials.held()]
    }

    /// Stops taking connections, lets open ones finish for the drain
    /// timeout (a successor agent takes the new ones), then resets the rest.
    pub async fn shutdown(&self) {
        let drain = self.drain_timeout;
        info!(?drain, "tunnel draining");
        // All shards drain at once, each within the same timeout.
        let drains: Vec<JoinHandle<()>> = self
            .shards
            .iter()
            .map(|s| {
                let (outbound, inbound) = (s.outbound.clone(), s.inbound.clone());
                tokio::spawn(async move {
                    tokio::join!(outbound.shutdown(drain), inbound.shutdown(drain));
                })
            })
            .collect();
        for drained in drains {
            let _ = drained.await;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            task.abort();
        }
    }
}

fn read(placement: &RwLock<Arc<Placement>>) -> Arc<Placement> {
    placement.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// One data-plane thread's share of the tunnel.
struct Shard {
    outbound: Outbound,
    inbound: Inbound,
    runtime: tokio::runtime::Handle,
}

/// A single-threaded runtime on a thread of its own, running until the
/// process ends; its handle.
fn data_plane_runtime(index: usize) -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name(format!("mesh-tunnel-{index}"))
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

fn spawn_outbound(
    shard: &Shard,
    listener: TcpListener,
    origins: Arc<TunnelOrigins>,
    placement: Arc<RwLock<Arc<Placement>>>,
    source_identity: String,
) -> JoinHandle<()> {
    let outbound = shard.outbound.clone();
    let resolve = move |tcp: &TcpStream, client: SocketAddr| -> Result<Destination, ResolveError> {
        let captured = origins
            .claim(client, tcp.local_addr()?)
            .ok_or(ResolveError::NotCaptured(client))?;
        let placement = read(&placement);
        let node = placement
            .remote
            .get(&captured.backend)
            .and_then(|name| placement.nodes.get(name))
            .ok_or(ResolveError::UnknownBackend(captured.backend))?;
        Ok(Destination {
            node_name: node.name.clone(),
            node_addr: node.tunnel_addr(),
            backend: captured.backend,
            client_addr: client,
            source_identity: source_identity.clone(),
            workload: placement.claims.get(&captured.identity).cloned(),
        })
    };
    shard
        .runtime
        .spawn(async move { outbound.serve(listener, resolve).await })
}

/// The tunnel's TLS from this node's credentials.
struct IdentityTls(NodeCredentials);

impl OutboundTls for IdentityTls {
    fn client_config(
        &self,
        _source_identity: &str,
        node_name: &str,
    ) -> Result<OutboundTlsConfig, TlsSetupError> {
        let info = self.0.info();
        Ok(OutboundTlsConfig {
            config: self.0.client_config(node_name),
            // The peer is checked by its SPIFFE ID, not by name; no SNI
            // goes out for an IP address.
            server_name: ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into()),
            local_cert_not_after: Some(info.not_after_time()),
            local_cert_not_before: Some(info.not_before_time()),
            generation: info.generation,
        })
    }

    fn generations(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.0.subscribe())
    }
}

impl InboundTls for IdentityTls {
    fn server_config(&self) -> Result<InboundTlsConfig, TlsSetupError> {
        let info = self.0.info();
        Ok(InboundTlsConfig {
            config: self.0.server_config(),
            local_cert_not_after: Some(info.not_after_time()),
            local_cert_not_before: Some(info.not_before_time()),
        })
    }

    fn peer_identity(&self, chain: &[CertificateDer<'static>]) -> Result<String, PeerRejected> {
        let id = identity::peer_identity(chain).map_err(|e| PeerRejected(e.to_string()))?;
        id.node_name()
            .map(str::to_owned)
            .ok_or_else(|| PeerRejected(format!("{id} is not a node identity")))
    }
}
