//! Certificate rotation on the tunnel (two namespace nodes; a client on
//! node-a reaches an echo backend on node-b through the VIP, so every
//! connection crosses the mTLS tunnel):
//!
//! - every node's leaf is re-issued (`meshctl ca issue` into its identity
//!   directory) under a bounded load: no connection fails, no byte is wrong,
//!   and the tunnel connections opened with the old, short-lived
//!   certificates are gone before those certificates' notAfter;
//! - the trust bundle moves to a second CA (old+new roots, leaves of the
//!   new CA, new root only) under the same load: no connection fails;
//! - a broken renewal (garbage cert.pem, then another node's certificate)
//!   keeps the valid certificate in use, shows in `meshctl certs` and in
//!   `mesh_identity_reloads_total{result="failed"}`, and fixing the files
//!   recovers.
//!
//! The load and the backend are python3 programs inside the nodes: every
//! connection sends a deterministic payload and checks each byte that comes
//! back; the load is bounded in connections and in time. Nothing is judged
//! by how long anything took, except that the old connections must be gone
//! before the old certificates expire, which is the property under test.

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mesh_tests::cluster::{Node, meshctl, metric, path};
use mesh_tests::{Cluster, PyProcess, cluster::TRUST_DOMAIN, run_with_timeout};
use serde_json::{Value, json};

const VIP: &str = "127.77.0.1";
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 9000;
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Lifetime of the certificates the leaf test starts with.
const SHORT_LIFETIME: u64 = 90;

/// `serve`: a threaded echo server. `load`: `count` connections from
/// `workers` threads through the VIP (every `long_every`-th one `long`
/// bytes, the others up to `short_max`), each sending a slice of a fixed
/// pseudo-random stream and checking every byte echoed back; progress goes
/// to a file (atomically, at most every 100 ms), the report to stdout.
const PY: &str = r#"
import json, os, random, signal, socket, sys, threading, time

BLOCK = random.Random(7).randbytes(1 << 20)
B = len(BLOCK)
DBL = BLOCK + BLOCK
MV = memoryview(DBL)

def conn(target, size, off):
    rec = {"size": size, "start": time.time()}
    try:
        s = socket.create_connection(target, timeout=10)
    except OSError as e:
        rec.update(outcome="connect_failed", detail=str(e), end=time.time(), got=0)
        return rec
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(30)
    st = {"err": None}
    def sender():
        pos = 0
        try:
            while pos < size:
                o = (off + pos) % B
                pos += s.send(MV[o:o + min(262144, size - pos)])
            s.shutdown(socket.SHUT_WR)
        except BaseException as e:
            st["err"] = e
    t = threading.Thread(target=sender, daemon=True)
    t.start()
    got, eof, err, corrupt = 0, False, None, None
    try:
        while True:
            b = s.recv(262144)
            if not b:
                eof = True
                break
            o = (off + got) % B
            if got + len(b) > size or DBL[o:o + len(b)] != b:
                corrupt = got
                break
            got += len(b)
    except OSError as e:
        err = e
    t.join(30)
    s.close()
    errs = [e for e in (err, st["err"]) if e is not None]
    if corrupt is not None:
        outcome = "corrupt"
    elif any(isinstance(e, (ConnectionResetError, BrokenPipeError)) for e in errs):
        outcome = "reset"
    elif errs:
        outcome = "error"
    elif eof and got == size:
        outcome = "ok"
    else:
        outcome = "eof_short"
    rec.update(outcome=outcome, got=got, end=time.time())
    if errs or corrupt is not None:
        rec["detail"] = "; ".join(repr(e) for e in errs) or "first wrong byte at %d" % corrupt
    return rec

mode = sys.argv[1]
if mode == "once":
    rec = conn((sys.argv[2], int(sys.argv[3])), int(sys.argv[4]), 12345)
    print(json.dumps(rec))
elif mode == "load":
    cfg = json.loads(sys.argv[2])
    signal.alarm(cfg["seconds"] + 60)
    target = (cfg["host"], cfg["port"])
    deadline = time.time() + cfg["seconds"]
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "ok": 0, "bytes": 0, "failed": [], "ok_ends": [], "written": 0.0}
    def progress(force=False):
        now = time.time()
        if not force and now - state["written"] < 0.1:
            return
        state["written"] = now
        p = {"done": state["done"], "ok": state["ok"], "bytes": state["bytes"],
             "failed": state["failed"][:20], "failures": len(state["failed"]),
             "last_ok_end": max(state["ok_ends"][-64:], default=0)}
        tmp = cfg["progress"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(p, f)
        os.rename(tmp, cfg["progress"])
    def worker():
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= cfg["count"] or time.time() > deadline or os.path.exists(cfg["stop"]):
                return
            if i % cfg["long_every"] == 0:
                size = cfg["long"]
            else:
                size = 1 + (i * 2654435761) % cfg["short_max"]
            rec = conn(target, size, i * 7919)
            rec["i"] = i
            with lock:
                state["done"] += 1
                if rec["outcome"] == "ok":
                    state["ok"] += 1
                    state["bytes"] += 2 * size
                    state["ok_ends"].append(rec["end"])
                else:
                    state["failed"].append(rec)
                progress()
    with lock:
        progress(True)
    threads = [threading.Thread(target=worker) for _ in range(cfg["workers"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with lock:
        progress(True)
    print(json.dumps({"done": state["done"], "ok": state["ok"], "bytes": state["bytes"],
                      "failed": state["failed"], "limit_hit": time.time() > deadline}))
"#;

/// `PY args...` inside `node`.
fn py(node: &Node, args: &[&str], what: &str) -> Result<PyProcess> {
    PyProcess::spawn(mesh_tests::python::command(node, PY, args), what)
}

/// The load's progress and stop files.
struct Load {
    child: Option<PyProcess>,
    progress: PathBuf,
    stop: PathBuf,
}

/// Connections of the load: 1 in 10 carries 8 MiB each way, the others up
/// to 32 KiB; 2000 of them are about 1.6 GiB each way, 3.3 GiB checked.
const COUNT: u64 = 2000;
const LONG: u64 = 8 << 20;

impl Load {
    fn start(node: &Node, dir: &Path) -> Result<Load> {
        let dir = dir.join("load");
        std::fs::create_dir_all(&dir)?;
        let (progress, stop) = (dir.join("progress.json"), dir.join("stop"));
        let path = |p: &Path| p.to_str().map(str::to_owned).context("path is not UTF-8");
        let cfg = json!({
            "host": VIP,
            "port": VIP_PORT,
            "workers": 4,
            "count": COUNT,
            "seconds": 150,
            "long_every": 10,
            "long": LONG,
            "short_max": 32 << 10,
            "progress": path(&progress)?,
            "stop": path(&stop)?,
        });
        let child = py(node, &["load", &cfg.to_string()], "the load client")?;
        Ok(Load {
            child: Some(child),
            progress,
            stop,
        })
    }

    fn progress(&self) -> Result<Value> {
        match std::fs::read_to_string(&self.progress) {
            Ok(text) => Ok(serde_json::from_str(&text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
            Err(e) => Err(e.into()),
        }
    }

    /// Polls the progress (≤ `limit`) until `done` holds; fails at once
    /// when a connection failed.
    fn wait(&self, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let p = self.progress()?;
            if p["failures"].as_u64().unwrap_or(0) > 0 {
                bail!(
                    "connections failed while waiting for '{what}': {}",
                    p["failed"]
                );
            }
            if done(&p) {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!("the load did not reach '{what}' within {limit:?}; progress: {p}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Lets the load run to its end and checks that every connection of it
    /// came back intact.
    fn finish_intact(mut self, after: f64) -> Result<Value> {
        self.wait("connections completed after the rotation", WAIT * 4, |p| {
            p["last_ok_end"].as_f64().is_some_and(|t| t > after) && p["ok"].as_u64() >= Some(200)
        })?;
        let child = self.child.take().context("the load was finished already")?;
        let report = child.finish(Duration::from_secs(240))?;
        let failed = report["failed"].as_array().cloned().unwrap_or_default();
        eprintln!(
            "load: {} connections, {} ok, {} MiB checked, failed {}",
            report["done"],
            report["ok"],
            report["bytes"].as_u64().unwrap_or(0) >> 20,
            failed.len()
        );
        assert!(
            failed.is_empty(),
            "{} connections failed or were corrupted: {failed:?}",
            failed.len()
        );
        assert_eq!(
            report["done"].as_u64(),
            Some(COUNT),
            "the load stopped early (its time bound): {report}"
        );
        Ok(report)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
    }
}

fn service_yaml(backend: &str) -> String {
    format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: {VIP_PORT}\n    mtls: strict\n    backends:\n      - address: {backend}\n        port: {BACKEND_PORT}\n        node: node-b\n"
    )
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The node's own identity row of `meshctl certs -o json`.
fn node_identity(node: &Node) -> Result<Value> {
    let certs = node.agent().meshctl_json(&["certs"])?;
    certs["identities"]
        .as_array()
        .and_then(|ids| ids.iter().find(|i| i["kind"] == "node"))
        .cloned()
        .with_context(|| format!("{}: no node identity in {certs}", node.name))
}

/// Polls `meshctl certs` (≤ `WAIT`) until the node's identity satisfies `done`.
fn wait_identity(node: &Node, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let id = node_identity(node)?;
        if done(&id) {
            return Ok(id);
        }
        if Instant::now() >= deadline {
            bail!("{}: '{what}' not reached within {WAIT:?}: {id}", node.name);
        }
        std::thread::sleep(POLL);
    }
}

fn generation(id: &Value) -> u64 {
    id["generation"].as_u64().unwrap_or(0)
}

/// Every tunnel connection of the node: (peer, connection) pairs.
fn tunnel_conns(node: &Node) -> Result<Vec<Value>> {
    let view = node.agent().meshctl_json(&["tunnels"])?;
    let peers = view["peers"].as_array().context("peers")?;
    Ok(peers
        .iter()
        .flat_map(|p| p["conns"].as_array().cloned().unwrap_or_default())
        .collect())
}

fn ids(conns: &[Value]) -> Vec<u64> {
    conns.iter().filter_map(|c| c["id"].as_u64()).collect()
}

/// Writes `bytes` to `path` as a CA tool would: a temporary file renamed
/// over it, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A cluster of two with the web service from node-a to node-b and the
/// echo backend running.
fn cluster_with_backend(
    before_start: impl FnOnce(&Cluster) -> Result<()>,
) -> Result<(Cluster, PyProcess)> {
    let mut cluster = Cluster::new(2)?;
    before_start(&cluster)?;
    let backend = cluster.nodes[1].ip4.to_string();
    cluster.start_agents(&service_yaml(&backend), &[])?;
    let server = mesh_tests::python::echo_server(&cluster.nodes[1], &backend, BACKEND_PORT)?;
    Ok((cluster, server))
}

#[test]
fn leaf_rotation_under_load_drops_nothing_and_retires_the_old_connections_before_expiry()
-> Result<()> {
    // Certificates that expire soon: the connections opened with them must
    // be gone before then.
    let not_after = unix_now() as u64 + SHORT_LIFETIME;
    let not_before = unix_now() as u64 - 5;
    let (cluster, _server) = cluster_with_backend(|cluster| {
        for node in &cluster.nodes {
            cluster.issue(
                &node.name,
                &node.identity_dir,
                &[
                    "--not-before-unix",
                    &not_before.to_string(),
                    "--not-after-unix",
                    &not_after.to_string(),
                ],
            )?;
        }
        Ok(())
    })?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let old: Vec<Value> = [a, b]
        .iter()
        .map(|n| node_identity(n))
        .collect::<Result<_>>()?;
    for id in &old {
        assert_eq!(id["not_after"].as_u64(), Some(not_after), "{id}");
        assert_eq!(generation(id), 1, "{id}");
    }

    let load = Load::start(a, cluster.dir())?;
    load.wait("connections through the tunnel", WAIT, |p| {
        p["ok"].as_u64() >= Some(100)
    })?;
    let old_conns = [tunnel_conns(a)?, tunnel_conns(b)?];
    let old_ids = [ids(&old_conns[0]), ids(&old_conns[1])];
    assert!(
        !old_ids[0].is_empty() && !old_ids[1].is_empty(),
        "no tunnel connection before the rotation: {old_conns:?}"
    );
    for c in &old_conns[0] {
        assert_eq!(
            c["local_cert_not_after_unix"].as_u64(),
            Some(not_after),
            "{c}"
        );
        assert_eq!(
            c["peer_cert_not_after_unix"].as_u64(),
            Some(not_after),
            "{c}"
        );
    }

    // Rotate every node's leaf (a fresh 1 h certificate) under the load.
    let rotated = unix_now();
    for node in &cluster.nodes {
        cluster.issue(&node.name, &node.identity_dir, &["--hours", "1"])?;
    }
    for (node, old) in [a, b].iter().zip(&old) {
        let new = wait_identity(node, "the new certificate in use", |id| generation(id) == 2)?;
        assert_ne!(new["serial"], old["serial"], "{new}");
        assert!(new["not_after"].as_u64() > Some(not_after + 600), "{new}");
        assert_eq!(new["reload"]["last_error"], Value::Null, "{new}");
    }
    // The old connections go (make-before-break) while the load goes on,
    // and before the old certificates expire.
    let deadline = Instant::now() + WAIT;
    let gone_at = loop {
        let now = [ids(&tunnel_conns(a)?), ids(&tunnel_conns(b)?)];
        let mut left: Vec<u64> = Vec::new();
        for (now, old) in now.iter().zip(&old_ids) {
            left.extend(now.iter().filter(|id| old.contains(id)));
        }
        if left.is_empty() {
            break unix_now();
        }
        if Instant::now() >= deadline {
            bail!("old tunnel connections {left:?} still open {WAIT:?} after the rotation");
        }
        std::thread::sleep(POLL);
    };
    eprintln!(
        "old connections gone {:.1} s after the rotation, {:.1} s before the old notAfter",
        gone_at - rotated,
        not_after as f64 - gone_at
    );
    assert!(
        gone_at < not_after as f64,
        "the old connections outlived their certificates ({gone_at} >= {not_after})"
    );
    // What carries the load now was opened after the rotation, with the
    // new credentials.
    load.wait("more connections after the rotation", WAIT, |p| {
        p["last_ok_end"].as_f64().is_some_and(|t| t > gone_at)
    })?;
    let conns = tunnel_conns(a)?;
    assert!(!conns.is_empty(), "nothing carries the load");
    for c in &conns {
        assert!(
            c["opened_unix_ms"]
                .as_f64()
                .is_some_and(|ms| ms / 1000.0 >= rotated),
            "a connection from before the rotation: {c}"
        );
        assert_eq!(c["generation"].as_u64(), Some(2), "{c}");
        assert!(
            c["local_cert_not_after_unix"].as_u64() > Some(not_after),
            "{c}"
        );
    }
    let text = a.scrape()?;
    let retired = metric(
        &text,
        "mesh_tunnel_connections_retired_total",
        &[("direction", "outbound"), ("reason", "rotation")],
    );
    assert!(
        retired >= 1,
        "no outbound connection retired for rotation:\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            "mesh_tunnel_connections_dropped_total",
            &[("reason", "expiry")]
        ),
        0,
        "{text}"
    );
    assert!(
        metric(&text, "mesh_identity_reloads_total", &[("result", "ok")]) >= 1,
        "{text}"
    );
    load.finish_intact(gone_at)?;
    Ok(())
}

#[test]
fn trust_bundle_rotation_under_load_drops_nothing() -> Result<()> {
    let (cluster, _server) = cluster_with_backend(|_| Ok(()))?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let new_ca = cluster.dir().join("ca-new");
    meshctl(&[
        "ca",
        "init",
        "--dir",
        path(&new_ca)?,
        "--trust-domain",
        TRUST_DOMAIN,
    ])?;
    let old_root = std::fs::read(cluster.ca_dir.join("ca.pem"))?;
    let new_root = std::fs::read(new_ca.join("ca.pem"))?;
    let both = [new_root.clone(), old_root.clone()].concat();

    let load = Load::start(a, cluster.dir())?;
    load.wait("connections through the tunnel", WAIT, |p| {
        p["ok"].as_u64() >= Some(100)
    })?;
    let first_serials: Vec<Value> = [a, b]
        .iter()
        .map(|n| node_identity(n).map(|i| i["serial"].clone()))
        .collect::<Result<_>>()?;

    // 1. Every node trusts both roots.
    for node in [a, b] {
        write_atomically(&node.identity_dir.join("bundle.pem"), &both)?;
    }
    for node in [a, b] {
        wait_identity(node, "both roots trusted", |id| {
            generation(id) == 2 && id["bundle_roots"] == 2
        })?;
    }
    load.wait("connections with both roots", WAIT, |p| {
        p["last_ok_end"]
            .as_f64()
            .is_some_and(|t| t > unix_now() - 0.5)
    })?;
    // 2. Leaves of the new CA (handed out with both roots).
    std::fs::write(new_ca.join("bundle.pem"), &both)?;
    for node in [a, b] {
        meshctl(&[
            "ca",
            "issue",
            "--ca-dir",
            path(&new_ca)?,
            "--node",
            &node.name,
            "--out",
            path(&node.identity_dir)?,
        ])?;
    }
    for (node, first) in [a, b].iter().zip(&first_serials) {
        let id = wait_identity(node, "a leaf of the new CA", |id| generation(id) == 3)?;
        assert_ne!(&id["serial"], first, "{id}");
        assert_eq!(id["bundle_roots"], 2, "{id}");
    }
    load.wait("connections with the new leaves", WAIT, |p| {
        p["last_ok_end"]
            .as_f64()
            .is_some_and(|t| t > unix_now() - 0.5)
    })?;
    // 3. The old root goes.
    for node in [a, b] {
        write_atomically(&node.identity_dir.join("bundle.pem"), &new_root)?;
    }
    for node in [a, b] {
        wait_identity(node, "the new root only", |id| {
            generation(id) == 4 && id["bundle_roots"] == 1
        })?;
    }
    let done = unix_now();
    // The connections carrying the load are the new credentials' now.
    let deadline = Instant::now() + WAIT;
    loop {
        let conns = tunnel_conns(a)?;
        let outbound: Vec<&Value> = conns
            .iter()
            .filter(|c| c["direction"] == "outbound")
            .collect();
        if outbound.iter().all(|c| c["generation"].as_u64() == Some(4)) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("connections of older credentials still open: {outbound:?}");
        }
        std::thread::sleep(POLL);
    }
    load.finish_intact(done)?;
    let text = a.scrape()?;
    assert!(
        metric(
            &text,
            "mesh_tunnel_connections_retired_total",
            &[("direction", "outbound"), ("reason", "rotation")]
        ) >= 3,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "mesh_identity_reloads_total",
            &[("result", "failed")]
        ),
        0,
        "{text}"
    );
    Ok(())
}

/// One connection through the VIP from node-a with `size` bytes echoed;
/// its outcome record.
fn one_connection(node: &Node, size: u64) -> Result<Value> {
    let out = run_with_timeout(
        node.command("python3").args([
            "-c",
            PY,
            "once",
            VIP,
            &VIP_PORT.to_string(),
            &size.to_string(),
        ]),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn a_broken_renewal_keeps_the_valid_certificate_and_is_shown_until_fixed() -> Result<()> {
    let (cluster, _server) = cluster_with_backend(|_| Ok(()))?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_eq!(one_connection(a, 100_000)?["outcome"], "ok");
    let good = node_identity(a)?;
    let cert = a.identity_dir.join("cert.pem");

    // Garbage where the certificate was.
    write_atomically(&cert, b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")?;
    let id = wait_identity(a, "the failed reload", |id| {
        id["reload"]["last_error_reason"] == "bad_file"
    })?;
    assert_eq!(id["serial"], good["serial"], "{id}");
    assert_eq!(generation(&id), 1, "{id}");
    assert!(id["reload"]["next_retry_unix"].as_i64().is_some(), "{id}");
    assert!(
        id["reload"]["last_error"].as_str().is_some_and(
            |e| e.contains("cert.pem") && e.contains("still using the previous certificate")
        ),
        "{id}"
    );
    // Tunnels keep working on the valid certificate, old and new ones.
    assert_eq!(one_connection(a, 1 << 20)?["outcome"], "ok");
    let table = a.agent().meshctl(&["certs"])?;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{text}");
    assert!(
        text.contains("reload failing") && text.contains("bad_file") && text.contains("next retry"),
        "{text}"
    );
    // Retried with backoff: the failures are counted, the log has it once.
    let deadline = Instant::now() + WAIT;
    let failed = loop {
        let failed = metric(
            &a.scrape()?,
            "mesh_identity_reloads_total",
            &[("result", "failed")],
        );
        if failed >= 2 {
            break failed;
        }
        if Instant::now() >= deadline {
            bail!("no retry of the failed reload counted ({failed})");
        }
        std::thread::sleep(POLL);
    };
    let log = a.agent().log();
    assert_eq!(
        log.matches("reloading the identity from").count(),
        1,
        "one log line per distinct error ({failed} failures):\n{log}"
    );

    // Another node's certificate (with its key and bundle): refused too.
    let other = cluster.dir().join("other-node");
    cluster.issue(&b.name, &other, &[])?;
    for name in ["key.pem", "cert.pem"] {
        write_atomically(
            &a.identity_dir.join(name),
            &std::fs::read(other.join(name))?,
        )?;
    }
    let id = wait_identity(a, "the wrong node refused", |id| {
        id["reload"]["last_error_reason"] == "wrong_spiffe_id"
    })?;
    assert_eq!(id["serial"], good["serial"], "{id}");
    assert_eq!(id["spiffe_id"], good["spiffe_id"], "{id}");
    assert_eq!(one_connection(a, 1 << 20)?["outcome"], "ok");

    // Fixed: a good certificate for node-a again.
    cluster.issue(&a.name, &a.identity_dir, &[])?;
    let id = wait_identity(a, "the recovery", |id| generation(id) == 2)?;
    assert_ne!(id["serial"], good["serial"], "{id}");
    assert_eq!(id["reload"]["last_error"], Value::Null, "{id}");
    assert_eq!(id["reload"]["next_retry_unix"], Value::Null, "{id}");
    assert_eq!(one_connection(a, 1 << 20)?["outcome"], "ok");
    let text = a.scrape()?;
    // As a strict scraper reads it (scrape() prints a trailing newline).
    openmetrics_parser::openmetrics::parse_openmetrics(text.trim_end_matches('\n'))
        .map_err(|e| anyhow::anyhow!("not valid OpenMetrics: {e:?}\n{text}"))?;
    assert!(metric(&text, "mesh_identity_reloads_total", &[("result", "ok")]) >= 1);
    assert!(
        metric(
            &text,
            "mesh_identity_cert_expiry_seconds",
            &[("spiffe_id", "spiffe://mesh.test/node/node-a")]
        ) > 3000,
        "{text}"
    );
    Ok(())
}
