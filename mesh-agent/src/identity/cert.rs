//! Reading PEM files and the few X.509 fields the mesh looks at (x509-parser).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::{IdentityError, SpiffeId, spiffe::sanitize};

/// What the mesh reads from one certificate.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub uris: Vec<String>,
    pub serial: String,
    pub subject: String,
    pub issuer: String,
    pub subject_raw: Vec<u8>,
    pub issuer_raw: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
}

pub(crate) fn parse(der: &[u8], whose: &str) -> Result<Parsed, IdentityError> {
    let bad = |detail: String| IdentityError::BadCertificate {
        whose: whose.to_owned(),
        detail,
    };
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| bad(format!("not a valid X.509 certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate".into()));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("unreadable subjectAltName: {e}")))?;
    let uris = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Parsed {
        uris,
        serial: cert.raw_serial_as_string(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        subject_raw: cert.subject().as_raw().to_vec(),
        issuer_raw: cert.issuer().as_raw().to_vec(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    })
}

/// The one SPIFFE ID a certificate carries (exactly one URI SAN).
pub(crate) fn spiffe_id_of(parsed: &Parsed, whose: &str) -> Result<SpiffeId, IdentityError> {
    match parsed.uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId {
            whose: whose.to_owned(),
        }),
        [uri] if !uri.starts_with("spiffe:") => Err(IdentityError::NoSpiffeId {
            whose: format!("{whose} (its URI SAN is \"{}\")", sanitize(uri)),
        }),
        [uri] => uri.parse().map_err(|e| IdentityError::BadSpiffeId {
            whose: whose.to_owned(),
            source: Box::new(e),
        }),
        many => Err(IdentityError::MultipleSpiffeIds {
            whose: whose.to_owned(),
            count: many.len(),
        }),
    }
}

pub(crate) fn now_unix() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (UTC, proleptic Gregorian).
pub(crate) fn fmt_unix(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(crate) fn read(path: &Path, hint: &'static str) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
        hint,
    })
}

/// Every CERTIFICATE block of a PEM file, at least one.
pub(crate) fn certs_from_pem(
    path: &Path,
    pem: &[u8],
    hint: &'static str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadFile {
            path: path.to_owned(),
            problem: format!("not valid PEM: {e}"),
            hint,
        })?;
    if certs.is_empty() {
        return Err(IdentityError::BadFile {
            path: path.to_owned(),
            problem: "holds no CERTIFICATE block".into(),
            hint,
        });
    }
    Ok(certs)
}

/// The private key of a PEM file. The error never quotes the file: it is a
/// secret, and so is any part of it.
pub(crate) fn key_from_pem(
    path: &Path,
    pem: &[u8],
    hint: &'static str,
) -> Result<PrivateKeyDer<'static>, IdentityError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| IdentityError::BadFile {
        path: path.to_owned(),
        problem: "holds no readable private key (expected a PEM PRIVATE KEY block)".into(),
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_format_as_utc() {
        assert_eq!(fmt_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(fmt_unix(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(fmt_unix(-1), "1969-12-31T23:59:59Z");
        assert_eq!(fmt_unix(4_102_444_800), "2100-01-01T00:00:00Z");
    }
}
