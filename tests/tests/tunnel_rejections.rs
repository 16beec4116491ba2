//! Every way the tunnel refuses, end to end on a three-node cluster: the
//! refusal happens (the client gets a reset or a failed handshake, never
//! data) and the agent counts it by reason in its Prometheus metrics
//! (`mesh_tunnel_handshake_failures_total{direction,reason}`,
//! `mesh_tunnel_streams_rejected_total{direction,reason,status}`).
//!
//! Clients and listeners inside the nodes are small python3 programs run in
//! the node's network namespace and cgroup (`Node::command`), so they are
//! exactly what an application there would be: a VIP connect the kernel
//! hands to the agent, or a raw TLS client on a peer's :15008.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mesh_tests::cluster::{Node, TRUST_DOMAIN, meshctl, metric, path};
use mesh_tests::{Cluster, PyProcess, run_with_timeout};
use serde_json::Value;

const VIP: &str = "127.77.0.1";
const VIP_PORT: &str = "80";
const BACKEND_PORT: u16 = 9000;
const TUNNEL_PORT: &str = "15008";
const PY_LIMIT: Duration = Duration::from_secs(20);
const METRIC_WAIT: Duration = Duration::from_secs(10);

const HANDSHAKE_FAILURES: &str = "mesh_tunnel_handshake_failures_total";
const STREAMS_REJECTED: &str = "mesh_tunnel_streams_rejected_total";
const HANDSHAKES: &str = "mesh_tunnel_handshakes_total";

/// The python side. Every socket has a timeout; each mode prints one JSON
/// object (or, for `listen`, a "listening" line and then one line per
/// accepted connection).
const PY: &str = r#"
import json, socket, ssl, sys

def classify_read(s):
    try:
        b = s.recv(65536)
    except ssl.SSLError as e:
        return {"read": "tls_error", "detail": str(e)}
    except ConnectionResetError as e:
        return {"read": "reset", "detail": str(e)}
    except socket.timeout:
        return {"read": "timeout"}
    except OSError as e:
        return {"read": "error", "detail": str(e)}
    if not b:
        return {"read": "eof"}
    return {"read": "data", "len": len(b), "hex": b[:64].hex()}

mode = sys.argv[1]
if mode == "tls":
    host, port, cert, key = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The server's certificate is not what these tests look at.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(cert, key)
    raw = socket.create_connection((host, port), timeout=10)
    out = {}
    try:
        s = ctx.wrap_socket(raw)
        out["handshake"] = "ok"
        out["alpn"] = s.selected_alpn_protocol()
    except (ssl.SSLError, OSError) as e:
        out["handshake"] = "failed"
        out["detail"] = str(e)
        print(json.dumps(out))
        sys.exit(0)
    # The HTTP/2 client preface and an empty SETTINGS frame: an agent that
    # took us answers with its own SETTINGS (data); one that refused our
    # certificate sends an alert (TLS 1.3: seen on the first read).
    try:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        out["write"] = "ok"
    except (ssl.SSLError, OSError) as e:
        out["write"] = "failed: %s" % e
    out.update(classify_read(s))
    print(json.dumps(out))
elif mode == "plain":
    host, port = sys.argv[2], int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    out = classify_read(s)
    if out["read"] == "data":
        # Whatever follows (an alert, then the close).
        out.update({"then": classify_read(s)["read"]})
    print(json.dumps(out))
elif mode == "app":
    host, port = sys.argv[2], int(sys.argv[3])
    out = {}
    try:
        s = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        print(json.dumps({"connect": "failed", "detail": str(e)}))
        sys.exit(0)
    out["connect"] = "ok"
    try:
        s.sendall(b"hello through the tunnel\n")
        out["write"] = "ok"
    except OSError as e:
        out["write"] = "failed"
        # EPIPE/ECONNRESET on the write: the reset came first.
        if isinstance(e, (ConnectionResetError, BrokenPipeError)):
            out.update({"read": "reset", "detail": "write: %s" % e})
            print(json.dumps(out))
            sys.exit(0)
    out.update(classify_read(s))
    print(json.dumps(out))
elif mode == "listen":
    host, port = sys.argv[2], int(sys.argv[3])
    l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((host, port))
    l.listen(64)
    print("listening", flush=True)
    l.settimeout(60)
    while True:
        try:
            c, peer = l.accept()
        except socket.timeout:
            break
        print("accepted %s:%d" % peer, flush=True)
        # One request in, one answer out, then a clean close.
        c.settimeout(10)
        try:
            c.recv(65536)
            c.sendall(b"hi from the backend\n")
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        c.close()
"#;

/// `PY listen` on `host:port` inside `node`, once it listens (≤ 10 s);
/// each connection it accepts is a line (`PyProcess::pending`).
fn listen(node: &Node, host: &str, port: u16) -> Result<PyProcess> {
    let mut cmd = node.command("python3");
    cmd.args(["-c", PY, "listen", host, &port.to_string()]);
    PyProcess::ready(cmd, "the python listener", "listening")
}

/// Runs `PY <args>` inside `node` to completion and parses its JSON line.
fn py_json(node: &Node, args: &[&str]) -> Result<Value> {
    let out = run_with_timeout(
        node.command("python3").arg("-c").arg(PY).args(args),
        PY_LIMIT,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "python3 {} in {} failed ({}): {}{}",
            args.join(" "),
            node.name,
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("python3 {} printed {stdout:?}", args.join(" ")))
}

/// The series of `name` (with their labels) that are not zero, for messages.
fn nonzero(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.ends_with(" 0"))
        .map(str::to_owned)
        .collect()
}

/// Polls the node's metrics (≤ 10 s) until `name{labels}` reaches `min`;
/// returns the scrape. The failure names every non-zero series of `name`.
fn wait_metric(node: &Node, name: &str, labels: &[(&str, &str)], min: u64) -> Result<String> {
    let deadline = Instant::now() + METRIC_WAIT;
    loop {
        let text = node.scrape()?;
        if metric(&text, name, labels) >= min {
            return Ok(text);
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: {name}{labels:?} did not reach {min} within {METRIC_WAIT:?}; its non-zero series: {:?}\nagent log:\n{}",
                node.name,
                nonzero(&text, name),
                node.agent().log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One service at the VIP whose only backend is `backend:9000` on `node`.
fn service_yaml(backend: &str, node: &str) -> String {
    format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: {VIP_PORT}\n    mtls: strict\n    backends:\n      - address: {backend}\n        port: {BACKEND_PORT}\n        node: {node}\n"
    )
}

/// A cluster of three with the standard service: backend on node-b.
fn standard_cluster() -> Result<Cluster> {
    let mut cluster = Cluster::new(3)?;
    let backend = cluster.nodes[1].ip4.to_string();
    cluster.start_agents(&service_yaml(&backend, "node-b"), &[])?;
    Ok(cluster)
}

/// A TLS 1.3 client with ALPN h2 and the certificate in `identity` (a
/// `meshctl ca issue` directory), from `from` to `to`'s :15008.
fn tls_client(from: &Node, to: &Node, identity: &Path) -> Result<Value> {
    let ip = to.ip4.to_string();
    py_json(
        from,
        &[
            "tls",
            &ip,
            TUNNEL_PORT,
            path(&identity.join("cert.pem"))?,
            path(&identity.join("key.pem"))?,
        ],
    )
}

/// The client was refused: either its handshake failed or its first read
/// after the HTTP/2 preface got an alert, a reset or EOF, never data.
fn assert_refused(what: &str, r: &Value) {
    let handshake_failed = r["handshake"] == "failed";
    let read = r["read"].as_str().unwrap_or("");
    assert!(
        handshake_failed || matches!(read, "tls_error" | "reset" | "eof" | "error"),
        "{what}: the client was not refused: {r}"
    );
    assert_ne!(r["read"], "data", "{what}: the client got data: {r}");
}

/// An application's connection through the VIP saw a reset: ECONNRESET on
/// a read or write, never data and never a clean EOF.
fn assert_reset(what: &str, r: &Value) {
    assert_eq!(
        r["connect"], "ok",
        "{what}: the VIP connect itself failed (the kernel did not hand it to the agent?): {r}"
    );
    assert_eq!(
        r["read"], "reset",
        "{what}: the application must see a reset (not data, not a clean EOF): {r}"
    );
}

fn app_through_vip(node: &Node) -> Result<Value> {
    py_json(node, &["app", VIP, VIP_PORT])
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[test]
fn a_client_certificate_of_another_ca_is_refused_and_counted_unknown_ca() -> Result<()> {
    let cluster = standard_cluster()?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    // Control: the same client with node-a's own certificate is taken (it
    // gets node-b's SETTINGS), so a refusal below is the certificate's doing.
    let own = tls_client(a, b, &a.identity_dir)?;
    assert_eq!(own["handshake"], "ok", "control: {own}");
    assert_eq!(own["alpn"], "h2", "control: {own}");
    assert_eq!(
        own["read"], "data",
        "control: node-b did not take node-a: {own}"
    );
    wait_metric(b, HANDSHAKES, &[("direction", "inbound")], 1)?;

    let other_ca = cluster.dir().join("other-ca");
    meshctl(&[
        "ca",
        "init",
        "--dir",
        path(&other_ca)?,
        "--trust-domain",
        TRUST_DOMAIN,
    ])?;
    let foreign = cluster.dir().join("node-a-other-ca");
    meshctl(&[
        "ca",
        "issue",
        "--ca-dir",
        path(&other_ca)?,
        "--node",
        "node-a",
        "--out",
        path(&foreign)?,
    ])?;
    let r = tls_client(a, b, &foreign)?;
    assert_refused("node-a's name, another CA", &r);
    let text = wait_metric(
        b,
        HANDSHAKE_FAILURES,
        &[("direction", "inbound"), ("reason", "unknown_ca")],
        1,
    )?;
    assert_eq!(
        metric(&text, HANDSHAKES, &[("direction", "inbound")]),
        1,
        "only the control handshake completed"
    );
    Ok(())
}

#[test]
fn an_expired_node_certificate_is_refused_and_counted_expired() -> Result<()> {
    let cluster = standard_cluster()?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let now = unix_now();
    let expired = cluster.dir().join("node-a-expired");
    cluster.issue(
        "node-a",
        &expired,
        &[
            "--not-before-unix",
            &(now - 7200).to_string(),
            "--not-after-unix",
            &(now - 3600).to_string(),
        ],
    )?;
    let r = tls_client(a, b, &expired)?;
    assert_refused("an expired node-a certificate", &r);
    let text = wait_metric(
        b,
        HANDSHAKE_FAILURES,
        &[("direction", "inbound"), ("reason", "expired")],
        1,
    )?;
    assert_eq!(metric(&text, HANDSHAKES, &[("direction", "inbound")]), 0);
    Ok(())
}

#[test]
fn a_peer_with_the_wrong_spiffe_id_is_refused_and_the_application_is_reset() -> Result<()> {
    let mut cluster = Cluster::new(3)?;
    let (ip_a, ip_b, ip_c) = (
        cluster.nodes[0].ip4,
        cluster.nodes[1].ip4,
        cluster.nodes[2].ip4,
    );
    let services = service_yaml(&ip_b.to_string(), "node-b");
    let right = format!("{}{services}", cluster.nodes_yaml());
    // node-a believes node-b lives at node-c's address.
    let wrong = format!(
        "nodes:\n  - name: node-a\n    address: {ip_a}\n  - name: node-b\n    address: {ip_c}\n{services}"
    );
    cluster.start_agents_each(
        |n| {
            if n.name == "node-a" {
                wrong.clone()
            } else {
                right.clone()
            }
        },
        &[],
    )?;
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    // A backend that would answer, had the stream reached node-b.
    let backend = listen(b, &ip_b.to_string(), BACKEND_PORT)?;

    let r = app_through_vip(a)?;
    assert_reset("node-a dialled node-c expecting node-b", &r);
    wait_metric(
        a,
        HANDSHAKE_FAILURES,
        &[("direction", "outbound"), ("reason", "wrong_spiffe_id")],
        1,
    )?;
    // The stream never got a status: refused at the connection.
    wait_metric(
        a,
        STREAMS_REJECTED,
        &[("direction", "outbound"), ("status", "0")],
        1,
    )?;
    // node-c saw a client that gave up on it (it sent us its certificate).
    let text_c = c.scrape()?;
    assert_eq!(
        metric(&text_c, HANDSHAKES, &[("direction", "inbound")]),
        0,
        "node-c must not have completed a tunnel with node-a: {:?}",
        nonzero(&text_c, HANDSHAKES)
    );
    assert!(backend.pending().is_empty(), "node-b's backend was reached");
    Ok(())
}

#[test]
fn a_client_that_does_not_speak_tls_is_closed_and_counted() -> Result<()> {
    let cluster = standard_cluster()?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let before = metric(
        &b.scrape()?,
        HANDSHAKE_FAILURES,
        &[("direction", "inbound")],
    );
    assert_eq!(before, 0);
    let r = py_json(a, &["plain", &b.ip4.to_string(), TUNNEL_PORT])?;
    match r["read"].as_str() {
        Some("eof" | "reset") => {}
        // A TLS alert record (content type 21) before the close is fine;
        // anything else, e.g. an HTTP answer, is not.
        Some("data") => {
            let hex = r["hex"].as_str().unwrap_or("");
            assert!(hex.starts_with("15"), "not a TLS alert: {r}");
            assert!(
                matches!(r["then"].as_str(), Some("eof" | "reset")),
                "the connection stayed open after the alert: {r}"
            );
        }
        _ => panic!("a plain-text client on :15008 was not closed: {r}"),
    }
    let text = wait_metric(b, HANDSHAKE_FAILURES, &[("direction", "inbound")], 1)?;
    let series = nonzero(&text, HANDSHAKE_FAILURES);
    assert_eq!(
        metric(&text, HANDSHAKE_FAILURES, &[("direction", "inbound")]),
        1,
        "exactly this connection: {series:?}"
    );
    // rustls refuses a first record that is not a handshake: a protocol error.
    assert_eq!(
        metric(
            &text,
            HANDSHAKE_FAILURES,
            &[("direction", "inbound"), ("reason", "protocol")]
        ),
        1,
        "counted as a protocol error: {series:?}"
    );
    Ok(())
}

#[test]
fn a_connect_to_an_address_that_is_not_a_local_backend_is_answered_400() -> Result<()> {
    let mut cluster = Cluster::new(3)?;
    let ip_b = cluster.nodes[1].ip4.to_string();
    let nodes = cluster.nodes_yaml();
    // node-a places web's backend on node-b; node-b's own config serves
    // another port there, so 10.77.0.2:9000 is not one of its backends.
    let on_a = format!("{nodes}{}", service_yaml(&ip_b, "node-b"));
    let elsewhere = format!(
        "{nodes}services:\n  - name: web\n    vip: {VIP}\n    port: {VIP_PORT}\n    mtls: strict\n    backends:\n      - address: {ip_b}\n        port: {}\n        node: node-b\n",
        BACKEND_PORT + 1
    );
    cluster.start_agents_each(
        |n| {
            if n.name == "node-a" {
                on_a.clone()
            } else {
                elsewhere.clone()
            }
        },
        &[],
    )?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Something listens there, so the 400 is the policy's, not the socket's.
    let backend = listen(b, &ip_b, BACKEND_PORT)?;

    let r = app_through_vip(a)?;
    assert_reset("a backend node-b does not serve", &r);
    wait_metric(
        b,
        STREAMS_REJECTED,
        &[
            ("direction", "inbound"),
            ("reason", "not_local_backend"),
            ("status", "400"),
        ],
        1,
    )?;
    wait_metric(
        a,
        STREAMS_REJECTED,
        &[
            ("direction", "outbound"),
            ("reason", "bad_request"),
            ("status", "400"),
        ],
        1,
    )?;
    assert!(
        backend.pending().is_empty(),
        "node-b connected to a backend it does not serve"
    );
    Ok(())
}

#[test]
fn a_backend_that_is_down_is_answered_503_and_the_client_is_reset() -> Result<()> {
    let cluster = standard_cluster()?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Nothing listens on node-b:9000.
    let r = app_through_vip(a)?;
    assert_reset("a backend that is down", &r);
    wait_metric(
        b,
        STREAMS_REJECTED,
        &[
            ("direction", "inbound"),
            ("reason", "backend_connect"),
            ("status", "503"),
        ],
        1,
    )?;
    let text = wait_metric(
        a,
        STREAMS_REJECTED,
        &[
            ("direction", "outbound"),
            ("reason", "backend_unavailable"),
            ("status", "503"),
        ],
        1,
    )?;
    // The tunnel itself was fine: one handshake, no failure.
    assert_eq!(metric(&text, HANDSHAKES, &[("direction", "outbound")]), 1);
    assert_eq!(
        metric(&text, HANDSHAKE_FAILURES, &[("direction", "outbound")]),
        0
    );
    // With the backend up the same client gets through (the control).
    let _up = listen(b, &b.ip4.to_string(), BACKEND_PORT)?;
    let ok = app_through_vip(a)?;
    assert_eq!(ok["connect"], "ok", "{ok}");
    assert_eq!(ok["read"], "data", "control with the backend up: {ok}");
    Ok(())
}
