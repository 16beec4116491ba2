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

/// The `IdentityError` our verifier put into a rustls error, for a log line
/// that says what was wrong and what to do (rustls itself prints it with
/// `Debug`). None for the standard certificate errors (expired, not yet
/// valid, unknown CA), whose rustls text is clear already.
pub fn identity_error(error: &rustls::Error) -> Option<&IdentityError> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<IdentityError>()
        }
        _ => None,
    }
}

/// `identity_error` for the `io::Error` tokio-rustls returns.
pub fn io_identity_error(error: &std::io::Error) -> Option<&IdentityError> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(identity_error)
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

#[cfg(test)]
mod tests {
    use super::super::ca::Subject;
    use super::super::testutil::*;
    use super::super::{NodeCredentials, SpiffeId};
    use rcgen::SanType;

    fn creds(dir: &TempDir) -> NodeCredentials {
        NodeCredentials::load(dir.path()).unwrap()
    }

    #[tokio::test]
    async fn nodes_a_and_b_speak_mutual_tls13_with_h2_and_aes_gcm() {
        let ca = new_ca(TD);
        let (dir_a, dir_b) = (node_dir(&ca, "a"), node_dir(&ca, "b"));
        let (a, b) = (creds(&dir_a), creds(&dir_b));
        assert_eq!(a.spiffe_id().as_str(), "spiffe://cluster.local/node/a");
        assert_eq!(a.trust_domain(), TD);

        for (server, client, client_name, server_name) in [(&b, &a, "a", "b"), (&a, &b, "b", "a")] {
            let outcome =
                handshake(server.server_config(), client.client_config(server_name)).await;
            let (s, c) = outcome.both_ok();
            assert_eq!(s.version, Some(rustls::ProtocolVersion::TLSv1_3));
            assert_eq!(s.alpn.as_deref(), Some(&b"h2"[..]));
            assert_eq!(c.alpn.as_deref(), Some(&b"h2"[..]));
            assert!(
                matches!(
                    s.suite,
                    Some(
                        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                            | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                    )
                ),
                "{:?}",
                s.suite
            );
            assert_eq!(s.suite, c.suite);
            assert!(!s.resumed);
            let peer = s.peer.expect("the server learns the client's identity");
            assert_eq!(peer.node_name(), Some(client_name));
            assert_eq!(c.server_serial, server.info().serial);
            assert_eq!(c.server_id, Some(server.spiffe_id()));
        }

        // One configuration per peer, reused.
        assert!(std::sync::Arc::ptr_eq(
            &a.client_config("b"),
            &a.client_config("b")
        ));
        assert!(!std::sync::Arc::ptr_eq(
            &a.client_config("b"),
            &a.client_config("c")
        ));
        // A second connection is a full handshake again: no resumption.
        let (s, _) = handshake(b.server_config(), a.client_config("b"))
            .await
            .both_ok();
        assert!(!s.resumed);
    }

    #[tokio::test]
    async fn a_certificate_of_another_ca_is_refused_both_ways() {
        let (ca1, ca2) = (new_ca(TD), new_ca(TD));
        let a = creds(&node_dir(&ca1, "a"));
        // Same trust domain, same CA name, other key.
        let stranger = node_dir(&ca2, "x");
        let outcome = handshake(a.server_config(), raw_client(Some(stranger.path()))).await;
        assert_eq!(outcome.server_reason(), "unknown_ca");
        assert_eq!(outcome.client_reason(), "peer_rejected");

        let fake_b = node_dir(&ca2, "b");
        let outcome = handshake(raw_server(fake_b.path()), a.client_config("b")).await;
        assert_eq!(outcome.client_reason(), "unknown_ca");
        // A real node of the other CA is refused too.
        let other = creds(&node_dir(&ca2, "b"));
        let outcome = handshake(other.server_config(), a.client_config("b")).await;
        assert_eq!(outcome.client_reason(), "unknown_ca");
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_certificates_are_refused() {
        let ca = new_ca(TD);
        let a = creds(&node_dir(&ca, "a"));
        let cases = [
            (window(-7200, -3600), "expired"),
            (window(3600, 7200), "not_yet_valid"),
        ];
        for (validity, reason) in cases {
            let dir = TempDir::new("window");
            issue_into(&ca, Subject::Node("b".into()), validity, dir.path());
            let outcome = handshake(a.server_config(), raw_client(Some(dir.path()))).await;
            assert_eq!(outcome.server_reason(), reason);
            let outcome = handshake(raw_server(dir.path()), a.client_config("b")).await;
            assert_eq!(outcome.client_reason(), reason);
            // And the agent refuses to start with it.
            let err = NodeCredentials::load(dir.path()).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
            assert!(err.to_string().contains("cert.pem"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_client_expecting_node_b_refuses_node_c() {
        let ca = new_ca(TD);
        let a = creds(&node_dir(&ca, "a"));
        let c = creds(&node_dir(&ca, "c"));
        let outcome = handshake(c.server_config(), a.client_config("b")).await;
        assert_eq!(outcome.client_reason(), "wrong_spiffe_id");
        assert_eq!(outcome.server_reason(), "peer_rejected");
        // The rustls error carries the whole story.
        let err = outcome.client.unwrap_err();
        let text = super::io_identity_error(&err).unwrap().to_string();
        assert!(text.contains("spiffe://cluster.local/node/c"), "{text}");
        assert!(
            text.contains("expected spiffe://cluster.local/node/b"),
            "{text}"
        );
        // An invalid peer name matches no one.
        let outcome = handshake(c.server_config(), a.client_config("c/../c")).await;
        assert_eq!(outcome.client_reason(), "wrong_spiffe_id");
    }

    #[tokio::test]
    async fn the_right_ca_but_another_trust_domain_is_refused() {
        let ca = new_ca(TD);
        let a = creds(&node_dir(&ca, "a"));
        let other_td = custom_dir(&ca, "spiffe://other.td/node/b", |_| {});
        let outcome = handshake(a.server_config(), raw_client(Some(other_td.path()))).await;
        assert_eq!(outcome.server_reason(), "wrong_trust_domain");
        let outcome = handshake(raw_server(other_td.path()), a.client_config("b")).await;
        assert_eq!(outcome.client_reason(), "wrong_trust_domain");
    }

    #[tokio::test]
    async fn a_workload_id_on_a_tunnel_certificate_is_refused() {
        let ca = new_ca(TD);
        let a = creds(&node_dir(&ca, "a"));
        let dir = TempDir::new("workload");
        let id = SpiffeId::workload(TD, "default", "web").unwrap();
        issue_into(&ca, Subject::Id(id), window(-60, 3600), dir.path());
        let outcome = handshake(a.server_config(), raw_client(Some(dir.path()))).await;
        assert_eq!(outcome.server_reason(), "wrong_spiffe_id");
        let outcome = handshake(raw_server(dir.path()), a.client_config("b")).await;
        assert_eq!(outcome.client_reason(), "wrong_spiffe_id");
        let err = NodeCredentials::load(dir.path()).unwrap_err();
        assert_eq!(err.reason(), "wrong_spiffe_id");
        assert!(err.to_string().contains("not a node identity"), "{err}");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let ca = new_ca(TD);
        let a = creds(&node_dir(&ca, "a"));
        let outcome = handshake(a.server_config(), raw_client(None)).await;
        assert_eq!(outcome.server_reason(), "no_certificate");
        assert_eq!(outcome.client_reason(), "peer_rejected");
    }

    #[tokio::test]
    async fn certificates_without_exactly_one_spiffe_uri_san_are_refused() {
        let ca = new_ca(TD);
        let a = creds(&node_dir(&ca, "a"));
        let no_san = custom_dir(&ca, "spiffe://cluster.local/node/b", |p| {
            p.subject_alt_names.clear();
        });
        let dns_only = custom_dir(&ca, "spiffe://cluster.local/node/b", |p| {
            p.subject_alt_names = vec![SanType::DnsName("b.example".try_into().unwrap())];
        });
        let https_uri = custom_dir(&ca, "spiffe://cluster.local/node/b", |p| {
            p.subject_alt_names = vec![SanType::URI("https://b.example/".try_into().unwrap())];
        });
        let two = custom_dir(&ca, "spiffe://cluster.local/node/b", |p| {
            p.subject_alt_names.push(SanType::URI(
                "spiffe://cluster.local/node/a".try_into().unwrap(),
            ));
        });
        let hostile = custom_dir(&ca, "spiffe://cluster.local/node/b", |p| {
            p.subject_alt_names = vec![SanType::URI(
                "spiffe://cluster.local/node/../b".try_into().unwrap(),
            )];
        });
        for (dir, reason) in [
            (&no_san, "no_spiffe_id"),
            (&dns_only, "no_spiffe_id"),
            (&https_uri, "no_spiffe_id"),
            (&two, "multiple_spiffe_ids"),
            (&hostile, "invalid_spiffe_id"),
        ] {
            let outcome = handshake(a.server_config(), raw_client(Some(dir.path()))).await;
            assert_eq!(outcome.server_reason(), reason);
            let outcome = handshake(raw_server(dir.path()), a.client_config("b")).await;
            assert_eq!(outcome.client_reason(), reason);
        }
    }

    #[tokio::test]
    async fn a_ca_certificate_cannot_serve_as_a_tunnel_certificate() {
        let ca = new_ca(TD);
        let a = creds(&node_dir(&ca, "a"));
        // A leaf that claims to be a CA, signed by the mesh CA.
        let ca_leaf = custom_dir(&ca, "spiffe://cluster.local/node/b", |p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        });
        let outcome = handshake(a.server_config(), raw_client(Some(ca_leaf.path()))).await;
        assert_eq!(outcome.server_reason(), "bad_certificate");
    }
}
