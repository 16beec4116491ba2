//! The cross-node mTLS tunnel end to end: three namespace nodes, an agent
//! each, a client on one reaching a backend on another through the VIP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_tests::{
    Agent, BulkReport, BulkServer, Cluster,
    cluster::{Node, metric},
    run_bulk,
};

const LIMIT: Duration = Duration::from_secs(60);
const VIP4: &str = "127.77.0.1";
const VIP6: &str = "::1:77";

/// One service on `vip`:80, its backends `(address, node)` on port 9000.
fn service_yaml(vip: &str, mtls: &str, backends: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "services:\n  - name: web\n    vip: \"{vip}\"\n    port: 80\n    mtls: {mtls}\n    backends:\n"
    );
    for (address, node) in backends {
        yaml.push_str(&format!(
            "      - address: \"{address}\"\n        port: 9000\n        node: {node}\n"
        ));
    }
    yaml
}

fn assert_ok(r: &BulkReport) {
    assert!(r.ok, "{} failed: {:?}", r.scenario, r.errors);
}

fn target(vip: &str) -> String {
    if vip.contains(':') {
        format!("[{vip}]:80")
    } else {
        format!("{vip}:80")
    }
}

/// Runs `scenario` from `client` to the VIP against a fresh server on
/// `server` at `bind`:9000; both reports.
fn scenario(
    client: &Node,
    server: &Node,
    bind: &str,
    vip: &str,
    scenario: &str,
    extra: &[&str],
) -> Result<(BulkReport, BulkReport)> {
    let bind = if bind.contains(':') {
        format!("[{bind}]:9000")
    } else {
        format!("{bind}:9000")
    };
    let srv = BulkServer::start(
        &server.cgroup,
        Some(&server.netns),
        &["--scenario", scenario, "--bind", &bind],
    )?;
    let mut args = vec!["client", "--scenario", scenario, "--target"];
    let target = target(vip);
    args.push(&target);
    args.extend_from_slice(extra);
    let c = run_bulk(&client.cgroup, Some(&client.netns), &args, LIMIT)?;
    let s = srv.finish(LIMIT)?;
    Ok((c, s))
}

fn service_counter(node: &Node, field: &str) -> Result<u64> {
    let services = node.agent().meshctl_json(&["services"])?;
    services["services"][0][field]
        .as_u64()
        .with_context(|| format!("no {field} in {services}"))
}

/// Bytes the tunnel carried, summed over this node's peers.
fn tunnel_bytes(node: &Node) -> Result<u64> {
    let view = node.agent().meshctl_json(&["tunnels"])?;
    let peers = view["peers"].as_array().context("peers")?;
    Ok(peers
        .iter()
        .map(|p| p["bytes_sent"].as_u64().unwrap_or(0) + p["bytes_received"].as_u64().unwrap_or(0))
        .sum())
}

/// Echo, half-close, reset and a bulk transfer behave through the tunnel
/// exactly as they do on a direct connection, byte for byte.
fn same_as_direct(vip: &str, backend_of: impl Fn(&Node) -> String) -> Result<()> {
    let mut cluster = Cluster::new(3)?;
    let backend = backend_of(&cluster.nodes[1]);
    let direct = service_yaml(vip, "disabled", &[(&backend, "node-b")]);
    let tunnelled = service_yaml(vip, "strict", &[(&backend, "node-b")]);
    cluster.start_agents(&direct, &[])?;
    let cases: [(&str, &[&str]); 4] = [
        ("echo", &[]),
        ("half-close", &[]),
        ("rst", &[]),
        ("bulk", &["--bytes", "268435456"]),
    ];
    let mut seen = Vec::new();
    for mode in ["direct", "tunnel"] {
        if mode == "tunnel" {
            cluster.write_config(&tunnelled)?;
            wait_for(|| {
                let s = cluster.nodes[0].agent().meshctl_json(&["services"])?;
                Ok(s["services"][0]["backends"][0]["tunnel"] == true)
            })?;
        }
        let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
        for (name, extra) in cases {
            let before = service_counter(a, "tunnelled")?;
            let (c, s) = scenario(a, b, &backend, vip, name, extra)?;
            assert_ok(&c);
            assert_ok(&s);
            let through = service_counter(a, "tunnelled")? - before;
            assert_eq!(
                through,
                u64::from(mode == "tunnel"),
                "{name} ({mode}): connections through the tunnel"
            );
            seen.push((mode, name, c.observed, s.observed));
        }
    }
    // How much of what a client wrote just before its abortive close
    // arrives depends on how much had left its socket by then, on either
    // path (an abortive close discards the rest): that count is no
    // property of the tunnel, the way the stream ends is.
    for (_, name, _, server) in &mut seen {
        if *name == "rst" {
            let read = server.remove("server_read_before_end").unwrap_or_default();
            assert!(read.parse::<u64>().is_ok_and(|n| n <= 100_000), "{read}");
        }
    }
    let (direct, tunnel) = seen.split_at(cases.len());
    for (d, t) in direct.iter().zip(tunnel) {
        assert_eq!((&d.2, &d.3), (&t.2, &t.3), "{}: direct vs tunnel", d.1);
    }
    assert!(tunnel_bytes(&cluster.nodes[0])? >= 256 << 20);
    Ok(())
}

#[test]
fn ipv4_through_the_tunnel_is_exactly_what_a_direct_connection_is() -> Result<()> {
    same_as_direct(VIP4, |n| n.ip4.to_string())
}

#[test]
fn ipv6_through_the_tunnel_is_exactly_what_a_direct_connection_is() -> Result<()> {
    same_as_direct(VIP6, |n| n.ip6.to_string())
}

/// A small Python program run inside a node (python3 is on every machine
fn python(node: &Node, program: &str, args: &[&str]) -> Result<String> {
    mesh_tests::python::run(node, program, args, LIMIT)
}

/// Echoes one connection at `addr`:9000 (printing `listening` first).
const ECHO_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(8)
print('listening', flush=True)
c, _ = s.accept()
while True:
    b = c.recv(65536)
    if not b: break
    c.sendall(b)
c.close()
"#;

/// Sends argv[2] to argv[1]:80, half-closes, prints the peer name and what
/// came back.
const MARKER_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=20)
print(s.getpeername()[0])
s.sendall(sys.argv[2].encode()); s.shutdown(socket.SHUT_WR)
got = b''
while True:
    b = s.recv(65536)
    if not b: break
    got += b
print(got.decode())
"#;

fn spawn_ready(mut cmd: std::process::Command, ready: &str) -> Result<Child> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let err = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    for stream in [
        Box::new(out) as Box<dyn std::io::Read + Send>,
        Box::new(err),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(ready) => return Ok(child),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("no '{ready}' within 10 s");
            }
        }
    }
}

/// A Python server in `node`, ready once it printed `listening`.
fn python_server(node: &Node, program: &str, arg: &str) -> Result<Reaped> {
    let mut server = node.command("python3");
    server.arg("-u").arg("-c").arg(program).arg(arg);
    Ok(Reaped(spawn_ready(server, "listening")?))
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn only_tls_crosses_the_wire_and_the_client_sees_the_vip() -> Result<()> {
    only_tls_on_the_wire(VIP4, |n| n.ip4.to_string())
}

#[test]
fn only_tls_crosses_the_wire_over_ipv6_and_the_client_sees_the_vip() -> Result<()> {
    only_tls_on_the_wire(VIP6, |n| n.ip6.to_string())
}

/// A client on node-a reaches `vip`, its backend on node-b at
/// `backend_of(node-b)`; a capture of node-a's veth holds TLS records and
/// never the client's plaintext.
fn only_tls_on_the_wire(vip: &str, backend_of: impl Fn(&Node) -> String) -> Result<()> {
    let mut cluster = Cluster::new(3)?;
    let backend = backend_of(&cluster.nodes[1]);
    cluster.start_agents(&service_yaml(vip, "strict", &[(&backend, "node-b")]), &[])?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let pcap = cluster.dir().join("a.pcap");
    let mut dump = a.netns.exec("tcpdump");
    dump.args(["-i", "eth0", "--immediate-mode", "-U", "-s", "0", "-w"])
        .arg(&pcap);
    let dump = Reaped(spawn_ready(dump, "listening on")?);
    let server = python_server(b, ECHO_SERVER, &backend)?;
    let marker = "mesh-plaintext-marker-5f3c9a";
    let out = python(a, MARKER_CLIENT, &[vip, marker])?;
    let (peer, echo) = out.split_once('\n').context("peer name, then the echo")?;
    // Compared as addresses: python writes ::1:77 as ::0.1.0.119.
    let peer: std::net::IpAddr = peer.parse()?;
    assert_eq!(
        peer,
        vip.parse::<std::net::IpAddr>()?,
        "the client sees the VIP"
    );
    assert_eq!(echo, marker, "the echo");
    drop(server);
    // SIGTERM, so tcpdump writes out what it holds.
    // SAFETY: a plain kill(2) of our own unreaped child.
    unsafe { libc::kill(dump.0.id() as i32, libc::SIGTERM) };
    let mut dump = dump;
    let _ = dump.0.wait();
    let wire = std::fs::read(&pcap)?;
    assert!(wire.len() > 24, "nothing captured");
    assert!(
        !wire.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the plaintext marker crossed the veth"
    );
    // TLS 1.3 application data records: type 23, legacy version 3.3.
    assert!(
        wire.windows(3).any(|w| w == [0x17, 0x03, 0x03]),
        "no TLS application data on the wire"
    );
    Ok(())
}

/// Sends a request and reads: prints `reset` if the connection was reset,
/// `eof:<bytes>` if it ended cleanly. A reset that comes before the
/// half-close makes `shutdown()` fail with ENOTCONN: a reset too.
const RESET_CLIENT: &str = r#"
import errno, socket, sys
got = b''
try:
    s = socket.create_connection((sys.argv[1], 80), timeout=20)
    s.sendall(b'hello'); s.shutdown(socket.SHUT_WR)
    while True:
        b = s.recv(65536)
        if not b: break
        got += b
    print('eof:%d' % len(got))
except (ConnectionResetError, BrokenPipeError):
    print('reset')
except OSError as e:
    if e.errno != errno.ENOTCONN:
        raise
    print('reset')
"#;

#[test]
fn a_backend_that_is_down_reaches_the_client_as_a_reset() -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    let backend = cluster.nodes[1].ip4.to_string();
    cluster.start_agents(&service_yaml(VIP4, "strict", &[(&backend, "node-b")]), &[])?;
    // Nothing listens on node-b:9000.
    assert_eq!(python(&cluster.nodes[0], RESET_CLIENT, &[VIP4])?, "reset");
    Ok(())
}

#[test]
fn a_backend_on_the_clients_own_node_stays_off_the_tunnel() -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    let (local, remote) = (
        cluster.nodes[0].ip4.to_string(),
        cluster.nodes[1].ip4.to_string(),
    );
    let yaml = service_yaml(VIP4, "strict", &[(&local, "node-a"), (&remote, "node-b")]);
    cluster.start_agents(&yaml, &[])?;
    let a = &cluster.nodes[0];
    let services = a.agent().meshctl_json(&["services"])?;
    let backends = &services["services"][0]["backends"];
    assert_eq!(backends[0]["tunnel"], false, "{backends}");
    assert_eq!(backends[1]["tunnel"], true, "{backends}");
    // Only the local backend listens: every connection that succeeds went
    // there, and the tunnel's counters do not move for them.
    let mut served = 0;
    for _ in 0..40 {
        let _server = python_server(a, ECHO_SERVER, &local)?;
        let before = (service_counter(a, "tunnelled")?, tunnel_bytes(a)?);
        let out = python(a, RESET_CLIENT, &[VIP4])?;
        let after = (service_counter(a, "tunnelled")?, tunnel_bytes(a)?);
        if out == "eof:5" {
            served += 1;
            assert_eq!(
                before, after,
                "a local connection moved the tunnel's counters"
            );
        } else {
            assert_eq!(out, "reset");
            assert_eq!(
                after.0,
                before.0 + 1,
                "a remote pick went through the tunnel"
            );
        }
        if served >= 5 {
            break;
        }
    }
    assert!(
        served >= 5,
        "the local backend was picked only {served} times in 40"
    );
    Ok(())
}

/// Threaded echo server for many connections at once.
const MANY_ECHO_SERVER: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(512)
print('listening', flush=True)
def echo(c):
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// Opens argv[2] connections at once, each says its number and reads it
/// back; all are held open until every one has its answer, then prints how
/// many got theirs.
const BURST_CLIENT: &str = r#"
import socket, sys, threading
n = int(sys.argv[2]); ok = []; lock = threading.Lock(); all_in = threading.Barrier(n)
def one(i):
    s = socket.create_connection((sys.argv[1], 80), timeout=30)
    msg = b'%08d' % i
    s.sendall(msg)
    got = b''
    while len(got) < len(msg):
        b = s.recv(64)
        if not b: break
        got += b
    if got == msg:
        with lock: ok.append(i)
    all_in.wait(timeout=30)
    s.close()
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(len(ok))
"#;

#[test]
fn a_burst_of_200_new_connections_opens_only_what_the_stream_limit_needs() -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    let backend = cluster.nodes[1].ip4.to_string();
    // One data-plane thread: each thread has a pool of its own, and this
    // is the pool's arithmetic.
    let yaml = service_yaml(VIP4, "strict", &[(&backend, "node-b")]);
    cluster.start_agents(&yaml, &["--tunnel-threads", "1"])?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let _server = python_server(b, MANY_ECHO_SERVER, &backend)?;
    assert_eq!(python(a, BURST_CLIENT, &[VIP4, "200"])?, "200");
    let text = a.scrape()?;
    let outbound = [("direction", "outbound")];
    let opened = metric(&text, "mesh_tunnel_connections_opened_total", &outbound);
    let handshakes = metric(&text, "mesh_tunnel_handshakes_total", &outbound);
    let streams = metric(&text, "mesh_tunnel_streams_total", &outbound);
    assert_eq!(streams, 200, "{text}");
    // 100 streams a connection, one handshake in flight per key: 200
    // streams held open together need exactly two connections.
    assert_eq!((opened, handshakes), (2, 2), "{text}");
    // The operator's view: one peer, its two connections.
    let out = a.agent().meshctl(&["tunnels"])?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("spiffe://mesh.test/node/node-a"), "{table}");
    assert!(
        table.contains("node-b") && table.contains("2 conns"),
        "{table}"
    );
    assert_eq!(table.matches("outbound").count(), 2, "{table}");
    Ok(())
}

#[test]
fn several_gib_cross_the_tunnel_byte_exact() -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    let backend = cluster.nodes[1].ip4.to_string();
    cluster.start_agents(&service_yaml(VIP4, "strict", &[(&backend, "node-b")]), &[])?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let gib = 3u64 << 30;
    let (c, s) = scenario(a, b, &backend, VIP4, "bulk", &["--bytes", &gib.to_string()])?;
    assert_ok(&c);
    assert_ok(&s);
    assert_eq!(service_counter(a, "tunnelled")?, 1);
    assert!(tunnel_bytes(a)? >= gib);
    Ok(())
}

/// Connects to argv[1]:80 and prints `refused`, or `ok` after an echo.
const CONNECT_CLIENT: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 80), timeout=10)
    s.sendall(b'ping'); s.shutdown(socket.SHUT_WR)
    print('ok' if s.recv(16) == b'ping' else 'wrong')
except ConnectionRefusedError:
    print('refused')
"#;

#[test]
fn without_a_tunnel_strict_is_refused_and_permissive_goes_direct() -> Result<()> {
    let cluster = Cluster::new(2)?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let backend = b.ip4.to_string();
    let config = |mtls| {
        format!(
            "{}{}",
            cluster.nodes_yaml(),
            service_yaml(VIP4, mtls, &[(&backend, "node-b")])
        )
    };
    // node-a has no identity: nothing can leave it encrypted.
    let agent = Agent::start_in(
        &a.netns,
        &config("strict"),
        &a.cgroup,
        &["--node-name", "node-a", "--metrics-addr", "127.0.0.1:0"],
    )?;
    let _server = python_server(b, MANY_ECHO_SERVER, &backend)?;
    assert_eq!(python(a, CONNECT_CLIENT, &[VIP4])?, "refused");
    let tunnels = agent.meshctl_json(&["tunnels"])?;
    assert_eq!(tunnels["enabled"], false, "{tunnels}");
    let generation = agent.status()?["config_generation"].as_u64().unwrap_or(0);
    agent.write_config(&config("permissive"))?;
    agent.wait_for_generation(generation + 1, Duration::from_secs(10))?;
    assert_eq!(python(a, CONNECT_CLIENT, &[VIP4])?, "ok");
    Ok(())
}

/// Sends one datagram to argv[1]:80 and prints the answer.
const UDP_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)
s.sendto(b'dgram', (sys.argv[1], 80))
data, peer = s.recvfrom(64)
print(data.decode(), peer[0])
"#;

/// Answers each datagram on argv[1]:9000 with its own bytes.
const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 9000))
print('listening', flush=True)
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
"#;

#[test]
fn udp_of_a_permissive_service_goes_directly_to_the_other_node_and_is_counted() -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    let backend = cluster.nodes[1].ip4.to_string();
    let yaml = service_yaml(VIP4, "permissive", &[(&backend, "node-b")]).replace(
        "    mtls: permissive\n",
        "    mtls: permissive\n    protocol: both\n",
    );
    cluster.start_agents(&yaml, &[])?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let _server = python_server(b, UDP_ECHO, &backend)?;
    // The application sees the VIP as the datagram's source.
    assert_eq!(python(a, UDP_CLIENT, &[VIP4])?, format!("dgram {VIP4}"));
    assert_eq!(service_counter(a, "udp_direct_remote")?, 1);
    assert_eq!(service_counter(a, "tunnelled")?, 0);
    Ok(())
}

fn wait_for(mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done()? {
        if Instant::now() >= deadline {
            bail!("not within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
