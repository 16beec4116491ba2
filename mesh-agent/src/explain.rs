//! `meshctl explain`: what the kernel would do with a connect from a given
//! client to a service, and why, computed from the same maps and the same
//! hash the programs use.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use mesh_common::{AffinityKey, SERVICE_AFFINITY, VERDICT_ALLOW, VERDICT_DENY};
use serde::{Deserialize, Serialize};

use crate::bpf::Maps;
use crate::identity::ResolvedPolicy;
use crate::reconcile::{Reconciler, service_keys};
use crate::state::{Algorithm, ServiceSet, spiffe_id_of};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExplainResponse {
    pub service: String,
    pub protocol: String,
    pub algorithm: String,
    pub client: Option<ClientView>,
    /// Why the client may or may not connect.
    pub policy: String,
    /// forward, or refuse with the errno the application would get.
    pub verdict: String,
    /// How the backend is picked, in words.
    pub decision: String,
    /// The backend a connect from this client gets now, when that is
    /// determined (Maglev, or a live affinity entry).
    pub chosen: Option<String>,
    pub candidates: Vec<CandidateView>,
    /// Backends on other nodes, reached through the tunnel: the identity a
    /// connection carries there and what the destination makes of it.
    #[serde(default)]
    pub remote: Vec<RemoteView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteView {
    pub backend: String,
    pub node: String,
    /// The SPIFFE ID the stream claims; `None`: no workload identity.
    pub identity: Option<String>,
    /// Whether the destination's policy lets it through, and why.
    pub destination: String,
}

/// Where the explaining node stands in the mesh.
pub struct Vantage<'a> {
    pub node: &'a str,
    pub trust_domain: &'a str,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientView {
    pub cgroup: String,
    pub cgroup_id: u64,
    /// The id the kernel keys Maglev and affinity by: the network-namespace
    /// cookie, or the cgroup id for host-network clients.
    pub client_id: u64,
    pub identity: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CandidateView {
    pub backend: String,
    pub slots: u32,
    /// Share of new connections from a random pick (weighted), or of clients
    /// (Maglev).
    pub share: f64,
    pub live_connections: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("no service named '{0}'; `meshctl services` lists them")]
    UnknownService(String),
    #[error("cannot read cgroup {path}: {reason}")]
    Cgroup { path: String, reason: String },
}

pub fn explain(
    desired: &ServiceSet,
    reconciler: &Reconciler,
    maps: &Maps,
    service: &str,
    cgroup: Option<&Path>,
    host_netns_cookie: u64,
    vantage: &Vantage<'_>,
) -> Result<ExplainResponse, ExplainError> {
    let svc = desired
        .get(service)
        .ok_or_else(|| ExplainError::UnknownService(service.to_owned()))?;
    let key = service_keys(svc)
        .next()
        .expect("every service has a protocol");
    let programmed = reconciler.service(&key);
    let client = cgroup
        .map(|path| client_view(path, reconciler, maps, host_netns_cookie))
        .transpose()?;

    let identity_id = client.as_ref().map_or(0, |c| identity_id(c, maps));
    let policy = if !svc.policy.is_active() {
        "no policy: every client may connect".to_owned()
    } else {
        let verdict = programmed.and_then(|p| {
            maps.policy
                .get(
                    &mesh_common::PolicyKey {
                        identity: identity_id,
                        service_id: p.id(),
                    },
                    0,
                )
                .ok()
        });
        let who = client
            .as_ref()
            .and_then(|c| c.identity.clone())
            .map_or("a client with no identity".to_owned(), |i| {
                format!("identity '{i}'")
            });
        match verdict.map(|v| v.verdict) {
            Some(VERDICT_ALLOW) => format!("allowed: {who} is on the allow list"),
            Some(VERDICT_DENY) => format!("denied: {who} is on the deny list"),
            _ if svc.policy.default_deny => {
                format!("denied: {who} is not allowed and the default is deny")
            }
            _ => format!("allowed: {who} is not listed and the default is allow"),
        }
    };
    let denied = policy.starts_with("denied");

    let slots = programmed.map_or(&[][..], |p| p.slots.as_slice());
    let by_id: std::collections::BTreeMap<u32, SocketAddr> = programmed
        .map(|p| {
            p.backends
                .iter()
                .map(|(&(ip, port), &id)| (id, SocketAddr::new(ip, port)))
                .collect()
        })
        .unwrap_or_default();
    let candidates: Vec<CandidateView> = by_id
        .iter()
        .map(|(&id, addr)| {
            let held = slots.iter().filter(|&&s| s == id).count() as u32;
            CandidateView {
                backend: addr.to_string(),
                slots: held,
                share: if slots.is_empty() {
                    0.0
                } else {
                    f64::from(held) / slots.len() as f64
                },
                live_connections: maps.backend_active(id),
            }
        })
        .filter(|c| c.slots > 0)
        .collect();

    let mut chosen = None;
    let mut decision = match svc.algorithm {
        Algorithm::Weighted => format!(
            "weighted: a random slot of {}; each backend's chance is its share of the slots",
            slots.len()
        ),
        Algorithm::LeastConn => format!(
            "least-conn: two different random slots of {}; the backend with fewer live connections wins",
            slots.len()
        ),
        Algorithm::Maglev => match (&client, programmed) {
            (Some(c), Some(p)) if !slots.is_empty() => {
                let slot = mesh_common::maglev_slot(c.client_id, p.id(), slots.len() as u32);
                let backend = by_id.get(&slots[slot as usize]).map(|a| a.to_string());
                chosen = backend.clone();
                format!(
                    "maglev: hash(client {}) → slot {slot} of {} → {}",
                    c.client_id,
                    slots.len(),
                    backend.unwrap_or_default()
                )
            }
            _ => format!(
                "maglev: hash(client) picks one of {} slots; name a client with --client to see which",
                slots.len()
            ),
        },
    };
    if let (Some(c), Some(p)) = (&client, programmed)
        && p.value.flags & SERVICE_AFFINITY != 0
    {
        let key = AffinityKey {
            service_id: p.id(),
            _pad: 0,
            client: c.client_id,
        };
        let now_ns = monotonic_ns();
        let timeout_ns = u64::from(p.value.affinity_timeout_s) * 1_000_000_000;
        match maps.affinity.get(&key, 0) {
            Ok(entry) if now_ns.saturating_sub(entry.last_used_ns) < timeout_ns => {
                let backend = by_id.get(&entry.backend_id).map(|a| a.to_string());
                let left = (timeout_ns - (now_ns - entry.last_used_ns)) / 1_000_000_000;
                decision = format!(
                    "affinity: the client is pinned to {} for {left} s more (then: {decision})",
                    backend.clone().unwrap_or_default()
                );
                chosen = backend;
            }
            _ => decision = format!("affinity: no live entry for this client, so {decision}"),
        }
    }
    let verdict = if denied {
        "refuse: connect() fails with EPERM".to_owned()
    } else if slots.is_empty() {
        "refuse: no usable backend, connect() fails with ECONNREFUSED".to_owned()
    } else {
        "forward".to_owned()
    };
    let remote = remote_views(svc, &desired.workloads, client.as_ref(), vantage);
    Ok(ExplainResponse {
        service: svc.name.clone(),
        protocol: svc.protocol.to_string(),
        algorithm: svc.algorithm.to_string(),
        client,
        policy,
        verdict,
        decision,
        chosen: if denied { None } else { chosen },
        candidates,
        remote,
    })
}

/// What each tunnelled backend's node would make of a stream from `client`
/// (in file mode every node reads the same policies and workloads).
fn remote_views(
    svc: &crate::state::Service,
    workloads: &[crate::state::Workload],
    client: Option<&ClientView>,
    vantage: &Vantage<'_>,
) -> Vec<RemoteView> {
    let td = vantage.trust_domain;
    svc.backends
        .iter()
        .filter(|b| b.tunnel)
        .map(|b| {
            let node = b.node.clone().unwrap_or_default();
            let Some(client) = client else {
                return RemoteView {
                    backend: b.socket_addr().to_string(),
                    node,
                    identity: None,
                    destination: "name a client with --client to see the identity it carries"
                        .into(),
                };
            };
            let identity = client.identity.as_deref().map(|i| spiffe_id_of(i, td));
            let hosted = client.identity.as_deref().is_none_or(|name| {
                workloads
                    .iter()
                    .any(|w| w.identity == name && w.is_hosted_by(vantage.node))
            });
            let destination = if hosted {
                let rule = ResolvedPolicy::of(&svc.policy, td).rule_for(identity.as_deref());
                format!("node '{node}': {}", rule.describe())
            } else {
                format!(
                    "node '{node}' refuses the stream (401 not_hosted): no workload of this \
                     identity names node '{}' in `workloads:`",
                    vantage.node
                )
            };
            RemoteView {
                backend: b.socket_addr().to_string(),
                node,
                identity,
                destination,
            }
        })
        .collect()
}

fn client_view(
    path: &Path,
    reconciler: &Reconciler,
    maps: &Maps,
    host_netns_cookie: u64,
) -> Result<ClientView, ExplainError> {
    let cgroup_id = std::fs::metadata(path)
        .map_err(|e| ExplainError::Cgroup {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?
        .ino();
    let netns = crate::destroy::netns_cookie_of_cgroup(path).unwrap_or(host_netns_cookie);
    let client_id = if netns == host_netns_cookie {
        cgroup_id
    } else {
        netns
    };
    let mut view = ClientView {
        cgroup: path.display().to_string(),
        cgroup_id,
        client_id,
        identity: None,
    };
    let id = identity_id(&view, maps);
    view.identity = (id != 0).then(|| {
        reconciler
            .identity_name(id)
            .map_or_else(|| format!("#{id}"), str::to_owned)
    });
    Ok(view)
}

/// The identity of the cgroup or its nearest registered ancestor, as the
/// kernel finds it.
fn identity_id(client: &ClientView, maps: &Maps) -> u32 {
    let mut dir = Some(Path::new(&client.cgroup));
    while let Some(d) = dir {
        if let Ok(meta) = std::fs::metadata(d)
            && let Ok(id) = maps.workloads.get(&meta.ino(), 0)
        {
            return id;
        }
        dir = d.parent();
    }
    0
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; bpf_ktime_get_ns() is CLOCK_MONOTONIC.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
