//! Test-only PKI and plumbing: a CA issued with rcgen, node certificates
//! (DNS SAN = node name), rustls configs using rustls's own WebPKI
//! verifiers, and TLS providers for [`super::Outbound`] / [`super::Inbound`].

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
};

use super::tls::{
    self, InboundTls, InboundTlsConfig, OutboundTls, OutboundTlsConfig, PeerRejected, TlsSetupError,
};

pub(crate) struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub(crate) cert: CertificateDer<'static>,
}

pub(crate) struct NodeCert {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl NodeCert {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

impl TestCa {
    pub(crate) fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub(crate) fn node(&self, node: &str) -> NodeCert {
        self.node_with(node, |_| {})
    }

    /// A node certificate valid from `not_before` to `not_after`.
    pub(crate) fn node_valid(
        &self,
        node: &str,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> NodeCert {
        let secs =
            |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        self.node_with(node, |params| {
            params.not_before = epoch + std::time::Duration::from_secs(secs(not_before));
            params.not_after = epoch + std::time::Duration::from_secs(secs(not_after));
        })
    }

    fn node_with(&self, node: &str, edit: impl FnOnce(&mut CertificateParams)) -> NodeCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![node.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, node);
        edit(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        NodeCert {
            chain: vec![cert.der().clone()],
            key: key.serialize_der(),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        Arc::new(roots)
    }

    pub(crate) fn client_config(&self, cert: &NodeCert) -> Arc<rustls::ClientConfig> {
        let config =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_root_certificates(self.roots())
                .with_client_auth_cert(cert.chain.clone(), cert.key())
                .unwrap();
        Arc::new(config)
    }

    pub(crate) fn server_config(&self, cert: &NodeCert) -> Arc<rustls::ServerConfig> {
        let verifier = WebPkiClientVerifier::builder(self.roots()).build().unwrap();
        let config =
            rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_client_cert_verifier(verifier)
                .with_single_cert(cert.chain.clone(), cert.key())
                .unwrap();
        Arc::new(config)
    }
}

/// Outbound TLS of one node: the same client config for every peer; the
/// peer's certificate must name the node.
pub(crate) struct TestOutboundTls {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) validity: Option<super::lifetime::Validity>,
    /// The credentials generation; bump it to simulate a reload.
    pub(crate) generation: tokio::sync::watch::Sender<u64>,
}

impl TestOutboundTls {
    pub(crate) fn new(ca: &TestCa, node: &str) -> Arc<Self> {
        Self::with_cert(ca, ca.node(node))
    }

    pub(crate) fn with_cert(ca: &TestCa, cert: NodeCert) -> Arc<Self> {
        Arc::new(Self {
            config: ca.client_config(&cert),
            validity: tls::cert_validity(&cert.chain[0]),
            generation: tokio::sync::watch::Sender::new(1),
        })
    }
}

impl OutboundTls for TestOutboundTls {
    fn client_config(
        &self,
        _source: &str,
        node_name: &str,
    ) -> Result<OutboundTlsConfig, TlsSetupError> {
        let server_name = ServerName::try_from(node_name.to_string())
            .map_err(|e| TlsSetupError(format!("node name {node_name:?}: {e}")))?;
        Ok(OutboundTlsConfig {
            config: self.config.clone(),
            server_name,
            local_cert_not_after: self.validity.map(|v| v.not_after),
            local_cert_not_before: self.validity.map(|v| v.not_before),
            generation: *self.generation.borrow(),
        })
    }

    fn generations(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.generation.subscribe())
    }
}

/// Inbound TLS of one node; names the peer by its certificate's CN.
pub(crate) struct TestInboundTls {
    pub(crate) config: Arc<rustls::ServerConfig>,
}

impl TestInboundTls {
    pub(crate) fn new(ca: &TestCa, node: &str) -> Arc<Self> {
        let cert = ca.node(node);
        Arc::new(Self {
            config: ca.server_config(&cert),
        })
    }
}

impl InboundTls for TestInboundTls {
    fn server_config(&self) -> Result<InboundTlsConfig, TlsSetupError> {
        Ok(InboundTlsConfig {
            config: self.config.clone(),
            local_cert_not_after: None,
            local_cert_not_before: None,
        })
    }

    fn peer_identity(&self, chain: &[CertificateDer<'static>]) -> Result<String, PeerRejected> {
        let leaf = chain
            .first()
            .ok_or_else(|| PeerRejected("empty chain".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| PeerRejected(e.to_string()))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| PeerRejected("no CN".into()))?;
        Ok(cn.to_string())
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, to compare large transfers by checksum in messages.
pub(crate) fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}
