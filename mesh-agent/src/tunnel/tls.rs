//! What the tunnel needs from the TLS layer (the `identity` module provides
//! it): a client config per destination node, a server config re-read for
//! every accepted connection (so rotation needs no restart), and a check of
//! the peer's chain that names the peer.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;

use super::hbone::ALPN_H2;
use super::lifetime::Validity;

/// What outbound dials one peer node with.
#[derive(Clone, Debug)]
pub struct OutboundTlsConfig {
    /// TLS 1.3 only; ALPN is forced to `h2` if the config lacks it.
    pub config: Arc<rustls::ClientConfig>,
    /// The name sent as SNI and handed to the config's verifier.
    pub server_name: ServerName<'static>,
    /// When our certificate in `config` expires, for `meshctl tunnels`
    /// and the connection's lifetime.
    pub local_cert_not_after: Option<SystemTime>,
    /// When it became valid: with `local_cert_not_after`, its lifetime,
    /// of which the retirement margin is a fraction.
    pub local_cert_not_before: Option<SystemTime>,
    /// The credentials generation `config` presents (see
    /// [`OutboundTls::generations`]).
    pub generation: u64,
}

/// What inbound serves one accepted connection with.
#[derive(Clone, Debug)]
pub struct InboundTlsConfig {
    /// Must require client certificates; ALPN is forced to `h2`.
    pub config: Arc<rustls::ServerConfig>,
    pub local_cert_not_after: Option<SystemTime>,
    pub local_cert_not_before: Option<SystemTime>,
}

/// Our certificate's window from what a TLS config said, if it said both.
pub(crate) fn local_validity(
    not_before: Option<SystemTime>,
    not_after: Option<SystemTime>,
) -> Option<Validity> {
    Some(Validity {
        not_before: not_before?,
        not_after: not_after?,
    })
}

/// Why no TLS config could be had (the handshake is not attempted).
#[derive(Debug, Clone, thiserror::Error)]
#[error("no TLS configuration: {0}")]
pub struct TlsSetupError(pub String);

/// Why a verified peer chain is still not accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer certificate rejected: {0}")]
pub struct PeerRejected(pub String);

pub trait OutboundTls: Send + Sync + 'static {
    /// The config to reach `node_name` as `source_identity`'s node. Called
    /// for every new connection, never per stream.
    fn client_config(
        &self,
        source_identity: &str,
        node_name: &str,
    ) -> Result<OutboundTlsConfig, TlsSetupError>;

    /// This node's credentials generation, which changes whenever its
    /// certificate or trust bundle was reloaded: connections opened with an
    /// older one are retired (see `lifetime`). `None`: never changes.
    fn generations(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

pub trait InboundTls: Send + Sync + 'static {
    /// Called for every accepted connection.
    fn server_config(&self) -> Result<InboundTlsConfig, TlsSetupError>;

    /// After a handshake the config's verifier accepted: who the peer is
    /// (e.g. its node name), from its chain, leaf first.
    fn peer_identity(&self, chain: &[CertificateDer<'static>]) -> Result<String, PeerRejected>;
}

/// `config` with ALPN exactly `h2`, cloned only when it is not already.
pub(crate) fn client_with_alpn(config: Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    if config.alpn_protocols == [ALPN_H2] {
        return config;
    }
    let mut owned = (*config).clone();
    owned.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(owned)
}

pub(crate) fn server_with_alpn(config: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    if config.alpn_protocols == [ALPN_H2] {
        return config;
    }
    let mut owned = (*config).clone();
    owned.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(owned)
}

/// The notAfter of a DER certificate, for [`OutboundTlsConfig::local_cert_not_after`].
pub fn cert_not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    cert_validity(cert).map(|v| v.not_after)
}

/// The validity window of a DER certificate (e.g. the peer's leaf).
pub fn cert_validity(cert: &CertificateDer<'_>) -> Option<Validity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let time = |secs: i64| {
        let secs = u64::try_from(secs).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_secs(secs))
    };
    Some(Validity {
        not_before: time(parsed.validity().not_before.timestamp())?,
        not_after: time(parsed.validity().not_after.timestamp())?,
    })
}

/// The peer's leaf validity from a chain, leaf first.
pub(crate) fn peer_validity(chain: Option<&[CertificateDer<'_>]>) -> Option<Validity> {
    chain.and_then(|c| c.first()).and_then(cert_validity)
}
