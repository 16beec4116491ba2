//! TLS done by the applications themselves (rustls on both ends) over a
//! redirected loopback connection: the handshake, records of every size and
//! close_notify all ride the sockhash, and every byte comes back as sent.
//!
//! The test process moves itself into the test cgroup (nextest runs each
//! test in its own process) so that both ends are sockets of that cgroup,
//! and moves back before the cgroup is removed.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mesh_tests::{Agent, TestCgroup, bulk::Rng, cgroup2_mount};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);
const TOTAL: usize = 16 << 20;

/// This process inside `cg` until dropped (declare it after the cgroup, so
/// it is dropped first: the cgroup's drop kills whatever is still inside).
struct Inside {
    home: PathBuf,
}

impl Inside {
    fn enter(cg: &TestCgroup) -> Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let home = cgroup2_mount()?.join(rel.trim_start_matches('/'));
        std::fs::write(cg.path().join("cgroup.procs"), "0")?;
        Ok(Inside { home })
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), "0");
    }
}

/// A blocking socket whose reads retry EAGAIN until a deadline: a socket in
/// the sockhash can return it from a blocking read (kernel limit, see
/// docs/ARCHITECTURE.md); rustls would otherwise report it as an error.
struct Patient(TcpStream, Instant);

impl Read for Patient {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < self.1 => {}
                other => return other,
            }
        }
    }
}

impl Write for Patient {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

fn patient(s: TcpStream) -> Result<Patient> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(Patient(s, Instant::now() + TIMEOUT))
}

fn configs() -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)> {
    let ck = rcgen::generate_simple_self_signed(vec!["mesh.test".to_string()])?;
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((Arc::new(server), Arc::new(client)))
}

/// One TLS echo session over loopback: returns the bytes echoed back, after
/// checking each chunk against what was sent.
fn tls_echo(bind: &str) -> Result<usize> {
    let (server_cfg, client_cfg) = configs()?;
    let listener = TcpListener::bind(bind)?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> Result<u64> {
        let (sock, _) = listener.accept()?;
        let conn = rustls::ServerConnection::new(server_cfg)?;
        let mut tls = rustls::StreamOwned::new(conn, patient(sock)?);
        let mut buf = vec![0u8; 1 << 16];
        let mut echoed = 0u64;
        loop {
            let n = tls.read(&mut buf)?;
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n])?;
            echoed += n as u64;
        }
        tls.conn.send_close_notify();
        tls.flush()?;
        Ok(echoed)
    });
    let sock = TcpStream::connect(addr)?;
    let conn = rustls::ClientConnection::new(client_cfg, ServerName::try_from("mesh.test")?)?;
    let mut tls = rustls::StreamOwned::new(conn, patient(sock)?);
    let mut rng = Rng::new(17);
    let (mut sent, mut back) = (0usize, vec![0u8; 1 << 17]);
    while sent < TOTAL {
        let n = rng.size(1 << 17).min(TOTAL - sent);
        let mut chunk = vec![0u8; n];
        rng.fill(&mut chunk);
        tls.write_all(&chunk)?;
        tls.read_exact(&mut back[..n])?;
        ensure!(
            back[..n] == chunk[..],
            "echo differs in the chunk at {sent}"
        );
        sent += n;
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)?;
    ensure!(rest.is_empty(), "{} bytes after the echo", rest.len());
    let echoed = server.join().expect("server thread")?;
    ensure!(echoed == sent as u64, "server echoed {echoed} of {sent}");
    Ok(sent)
}

fn counter(agent: &Agent, name: &str) -> Result<u64> {
    let v: Value = agent.meshctl_json(&["redirect"])?;
    v["counters"][name].as_u64().context("no such counter")
}

#[test]
fn rustls_over_a_redirected_connection_is_byte_exact() -> Result<()> {
    let cgroup = TestCgroup::new("redir-tls")?;
    let agent = Agent::start("services: []\n", &cgroup)?;
    let _inside = Inside::enter(&cgroup)?;

    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let (b0, s0) = (
            counter(&agent, "bytes_redirected")?,
            counter(&agent, "sockets_added")?,
        );
        let sent = tls_echo(bind)?;
        let (b1, s1) = (
            counter(&agent, "bytes_redirected")?,
            counter(&agent, "sockets_added")?,
        );
        // Both directions, records and handshake included, were redirected.
        assert!(
            b1 - b0 >= 2 * sent as u64,
            "{bind}: {} bytes redirected",
            b1 - b0
        );
        assert!(s1 - s0 >= 2, "{bind}: {} sockets added", s1 - s0);
    }

    // And the same with the switch off: nothing redirected, same bytes.
    let v = agent.meshctl_json(&["redirect", "off"])?;
    assert_eq!(v["enabled"], Value::from(false), "{v}");
    let b0 = counter(&agent, "bytes_redirected")?;
    tls_echo("127.0.0.1:0")?;
    assert_eq!(counter(&agent, "bytes_redirected")?, b0);
    Ok(())
}
