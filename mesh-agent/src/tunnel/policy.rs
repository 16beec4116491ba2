//! Inbound's questions about a stream: is the authority a backend this node
//! serves (else 400), and may this peer reach it (else 401). Both answers
//! change with the cluster's state, so [`InboundPolicy`] is swapped at run
//! time with [`super::Inbound::set_policy`].

use std::{net::SocketAddr, sync::Arc};

/// The authenticated far end of an inbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// What [`super::InboundTls::peer_identity`] returned (e.g. node name).
    pub identity: String,
    /// The peer agent's socket address.
    pub addr: SocketAddr,
}

/// An authorization refusal (answered 401, or the stream closed when it
/// was already open).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Deny {
    /// A short stable label for metrics (`denied`, `not_hosted`, ...).
    pub reason: &'static str,
    pub detail: String,
}

pub trait LocalBackends: Send + Sync + 'static {
    fn is_local_backend(&self, addr: SocketAddr) -> bool;
}

impl<F> LocalBackends for F
where
    F: Fn(SocketAddr) -> bool + Send + Sync + 'static,
{
    fn is_local_backend(&self, addr: SocketAddr) -> bool {
        self(addr)
    }
}

pub trait Authorizer: Send + Sync + 'static {
    /// `source_identity` is the workload identity the stream claims
    /// (`x-mesh-source-identity`); checking it against what `peer` hosts is
    /// this hook's job. Called for each new stream, and again for the open
    /// ones when the policy is replaced.
    fn authorize(
        &self,
        peer: &PeerInfo,
        source_identity: Option<&str>,
        backend: SocketAddr,
    ) -> Result<Admit, Deny>;
}

/// What an authorizer admitted a stream as: the destination service whose
/// policy let it through, when it knows one (for per-service metrics).
pub type Admit = Option<String>;

impl<F> Authorizer for F
where
    F: Fn(&PeerInfo, Option<&str>, SocketAddr) -> Result<Admit, Deny> + Send + Sync + 'static,
{
    fn authorize(
        &self,
        peer: &PeerInfo,
        source_identity: Option<&str>,
        backend: SocketAddr,
    ) -> Result<Admit, Deny> {
        self(peer, source_identity, backend)
    }
}

/// Lets every stream through (until the identity module's check exists).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: &PeerInfo, _: Option<&str>, _: SocketAddr) -> Result<Admit, Deny> {
        Ok(None)
    }
}

#[derive(Clone)]
pub struct InboundPolicy {
    pub backends: Arc<dyn LocalBackends>,
    pub authorizer: Arc<dyn Authorizer>,
}

impl InboundPolicy {
    pub fn new(backends: impl LocalBackends, authorizer: impl Authorizer) -> Self {
        Self {
            backends: Arc::new(backends),
            authorizer: Arc::new(authorizer),
        }
    }
}
