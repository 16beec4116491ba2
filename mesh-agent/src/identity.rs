//! Node identity for the cross-node tunnel: the mesh CA (`ca`, run by
//! `meshctl ca` on the operator's machine), SPIFFE IDs (`spiffe`), a node's
//! reloadable certificate, key and trust bundle (`store`), peer verification
//! (`verify`) and the rustls configurations the tunnel uses (`tls`); the
//! files are watched and reloaded on change (`watch`), and their expiry and
//! reloads exported (`metrics`).
//!
//! A node agent authenticates tunnels with a certificate whose only URI SAN
//! is `spiffe://<trust-domain>/node/<node>`. Workload identities
//! (`spiffe://<td>/ns/<ns>/sa/<sa>`) travel per stream inside the tunnel and
//! are checked elsewhere; this module only parses and validates them.
//!
//! Rejected handshakes are observable through the error rustls returns: the
//! verifiers put an [`IdentityError`] (or a rustls certificate error) into
//! it, and [`failure_reason`] / [`io_failure_reason`] turn any handshake
//! error into a short stable label for metrics.

pub mod authz;
pub mod ca;
mod cert;
mod metrics;
mod spiffe;
mod store;
mod tls;
mod verify;
pub mod watch;

#[cfg(test)]
mod testutil;

use std::path::PathBuf;

pub use authz::{Admitted, Authorization, AuthzCheck, ClaimCheck, Refusal, ResolvedPolicy, Rule};
pub use metrics::IdentityMetrics;
pub use spiffe::SpiffeId;
pub(crate) use spiffe::sanitize;
pub use store::{CertInfo, HeldIdentity, NodeCredentials};
pub use tls::{ALPN_H2, failure_reason, identity_error, io_failure_reason, io_identity_error};
pub use verify::{peer_identity, peer_not_after};
pub use watch::{ReloadStatus, WatchSettings, spawn_watcher};

/// Everything that can go wrong with identities. `reason()` gives a short
/// stable label (for metrics); `Display` says what, where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "invalid SPIFFE ID \"{input}\": {why}; expected spiffe://<trust-domain>/node/<node> \
         or spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    InvalidSpiffeId { input: String, why: &'static str },
    #[error("cannot read {}: {source}; {hint}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} already exists; refusing to overwrite it (pass --force to replace it: every \
         certificate the old CA issued then stops being trusted once bundles change)",
        path.display()
    )]
    Exists { path: PathBuf },
    #[error("{}: {problem}; {hint}", path.display())]
    BadFile {
        path: PathBuf,
        problem: String,
        hint: &'static str,
    },
    #[error("{whose}: cannot use the certificate: {detail}")]
    BadCertificate { whose: String, detail: String },
    #[error(
        "{whose} is not signed by any CA in the trust bundle ({detail}); issue it from the \
         mesh CA (`meshctl ca issue`) or add its root to bundle.pem"
    )]
    UnknownCa { whose: String, detail: String },
    #[error(
        "{whose} expired at {} (now {}); issue a new one with `meshctl ca issue`",
        cert::fmt_unix(*not_after),
        cert::fmt_unix(*now)
    )]
    Expired {
        whose: String,
        not_after: i64,
        now: i64,
    },
    #[error(
        "{whose} is not valid before {} (now {}); check the clocks of this node and of the \
         machine that issued it",
        cert::fmt_unix(*not_before),
        cert::fmt_unix(*now)
    )]
    NotYetValid {
        whose: String,
        not_before: i64,
        now: i64,
    },
    #[error(
        "{whose} carries no SPIFFE ID (no spiffe:// URI SAN); node certificates come from \
         `meshctl ca issue --node NAME`"
    )]
    NoSpiffeId { whose: String },
    #[error("{whose} carries {count} URI SANs; a mesh certificate carries exactly one SPIFFE ID")]
    MultipleSpiffeIds { whose: String, count: usize },
    #[error("{whose}: {source}")]
    BadSpiffeId {
        whose: String,
        #[source]
        source: Box<IdentityError>,
    },
    #[error("{whose} is {found}, of trust domain {}, not of {expected}", found.trust_domain())]
    WrongTrustDomain {
        whose: String,
        expected: String,
        found: SpiffeId,
    },
    #[error(
        "{whose} is {found}, not a node identity (spiffe://<td>/node/<node>); tunnels are \
         authenticated by node certificates (`meshctl ca issue --node NAME`)"
    )]
    NotNodeId { whose: String, found: SpiffeId },
    #[error("{whose} is {found}, expected {expected}")]
    WrongSpiffeId {
        whose: String,
        expected: String,
        found: SpiffeId,
    },
    #[error(
        "{} does not belong to {}: the private key is not the certificate's; write both from \
         the same `meshctl ca issue`",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the mesh CA cannot {what}: {detail}")]
    Ca { what: &'static str, detail: String },
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
    #[error(
        "reloading the identity from {} failed, still using the previous certificate \
         (serial {serial}, valid until {}): {source}",
        dir.display(),
        cert::fmt_unix(*not_after)
    )]
    Reload {
        dir: PathBuf,
        serial: String,
        not_after: i64,
        #[source]
        source: Box<IdentityError>,
    },
}

impl IdentityError {
    /// A short stable label, for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::InvalidSpiffeId { .. } | IdentityError::BadSpiffeId { .. } => {
                "invalid_spiffe_id"
            }
            IdentityError::Read { .. } | IdentityError::Write { .. } => "io",
            IdentityError::Exists { .. } => "exists",
            IdentityError::BadFile { .. } => "bad_file",
            IdentityError::BadCertificate { .. } => "bad_certificate",
            IdentityError::UnknownCa { .. } => "unknown_ca",
            IdentityError::Expired { .. } => "expired",
            IdentityError::NotYetValid { .. } => "not_yet_valid",
            IdentityError::NoSpiffeId { .. } => "no_spiffe_id",
            IdentityError::MultipleSpiffeIds { .. } => "multiple_spiffe_ids",
            IdentityError::WrongTrustDomain { .. } => "wrong_trust_domain",
            IdentityError::NotNodeId { .. } | IdentityError::WrongSpiffeId { .. } => {
                "wrong_spiffe_id"
            }
            IdentityError::KeyMismatch { .. } => "key_mismatch",
            IdentityError::Ca { .. } => "ca",
            IdentityError::Tls(_) => "tls",
            IdentityError::Reload { source, .. } => source.reason(),
        }
    }
}
