//! Zero trust on the tunnel, end to end on a three-node cluster: each
//! stream carries its client workload's identity, the destination believes
//! it only from the node that hosts that workload, authorizes it by the
//! service's policy, counts every refusal by reason, and closes open streams
//! that a new policy denies.
//!
//! Workloads are child cgroups of their node's cgroup: `frontend` on
//! node-a, `batch` (a full SPIFFE ID) on node-c. The service `web` has its
//! backend on node-b. Where a test needs a node that lies or lags behind,
//! that node gets a configuration of its own (`start_agents_each`); where it
//! needs claims no agent would send, a hand-made HBONE client holds a
//! node's certificate.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_tests::cluster::{Node, TRUST_DOMAIN, meshctl, metric, path};
use mesh_tests::{Cluster, PyProcess, TestCgroup, run_with_timeout};
use serde_json::Value;

const VIP: &str = "127.77.0.1";
const BACKEND_PORT: u16 = 9000;
const LIMIT: Duration = Duration::from_secs(20);
const BATCH: &str = "spiffe://mesh.test/ns/jobs/sa/batch";
const FRONTEND: &str = "spiffe://mesh.test/ns/default/sa/frontend";
const REJECTED: &str = "mesh_tunnel_streams_rejected_total";

/// Servers and clients inside the nodes. Every socket has a timeout and
/// every loop a bound.
const PY: &str = r#"
import json, socket, sys, threading, time
mode = sys.argv[1]

def report(**kw):
    print(json.dumps(kw), flush=True)

if mode == "once":
    try:
        s = socket.create_connection((sys.argv[2], 80), timeout=10)
    except OSError as e:
        report(connect="failed", errno=e.errno)
        sys.exit(0)
    msg = sys.argv[3].encode()
    got = b""
    try:
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
    except ConnectionResetError:
        report(connect="ok", read="reset", got=len(got))
        sys.exit(0)
    except OSError as e:
        report(connect="ok", read="error", detail=str(e))
        sys.exit(0)
    report(connect="ok", read="eof", echo=got.decode(errors="replace"))
elif mode == "hold":
    # One long-lived connection: numbered 512-byte exchanges, each echo
    # checked, a tick line every 20, until the connection ends or the bound.
    s = socket.create_connection((sys.argv[2], 80), timeout=10)
    n = 0
    deadline = time.time() + 60
    try:
        while n < 200000 and time.time() < deadline:
            msg = (b"%08d" % n) * 64
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                b = s.recv(len(msg) - len(got))
                if not b:
                    report(ended="eof", exchanges=n)
                    sys.exit(0)
                got += b
            if got != msg:
                report(ended="corrupt", exchanges=n)
                sys.exit(0)
            n += 1
            if n == 1:
                print("open", flush=True)
            if n % 20 == 0:
                print("tick %d" % n, flush=True)
            time.sleep(0.005)
    except ConnectionResetError:
        report(ended="reset", exchanges=n, at=time.time())
        sys.exit(0)
    except OSError as e:
        report(ended="error", detail=str(e), exchanges=n, at=time.time())
        sys.exit(0)
    report(ended="bound", exchanges=n)
elif mode == "tls":
    # A TLS client with the given certificate that does not check the
    # server's: what the test looks at is whether the server takes ours.
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    raw = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    try:
        t = ctx.wrap_socket(raw)
        t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        # TLS 1.3: a refused client certificate shows on the first read.
        b = t.recv(65536)
        report(handshake="ok", read=len(b))
    except (ssl.SSLError, OSError) as e:
        report(handshake="failed", detail=str(e))
"#;

fn py(node: &Node, cgroup: Option<&TestCgroup>) -> std::process::Command {
    let mut cmd = match cgroup {
        Some(cgroup) => node.command_in(cgroup, "python3"),
        None => node.command("python3"),
    };
    cmd.args(["-u", "-c", PY]);
    cmd
}

/// The echo backend of `web` on node-b.
fn echo_backend(node: &Node) -> Result<PyProcess> {
    mesh_tests::python::echo_server(node, &node.ip4.to_string(), BACKEND_PORT)
}

/// One connection to `web`'s VIP from `cgroup` on `node`, its JSON report.
fn once(node: &Node, cgroup: &TestCgroup, message: &str) -> Result<Value> {
    let mut cmd = py(node, Some(cgroup));
    cmd.args(["once", VIP, message]);
    let out = run_with_timeout(&mut cmd, LIMIT)?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("client output {text:?}"))
}

fn assert_echoed(what: &str, r: &Value, message: &str) {
    assert_eq!(r["connect"], "ok", "{what}: {r}");
    assert_eq!(r["read"], "eof", "{what}: {r}");
    assert_eq!(r["echo"], message, "{what}: {r}");
}

/// The tunnel refused the stream: the client's connection is reset
/// without a byte of the backend's.
fn assert_reset(what: &str, r: &Value) {
    assert_eq!(r["connect"], "ok", "{what}: {r}");
    assert_eq!(r["read"], "reset", "{what}: {r}");
    assert_eq!(r["got"], 0, "{what}: {r}");
}

/// The cluster's workloads: `frontend` on `frontend_node`, `batch` on
/// node-c, each a child cgroup of its node's.
fn workloads_yaml(cluster: &Cluster, frontend_node: usize) -> String {
    let a = &cluster.nodes[frontend_node];
    let c = &cluster.nodes[2];
    format!(
        "workloads:\n  \
         - {{ name: frontend, cgroup: {}/frontend, node: {} }}\n  \
         - {{ name: batch, cgroup: {}/batch, node: {}, identity: '{BATCH}' }}\n",
        a.cgroup.path().display(),
        a.name,
        c.cgroup.path().display(),
        c.name,
    )
}

/// `web`, its backend on node-b, with `policy` (YAML flow map, or empty).
fn web_yaml(cluster: &Cluster, policy: &str) -> String {
    let b = &cluster.nodes[1];
    let policy = if policy.is_empty() {
        String::new()
    } else {
        format!("    policy: {policy}\n")
    };
    format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    mtls: strict\n{policy}    \
         backends:\n      - {{ address: {}, port: {BACKEND_PORT}, node: {} }}\n",
        b.ip4, b.name
    )
}

/// Three nodes, `frontend` and `batch` cgroups on node-a and node-c, and
/// the echo backend on node-b. Agents are the caller's to start.
struct Setup {
    frontend: TestCgroup,
    batch: TestCgroup,
    _backend: Option<PyProcess>,
    cluster: Cluster,
}

impl Setup {
    fn new() -> Result<Setup> {
        let cluster = Cluster::new(3)?;
        Ok(Setup {
            frontend: cluster.nodes[0].cgroup.child("frontend")?,
            batch: cluster.nodes[2].cgroup.child("batch")?,
            _backend: None,
            cluster,
        })
    }

    fn start(&mut self, config: impl Fn(&Cluster, &Node) -> String) -> Result<()> {
        let yaml: Vec<String> = self
            .cluster
            .nodes
            .iter()
            .map(|n| format!("{}{}", self.cluster.nodes_yaml(), config(&self.cluster, n)))
            .collect();
        self.cluster
            .start_agents_each(|n| yaml[index(&n.name)].clone(), &[])?;
        self._backend = Some(echo_backend(&self.cluster.nodes[1])?);
        Ok(())
    }

    fn node(&self, i: usize) -> &Node {
        &self.cluster.nodes[i]
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Processes and agents go before the cgroups they run in.
        self._backend = None;
        for node in &mut self.cluster.nodes {
            node.agent = None;
        }
    }
}

fn index(node: &str) -> usize {
    (node.as_bytes()[node.len() - 1] - b'a') as usize
}

/// Waits (≤ 10 s) until `name{labels}` on `node` reaches `min`; its value.
fn wait_metric(node: &Node, name: &str, labels: &[(&str, &str)], min: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = metric(&node.scrape()?, name, labels);
        if value >= min {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!(
                "{name}{labels:?} on {} is {value}, not {min} or more",
                node.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rejected(reason: &str, status: &str) -> [(&'static str, String); 3] {
    [
        ("direction", "inbound".into()),
        ("reason", reason.into()),
        ("status", status.into()),
    ]
}

fn labels<'a>(l: &'a [(&'static str, String); 3]) -> Vec<(&'static str, &'a str)> {
    l.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn an_identity_the_destination_denies_is_answered_401_and_counted() -> Result<()> {
    let mut s = Setup::new()?;
    // node-b's policy denies frontend; node-a's configuration lags behind
    // (no policy yet), so only the destination can stop it.
    s.start(|cluster, node| {
        let policy = if node.name == "node-b" {
            "{ deny: [frontend] }"
        } else {
            ""
        };
        format!(
            "{}{}",
            workloads_yaml(cluster, 0),
            web_yaml(cluster, policy)
        )
    })?;
    let r = once(s.node(0), &s.frontend, "from frontend")?;
    assert_reset("frontend, denied at node-b", &r);
    let r = once(s.node(2), &s.batch, "from batch")?;
    assert_echoed("batch, allowed", &r, "from batch");

    let b = s.node(1);
    wait_metric(b, REJECTED, &labels(&rejected("denied", "401")), 1)?;
    wait_metric(
        b,
        "mesh_tunnel_service_streams_total",
        &[("service", "web")],
        1,
    )?;
    wait_metric(
        s.node(0),
        REJECTED,
        &[("direction", "outbound"), ("status", "401")],
        1,
    )?;

    // Once node-a has the policy too, its own kernel refuses the connect
    // (EPERM) before anything leaves the node.
    let denying = format!(
        "{}{}",
        workloads_yaml(&s.cluster, 0),
        web_yaml(&s.cluster, "{ deny: [frontend] }")
    );
    s.node(0)
        .agent()
        .write_config(&format!("{}{denying}", s.cluster.nodes_yaml()))?;
    s.node(0).agent().wait_for_generation(2, LIMIT)?;
    let r = once(s.node(0), &s.frontend, "again")?;
    assert_eq!(r["connect"], "failed", "{r}");
    assert_eq!(r["errno"], libc::EPERM, "{r}");

    // meshctl says the same: the policy check, and explain's view of the
    // remote backend for frontend's cgroup.
    let check = b
        .agent()
        .meshctl_json(&["authz", "check", "--from", "frontend", "--to", "web"])?;
    assert_eq!(check["from"], FRONTEND, "{check}");
    assert_eq!(check["allowed"], false, "{check}");
    assert_eq!(check["rule"], "deny_list", "{check}");
    assert_eq!(check["hosted_by"], serde_json::json!(["node-a"]), "{check}");
    let check = b.agent().meshctl_json(&[
        "authz", "check", "--from", BATCH, "--to", "web", "--node", "node-a",
    ])?;
    assert_eq!(
        check["allowed"], false,
        "batch is not node-a's to claim: {check}"
    );
    assert_eq!(check["claim_from_node"]["believed"], false, "{check}");
    // node-a speaks for frontend (and for nothing of node-c's).
    let certs = s.node(0).agent().meshctl_json(&["certs"])?;
    let spoken: Vec<&Value> = certs["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(spoken.len(), 1, "{certs}");
    assert_eq!(spoken[0]["spiffe_id"], FRONTEND, "{certs}");
    assert_eq!(spoken[0]["claimable"], true, "{certs}");
    let frontend_cgroup = s.frontend.path().display().to_string();
    let explain =
        s.node(0)
            .agent()
            .meshctl_json(&["explain", "web", "--client", &frontend_cgroup])?;
    let remote = &explain["remote"][0];
    assert_eq!(remote["node"], "node-b", "{explain}");
    assert_eq!(remote["identity"], FRONTEND, "{explain}");
    assert!(
        remote["destination"]
            .as_str()
            .unwrap_or_default()
            .contains("deny list"),
        "{explain}"
    );
    Ok(())
}

#[test]
fn a_node_claiming_a_workload_it_does_not_host_is_refused_as_not_hosted() -> Result<()> {
    let mut s = Setup::new()?;
    let liar = s.node(2).cgroup.child("frontend")?;
    // node-c's configuration says frontend runs there (on the cgroup
    // `liar`); the others know it runs on node-a.
    s.start(|cluster, node| {
        let frontend_node = if node.name == "node-c" { 2 } else { 0 };
        format!(
            "{}{}",
            workloads_yaml(cluster, frontend_node),
            web_yaml(cluster, "")
        )
    })?;
    let r = once(s.node(2), &liar, "not really frontend")?;
    assert_reset("node-c speaking for frontend", &r);
    let r = once(s.node(0), &s.frontend, "the real frontend")?;
    assert_echoed("frontend from node-a", &r, "the real frontend");
    wait_metric(
        s.node(1),
        REJECTED,
        &labels(&rejected("not_hosted", "401")),
        1,
    )?;
    Ok(())
}

/// What a hand-made HBONE client got: the status of its CONNECT, or why
/// there was none.
#[derive(Debug, PartialEq, Eq)]
enum Hbone {
    Status(u16),
    Failed(String),
}

/// One CONNECT to `to`'s agent for `backend`, sent from inside `from`'s
/// network namespace with the certificate in `identity_dir`, claiming each
/// of `claims` as `x-mesh-source-identity`.
fn hbone(from: &Node, identity_dir: &Path, to: &Node, backend: &str, claims: &[&str]) -> Hbone {
    let netns = format!("/run/netns/{}", from.netns.name());
    let to_addr = (to.ip4, 15008u16);
    let to_name = to.name.clone();
    let dir = identity_dir.to_owned();
    let backend = backend.to_owned();
    let claims: Vec<String> = claims.iter().map(|c| c.to_string()).collect();
    let run = move || -> Result<Hbone> {
        let ns = std::fs::File::open(&netns).with_context(|| netns.clone())?;
        // SAFETY: setns on this thread only, with a namespace fd we opened.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {netns}: {}", std::io::Error::last_os_error());
        }
        let credentials = mesh_agent::identity::NodeCredentials::load(&dir)?;
        let config = credentials.client_config(&to_name);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(async move {
            let exchange = async {
                let tcp = tokio::net::TcpStream::connect(to_addr).await?;
                let server = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into());
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(server, tcp)
                    .await?;
                let (send, connection) = h2::client::handshake(tls).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                let mut send = send.ready().await?;
                let mut request = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(backend.as_str())
                    .header("forwarded", "for=\"10.77.0.3:40000\"");
                for claim in &claims {
                    request = request.header("x-mesh-source-identity", claim.as_str());
                }
                let (response, _body) = send.send_request(request.body(())?, false)?;
                anyhow::Ok(response.await?.status().as_u16())
            };
            match tokio::time::timeout(LIMIT, exchange).await {
                Ok(Ok(status)) => Hbone::Status(status),
                Ok(Err(e)) => Hbone::Failed(format!("{e:#}")),
                Err(_) => Hbone::Failed("timed out".into()),
            }
        }))
    };
    match std::thread::spawn(run).join() {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Hbone::Failed(format!("setup: {e:#}")),
        Err(_) => Hbone::Failed("the client thread panicked".into()),
    }
}

#[test]
fn forged_and_replayed_claims_are_refused_and_counted_by_reason() -> Result<()> {
    let mut s = Setup::new()?;
    s.start(|cluster, _| format!("{}{}", workloads_yaml(cluster, 0), web_yaml(cluster, "")))?;
    let (b, c) = (s.node(1), s.node(2));
    let backend = format!("{}:{BACKEND_PORT}", b.ip4);
    let as_c = |claims: &[&str]| hbone(c, &c.identity_dir, b, &backend, claims);

    // The baseline: node-c speaking for its own workload is let through.
    assert_eq!(as_c(&[BATCH]), Hbone::Status(200));
    // Replaying node-a's claim (its exact header) from node-c: not hosted.
    assert_eq!(as_c(&[FRONTEND]), Hbone::Status(401));
    // Forged claims: another trust domain, a node's own ID, a service
    // account path that is not a workload's.
    for forged in [
        "spiffe://other.test/ns/jobs/sa/batch",
        "spiffe://mesh.test/node/node-c",
        "spiffe://mesh.test/ns/jobs",
    ] {
        assert_eq!(as_c(&[forged]), Hbone::Status(401), "{forged}");
    }
    // Two claims at once, or one that is no SPIFFE ID: malformed.
    assert_eq!(as_c(&[BATCH, FRONTEND]), Hbone::Status(400));
    assert_eq!(as_c(&["batch"]), Hbone::Status(400));

    wait_metric(b, REJECTED, &labels(&rejected("not_hosted", "401")), 1)?;
    wait_metric(b, REJECTED, &labels(&rejected("invalid_claim", "401")), 3)?;
    wait_metric(
        b,
        REJECTED,
        &labels(&rejected("duplicate_header", "400")),
        1,
    )?;
    wait_metric(
        b,
        REJECTED,
        &labels(&rejected("bad_source_identity", "400")),
        1,
    )?;
    Ok(())
}

#[test]
fn a_certificate_of_the_mesh_ca_for_another_trust_domain_is_refused() -> Result<()> {
    let mut s = Setup::new()?;
    s.start(|cluster, _| format!("{}{}", workloads_yaml(cluster, 0), web_yaml(cluster, "")))?;
    let foreign = s.cluster.dir().join("foreign-identity");
    meshctl(&[
        "ca",
        "issue",
        "--ca-dir",
        path(&s.cluster.ca_dir)?,
        "--spiffe-id",
        "spiffe://other.test/node/node-c",
        "--foreign-trust-domain",
        "--out",
        path(&foreign)?,
    ])?;
    assert_ne!(TRUST_DOMAIN, "other.test");

    let (b, c) = (s.node(1), s.node(2));
    let mut cmd = py(c, None);
    cmd.args(["tls", &b.ip4.to_string(), "15008"])
        .arg(foreign.join("cert.pem"))
        .arg(foreign.join("key.pem"));
    let out = run_with_timeout(&mut cmd, LIMIT)?;
    let r: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())?;
    assert_eq!(
        r["handshake"], "failed",
        "a foreign trust domain's certificate: {r}"
    );
    wait_metric(
        b,
        "mesh_tunnel_handshake_failures_total",
        &[("direction", "inbound"), ("reason", "wrong_trust_domain")],
        1,
    )?;
    Ok(())
}

#[test]
fn a_policy_change_closes_the_denied_identitys_open_streams_and_no_others() -> Result<()> {
    let mut s = Setup::new()?;
    let config = |cluster: &Cluster, policy: &str| {
        format!(
            "{}{}",
            workloads_yaml(cluster, 0),
            web_yaml(cluster, policy)
        )
    };
    s.start(|cluster, _| config(cluster, ""))?;
    let hold = |node: &Node, cgroup: &TestCgroup| -> Result<PyProcess> {
        let mut cmd = py(node, Some(cgroup));
        cmd.args(["hold", VIP]);
        let held = PyProcess::spawn(cmd, "a long-lived client")?;
        held.until(LIMIT, |l| l == "open")?;
        Ok(held)
    };
    let frontend = hold(s.node(0), &s.frontend)?;
    let batch = hold(s.node(2), &s.batch)?;
    let b = s.node(1);
    wait_metric(
        b,
        "mesh_tunnel_streams_active",
        &[("direction", "inbound")],
        2,
    )?;

    let changed = Instant::now();
    s.cluster
        .write_config(&config(&s.cluster, "{ deny: [frontend] }"))?;
    let ended = frontend.until(LIMIT, |l| l.starts_with('{'))?;
    let took = changed.elapsed();
    let ended: Value = serde_json::from_str(&ended)?;
    assert_eq!(ended["ended"], "reset", "frontend's stream: {ended}");
    // Reported, not asserted: the issue asks for under a second.
    println!("frontend's open stream was closed {took:?} after the policy was written");

    // batch's stream is untouched: it goes on exchanging, byte-exact.
    let mut ticks = 0;
    while ticks < 3 {
        let line = batch.line(LIMIT)?;
        assert!(line.starts_with("tick"), "batch's stream: {line}");
        ticks += 1;
    }
    assert_eq!(
        metric(
            &b.scrape()?,
            "mesh_tunnel_streams_revoked_total",
            &[("reason", "denied")]
        ),
        1
    );
    Ok(())
}
