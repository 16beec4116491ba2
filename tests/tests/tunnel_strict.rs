//! Strict mTLS enforced in the destination node's kernel: a plaintext
//! connection from another node straight to a strict service's backend is
//! dropped by node-b's `cgroup_skb/ingress` program and counted, while the
//! tunnel, and plaintext from node-b itself, still get through. Permissive
//! lets plaintext in and counts it; disabled is not counted at all; and a
//! switch from permissive to strict under load refuses every plaintext
//! connection started after it, while tunnel clients see no failure.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_tests::{
    Cluster,
    cluster::{Node, metric},
};

const LIMIT: Duration = Duration::from_secs(60);
const VIP4: &str = "127.77.0.1";
const VIP6: &str = "::1:77";
const PLAINTEXT: &str = "mesh_service_plaintext_connections_total";

#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn vip(self) -> &'static str {
        match self {
            Family::V4 => VIP4,
            Family::V6 => VIP6,
        }
    }

    fn backend(self, node: &Node) -> String {
        match self {
            Family::V4 => node.ip4.to_string(),
            Family::V6 => node.ip6.to_string(),
        }
    }
}

/// One TCP service "web" on `vip`:80 with one backend on node-b at
/// `backend`:9000.
fn service_yaml(vip: &str, mtls: &str, backend: &str) -> String {
    format!(
        "services:\n  - name: web\n    vip: \"{vip}\"\n    port: 80\n    mtls: {mtls}\n    backends:\n      - address: \"{backend}\"\n        port: 9000\n        node: node-b\n"
    )
}

/// Echoes every connection at argv[1]:9000, a thread each.
const ECHO_SERVER: &str = r#"
import socket, sys, threading
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(1024)
print('listening', flush=True)
def echo(c):
    try:
        while True:
            b = c.recv(65536)
            if not b: break
            c.sendall(b)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// One connection to argv[1]:argv[2] with a connect timeout of argv[4]
/// seconds: sends argv[3] random bytes, half-closes, reads to the end.
/// Prints `ok` (the echo is byte-exact), `timeout` (connect did not
/// complete), `refused`, `short` or `error:<what>`.
const PROBE: &str = r#"
import os, socket, sys
host, port, size, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = os.urandom(size)
try:
    s = socket.create_connection((host, port), timeout=limit)
except socket.timeout:
    print('timeout'); sys.exit(0)
except ConnectionRefusedError:
    print('refused'); sys.exit(0)
s.settimeout(20)
try:
    s.sendall(data); s.shutdown(socket.SHUT_WR)
    got = b''
    while True:
        b = s.recv(65536)
        if not b: break
        got += b
    print('ok' if got == data else 'short')
except OSError as e:
    print('error:' + repr(e))
"#;

/// A bounded load on argv[1]:argv[2]: argv[3] threads make connections
/// until argv[4] were started, argv[5] seconds passed or the file argv[6]
/// exists, each pausing argv[8] s between connections. Each connection:
/// connect timeout argv[7] s, 1..8 KiB random bytes, half-close, read to
/// the end, compare. Prints one line per
/// connection: `<CLOCK_MONOTONIC ns at connect()> <outcome>`.
const LOAD: &str = r#"
import os, random, socket, sys, threading, time
host, port, threads, most, secs, stop, limit, pause = (sys.argv[1], int(sys.argv[2]),
    int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6], float(sys.argv[7]),
    float(sys.argv[8]))
end = time.monotonic() + secs
lock = threading.Lock()
started = [0]
out = []
def one():
    data = os.urandom(random.randint(1024, 8192))
    t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    try:
        s = socket.create_connection((host, port), timeout=limit)
    except socket.timeout:
        return t0, 'timeout'
    except OSError as e:
        return t0, 'error:connect:' + type(e).__name__
    s.settimeout(20)
    try:
        s.sendall(data); s.shutdown(socket.SHUT_WR)
        got = b''
        while True:
            b = s.recv(65536)
            if not b: break
            got += b
        return t0, 'ok' if got == data else 'short:%d/%d' % (len(got), len(data))
    except OSError as e:
        return t0, 'error:' + type(e).__name__
    finally:
        s.close()
def run():
    while time.monotonic() < end and not os.path.exists(stop):
        with lock:
            if started[0] >= most: return
            started[0] += 1
        r = one()
        with lock: out.append(r)
        time.sleep(pause)
ts = [threading.Thread(target=run) for _ in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
for t0, what in out: print(t0, what)
"#;

fn python(node: &Node, program: &str, args: &[&str]) -> Result<String> {
    mesh_tests::python::run(node, program, args, LIMIT)
}

/// A child process killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The echo server on `node` at `bind`:9000, once it listens.
fn echo_server(node: &Node, bind: &str) -> Result<Reaped> {
    let mut child = node
        .command("python3")
        .arg("-u")
        .arg("-c")
        .arg(ECHO_SERVER)
        .arg(bind)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let child = Reaped(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.contains("listening") => Ok(child),
        other => bail!("echo server on {}: {other:?}", node.name),
    }
}

fn host_port(host: &str, port: u16) -> (String, String) {
    (host.to_owned(), port.to_string())
}

/// One probe from `node` to `host`:`port`.
fn probe(node: &Node, host: &str, port: u16, size: usize, connect_timeout: &str) -> Result<String> {
    let (h, p) = host_port(host, port);
    python(node, PROBE, &[&h, &p, &size.to_string(), connect_timeout])
}

/// node-b's plaintext counters of "web": (accepted, refused).
fn plaintext(node: &Node) -> Result<(u64, u64)> {
    let text = node.scrape()?;
    let of = |verdict| {
        metric(
            &text,
            PLAINTEXT,
            &[("service", "web"), ("verdict", verdict)],
        )
    };
    Ok((of("accepted"), of("refused")))
}

fn has_family(node: &Node) -> Result<bool> {
    Ok(node
        .scrape()?
        .lines()
        .any(|l| l.starts_with(&format!("{PLAINTEXT}{{service=\"web\""))))
}

/// A cluster of two with "web" in `mode`, its backend on node-b, and the
/// echo server running there.
fn cluster_with(family: Family, mode: &str) -> Result<(Cluster, Reaped, String)> {
    let mut cluster = Cluster::new(2)?;
    let backend = family.backend(&cluster.nodes[1]);
    cluster.start_agents(&service_yaml(family.vip(), mode, &backend), &[])?;
    let server = echo_server(&cluster.nodes[1], &backend)?;
    Ok((cluster, server, backend))
}

fn strict_refuses_plaintext_from_another_node(family: Family) -> Result<()> {
    let (cluster, _server, backend) = cluster_with(family, "strict")?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Straight from node-a: the SYN is dropped, the connect never completes
    // (one SYN and its retransmission within the 2 s: one connection).
    assert_eq!(probe(a, &backend, 9000, 1000, "2")?, "timeout");
    assert_eq!(
        plaintext(b)?,
        (0, 1),
        "node-b counts one refused connection"
    );
    // Through the VIP from node-a: the tunnel delivers every byte.
    assert_eq!(probe(a, family.vip(), 80, 256 << 10, "10")?, "ok");
    // Plaintext from node-b itself reaches its own backend.
    assert_eq!(probe(b, &backend, 9000, 64 << 10, "10")?, "ok");
    // Neither the tunnel's leg nor the local client was counted.
    assert_eq!(plaintext(b)?, (0, 1));
    Ok(())
}

#[test]
fn ipv4_strict_refuses_plaintext_from_another_node_in_its_kernel() -> Result<()> {
    strict_refuses_plaintext_from_another_node(Family::V4)
}

#[test]
fn ipv6_strict_refuses_plaintext_from_another_node_in_its_kernel() -> Result<()> {
    strict_refuses_plaintext_from_another_node(Family::V6)
}

fn permissive_accepts_and_counts_plaintext(family: Family) -> Result<()> {
    let (cluster, _server, backend) = cluster_with(family, "permissive")?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_eq!(probe(a, &backend, 9000, 64 << 10, "10")?, "ok");
    assert_eq!(
        plaintext(b)?,
        (1, 0),
        "node-b counts one accepted connection"
    );
    assert_eq!(probe(a, family.vip(), 80, 64 << 10, "10")?, "ok");
    assert_eq!(probe(b, &backend, 9000, 1000, "10")?, "ok");
    assert_eq!(
        plaintext(b)?,
        (1, 0),
        "the tunnel and node-b's own are not plaintext from afar"
    );
    Ok(())
}

#[test]
fn ipv4_permissive_accepts_plaintext_and_counts_it() -> Result<()> {
    permissive_accepts_and_counts_plaintext(Family::V4)
}

#[test]
fn ipv6_permissive_accepts_plaintext_and_counts_it() -> Result<()> {
    permissive_accepts_and_counts_plaintext(Family::V6)
}

/// Writes "web" in `mode` to both agents and waits until both applied it.
fn switch(cluster: &Cluster, family: Family, mode: &str, backend: &str) -> Result<()> {
    let generation = |n: &Node| -> Result<u64> {
        n.agent().status()?["config_generation"]
            .as_u64()
            .context("config_generation")
    };
    let before: Vec<u64> = cluster
        .nodes
        .iter()
        .map(generation)
        .collect::<Result<_>>()?;
    cluster.write_config(&service_yaml(family.vip(), mode, backend))?;
    for (node, g) in cluster.nodes.iter().zip(before) {
        node.agent()
            .wait_for_generation(g + 1, Duration::from_secs(10))?;
    }
    Ok(())
}

fn disabled_is_not_counted(family: Family) -> Result<()> {
    let (cluster, _server, backend) = cluster_with(family, "disabled")?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_eq!(probe(a, &backend, 9000, 1000, "10")?, "ok");
    // Through the VIP: disabled goes straight to node-b, in plaintext.
    assert_eq!(probe(a, family.vip(), 80, 1000, "10")?, "ok");
    assert!(has_family(b)?, "the family lists the service");
    assert_eq!(plaintext(b)?, (0, 0));
    // The same connection is counted once the service is permissive, and
    // no more once it is disabled again (its backend left MESH_INBOUND).
    switch(&cluster, family, "permissive", &backend)?;
    assert_eq!(probe(a, &backend, 9000, 1000, "10")?, "ok");
    assert_eq!(plaintext(b)?, (1, 0));
    switch(&cluster, family, "disabled", &backend)?;
    assert_eq!(probe(a, &backend, 9000, 1000, "10")?, "ok");
    assert_eq!(probe(a, family.vip(), 80, 1000, "10")?, "ok");
    assert_eq!(plaintext(b)?, (1, 0));
    Ok(())
}

#[test]
fn ipv4_disabled_plaintext_is_not_counted() -> Result<()> {
    disabled_is_not_counted(Family::V4)
}

#[test]
fn ipv6_disabled_plaintext_is_not_counted() -> Result<()> {
    disabled_is_not_counted(Family::V6)
}

/// Connections of the tunnel load across the switch.
const TUNNEL_CONNECTIONS: u32 = 3000;

/// CLOCK_MONOTONIC now, in ns (the clock the load clients stamp with).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A running load client: the process, and its stdout and stderr read
/// as they come (a full pipe would stop it).
struct Load {
    child: Reaped,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

fn read_all(stream: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stream {
            let _ = s.read_to_string(&mut text);
        }
        text
    })
}

/// A load client on `node` (see `LOAD`).
fn load(
    node: &Node,
    target: (&str, u16),
    threads: u32,
    most: u32,
    stop: &Path,
    connect_timeout: &str,
    pause: &str,
) -> Result<Load> {
    let (h, p) = host_port(target.0, target.1);
    let child = node
        .command("python3")
        .arg("-c")
        .arg(LOAD)
        .args([&h, &p, &threads.to_string(), &most.to_string(), "90"])
        .arg(stop)
        .arg(connect_timeout)
        .arg(pause)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = Reaped(child);
    let out = read_all(child.0.stdout.take());
    let err = read_all(child.0.stderr.take());
    Ok(Load { child, out, err })
}

/// Waits (bounded) for a load client to end; its (start ns, outcome) lines.
fn finish(mut client: Load, what: &str) -> Result<Vec<(u64, String)>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = client.child.0.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            bail!("{what}: still running after 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = client.out.join().unwrap_or_default();
    let err = client.err.join().unwrap_or_default();
    if !status.success() {
        bail!("{what} failed: {err}");
    }
    out.lines()
        .map(|l| {
            let (t, what) = l.split_once(' ').context("a line of the load client")?;
            Ok((t.parse()?, what.to_owned()))
        })
        .collect()
}

/// Polls `done` every 50 ms for at most `limit`.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done()? {
        if Instant::now() >= deadline {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn permissive_to_strict_under_load(family: Family) -> Result<()> {
    let (cluster, _server, backend) = cluster_with(family, "permissive")?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let stop = cluster.dir().join("stop-load");
    // Tunnel clients through the VIP (3,000 connections), plaintext clients
    // straight to the backend, both from node-a; bounded by count, time
    // and (the plaintext ones) the stop file.
    let never = Path::new("/nonexistent");
    let tunnel = load(
        a,
        (family.vip(), 80),
        4,
        TUNNEL_CONNECTIONS,
        never,
        "10",
        "0",
    )?;
    // Paced, so their budget lasts beyond the switch.
    let direct = load(a, (&backend, 9000), 2, 5000, &stop, "0.5", "0.01")?;
    let tunnelled = || -> Result<u64> {
        let s = a.agent().meshctl_json(&["services"])?;
        s["services"][0]["tunnelled"].as_u64().context("tunnelled")
    };
    // The switch comes with a third of the tunnel load done.
    wait_until(LIMIT, "load before the switch", || {
        Ok(tunnelled()? >= u64::from(TUNNEL_CONNECTIONS / 3) && plaintext(b)?.0 >= 20)
    })?;
    switch(&cluster, family, "strict", &backend)?;
    let applied = monotonic_ns();
    let tunnel = finish(tunnel, "tunnel load")?;
    // Plaintext clients go on meeting the strict backend until then.
    let refused_at_end = plaintext(b)?.1;
    wait_until(LIMIT, "plaintext refused after the tunnel load", || {
        Ok(plaintext(b)?.1 >= refused_at_end + 2)
    })?;
    std::fs::write(&stop, b"stop")?;
    let direct = finish(direct, "plaintext load")?;

    assert_eq!(
        tunnel.len(),
        TUNNEL_CONNECTIONS as usize,
        "the tunnel load ran to its count"
    );
    let failed: Vec<_> = tunnel.iter().filter(|(_, w)| w != "ok").collect();
    assert!(
        failed.is_empty(),
        "{} of {} tunnel connections failed: {:?}",
        failed.len(),
        tunnel.len(),
        &failed[..failed.len().min(10)]
    );
    let tunnel_after = tunnel.iter().filter(|(t, _)| *t > applied).count();
    assert!(
        tunnel_after > 0,
        "no tunnel connection started after the switch"
    );
    let before_ok = direct
        .iter()
        .filter(|(t, w)| *t < applied && w == "ok")
        .count();
    assert!(
        before_ok > 0,
        "no plaintext connection worked before the switch"
    );
    let after: Vec<_> = direct.iter().filter(|(t, _)| *t > applied).collect();
    assert!(
        !after.is_empty(),
        "no plaintext connection after the switch"
    );
    let through: Vec<_> = after.iter().filter(|(_, w)| w != "timeout").collect();
    assert!(
        through.is_empty(),
        "{} of {} plaintext connections started after the switch were not refused: {:?}",
        through.len(),
        after.len(),
        &through[..through.len().min(10)]
    );
    let (accepted, refused) = plaintext(b)?;
    assert!(
        refused >= after.len() as u64,
        "refused {refused} < {}",
        after.len()
    );
    assert!(
        accepted >= before_ok as u64,
        "accepted {accepted} < {before_ok}"
    );
    eprintln!(
        "{family:?}: {} tunnel connections ({tunnel_after} after the switch), {} plaintext ({before_ok} ok before, {} refused after); counters accepted {accepted}, refused {refused}",
        tunnel.len(),
        direct.len(),
        after.len()
    );
    Ok(())
}

#[test]
fn ipv4_permissive_to_strict_under_load_refuses_plaintext_from_the_switch_on() -> Result<()> {
    permissive_to_strict_under_load(Family::V4)
}

#[test]
fn ipv6_permissive_to_strict_under_load_refuses_plaintext_from_the_switch_on() -> Result<()> {
    permissive_to_strict_under_load(Family::V6)
}

/// The program and its maps are pinned: strict holds while node-b's agent
/// is down (SIGKILL) and after it restarts (which finds the entries and
/// counters in place), and the restarted agent still follows the config.
#[test]
fn strict_holds_while_the_agent_is_down_and_across_its_restart() -> Result<()> {
    let family = Family::V4;
    let (mut cluster, _server, backend) = cluster_with(family, "strict")?;
    assert_eq!(
        probe(&cluster.nodes[0], &backend, 9000, 1000, "2")?,
        "timeout"
    );
    cluster.nodes[1].agent_mut().kill()?;
    assert_eq!(
        probe(&cluster.nodes[0], &backend, 9000, 1000, "2")?,
        "timeout"
    );
    cluster.nodes[1].agent_mut().kill_and_restart(&[])?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_eq!(probe(a, &backend, 9000, 1000, "2")?, "timeout");
    assert_eq!(probe(a, family.vip(), 80, 64 << 10, "10")?, "ok");
    // All three refusals, the one with no agent running included.
    assert_eq!(plaintext(b)?, (0, 3));
    switch(&cluster, family, "permissive", &backend)?;
    assert_eq!(probe(a, &backend, 9000, 1000, "10")?, "ok");
    assert_eq!(plaintext(b)?, (1, 3));
    Ok(())
}
