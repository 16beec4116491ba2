//! The mesh CA, as `meshctl ca` runs it on the operator's machine: `init`
//! makes a self-signed ECDSA P-256 root (ca.pem, ca-key.pem), `issue` signs a
//! short-lived leaf for one identity and writes what a node needs (cert.pem,
//! key.pem, bundle.pem). The root key never goes to a node.
//!
//! Files are written to a temporary name in the same directory (private keys
//! created 0600, never readable by others even briefly) and renamed into
//! place, so an agent reloading mid-write sees the old file or the new one.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType,
    SerialNumber,
};
use x509_parser::asn1_rs::Tag;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::cert::{self, Parsed};
use super::{IdentityError, SpiffeId};

/// The CA directory's certificate and key.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
/// Optional in the CA directory: the roots to hand out as the trust bundle
/// (old and new root during a root rotation). Without it, ca.pem is the bundle.
pub const CA_BUNDLE: &str = "bundle.pem";
/// What a node's identity directory holds.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const BUNDLE_FILE: &str = "bundle.pem";

/// How far in the past a certificate's notBefore lies, so that a node whose
/// clock is a little behind the issuer's accepts it at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Default leaf lifetime: short, so a stolen key is worth little for long.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

/// `meshctl ca init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub days: u32,
    /// Replace an existing ca.pem / ca-key.pem.
    pub force: bool,
}

/// What `init` made (never the key).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaSummary {
    pub trust_domain: String,
    pub subject: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whom a leaf is for.
#[derive(Debug, Clone)]
pub enum Subject {
    /// `spiffe://<the CA's trust domain>/node/<name>`.
    Node(String),
    /// Any SPIFFE ID of the CA's trust domain.
    Id(SpiffeId),
    /// Testing only: an ID of another trust domain, signed all the same,
    /// to show that peers refuse it.
    ForeignId(SpiffeId),
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from `CLOCK_SKEW` ago for `lifetime` from now.
    pub fn from_now(lifetime: Duration) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH),
            not_after: now + lifetime,
        }
    }
}

/// `meshctl ca issue`.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    pub ca_dir: PathBuf,
    pub out: PathBuf,
    pub subject: Subject,
    pub validity: Validity,
}

/// What `issue` wrote (never the key).
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuedCert {
    pub spiffe_id: SpiffeId,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    pub bundle_roots: usize,
}

/// One certificate of a PEM file, for `meshctl ca show`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CertSummary {
    pub spiffe_id: Option<SpiffeId>,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
}

/// Every certificate of the PEM file at `path`, without judging them.
pub fn describe(path: &Path) -> Result<Vec<CertSummary>, IdentityError> {
    const HINT: &str = "expected a PEM file of certificates";
    let certs = cert::certs_from_pem(path, &cert::read(path, HINT)?, HINT)?;
    let whose = path.display().to_string();
    certs
        .iter()
        .map(|der| {
            let parsed = cert::parse(der, &whose)?;
            Ok(CertSummary {
                spiffe_id: cert::spiffe_id_of(&parsed, &whose).ok(),
                subject: parsed.subject,
                issuer: parsed.issuer,
                serial: parsed.serial,
                not_before: parsed.not_before,
                not_after: parsed.not_after,
                is_ca: parsed.is_ca,
            })
        })
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds.
pub fn format_unix(secs: i64) -> String {
    cert::fmt_unix(secs)
}

/// Creates the mesh root CA in `opts.dir`.
pub fn init(opts: &InitOptions) -> Result<CaSummary, IdentityError> {
    let td_id = SpiffeId::trust_domain_id(&opts.trust_domain)?;
    let cert_path = opts.dir.join(CA_CERT);
    let key_path = opts.dir.join(CA_KEY);
    if !opts.force {
        for path in [&cert_path, &key_path] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(IdentityError::Exists { path: path.clone() });
            }
        }
    }
    if opts.days == 0 {
        return Err(IdentityError::Ca {
            what: "make a root valid for 0 days",
            detail: "pass --days 1 or more".into(),
        });
    }
    make_dir(&opts.dir)?;

    let key = new_key()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mesh");
    dn.push(DnType::CommonName, "mesh root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![uri_san(td_id.as_str())?];
    params.serial_number = Some(random_serial()?);
    let validity = Validity::from_now(Duration::from_secs(u64::from(opts.days) * 86_400));
    set_validity(&mut params, validity)?;
    let ca = params.self_signed(&key).map_err(|e| IdentityError::Ca {
        what: "sign its root certificate",
        detail: e.to_string(),
    })?;

    let no_clobber = !opts.force;
    write_file(
        &key_path,
        key.serialize_pem().as_bytes(),
        KEY_MODE,
        no_clobber,
    )?;
    write_file(&cert_path, ca.pem().as_bytes(), CERT_MODE, no_clobber)?;
    let parsed = cert::parse(ca.der(), "the new CA certificate")?;
    Ok(CaSummary {
        trust_domain: opts.trust_domain.clone(),
        subject: parsed.subject,
        serial: parsed.serial,
        not_before: parsed.not_before,
        not_after: parsed.not_after,
        cert: cert_path,
        key: key_path,
    })
}

/// Issues a leaf for `opts.subject` into `opts.out` (cert.pem, key.pem,
/// bundle.pem), replacing what is there: this is how a node's identity is
/// rotated.
pub fn issue(opts: &IssueOptions) -> Result<IssuedCert, IdentityError> {
    let ca = Ca::load(&opts.ca_dir)?;
    let id = match &opts.subject {
        Subject::Node(name) => SpiffeId::node(&ca.trust_domain, name)?,
        Subject::Id(id) if id.trust_domain() != ca.trust_domain => {
            return Err(IdentityError::WrongTrustDomain {
                whose: "the requested identity".into(),
                expected: ca.trust_domain.clone(),
                found: id.clone(),
            });
        }
        Subject::Id(id) | Subject::ForeignId(id) => id.clone(),
    };
    let params = leaf_params(&id, opts.validity)?;
    let key = new_key()?;
    let leaf = ca.sign(&params, &key)?;
    let issued = ca.write_leaf(&opts.out, &leaf, &key)?;
    Ok(IssuedCert {
        spiffe_id: id,
        serial: issued.serial,
        not_before: issued.not_before,
        not_after: issued.not_after,
        cert: opts.out.join(CERT_FILE),
        key: opts.out.join(KEY_FILE),
        bundle: opts.out.join(BUNDLE_FILE),
        bundle_roots: issued.bundle_roots,
    })
}

/// The parameters of a mesh leaf: one URI SAN, both TLS usages (a node is
/// client and server of tunnels), not a CA.
pub(crate) fn leaf_params(
    id: &SpiffeId,
    validity: Validity,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mesh");
    // CN is limited to 64 characters; the SAN is the name that counts.
    let cn = id.node_name().unwrap_or(id.as_str());
    if cn.len() <= 64 {
        dn.push(DnType::CommonName, cn);
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![uri_san(id.as_str())?];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, validity)?;
    Ok(params)
}

/// A loaded CA: its signing key, its trust domain and the bundle it hands out.
pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub(crate) trust_domain: String,
    parsed: Parsed,
    bundle_pem: Vec<u8>,
    bundle_roots: usize,
}

pub(crate) struct Written {
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub bundle_roots: usize,
}

impl Ca {
    pub(crate) fn load(dir: &Path) -> Result<Ca, IdentityError> {
        const HINT: &str = "point --ca-dir at the directory `meshctl ca init` wrote";
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = cert::read(&cert_path, HINT)?;
        let ca_der = match cert::certs_from_pem(&cert_path, &cert_pem, HINT)?.as_slice() {
            [one] => one.clone(),
            many => {
                return Err(IdentityError::BadFile {
                    path: cert_path,
                    problem: format!("holds {} certificates, expected the one CA", many.len()),
                    hint: HINT,
                });
            }
        };
        let whose = cert_path.display().to_string();
        let parsed = cert::parse(&ca_der, &whose)?;
        if !parsed.is_ca {
            return Err(IdentityError::BadFile {
                path: cert_path,
                problem: "is not a CA certificate".into(),
                hint: HINT,
            });
        }
        let td_id = cert::spiffe_id_of(&parsed, &whose)?;
        if !td_id.path().is_empty() {
            return Err(IdentityError::BadFile {
                path: cert_path,
                problem: format!("carries {td_id}, not a trust domain ID (spiffe://<td>)"),
                hint: HINT,
            });
        }
        let now = cert::now_unix();
        if parsed.not_after < now {
            return Err(IdentityError::Expired {
                whose: format!("the CA certificate {whose}"),
                not_after: parsed.not_after,
                now,
            });
        }
        let key_pem = cert::read(&key_path, HINT)?;
        let bad_key = || IdentityError::BadFile {
            path: key_path.clone(),
            problem: "holds no readable ECDSA private key".into(),
            hint: HINT,
        };
        let key_text = std::str::from_utf8(&key_pem).map_err(|_| bad_key())?;
        let key = KeyPair::from_pem(key_text).map_err(|_| bad_key())?;
        if key.subject_public_key_info() != spki_of(&ca_der, &whose)? {
            return Err(IdentityError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let dn = distinguished_name(&ca_der, &whose)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];

        // The bundle handed out: bundle.pem of the CA dir if present (it
        // must hold this CA), else ca.pem.
        let bundle_path = dir.join(CA_BUNDLE);
        let (bundle_pem, bundle_roots) = match fs::read(&bundle_path) {
            Ok(bytes) => {
                let roots = cert::certs_from_pem(&bundle_path, &bytes, HINT)?;
                if !roots.contains(&ca_der) {
                    return Err(IdentityError::BadFile {
                        path: bundle_path,
                        problem: format!("does not contain the CA of {}", cert_path.display()),
                        hint: "append ca.pem to it, or remove it to hand out ca.pem alone",
                    });
                }
                (bytes, roots.len())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (cert_pem, 1),
            Err(source) => {
                return Err(IdentityError::Read {
                    path: bundle_path,
                    source,
                    hint: HINT,
                });
            }
        };
        Ok(Ca {
            issuer: Issuer::new(params, key),
            trust_domain: td_id.trust_domain().to_owned(),
            parsed,
            bundle_pem,
            bundle_roots,
        })
    }

    /// Signs `params` for `key`, checking that the result names this CA
    /// exactly as its certificate does (chain building compares the bytes).
    pub(crate) fn sign(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Result<Certificate, IdentityError> {
        if params.not_after.unix_timestamp() > self.parsed.not_after {
            return Err(IdentityError::Ca {
                what: "issue a certificate that outlives it",
                detail: format!(
                    "the CA expires at {}; ask for a shorter lifetime or make a new CA",
                    cert::fmt_unix(self.parsed.not_after)
                ),
            });
        }
        let leaf = params
            .signed_by(key, &self.issuer)
            .map_err(|e| IdentityError::Ca {
                what: "sign the certificate",
                detail: e.to_string(),
            })?;
        let parsed = cert::parse(leaf.der(), "the new certificate")?;
        if parsed.issuer_raw != self.parsed.subject_raw {
            return Err(IdentityError::Ca {
                what: "reproduce its own name",
                detail: "ca.pem's subject uses an encoding rcgen does not write; make the CA \
                         with `meshctl ca init`"
                    .into(),
            });
        }
        Ok(leaf)
    }

    /// Writes key.pem, cert.pem and bundle.pem into `out`.
    pub(crate) fn write_leaf(
        &self,
        out: &Path,
        leaf: &Certificate,
        key: &KeyPair,
    ) -> Result<Written, IdentityError> {
        make_dir(out)?;
        write_file(&out.join(BUNDLE_FILE), &self.bundle_pem, CERT_MODE, false)?;
        write_file(
            &out.join(KEY_FILE),
            key.serialize_pem().as_bytes(),
            KEY_MODE,
            false,
        )?;
        write_file(
            &out.join(CERT_FILE),
            leaf.pem().as_bytes(),
            CERT_MODE,
            false,
        )?;
        let parsed = cert::parse(leaf.der(), "the new certificate")?;
        Ok(Written {
            serial: parsed.serial,
            not_before: parsed.not_before,
            not_after: parsed.not_after,
            bundle_roots: self.bundle_roots,
        })
    }
}

fn new_key() -> Result<KeyPair, IdentityError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Ca {
        what: "generate an ECDSA P-256 key",
        detail: e.to_string(),
    })
}

fn uri_san(uri: &str) -> Result<SanType, IdentityError> {
    let ia5 = uri
        .to_owned()
        .try_into()
        .map_err(|e: rcgen::Error| IdentityError::Ca {
            what: "encode the SPIFFE ID",
            detail: e.to_string(),
        })?;
    Ok(SanType::URI(ia5))
}

/// 16 random bytes, positive and non-zero, as RFC 5280 wants serials.
fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Ca {
            what: "draw a random serial number",
            detail: "the system random generator failed".into(),
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn set_validity(params: &mut CertificateParams, validity: Validity) -> Result<(), IdentityError> {
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .map_err(|_| IdentityError::Ca {
                what: "issue a certificate valid before 1970",
                detail: "pick a later time".into(),
            })
    };
    let (nb, na) = (secs(validity.not_before)?, secs(validity.not_after)?);
    if na <= nb {
        return Err(IdentityError::Ca {
            what: "issue a certificate that ends before it starts",
            detail: format!(
                "notBefore {} is not before notAfter {}",
                cert::fmt_unix(nb as i64),
                cert::fmt_unix(na as i64)
            ),
        });
    }
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(nb);
    params.not_after = epoch + Duration::from_secs(na);
    Ok(())
}

fn spki_of(der: &[u8], whose: &str) -> Result<Vec<u8>, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate {
        whose: whose.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(cert.public_key().raw.to_vec())
}

/// The CA's subject as rcgen will write it as the issuer of what it signs.
fn distinguished_name(der: &[u8], whose: &str) -> Result<DistinguishedName, IdentityError> {
    let bad = |detail: String| IdentityError::BadCertificate {
        whose: whose.to_owned(),
        detail,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        for attr in rdn.iter() {
            let oid: Vec<u64> = attr
                .attr_type()
                .iter()
                .map(|arcs| arcs.collect())
                .ok_or_else(|| bad("subject attribute with an oversized OID".into()))?;
            let text = attr
                .as_str()
                .map_err(|_| bad("subject attribute that is not a string".into()))?
                .to_owned();
            let value = match attr.attr_value().tag() {
                Tag::Utf8String => DnValue::Utf8String(text),
                Tag::PrintableString => DnValue::PrintableString(
                    text.try_into()
                        .map_err(|_| bad("subject attribute not printable".into()))?,
                ),
                _ => return Err(bad("subject attribute of an unsupported string type".into())),
            };
            dn.push(DnType::from_oid(&oid), value);
        }
    }
    Ok(dn)
}

fn make_dir(dir: &Path) -> Result<(), IdentityError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| IdentityError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `contents` to a new temporary file created with `mode` (O_EXCL,
/// so never through a planted symlink), then moves it to `path`: with
/// `no_clobber` by a hard link that fails if `path` exists, else by rename.
fn write_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    no_clobber: bool,
) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        if no_clobber {
            fs::hard_link(&tmp, path)?;
            fs::remove_file(&tmp)
        } else {
            fs::rename(&tmp, path)
        }
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists if no_clobber => IdentityError::Exists {
            path: path.to_owned(),
        },
        _ => err(e),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::super::testutil::*;
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn init_writes_a_private_key_0600_and_refuses_to_overwrite() {
        let parent = TempDir::new("init");
        let dir = parent.join("ca");
        let opts = InitOptions {
            dir: dir.clone(),
            trust_domain: TD.into(),
            days: 10,
            force: false,
        };
        let summary = init(&opts).unwrap();
        assert_eq!(summary.trust_domain, TD);
        assert_eq!(summary.not_after - summary.not_before, 10 * 86_400 + 5 * 60);
        assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            names(&dir),
            vec![CA_KEY, CA_CERT],
            "no temporary files left"
        );
        let ca = fs::read(dir.join(CA_CERT)).unwrap();
        let key = fs::read(dir.join(CA_KEY)).unwrap();
        assert!(String::from_utf8_lossy(&key).contains("PRIVATE KEY"));
        let parsed = cert::parse(&cert::certs_from_pem(&dir, &ca, "").unwrap()[0], "ca").unwrap();
        assert!(parsed.is_ca);
        assert_eq!(parsed.uris, vec!["spiffe://cluster.local".to_owned()]);

        let err = init(&opts).unwrap_err();
        assert_eq!(err.reason(), "exists");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(dir.join(CA_CERT)).unwrap(), ca);
        assert_eq!(fs::read(dir.join(CA_KEY)).unwrap(), key);
        // Also when only the key is there.
        fs::remove_file(dir.join(CA_CERT)).unwrap();
        assert_eq!(init(&opts).unwrap_err().reason(), "exists");
        assert_eq!(fs::read(dir.join(CA_KEY)).unwrap(), key);

        init(&InitOptions {
            force: true,
            ..opts.clone()
        })
        .unwrap();
        assert_ne!(fs::read(dir.join(CA_KEY)).unwrap(), key);
        assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
        assert_eq!(names(&dir), vec![CA_KEY, CA_CERT]);

        for bad in ["Cluster.local", "", "td:1", "a/b"] {
            let other = InitOptions {
                dir: parent.join("bad"),
                trust_domain: bad.into(),
                ..opts.clone()
            };
            assert_eq!(
                init(&other).unwrap_err().reason(),
                "invalid_spiffe_id",
                "{bad}"
            );
        }
    }

    #[test]
    fn issue_writes_a_short_lived_node_certificate_key_and_bundle() {
        let ca = new_ca(TD);
        let out = TempDir::new("out");
        let node = out.join("node");
        let issued = issue(&IssueOptions {
            ca_dir: ca.path().to_owned(),
            out: node.clone(),
            subject: Subject::Node("worker-1".into()),
            validity: Validity::from_now(DEFAULT_LEAF_LIFETIME),
        })
        .unwrap();
        assert_eq!(
            issued.spiffe_id.as_str(),
            "spiffe://cluster.local/node/worker-1"
        );
        assert_eq!(issued.not_after - issued.not_before, 24 * 3600 + 5 * 60);
        assert!(
            issued.not_before < cert::now_unix(),
            "notBefore lies in the past"
        );
        assert_eq!(mode(&node.join(KEY_FILE)), 0o600);
        assert_eq!(names(&node), vec![BUNDLE_FILE, CERT_FILE, KEY_FILE]);
        assert_eq!(
            fs::read(node.join(BUNDLE_FILE)).unwrap(),
            fs::read(ca.join(CA_CERT)).unwrap()
        );
        let pem = fs::read(node.join(CERT_FILE)).unwrap();
        let leaf = cert::parse(&cert::certs_from_pem(&node, &pem, "").unwrap()[0], "leaf").unwrap();
        assert_eq!(leaf.uris, vec![issued.spiffe_id.to_string()]);
        assert!(!leaf.is_ca);
        assert_eq!(leaf.serial, issued.serial);

        // Issuing again rotates in place: new key, new serial, still 0600.
        let key = fs::read(node.join(KEY_FILE)).unwrap();
        let again = issue(&IssueOptions {
            ca_dir: ca.path().to_owned(),
            out: node.clone(),
            subject: Subject::Node("worker-1".into()),
            validity: Validity::from_now(hours(1)),
        })
        .unwrap();
        assert_ne!(again.serial, issued.serial);
        assert_ne!(fs::read(node.join(KEY_FILE)).unwrap(), key);
        assert_eq!(mode(&node.join(KEY_FILE)), 0o600);
        assert_eq!(names(&node), vec![BUNDLE_FILE, CERT_FILE, KEY_FILE]);
    }

    #[test]
    fn issue_refuses_what_the_ca_must_not_sign() {
        let ca = new_ca(TD);
        let out = TempDir::new("refused");
        let attempt = |subject: Subject, validity: Validity| {
            issue(&IssueOptions {
                ca_dir: ca.path().to_owned(),
                out: out.path().to_owned(),
                subject,
                validity,
            })
            .unwrap_err()
        };
        let other_td = SpiffeId::node("other.td", "a").unwrap();
        let err = attempt(Subject::Id(other_td), Validity::from_now(hours(1)));
        assert_eq!(err.reason(), "wrong_trust_domain");
        let err = attempt(Subject::Node("a/b".into()), Validity::from_now(hours(1)));
        assert_eq!(err.reason(), "invalid_spiffe_id");
        // The test CA lives 30 days.
        let err = attempt(
            Subject::Node("a".into()),
            Validity::from_now(hours(24 * 40)),
        );
        assert!(err.to_string().contains("outlives"), "{err}");
        let err = attempt(Subject::Node("a".into()), window(60, 0));
        assert!(err.to_string().contains("ends before it starts"), "{err}");
        assert!(names(out.path()).is_empty(), "nothing written on refusal");

        let missing = TempDir::new("noca");
        let err = issue(&IssueOptions {
            ca_dir: missing.path().to_owned(),
            out: out.path().to_owned(),
            subject: Subject::Node("a".into()),
            validity: Validity::from_now(hours(1)),
        })
        .unwrap_err();
        assert_eq!(err.reason(), "io");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        // A key that is not the CA's.
        let other = new_ca(TD);
        fs::copy(other.join(CA_KEY), ca.join(CA_KEY)).unwrap();
        let err = attempt(Subject::Node("a".into()), Validity::from_now(hours(1)));
        assert_eq!(err.reason(), "key_mismatch", "{err}");
    }

    #[test]
    fn a_bundle_in_the_ca_dir_is_handed_out_and_must_hold_the_ca() {
        let (ca, other) = (new_ca(TD), new_ca(TD));
        let both = [
            fs::read(ca.join(CA_CERT)).unwrap(),
            fs::read(other.join(CA_CERT)).unwrap(),
        ]
        .concat();
        fs::write(ca.join(CA_BUNDLE), &both).unwrap();
        let out = TempDir::new("bundle");
        let issued = issue(&IssueOptions {
            ca_dir: ca.path().to_owned(),
            out: out.path().to_owned(),
            subject: Subject::Node("a".into()),
            validity: Validity::from_now(hours(1)),
        })
        .unwrap();
        assert_eq!(issued.bundle_roots, 2);
        assert_eq!(fs::read(out.join(BUNDLE_FILE)).unwrap(), both);

        fs::copy(other.join(CA_CERT), ca.join(CA_BUNDLE)).unwrap();
        let err = issue(&IssueOptions {
            ca_dir: ca.path().to_owned(),
            out: out.path().to_owned(),
            subject: Subject::Node("a".into()),
            validity: Validity::from_now(hours(1)),
        })
        .unwrap_err();
        assert!(err.to_string().contains("does not contain the CA"), "{err}");
    }
}
