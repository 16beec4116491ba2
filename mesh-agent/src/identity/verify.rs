//! Peer verification: rustls-webpki builds the chain to the CURRENT trust
//! bundle and checks validity and usage; x509-parser reads the one URI SAN,
//! which must be a node SPIFFE ID of our trust domain (and, for a client
//! dialling node X, exactly `spiffe://<td>/node/X`). DNS names are never
//! looked at: the SPIFFE ID is the name.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use webpki::{EndEntityCert, KeyUsage};

use super::store::Shared;
use super::{IdentityError, SpiffeId, cert};

/// Whose certificate a verifier looks at, for messages.
const PEER: &str = "peer certificate";

/// The SPIFFE ID of a peer whose chain rustls (with our verifiers) already
/// accepted: what the tunnel's inbound side uses to learn which node called.
/// `certs` is `Connection::peer_certificates()`.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, IdentityError> {
    let Some(leaf) = certs.first() else {
        return Err(IdentityError::NoSpiffeId {
            whose: "the peer (it presented no certificate)".into(),
        });
    };
    let parsed = cert::parse(leaf, PEER)?;
    cert::spiffe_id_of(&parsed, PEER)
}

/// When the peer's certificate expires: a tunnel connection must be replaced
/// before then (it never outlives its certificate).
pub fn peer_not_after(certs: &[CertificateDer<'_>]) -> Result<SystemTime, IdentityError> {
    let Some(leaf) = certs.first() else {
        return Err(IdentityError::NoSpiffeId {
            whose: "the peer (it presented no certificate)".into(),
        });
    };
    let parsed = cert::parse(leaf, PEER)?;
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(parsed.not_after).unwrap_or(0)))
}

/// The chain of `end_entity` (plus `intermediates`) must lead to one of
/// `roots`, be valid at `now` and allow `usage`.
pub(crate) fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[TrustAnchor<'static>],
    now: UnixTime,
    usage: KeyUsage,
    algs: &WebPkiSupportedAlgorithms,
    whose: &str,
) -> Result<(), IdentityError> {
    let whose = || whose.to_owned();
    let ee = EndEntityCert::try_from(end_entity).map_err(|e| IdentityError::BadCertificate {
        whose: whose(),
        detail: format!("cannot parse it: {e}"),
    })?;
    let secs = |t: UnixTime| i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    ee.verify_for_usage(algs.all, roots, intermediates, now, usage, None, None)
        .map(|_| ())
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer => IdentityError::UnknownCa {
                whose: whose(),
                detail: "no chain to a root of the bundle".into(),
            },
            // Same issuer name as a root, but another key signed it: a
            // different CA of the same name.
            webpki::Error::InvalidSignatureForPublicKey => IdentityError::UnknownCa {
                whose: whose(),
                detail: "its signature does not verify with any root of the bundle".into(),
            },
            webpki::Error::CertExpired { time, not_after } => IdentityError::Expired {
                whose: whose(),
                not_after: secs(not_after),
                now: secs(time),
            },
            webpki::Error::CertNotValidYet { time, not_before } => IdentityError::NotYetValid {
                whose: whose(),
                not_before: secs(not_before),
                now: secs(time),
            },
            webpki::Error::CaUsedAsEndEntity => IdentityError::BadCertificate {
                whose: whose(),
                detail: "it is a CA certificate, not a leaf".into(),
            },
            webpki::Error::RequiredEkuNotFoundContext(_) => IdentityError::BadCertificate {
                whose: whose(),
                detail: "its extended key usage does not allow TLS client and server auth".into(),
            },
            other => IdentityError::BadCertificate {
                whose: whose(),
                detail: format!("chain verification failed: {other}"),
            },
        })
}

/// `id` must be a node ID of `trust_domain`, and node `expected` if given.
pub(crate) fn check_node_id(
    id: &SpiffeId,
    trust_domain: &str,
    expected: Option<&str>,
    whose: &str,
) -> Result<(), IdentityError> {
    if id.trust_domain() != trust_domain {
        return Err(IdentityError::WrongTrustDomain {
            whose: whose.to_owned(),
            expected: trust_domain.to_owned(),
            found: id.clone(),
        });
    }
    let Some(node) = id.node_name() else {
        return Err(IdentityError::NotNodeId {
            whose: whose.to_owned(),
            found: id.clone(),
        });
    };
    match expected {
        Some(want) if want != node => Err(IdentityError::WrongSpiffeId {
            whose: whose.to_owned(),
            expected: format!("spiffe://{trust_domain}/node/{want}"),
            found: id.clone(),
        }),
        _ => Ok(()),
    }
}

/// A peer's certificate checked against the current bundle and policy.
fn verify_peer(
    shared: &Shared,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
    expected: Option<&str>,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<SpiffeId, rustls::Error> {
    let current = shared.current();
    let checked = (|| {
        verify_chain(
            end_entity,
            intermediates,
            &current.roots,
            now,
            usage,
            algs,
            PEER,
        )?;
        let id = cert::spiffe_id_of(&cert::parse(end_entity, PEER)?, PEER)?;
        check_node_id(&id, current.id.trust_domain(), expected, PEER)?;
        Ok(id)
    })();
    checked.map_err(|e: IdentityError| {
        tracing::debug!(reason = e.reason(), error = %e, "rejected a tunnel peer's certificate");
        to_rustls(e)
    })
}

/// The rustls error for a rejection: the standard certificate errors where
/// one fits (so the peer gets the matching alert), else the IdentityError
/// itself, which `failure_reason` finds again.
fn to_rustls(e: IdentityError) -> rustls::Error {
    let time =
        |s: i64| UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(s).unwrap_or(0)));
    let cert_error = match e {
        IdentityError::UnknownCa { .. } => CertificateError::UnknownIssuer,
        IdentityError::Expired { not_after, now, .. } => CertificateError::ExpiredContext {
            time: time(now),
            not_after: time(not_after),
        },
        IdentityError::NotYetValid {
            not_before, now, ..
        } => CertificateError::NotValidYetContext {
            time: time(now),
            not_before: time(not_before),
        },
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

/// Verifies the server's certificate for a client dialling node `peer_node`.
pub(crate) struct ServerVerifier {
    shared: Arc<Shared>,
    peer_node: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerVerifier {
    pub(crate) fn new(
        shared: Arc<Shared>,
        peer_node: &str,
        algs: WebPkiSupportedAlgorithms,
    ) -> ServerVerifier {
        ServerVerifier {
            shared,
            peer_node: peer_node.to_owned(),
            algs,
        }
    }
}

impl std::fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("peer_node", &self.peer_node)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_peer(
            &self.shared,
            end_entity,
            intermediates,
            now,
            KeyUsage::server_auth(),
            Some(&self.peer_node),
            &self.algs,
        )
        .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a client's certificate on the inbound side: any node of our
/// trust domain; a client certificate is mandatory.
pub(crate) struct ClientVerifier {
    shared: Arc<Shared>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientVerifier {
    pub(crate) fn new(shared: Arc<Shared>, algs: WebPkiSupportedAlgorithms) -> ClientVerifier {
        ClientVerifier { shared, algs }
    }
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the bundle can change under us, and every mesh node has
        // exactly one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(
            &self.shared,
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
            None,
            &self.algs,
        )
        .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}
