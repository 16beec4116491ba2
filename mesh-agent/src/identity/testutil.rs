//! Test helpers: temporary directories, a CA and certificates issued by the
//! real `ca` functions, "attacker" rustls configurations that present any
//! certificate and trust anything, and one real TLS handshake over loopback.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::ca::{self, CERT_FILE, KEY_FILE, Subject, Validity};
use super::{ALPN_H2, SpiffeId, cert, peer_identity, tls};

pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("mesh-identity-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) const TD: &str = "cluster.local";

/// A fresh mesh CA of trust domain `td`.
pub(crate) fn new_ca(td: &str) -> TempDir {
    let dir = TempDir::new("ca");
    ca::init(&ca::InitOptions {
        dir: dir.path().to_owned(),
        trust_domain: td.to_owned(),
        days: 30,
        force: false,
    })
    .unwrap();
    dir
}

pub(crate) fn hours(h: u64) -> Duration {
    Duration::from_secs(h * 3600)
}

/// Valid from `start` to `end` relative to now (seconds, may be negative).
pub(crate) fn window(start: i64, end: i64) -> Validity {
    let at = |offset: i64| {
        let now = SystemTime::now();
        if offset >= 0 {
            now + Duration::from_secs(offset as u64)
        } else {
            now - Duration::from_secs(offset.unsigned_abs())
        }
    };
    Validity {
        not_before: at(start),
        not_after: at(end),
    }
}

/// Issues `subject` from `ca_dir` into `out`.
pub(crate) fn issue_into(ca_dir: &TempDir, subject: Subject, validity: Validity, out: &Path) {
    ca::issue(&ca::IssueOptions {
        ca_dir: ca_dir.path().to_owned(),
        out: out.to_owned(),
        subject,
        validity,
    })
    .unwrap();
}

/// A node's identity directory: a 24 h certificate for `node`.
pub(crate) fn node_dir(ca_dir: &TempDir, node: &str) -> TempDir {
    let dir = TempDir::new(node);
    issue_into(
        ca_dir,
        Subject::Node(node.to_owned()),
        Validity::from_now(hours(24)),
        dir.path(),
    );
    dir
}

/// A leaf for any `id` (even of another trust domain), with `edit` applied
/// to the parameters, signed by the CA in `ca_dir`: for hostile certificates
/// `ca::issue` refuses to make.
pub(crate) fn custom_dir(
    ca_dir: &TempDir,
    id: &str,
    edit: impl FnOnce(&mut rcgen::CertificateParams),
) -> TempDir {
    let dir = TempDir::new("custom");
    let loaded = ca::Ca::load(ca_dir.path()).unwrap();
    let id: SpiffeId = id.parse().unwrap();
    let mut params = ca::leaf_params(&id, Validity::from_now(hours(1))).unwrap();
    edit(&mut params);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = loaded.sign(&params, &key).unwrap();
    loaded.write_leaf(dir.path(), &leaf, &key).unwrap();
    dir
}

/// Trusts any peer certificate (but still checks handshake signatures):
/// the stance of an attacker, or of a peer that does not check.
#[derive(Debug)]
struct TrustAnything;

fn algs() -> rustls::crypto::WebPkiSupportedAlgorithms {
    tls::provider().signature_verification_algorithms
}

impl ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &algs())
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &algs())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algs().supported_schemes()
    }
}

impl ClientCertVerifier for TrustAnything {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &algs())
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &algs())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algs().supported_schemes()
    }
}

fn files(
    dir: &Path,
) -> (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let chain = cert::certs_from_pem(&cert_path, &std::fs::read(&cert_path).unwrap(), "").unwrap();
    let key = cert::key_from_pem(&key_path, &std::fs::read(&key_path).unwrap(), "").unwrap();
    (chain, key)
}

/// A client presenting the certificate in `dir` (none without), trusting
/// any server.
pub(crate) fn raw_client(dir: Option<&Path>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything));
    let mut config = match dir {
        Some(dir) => {
            let (chain, key) = files(dir);
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// A server presenting the certificate in `dir`, accepting any client cert.
pub(crate) fn raw_server(dir: &Path) -> Arc<ServerConfig> {
    let (chain, key) = files(dir);
    let mut config = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(TrustAnything))
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// What the server saw of a handshake that worked.
#[derive(Debug)]
pub(crate) struct ServerSeen {
    pub peer: Option<SpiffeId>,
    pub alpn: Option<Vec<u8>>,
    pub suite: Option<rustls::CipherSuite>,
    pub version: Option<rustls::ProtocolVersion>,
    pub resumed: bool,
}

/// What the client saw.
#[derive(Debug)]
pub(crate) struct ClientSeen {
    pub server_serial: String,
    pub server_id: Option<SpiffeId>,
    pub alpn: Option<Vec<u8>>,
    pub suite: Option<rustls::CipherSuite>,
}

pub(crate) struct Outcome {
    pub server: Result<ServerSeen, io::Error>,
    pub client: Result<ClientSeen, io::Error>,
}

impl Outcome {
    pub(crate) fn server_reason(&self) -> &'static str {
        match &self.server {
            Ok(seen) => panic!("the server accepted the handshake: {seen:?}"),
            Err(e) => super::io_failure_reason(e),
        }
    }

    pub(crate) fn client_reason(&self) -> &'static str {
        match &self.client {
            Ok(seen) => panic!("the client accepted the handshake: {seen:?}"),
            Err(e) => super::io_failure_reason(e),
        }
    }

    pub(crate) fn both_ok(self) -> (ServerSeen, ClientSeen) {
        match (self.server, self.client) {
            (Ok(s), Ok(c)) => (s, c),
            (s, c) => panic!("handshake failed: server {s:?}, client {c:?}"),
        }
    }
}

const BOUND: Duration = Duration::from_secs(20);

/// One real TLS handshake over loopback TCP. The server sends one byte
/// after its handshake and the client reads it: in TLS 1.3 the client
/// finishes before the server has checked the client's certificate, so the
/// client learns of a rejection only on its first read.
pub(crate) async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let (_, conn) = tls.get_ref();
        let seen = ServerSeen {
            peer: conn.peer_certificates().and_then(|c| peer_identity(c).ok()),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
            version: conn.protocol_version(),
            resumed: matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
        };
        tls.write_all(b"k").await?;
        tls.flush().await?;
        let mut buf = [0u8; 1];
        // Until the client closes.
        let _ = tls.read(&mut buf).await;
        Ok::<_, io::Error>(seen)
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await?;
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| io::Error::other("no server certificate"))?;
        let parsed = cert::parse(leaf, "server").map_err(io::Error::other)?;
        let seen = ClientSeen {
            server_serial: parsed.serial,
            server_id: conn.peer_certificates().and_then(|c| peer_identity(c).ok()),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
        };
        tls.shutdown().await?;
        Ok(seen)
    };
    let client = tokio::time::timeout(BOUND, client_side)
        .await
        .expect("client side bounded");
    let server = tokio::time::timeout(BOUND, server_task)
        .await
        .expect("server side bounded")
        .expect("server task");
    Outcome { server, client }
}
