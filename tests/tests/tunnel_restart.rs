//! Agent restarts under a bounded tunnelled load (two namespace nodes, the
//! client on node-a, an echo backend on node-b):
//!
//! - a planned restart of either node's agent (a successor started first
//!   on the same pins, then SIGTERM to the old one, which drains) loses no
//!   connection and no byte, including long connections held open across
//!   the whole hand-over;
//! - a SIGKILL of node-a's agent fails the connections it carried, and new
//!   connections work again once a restarted agent is ready.
//!
//! The load and the backend are python3 programs inside the nodes
//! (`Node::command`): every connection sends a seeded random payload and
//! checks that exactly it comes back, and its outcome is recorded; nothing
//! is judged by time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mesh_tests::cluster::Node;
use mesh_tests::{Cluster, PyProcess, require_bin, run_with_timeout};
use serde_json::{Value, json};

const VIP: &str = "127.77.0.1";
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 9000;
/// Bounds the old agent's drain in these tests (default 30 s).
const DRAIN: &[&str] = &["--tunnel-drain-seconds", "20"];
const WAIT: Duration = Duration::from_secs(25);
const POLL: Duration = Duration::from_millis(50);
/// Long connections held open across a restart.
const HELD: u64 = 2;
/// Connections that must complete after the restart, all through the new agent.
const AFTER: usize = 10;

/// The python side. `serve`: a threaded echo server. `load`: connections
/// through the VIP from a few workers, bounded in count and time, plus
/// `held` long ones that send `hold_at` bytes and wait for the `go` file
/// before sending the rest; progress goes to a file (atomically), the
/// report to stdout. `scrape`: an agent's /metrics.
const PY: &str = r#"
import json, os, random, signal, socket, sys, threading, time, urllib.request

def conn(target, size, seed, deadline, hold_at=None, go=None, on_hold=None):
    rec = {"size": size, "start": time.time()}
    data = random.Random(seed).randbytes(size)
    try:
        s = socket.create_connection(target, timeout=10)
    except OSError as e:
        rec.update(outcome="connect_failed", detail=str(e), end=time.time(), got=0)
        return rec
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(30)
    st = {"err": None}
    def sender():
        mv = memoryview(data)
        off = 0
        try:
            while off < size:
                limit = size
                if hold_at is not None and not st.get("released"):
                    if off >= hold_at:
                        on_hold()
                        while not os.path.exists(go):
                            if time.time() > deadline:
                                raise TimeoutError("the go file never came")
                            time.sleep(0.02)
                        st["released"] = True
                        continue
                    limit = hold_at
                off += s.send(mv[off:min(limit, off + 65536)])
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
            if data[got:got + len(b)] != b:
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
if mode == "scrape":
    with urllib.request.urlopen("http://%s/metrics" % sys.argv[2], timeout=10) as r:
        sys.stdout.write(r.read().decode())
elif mode == "load":
    cfg = json.loads(sys.argv[2])
    signal.alarm(cfg["seconds"] + 60)
    target = (cfg["host"], cfg["port"])
    deadline = time.time() + cfg["seconds"]
    lock = threading.Lock()
    results, nxt, held_ready = [], [0], [0]
    def progress():
        p = {"done": len(results), "held_ready": held_ready[0],
             "ok_starts": [r["start"] for r in results if r["kind"] == "loop" and r["outcome"] == "ok"],
             "failed": [r for r in results if r["outcome"] != "ok"]}
        tmp = cfg["progress"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(p, f)
        os.rename(tmp, cfg["progress"])
    def record(rec):
        with lock:
            results.append(rec)
            progress()
    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= cfg["max"] or time.time() > deadline or os.path.exists(cfg["stop"]):
                return
            if i % cfg["long_every"] == 0:
                size = cfg["long"]
            else:
                size = random.Random(i).randint(1, cfg["short_max"])
            rec = conn(target, size, i + 1, deadline)
            rec.update(kind="loop", i=i)
            record(rec)
    def held(h):
        def on_hold():
            with lock:
                held_ready[0] += 1
                progress()
        rec = conn(target, cfg["held_size"], 1000000 + h, deadline,
                   hold_at=cfg["hold_at"], go=cfg["go"], on_hold=on_hold)
        rec.update(kind="held", i=h)
        record(rec)
    with lock:
        progress()
    threads = [threading.Thread(target=held, args=(h,)) for h in range(cfg["held"])]
    threads += [threading.Thread(target=worker) for _ in range(cfg["workers"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"results": results}))
"#;

/// `PY args...` inside `node`.
fn py(node: &Node, args: &[&str], what: &str) -> Result<PyProcess> {
    PyProcess::spawn(mesh_tests::python::command(node, PY, args), what)
}

/// The files the load and the test share.
struct LoadFiles {
    progress: PathBuf,
    go: PathBuf,
    stop: PathBuf,
}

impl LoadFiles {
    fn new(dir: &Path) -> Result<LoadFiles> {
        let dir = dir.join("load");
        std::fs::create_dir_all(&dir)?;
        Ok(LoadFiles {
            progress: dir.join("progress.json"),
            go: dir.join("go"),
            stop: dir.join("stop"),
        })
    }

    fn progress(&self) -> Result<Value> {
        match std::fs::read_to_string(&self.progress) {
            Ok(text) => Ok(serde_json::from_str(&text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
            Err(e) => Err(e.into()),
        }
    }

    /// Polls the progress (≤ 25 s) until `done` holds; returns it.
    fn wait(&self, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let p = self.progress()?;
            if done(&p) {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the load did not reach '{what}' within {WAIT:?}; progress: done {}, held ready {}, failed {}",
                    p["done"],
                    p["held_ready"],
                    p["failed"]
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn touch(path: &Path) -> Result<()> {
        std::fs::write(path, b"").with_context(|| format!("creating {}", path.display()))
    }
}

/// Loop connections that completed intact and started after `since`.
fn ok_since(p: &Value, since: f64) -> usize {
    p["ok_starts"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|s| s.as_f64() > Some(since)).count())
}

fn start_load(node: &Node, files: &LoadFiles, held: u64, workers: u64) -> Result<PyProcess> {
    let path = |p: &Path| p.to_str().map(str::to_owned).context("path is not UTF-8");
    let cfg = json!({
        "host": VIP,
        "port": VIP_PORT,
        "workers": workers,
        "max": 600,
        "seconds": 45,
        // Every 4th connection is long; the others are short.
        "long_every": 4,
        "long": 3 << 20,
        "short_max": 32 << 10,
        "held": held,
        "held_size": 4 << 20,
        "hold_at": 1 << 20,
        "progress": path(&files.progress)?,
        "go": path(&files.go)?,
        "stop": path(&files.stop)?,
    });
    py(node, &["load", &cfg.to_string()], "the load client")
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

/// SIGTERM to one of our agents, by its PID (still our unreaped child).
fn sigterm(pid: u32) -> Result<()> {
    let out = run_with_timeout(
        Command::new("kill").args(["-TERM", &pid.to_string()]),
        Duration::from_secs(5),
    )?;
    if !out.status.success() {
        bail!(
            "kill -TERM {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A second agent for a node whose agent (a harness `Agent`) still runs:
/// the same pins (bpffs), cgroup, node name, identity and config (a copy),
/// its own admin socket and log. The harness agent keeps owning the pins:
/// it removes them when the cluster drops, after this one has stopped.
struct Successor {
    child: Child,
    dir: PathBuf,
    admin_socket: PathBuf,
    bpffs: PathBuf,
    meshctl: PathBuf,
}

impl Successor {
    fn start(node: &Node, extra: &[&str]) -> Result<Successor> {
        let old = node.agent();
        let dir = old
            .admin_socket()
            .parent()
            .context("admin socket has no directory")?
            .with_file_name(format!(
                "mesh-test-successor-{}-{}",
                std::process::id(),
                mesh_tests::next_id()
            ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("mesh.yaml");
        std::fs::copy(old.config_path(), &config)?;
        let admin_socket = dir.join("admin.sock");
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns.name()))
            .arg("--")
            .arg(require_bin("mesh-agent")?)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--cgroup")
            .arg(node.cgroup.path())
            .arg("--bpffs")
            .arg(old.bpffs())
            .arg("--admin-socket")
            .arg(&admin_socket)
            .args(["--watch-interval-ms", "100", "--node-name", &node.name])
            .arg("--identity-dir")
            .arg(&node.identity_dir)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning the successor agent")?;
        let mut successor = Successor {
            child,
            dir,
            admin_socket,
            bpffs: old.bpffs().to_owned(),
            meshctl: require_bin("meshctl")?,
        };
        successor.wait_ready()?;
        Ok(successor)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn status(&self) -> Result<Value> {
        let out = run_with_timeout(
            Command::new(&self.meshctl)
                .arg("--admin-socket")
                .arg(&self.admin_socket)
                .arg("--bpffs")
                .arg(&self.bpffs)
                .args(["status", "-o", "json"]),
            Duration::from_secs(10),
        )?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the successor agent exited during startup ({status}); log:\n{}",
                    self.log()
                );
            }
            let last = match self.status() {
                Ok(_) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "the successor agent was not ready within 20 s ({last}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = sigterm(self.child.id());
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `/metrics` of the agent whose status is `status`, fetched from inside
/// `node` (a loopback port of the node's namespace).
fn scrape(node: &Node, status: &Value) -> Result<String> {
    let addr = status["metrics_addr"]
        .as_str()
        .with_context(|| format!("no metrics_addr in {status}"))?;
    let out = run_with_timeout(
        node.command("python3").args(["-c", PY, "scrape", addr]),
        Duration::from_secs(15),
    )?;
    if !out.status.success() {
        bail!(
            "scraping {addr}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the sample `series` (name and labels exactly as exported).
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0) as u64
}

fn results(report: &Value) -> Vec<Value> {
    report["results"].as_array().cloned().unwrap_or_default()
}

fn outcomes(results: &[Value]) -> std::collections::BTreeMap<String, usize> {
    let mut by = std::collections::BTreeMap::new();
    for r in results {
        *by.entry(r["outcome"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
    }
    by
}

/// The planned restart of node `restart`'s agent (0: node-a, the client
/// side; 1: node-b, the server side) under load.
fn planned_restart(restart: usize) -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    let backend = cluster.nodes[1].ip4.to_string();
    cluster.start_agents(&service_yaml(&backend), DRAIN)?;
    let _server = mesh_tests::python::echo_server(&cluster.nodes[1], &backend, BACKEND_PORT)?;
    let files = LoadFiles::new(cluster.dir())?;
    let load = start_load(&cluster.nodes[0], &files, HELD, 3)?;
    files.wait("held connections open and some done", |p| {
        p["held_ready"].as_u64() == Some(HELD) && ok_since(p, 0.0) >= 5
    })?;

    let node = &cluster.nodes[restart];
    let successor = Successor::start(node, DRAIN)?;
    let old_pid = node.agent().pid();
    let terminated = unix_now();
    sigterm(old_pid)?;
    // The old agent drains (its listeners closed) while the held connections wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.agent().log().contains("tunnel draining") {
        if Instant::now() >= deadline {
            bail!(
                "the old agent of {} did not start draining; log:\n{}",
                node.name,
                node.agent().log()
            );
        }
        std::thread::sleep(POLL);
    }
    // While the old one still drains the held connections, new ones go
    // through the successor.
    files.wait("new connections while the old agent drains", |p| {
        ok_since(p, terminated) >= AFTER || !p["failed"].as_array().is_none_or(Vec::is_empty)
    })?;
    LoadFiles::touch(&files.go)?;
    let node_name = node.name.clone();
    let exit = cluster.nodes[restart]
        .agent_mut()
        .wait_exit(Duration::from_secs(25))?;
    let old_log = cluster.nodes[restart].agent().log();
    let Some(exit) = exit else {
        bail!("the old agent of {node_name} did not exit after SIGTERM; log:\n{old_log}");
    };
    let exited = unix_now();
    files.wait("connections through the successor", |p| {
        ok_since(p, exited) >= AFTER || !p["failed"].as_array().is_none_or(Vec::is_empty)
    })?;
    LoadFiles::touch(&files.stop)?;
    let report = load.finish(Duration::from_secs(40))?;
    let all = results(&report);
    let failed: Vec<&Value> = all.iter().filter(|r| r["outcome"] != "ok").collect();
    let long = all
        .iter()
        .filter(|r| r["size"].as_u64() >= Some(3 << 20))
        .count();
    eprintln!(
        "{node_name} restarted: {} connections ({long} long), outcomes {:?}",
        all.len(),
        outcomes(&all)
    );
    assert!(
        failed.is_empty(),
        "{} of {} connections failed across the planned restart of {node_name}: {failed:?}\nold agent log:\n{old_log}\nsuccessor log:\n{}",
        failed.len(),
        all.len(),
        successor.log()
    );
    assert!(
        exit.success(),
        "the old agent exited with {exit}:\n{old_log}"
    );
    assert!(
        !old_log.contains("drain timed out"),
        "the old agent did not drain in time:\n{old_log}"
    );
    let held_ok = all
        .iter()
        .filter(|r| r["kind"] == "held" && r["outcome"] == "ok")
        .count();
    assert_eq!(held_ok as u64, HELD, "held connections: {all:?}");
    assert!(long > HELD as usize, "too few long connections: {all:?}");
    let after = all
        .iter()
        .filter(|r| r["start"].as_f64() > Some(exited))
        .count();
    assert!(after >= AFTER, "only {after} connections after the restart");
    // The successor carried the new connections.
    let direction = if restart == 0 { "outbound" } else { "inbound" };
    let text = scrape(&cluster.nodes[restart], &successor.status()?)?;
    let streams = sample(
        &text,
        &format!("mesh_tunnel_streams_total{{direction=\"{direction}\"}}"),
    );
    assert!(
        streams >= AFTER as u64,
        "the successor carried only {streams} {direction} streams"
    );
    Ok(())
}

#[test]
fn a_planned_restart_of_the_client_side_agent_loses_no_connection() -> Result<()> {
    planned_restart(0)
}

#[test]
fn a_planned_restart_of_the_server_side_agent_loses_no_connection() -> Result<()> {
    planned_restart(1)
}

#[test]
fn a_killed_client_side_agent_fails_its_connections_and_a_restarted_one_serves_again() -> Result<()>
{
    const HELD_KILL: u64 = 3;
    let mut cluster = Cluster::new(2)?;
    let backend = cluster.nodes[1].ip4.to_string();
    cluster.start_agents(&service_yaml(&backend), DRAIN)?;
    let _server = mesh_tests::python::echo_server(&cluster.nodes[1], &backend, BACKEND_PORT)?;
    let files = LoadFiles::new(cluster.dir())?;
    let load = start_load(&cluster.nodes[0], &files, HELD_KILL, 2)?;
    files.wait("held connections open and some done", |p| {
        p["held_ready"].as_u64() == Some(HELD_KILL) && ok_since(p, 0.0) >= 5
    })?;

    let killed = unix_now();
    cluster.nodes[0].agent_mut().kill_and_restart(&[])?;
    let ready = unix_now();
    LoadFiles::touch(&files.go)?;
    files.wait("connections through the restarted agent", |p| {
        ok_since(p, ready) >= AFTER
    })?;
    LoadFiles::touch(&files.stop)?;
    let report = load.finish(Duration::from_secs(40))?;
    let all = results(&report);
    let in_flight: Vec<&Value> = all
        .iter()
        .filter(|r| r["start"].as_f64() < Some(killed) && r["end"].as_f64() > Some(killed))
        .collect();
    let failed_in_flight = in_flight.iter().filter(|r| r["outcome"] != "ok").count();
    eprintln!(
        "SIGKILL: {} connections, outcomes {:?}; in flight at the kill: {}, of which failed {failed_in_flight}",
        all.len(),
        outcomes(&all),
        in_flight.len()
    );
    let corrupt: Vec<&Value> = all.iter().filter(|r| r["outcome"] == "corrupt").collect();
    assert!(corrupt.is_empty(), "wrong bytes delivered: {corrupt:?}");
    let held: Vec<&Value> = all.iter().filter(|r| r["kind"] == "held").collect();
    assert_eq!(held.len() as u64, HELD_KILL, "{all:?}");
    for h in &held {
        // The agent carrying it died: it cannot have completed.
        assert_ne!(
            h["outcome"], "ok",
            "a held connection survived SIGKILL: {h}"
        );
        assert!(
            h["got"].as_u64() < h["size"].as_u64(),
            "a failed connection got everything: {h}"
        );
    }
    assert!(failed_in_flight as u64 >= HELD_KILL);
    let after: Vec<&Value> = all
        .iter()
        .filter(|r| r["start"].as_f64() > Some(ready))
        .collect();
    let after_failed: Vec<&&Value> = after.iter().filter(|r| r["outcome"] != "ok").collect();
    assert!(
        after_failed.is_empty(),
        "connections after the restarted agent was ready failed: {after_failed:?}\nagent log:\n{}",
        cluster.nodes[0].agent().log()
    );
    assert!(after.len() >= AFTER);
    Ok(())
}
