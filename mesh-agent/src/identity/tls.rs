//! The rustls configurations of the tunnel: TLS 1.3 only, the two AES-GCM
//! suites, X25519 then P-256 for key exchange, ALPN `h2`, mutual
//! authentication, no session resumption. Certificates come from a resolver
//! and peers are checked by verifiers that both read the current
//! credentials at each handshake.

use std::sync::Arc;

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, ServerConfig, SignatureScheme};

use super::IdentityError;
use super::store::Shared;
use super::verify::{ClientVerifier, ServerVerifier};

/// The only application protocol a tunnel speaks: HTTP/2 (HBONE).
pub const ALPN_H2: &[u8] = b"h2";

/// aws-lc-rs cut down to what the tunnel allows. No post-quantum hybrid
/// (X25519MLKEM768): see docs/SECURITY.md.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    provider.kx_groups = vec![aws_lc_rs::kx_group::X25519, aws_lc_rs::kx_group::SECP256R1];
    Arc::new(provider)
}

/// Presents the current certificate, on both ends of a tunnel.
struct CurrentCert {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentCert").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.shared.current().key.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.shared.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn tls_error(e: rustls::Error) -> IdentityError {
    IdentityError::Tls(e.to_string())
}

pub(crate) fn server_config(
    shared: &Arc<Shared>,
    provider: &Arc<CryptoProvider>,
) -> Result<ServerConfig, IdentityError> {
    let verifier = ClientVerifier::new(shared.clone(), provider.signature_verification_algorithms);
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(CurrentCert {
            shared: shared.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection is a full handshake against the
    // current certificates and bundle.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(config)
}

/// A client configuration whose verifier accepts no one; `client_for`
/// clones it and installs the verifier for one peer.
pub(crate) fn client_template(
    shared: &Arc<Shared>,
    provider: &Arc<CryptoProvider>,
) -> Result<ClientConfig, IdentityError> {
    let nobody = ServerVerifier::new(
        shared.clone(),
        "",
        provider.signature_verification_algorithms,
    );
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(nobody))
        .with_client_cert_resolver(Arc::new(CurrentCert {
            shared: shared.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    // The server name is an IP and means nothing here; do not send it.
    config.enable_sni = false;
    config.enable_early_data = false;
    Ok(config)
}

pub(crate) fn client_for(
    template: &ClientConfig,
    shared: &Arc<Shared>,
    provider: &CryptoProvider,
    peer_node: &str,
) -> ClientConfig {
    let mut config = template.clone();
    let verifier = ServerVerifier::new(
        shared.clone(),
        peer_node,
        provider.signature_verification_algorithms,
    );
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(verifier));
    config
}

/// A short stable label for a failed handshake, for metrics: the reasons of
/// `IdentityError` when our verifier rejected the peer ("unknown_ca",
/// "expired", "not_yet_valid", "wrong_spiffe_id", "wrong_trust_domain",
/// "no_spiffe_id", "bad_certificate", ...), "no_certificate" when the
/// client sent none, "peer_rejected" when the peer's verifier rejected us
/// (we received an alert), else "tls".
pub fn failure_reason(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(cert_error) => match cert_error {
            CertificateError::Other(other) => other
                .0
                .downcast_ref::<IdentityError>()
                .map_or("bad_certificate", IdentityError::reason),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            _ => "bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::AlertReceived(_) => "peer_rejected",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InvalidMessage(_) | rustls::Error::PeerMisbehaved(_) => "protocol",
        _ => "tls",
    }
}

/// `failure_reason` for the `io::Error` tokio-rustls returns; "io" when
/// the failure was not TLS (reset, EOF before the handshake finished).
pub fn io_failure_reason(error: &std::io::Error) -> &'static str {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => failure_reason(tls),
        None => "io",
    }
}
