//! A node's credentials: cert.pem (leaf, then any intermediates), key.pem
//! and bundle.pem (the trusted roots) from one directory, held behind a lock
//! that every handshake reads, so `reload()` changes what new handshakes
//! present and trust without rebuilding the rustls configurations.
//!
//! Every reload that changes the certificate or the bundle bumps the
//! credentials' generation and announces it (`subscribe`), so the tunnel
//! can replace connections opened with the old ones. What the last reload
//! did is kept for `meshctl certs` (`reload_status`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{TrustAnchor, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use webpki::KeyUsage;

use super::ca::{BUNDLE_FILE, CERT_FILE, KEY_FILE};
use super::watch::{ReloadStatus, unix_now};
use super::{IdentityError, SpiffeId, cert, tls, verify};

const HINT: &str = "the identity directory holds cert.pem, key.pem and bundle.pem as \
                    `meshctl ca issue --out DIR` writes them";

/// What `meshctl certs` and the admin API show about the loaded identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertInfo {
    pub spiffe_id: SpiffeId,
    /// Colon-separated hex, as openssl prints it.
    pub serial: String,
    pub subject: String,
    pub issuer: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub bundle_roots: usize,
    pub bundle_subjects: Vec<String>,
    pub dir: PathBuf,
    /// 1 at the first load, bumped by every reload that changed the
    /// certificate or the bundle: tunnel connections opened with an older
    /// generation are replaced.
    #[serde(default)]
    pub generation: u64,
}

impl CertInfo {
    pub fn not_after_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.not_after).unwrap_or(0))
    }

    pub fn not_before_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.not_before).unwrap_or(0))
    }
}

/// One identity this node holds, as `meshctl certs` shows it: a row per
/// identity, so identities of workloads the node speaks for can be added
/// beside the node's own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldIdentity {
    /// What it authenticates: `node` (this node's tunnels).
    pub kind: String,
    #[serde(flatten)]
    pub cert: CertInfo,
    /// Seconds until notAfter when the view was made (negative: expired).
    pub expires_in_secs: i64,
    pub reload: ReloadStatus,
}

/// One consistent set of files, validated.
pub(crate) struct Loaded {
    pub id: SpiffeId,
    pub key: Arc<CertifiedKey>,
    pub roots: Vec<TrustAnchor<'static>>,
    pub info: CertInfo,
}

/// What the resolvers and verifiers read at each handshake.
pub(crate) struct Shared {
    current: RwLock<Arc<Loaded>>,
}

impl Shared {
    pub(crate) fn current(&self) -> Arc<Loaded> {
        // A panic while holding the lock cannot leave a half-written value
        // (it is one Arc swap), so a poisoned lock is still good to read.
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, loaded: Loaded) {
        let loaded = Arc::new(loaded);
        match self.current.write() {
            Ok(mut guard) => *guard = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
    }
}

/// A node's identity: shared, cheap to clone.
#[derive(Clone)]
pub struct NodeCredentials {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    shared: Arc<Shared>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    client_template: ClientConfig,
    clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
    reloading: Mutex<()>,
    generations: watch::Sender<u64>,
    status: Mutex<ReloadStatus>,
}

/// More peers than any cluster has nodes: past it the cache starts over
/// rather than grow without bound.
const MAX_CACHED_CLIENTS: usize = 4096;

impl NodeCredentials {
    /// Loads cert.pem, key.pem and bundle.pem from `dir`. The certificate
    /// must be a node identity, chain to the bundle, be valid now and match
    /// the key.
    pub fn load(dir: &Path) -> Result<NodeCredentials, IdentityError> {
        let provider = tls::provider();
        let loaded = load_dir(dir, &provider, None)?;
        let shared = Arc::new(Shared {
            current: RwLock::new(Arc::new(loaded)),
        });
        let server = Arc::new(tls::server_config(&shared, &provider)?);
        let client_template = tls::client_template(&shared, &provider)?;
        Ok(NodeCredentials {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                shared,
                provider,
                server,
                client_template,
                clients: Mutex::new(HashMap::new()),
                reloading: Mutex::new(()),
                generations: watch::Sender::new(1),
                status: Mutex::new(ReloadStatus {
                    last_reload_unix: Some(unix_now()),
                    ..ReloadStatus::default()
                }),
            }),
        })
    }

    /// Reads the directory again. New handshakes use the new files at once;
    /// on any error the previous credentials stay in use and the error says
    /// which file is wrong. The trust domain and node name may not change.
    /// Returns whether anything changed (the same files again keep the
    /// generation, so no tunnel connection is replaced for nothing).
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let _one_at_a_time = self
            .inner
            .reloading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.inner.shared.current();
        let result = match load_dir(&self.inner.dir, &self.inner.provider, Some(&old)) {
            Ok(mut new) => {
                let same = new.key.cert == old.key.cert && new.roots == old.roots;
                if same {
                    Ok(false)
                } else {
                    new.info.generation = old.info.generation + 1;
                    let generation = new.info.generation;
                    tracing::info!(
                        spiffe_id = %new.id,
                        serial = %new.info.serial,
                        not_after = %cert::fmt_unix(new.info.not_after),
                        bundle_roots = new.info.bundle_roots,
                        generation,
                        "identity reloaded"
                    );
                    self.inner.shared.replace(new);
                    self.inner.generations.send_replace(generation);
                    Ok(true)
                }
            }
            Err(e) => Err(IdentityError::Reload {
                dir: self.inner.dir.clone(),
                serial: old.info.serial.clone(),
                not_after: old.info.not_after,
                source: Box::new(e),
            }),
        };
        let mut status = self.status_lock();
        match &result {
            Ok(_) => status.succeeded(),
            Err(e) => status.failed(e),
        }
        result
    }

    /// This identity as a row of `meshctl certs`.
    pub fn held(&self) -> HeldIdentity {
        let cert = self.info();
        HeldIdentity {
            kind: "node".into(),
            expires_in_secs: cert.not_after - unix_now(),
            cert,
            reload: self.reload_status(),
        }
    }

    /// What the reloads did: last success, last error, next retry.
    pub fn reload_status(&self) -> ReloadStatus {
        self.status_lock().clone()
    }

    /// When the watcher will try again after a failed reload.
    pub(crate) fn set_next_retry(&self, at_unix: Option<i64>) {
        self.status_lock().next_retry_unix = at_unix;
    }

    fn status_lock(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current generation (see [`CertInfo::generation`]), which
    /// changes whenever a reload changed the certificate or the bundle.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generations.subscribe()
    }

    pub fn spiffe_id(&self) -> SpiffeId {
        self.inner.shared.current().id.clone()
    }

    pub fn trust_domain(&self) -> String {
        self.inner.shared.current().id.trust_domain().to_owned()
    }

    /// This node's name (from its SPIFFE ID).
    pub fn node_name(&self) -> String {
        let current = self.inner.shared.current();
        current.id.node_name().unwrap_or_default().to_owned()
    }

    pub fn info(&self) -> CertInfo {
        self.inner.shared.current().info.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The mTLS server configuration for the inbound tunnel port (:15008):
    /// any node of the trust domain may connect; learn which with
    /// `peer_identity(conn.peer_certificates())`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.server.clone()
    }

    /// The mTLS client configuration for dialling node `peer_node`: the
    /// server must present `spiffe://<td>/node/<peer_node>`. The rustls
    /// `ServerName` passed to connect is ignored (an IP is fine). Cached per
    /// peer; an invalid node name yields a configuration that accepts no one.
    pub fn client_config(&self, peer_node: &str) -> Arc<ClientConfig> {
        let mut clients = self
            .inner
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(config) = clients.get(peer_node) {
            return config.clone();
        }
        if clients.len() >= MAX_CACHED_CLIENTS {
            clients.clear();
        }
        let config = Arc::new(tls::client_for(
            &self.inner.client_template,
            &self.inner.shared,
            &self.inner.provider,
            peer_node,
        ));
        clients.insert(peer_node.to_owned(), config.clone());
        config
    }
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.inner.shared.current();
        f.debug_struct("NodeCredentials")
            .field("spiffe_id", &current.id)
            .field("serial", &current.info.serial)
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// Reads and validates one set of files. With `previous`, the new identity
/// must be the same node of the same trust domain.
pub(crate) fn load_dir(
    dir: &Path,
    provider: &CryptoProvider,
    previous: Option<&Loaded>,
) -> Result<Loaded, IdentityError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let bundle_path = dir.join(BUNDLE_FILE);

    let chain = cert::certs_from_pem(&cert_path, &cert::read(&cert_path, HINT)?, HINT)?;
    let bundle = cert::certs_from_pem(&bundle_path, &cert::read(&bundle_path, HINT)?, HINT)?;
    let key_der = cert::key_from_pem(&key_path, &cert::read(&key_path, HINT)?, HINT)?;

    let mut roots = Vec::with_capacity(bundle.len());
    let mut bundle_subjects = Vec::with_capacity(bundle.len());
    for (i, root) in bundle.iter().enumerate() {
        let whose = format!("{} (certificate {})", bundle_path.display(), i + 1);
        let anchor =
            webpki::anchor_from_trusted_cert(root).map_err(|e| IdentityError::BadFile {
                path: bundle_path.clone(),
                problem: format!("certificate {} cannot be a trust anchor: {e}", i + 1),
                hint: HINT,
            })?;
        roots.push(anchor.to_owned());
        bundle_subjects.push(cert::parse(root, &whose)?.subject);
    }

    let key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|_| IdentityError::BadFile {
            path: key_path.clone(),
            problem: "holds a private key of a type TLS cannot use here (use ECDSA P-256)".into(),
            hint: HINT,
        })?;
    let certified = CertifiedKey::new(chain.clone(), key);
    if certified.keys_match().is_err() {
        return Err(IdentityError::KeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }

    let whose = cert_path.display().to_string();
    let (leaf, intermediates) = match chain.split_first() {
        Some(split) => split,
        None => {
            return Err(IdentityError::BadFile {
                path: cert_path,
                problem: "holds no certificate".into(),
                hint: HINT,
            });
        }
    };
    let now = UnixTime::now();
    let algs = provider.signature_verification_algorithms;
    // The same certificate serves both ends of tunnels.
    for usage in [KeyUsage::server_auth(), KeyUsage::client_auth()] {
        verify::verify_chain(leaf, intermediates, &roots, now, usage, &algs, &whose)?;
    }
    let parsed = cert::parse(leaf, &whose)?;
    let id = cert::spiffe_id_of(&parsed, &whose)?;
    let trust_domain = previous.map_or(id.trust_domain(), |p| p.id.trust_domain());
    verify::check_node_id(&id, trust_domain, None, &whose)?;
    if let Some(previous) = previous
        && previous.id != id
    {
        return Err(IdentityError::WrongSpiffeId {
            whose: format!("{whose} (this agent runs as {})", previous.id),
            expected: previous.id.to_string(),
            found: id,
        });
    }

    let info = CertInfo {
        spiffe_id: id.clone(),
        serial: parsed.serial,
        subject: parsed.subject,
        issuer: parsed.issuer,
        not_before: parsed.not_before,
        not_after: parsed.not_after,
        bundle_roots: roots.len(),
        bundle_subjects,
        dir: dir.to_owned(),
        generation: previous.map_or(1, |p| p.info.generation),
    };
    Ok(Loaded {
        id,
        key: Arc::new(certified),
        roots,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::super::ca::{BUNDLE_FILE, CA_CERT, CERT_FILE, KEY_FILE, Subject, Validity};
    use super::super::testutil::*;
    use super::*;

    fn copy(from: &TempDir, to: &TempDir, name: &str) {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }

    /// The serial the server at `b` presents to a client of node `a`.
    async fn served_serial(b: &NodeCredentials, a: &NodeCredentials) -> String {
        let (_, client) = handshake(b.server_config(), a.client_config(&b.node_name()))
            .await
            .both_ok();
        client.server_serial
    }

    #[tokio::test]
    async fn reload_makes_new_handshakes_present_the_new_certificate() {
        let ca = new_ca(TD);
        let a = NodeCredentials::load(node_dir(&ca, "a").path()).unwrap();
        let dir_b = node_dir(&ca, "b");
        let b = NodeCredentials::load(dir_b.path()).unwrap();
        let first = b.info().serial;
        assert_eq!(served_serial(&b, &a).await, first);

        issue_into(
            &ca,
            Subject::Node("b".into()),
            Validity::from_now(hours(24)),
            dir_b.path(),
        );
        // New files alone change nothing: the loaded set is what is served.
        assert_eq!(served_serial(&b, &a).await, first);
        b.reload().unwrap();
        let second = b.info().serial;
        assert_ne!(second, first);
        assert_eq!(served_serial(&b, &a).await, second);
        // The same configuration object, new certificate.
        let server = b.server_config();
        issue_into(
            &ca,
            Subject::Node("b".into()),
            Validity::from_now(hours(24)),
            dir_b.path(),
        );
        b.reload().unwrap();
        assert!(Arc::ptr_eq(&server, &b.server_config()));
        assert_eq!(served_serial(&b, &a).await, b.info().serial);
        assert_ne!(b.info().serial, second);
    }

    #[tokio::test]
    async fn a_failed_reload_keeps_serving_the_old_certificate() {
        let ca = new_ca(TD);
        let a = NodeCredentials::load(node_dir(&ca, "a").path()).unwrap();
        let dir_b = node_dir(&ca, "b");
        let b = NodeCredentials::load(dir_b.path()).unwrap();
        let serial = b.info().serial;
        let good_key = std::fs::read(dir_b.join(KEY_FILE)).unwrap();
        let good_cert = std::fs::read(dir_b.join(CERT_FILE)).unwrap();

        // A broken key file.
        std::fs::write(dir_b.join(KEY_FILE), "-----BEGIN PRIVATE KEY-----\nnope\n").unwrap();
        let err = b.reload().unwrap_err();
        let text = err.to_string();
        assert_eq!(err.reason(), "bad_file", "{text}");
        assert!(
            text.contains(&dir_b.join(KEY_FILE).display().to_string()),
            "{text}"
        );
        assert!(
            text.contains("still using the previous certificate"),
            "{text}"
        );
        assert!(text.contains(&serial), "{text}");
        assert!(
            !text.contains("nope"),
            "the key's content never reaches a message: {text}"
        );
        assert_eq!(served_serial(&b, &a).await, serial);
        assert_eq!(b.info().serial, serial);

        // A key of another certificate.
        let other = node_dir(&ca, "b");
        copy(&other, &dir_b, KEY_FILE);
        let err = b.reload().unwrap_err();
        assert_eq!(err.reason(), "key_mismatch", "{err}");
        assert!(
            err.to_string().contains("key.pem does not belong to"),
            "{err}"
        );
        assert_eq!(served_serial(&b, &a).await, serial);

        // An expired certificate (with its own key).
        let expired = TempDir::new("expired");
        issue_into(
            &ca,
            Subject::Node("b".into()),
            window(-7200, -3600),
            expired.path(),
        );
        copy(&expired, &dir_b, KEY_FILE);
        copy(&expired, &dir_b, CERT_FILE);
        assert_eq!(b.reload().unwrap_err().reason(), "expired");

        // Another trust domain, with its own CA and bundle.
        let other_ca = new_ca("other.td");
        let foreign = node_dir(&other_ca, "b");
        for name in [KEY_FILE, CERT_FILE, BUNDLE_FILE] {
            copy(&foreign, &dir_b, name);
        }
        let err = b.reload().unwrap_err();
        assert_eq!(err.reason(), "wrong_trust_domain", "{err}");
        assert_eq!(b.trust_domain(), TD);

        // Another node's certificate.
        let c = node_dir(&ca, "c");
        for name in [KEY_FILE, CERT_FILE, BUNDLE_FILE] {
            copy(&c, &dir_b, name);
        }
        let err = b.reload().unwrap_err();
        assert_eq!(err.reason(), "wrong_spiffe_id", "{err}");
        assert_eq!(b.spiffe_id().node_name(), Some("b"));

        // A missing file.
        std::fs::remove_file(dir_b.join(CERT_FILE)).unwrap();
        let err = b.reload().unwrap_err();
        assert_eq!(err.reason(), "io");
        assert!(err.to_string().contains("cert.pem"), "{err}");
        assert_eq!(served_serial(&b, &a).await, serial);

        // Good files again: reload works.
        std::fs::write(dir_b.join(KEY_FILE), &good_key).unwrap();
        std::fs::write(dir_b.join(CERT_FILE), &good_cert).unwrap();
        std::fs::copy(ca.join(CA_CERT), dir_b.join(BUNDLE_FILE)).unwrap();
        b.reload().unwrap();
        assert_eq!(served_serial(&b, &a).await, serial);
    }

    #[tokio::test]
    async fn a_second_root_in_the_bundle_lets_its_nodes_in_and_keeps_the_old_ones() {
        let (ca1, ca2) = (new_ca(TD), new_ca(TD));
        let a = NodeCredentials::load(node_dir(&ca1, "a").path()).unwrap();
        let dir_b = node_dir(&ca1, "b");
        let b = NodeCredentials::load(dir_b.path()).unwrap();
        // Node c has a certificate of the new root and trusts both.
        let dir_c = node_dir(&ca2, "c");
        let both = [
            std::fs::read(ca2.join(CA_CERT)).unwrap(),
            std::fs::read(ca1.join(CA_CERT)).unwrap(),
        ]
        .concat();
        std::fs::write(dir_c.join(BUNDLE_FILE), &both).unwrap();
        let c = NodeCredentials::load(dir_c.path()).unwrap();
        assert_eq!(c.info().bundle_roots, 2);

        let outcome = handshake(b.server_config(), c.client_config("b")).await;
        assert_eq!(outcome.server_reason(), "unknown_ca");

        std::fs::write(dir_b.join(BUNDLE_FILE), &both).unwrap();
        b.reload().unwrap();
        assert_eq!(b.info().bundle_roots, 2);
        assert_eq!(b.info().bundle_subjects.len(), 2);
        let (seen, _) = handshake(b.server_config(), c.client_config("b"))
            .await
            .both_ok();
        assert_eq!(seen.peer.unwrap().node_name(), Some("c"));
        let (seen, _) = handshake(b.server_config(), a.client_config("b"))
            .await
            .both_ok();
        assert_eq!(seen.peer.unwrap().node_name(), Some("a"));
        // And b, as a client, accepts c as a server.
        handshake(c.server_config(), b.client_config("c"))
            .await
            .both_ok();
    }

    #[test]
    fn load_refuses_a_certificate_the_bundle_does_not_sign() {
        let (ca1, ca2) = (new_ca(TD), new_ca(TD));
        let dir = node_dir(&ca1, "a");
        std::fs::copy(ca2.join(CA_CERT), dir.join(BUNDLE_FILE)).unwrap();
        let err = NodeCredentials::load(dir.path()).unwrap_err();
        assert_eq!(err.reason(), "unknown_ca", "{err}");
        assert!(err.to_string().contains("cert.pem"), "{err}");

        let empty = TempDir::new("empty");
        let err = NodeCredentials::load(empty.path()).unwrap_err();
        assert_eq!(err.reason(), "io");
        assert!(
            err.to_string().contains("meshctl ca issue --out DIR"),
            "{err}"
        );
    }

    #[test]
    fn info_describes_the_loaded_certificate() {
        let ca = new_ca(TD);
        let dir = node_dir(&ca, "n1");
        let creds = NodeCredentials::load(dir.path()).unwrap();
        let info = creds.info();
        assert_eq!(info.spiffe_id.as_str(), "spiffe://cluster.local/node/n1");
        assert_eq!(info.not_after - info.not_before, 24 * 3600 + 5 * 60);
        assert_eq!(info.bundle_roots, 1);
        assert!(info.issuer.contains("mesh root CA"), "{}", info.issuer);
        assert_eq!(info.bundle_subjects, vec![info.issuer.clone()]);
        assert!(info.not_after_time() > SystemTime::now());
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["spiffe_id"], "spiffe://cluster.local/node/n1");
        // Debug never shows key material.
        let debug = format!("{creds:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
    }
}
