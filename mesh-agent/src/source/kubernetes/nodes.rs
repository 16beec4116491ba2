//! Nodes, read with `get` (the only verb the agent has on them): this
//! node's zone for topology, and the addresses of the nodes hosting
//! endpoints, for the tunnel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::{Api, ResourceExt as _};
use tracing::warn;

use super::{Kind, Shared, mark};

/// What the source needs of a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NodeFacts {
    pub zone: Option<String>,
    pub address: Option<IpAddr>,
}

/// Reads this node and the peers that host endpoints with `get` (the
/// only verb the agent has on Nodes), when the set changes and every
/// `refresh`.
pub(super) async fn poll_nodes(
    api: Api<KubeNode>,
    this_node: String,
    mut wanted: tokio::sync::watch::Receiver<BTreeSet<String>>,
    refresh: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<BTreeMap<String, NodeFacts>>,
    shared: Arc<Shared>,
) {
    let mut tick = tokio::time::interval(refresh);
    let mut known: BTreeMap<String, NodeFacts> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = wanted.changed() => if r.is_err() { return },
        }
        let names = wanted.borrow_and_update().clone();
        let mut read = BTreeMap::new();
        let mut failed = false;
        for name in &names {
            match api.get(name).await {
                Ok(node) => {
                    read.insert(name.clone(), node_facts(&node));
                }
                Err(e) => {
                    // Only this node's own Node counts for readiness: a
                    // peer's missing Node costs only its tunnel address.
                    failed |= *name == this_node;
                    warn!(node = %name, "kubernetes: cannot read the Node: {e}");
                    if let Some(old) = known.get(name) {
                        read.insert(name.clone(), old.clone());
                    }
                }
            }
        }
        mark(&shared, Kind::Node, failed);
        if read != known || !failed && shared.synced.get().is_none() {
            known = read.clone();
            if tx.send(read).is_err() {
                return;
            }
        }
    }
}

fn node_facts(node: &KubeNode) -> NodeFacts {
    let zone = node
        .labels()
        .get("topology.kubernetes.io/zone")
        .filter(|z| !z.is_empty() && !z.chars().any(char::is_control))
        .cloned();
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| a.as_slice())
        .unwrap_or_default();
    let address = ["InternalIP", "ExternalIP"].iter().find_map(|kind| {
        addresses
            .iter()
            .filter(|a| a.type_ == *kind)
            .find_map(|a| a.address.parse::<IpAddr>().ok())
    });
    NodeFacts { zone, address }
}
