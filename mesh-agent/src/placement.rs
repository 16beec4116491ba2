//! Where each backend is, and so how this node reaches it: directly, or
//! through the local agent's mTLS tunnel to the backend's node. An overlay
//! like `drain` and `overrides`: it sets `Backend::tunnel`, which the
//! reconciler writes as `BACKEND_FLAG_TUNNEL`, on a service's backends.

use std::sync::Arc;

use crate::state::{Mesh, MtlsMode, Service};

/// This node and the mesh around it, as the overlay needs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// This node's name (`--node-name`).
    pub node: String,
    /// Whether this agent runs the tunnel (it has a node identity).
    pub tunnel_on: bool,
    pub mesh: Arc<Mesh>,
}

impl Placement {
    /// Whether connections from this node to `backend_node` go through the
    /// tunnel for a service of mode `mode`.
    ///
    /// A backend that names no node, or names this one, is reached
    /// directly. One on another node is tunnelled unless the service has
    /// mTLS disabled; without a tunnel on this node a permissive service
    /// falls back to plaintext, while a strict one stays tunnelled, so
    /// the kernel refuses its connections instead of sending them in the
    /// clear.
    pub fn tunnels(&self, backend_node: Option<&str>, mode: MtlsMode) -> bool {
        let remote = backend_node.is_some_and(|n| n != self.node);
        remote
            && match mode {
                MtlsMode::Disabled => false,
                MtlsMode::Permissive => self.tunnel_on,
                MtlsMode::Strict => true,
            }
    }

    /// `svc` with each backend's `tunnel` set; the same `Arc` when nothing
    /// changes, so unchanged services stay unchanged for the reconciler.
    pub fn overlay_service(&self, svc: Arc<Service>) -> Arc<Service> {
        let mode = svc.mtls_mode(&self.mesh);
        let wanted = |b: &crate::state::Backend| self.tunnels(b.node.as_deref(), mode);
        if svc.backends.iter().all(|b| b.tunnel == wanted(b)) {
            return svc;
        }
        let mut svc = (*svc).clone();
        for b in &mut svc.backends {
            b.tunnel = wanted(b);
        }
        Arc::new(svc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_goes_through_the_tunnel() {
        use MtlsMode::*;
        let with = |tunnel_on| Placement {
            node: "a".into(),
            tunnel_on,
            mesh: Arc::default(),
        };
        // (backend's node, mode, tunnel on this node) → tunnelled?
        let table = [
            (None, Strict, true, false),
            (Some("a"), Strict, true, false),
            (Some("a"), Permissive, true, false),
            (Some("b"), Strict, true, true),
            (Some("b"), Permissive, true, true),
            (Some("b"), Disabled, true, false),
            (Some("b"), Strict, false, true),
            (Some("b"), Permissive, false, false),
            (Some("b"), Disabled, false, false),
        ];
        for (node, mode, on, want) in table {
            assert_eq!(
                with(on).tunnels(node, mode),
                want,
                "backend on {node:?}, {mode}, tunnel on: {on}"
            );
        }
    }
}
