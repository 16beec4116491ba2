//! Act 2 of the demo: two nodes, each a network namespace with a veth into
//! a bridge of a third ("lan") namespace, a CA of the demo's own and a
//! certificate per node, an agent per node. A client on node-a connects to
//! a VIP whose backend runs on node-b; node-a's eth0 is captured meanwhile,
//! and the capture is read back to show that only TLS records crossed.
//! Every address is inside these namespaces; the VIP is a loopback one.

use std::fs;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Cleanup, capture, join_cgroup_on_exec, make_cgroup, register, spawn, spawn_agent};
use crate::util::{self, step};

const VIP: &str = "127.77.0.1";
const PORT: u16 = 80;
const BACKEND_PORT: u16 = 9000;
const TRUST_DOMAIN: &str = "mesh.demo";
const WAIT: Duration = Duration::from_secs(20);

/// What act 1 set up that act 2 uses too.
pub struct Demo<'a> {
    pub cleanup: &'a Mutex<Cleanup>,
    pub agent_bin: &'a Path,
    pub meshctl_bin: &'a Path,
    pub cgroup_mount: &'a Path,
    /// The demo's temp dir (removed by the cleanup).
    pub tmp: &'a Path,
    pub pid: u32,
}

struct Node {
    name: &'static str,
    /// In the names of its namespace, cgroup and pins: mesh-demo-<tag>-<pid>.
    tag: &'static str,
    /// Its network namespace.
    netns: String,
    ip: Ipv4Addr,
}

/// Echoes every connection it accepts, one at a time.
const ECHO_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print('listening', flush=True)
while True:
    c, _ = s.accept()
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.close()
"#;

/// Sends argv[3] to argv[1]:argv[2], half-closes, prints the peer's name
/// as the client sees it, then what came back.
const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
print('%s:%d' % s.getpeername()[:2])
s.sendall(sys.argv[3].encode()); s.shutdown(socket.SHUT_WR)
got = b''
while True:
    b = s.recv(65536)
    if not b: break
    got += b
print(got.decode(errors='replace'))
"#;

pub fn run(d: &Demo) -> Result<()> {
    let nodes = [
        Node {
            name: "node-a",
            tag: "a",
            netns: format!("mesh-demo-a-{}", d.pid),
            ip: Ipv4Addr::new(10, 77, 0, 1),
        },
        Node {
            name: "node-b",
            tag: "b",
            netns: format!("mesh-demo-b-{}", d.pid),
            ip: Ipv4Addr::new(10, 77, 0, 2),
        },
    ];
    let (a, b) = (&nodes[0], &nodes[1]);
    step(format!(
        "demo: act 2: two nodes, network namespaces on a bridge: {} {}, {} {}; a CA and a certificate each (meshctl ca)",
        a.name, a.ip, b.name, b.ip
    ));
    let lan = format!("mesh-demo-lan-{}", d.pid);
    add_netns(d, &lan)?;
    ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &lan, "link", "set", "br0", "up"])?;
    for (i, node) in nodes.iter().enumerate() {
        add_netns(d, &node.netns)?;
        // Made inside the lan namespace, so no name is taken on the host.
        let port = format!("p{i}");
        ip(&[
            "-n",
            &lan,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &node.netns,
        ])?;
        ip(&["-n", &lan, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &lan, "link", "set", &port, "up"])?;
        let addr = format!("{}/24", node.ip);
        ip(&["-n", &node.netns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &node.netns, "link", "set", "eth0", "up"])?;
    }
    let ca = d.tmp.join("ca");
    quiet(
        Command::new(d.meshctl_bin)
            .args(["ca", "init", "--dir"])
            .arg(&ca)
            .args(["--trust-domain", TRUST_DOMAIN]),
    )?;
    for node in &nodes {
        quiet(
            Command::new(d.meshctl_bin)
                .args(["ca", "issue", "--ca-dir"])
                .arg(&ca)
                .args(["--node", node.name, "--out"])
                .arg(d.tmp.join(node.name)),
        )?;
    }

    let config = d.tmp.join("nodes.yaml");
    let yaml = format!(
        "nodes:\n\
         \x20 - name: {}\n    address: {}\n\
         \x20 - name: {}\n    address: {}\n\
         services:\n\
         \x20 - name: web\n    vip: \"{VIP}\"\n    port: {PORT}\n    mtls: strict\n    backends:\n\
         \x20     - address: \"{}\"\n        port: {BACKEND_PORT}\n        node: {}\n",
        a.name, a.ip, b.name, b.ip, b.ip, b.name
    );
    fs::write(&config, yaml).with_context(|| format!("could not write {}", config.display()))?;

    // The capture starts before the agents, so it holds the tunnel's whole
    // TCP connection, from its SYN on.
    let pcap = d.tmp.join("node-a-eth0.pcap");
    let mut dump = in_netns(&a.netns, "tcpdump");
    dump.args(["-i", "eth0", "--immediate-mode", "-U", "-s", "0", "-w"])
        .arg(&pcap);
    let dump_log = d.tmp.join("tcpdump.log");
    let tcpdump = spawn_logged(d, "tcpdump", dump, &dump_log)?;

    step(format!(
        "demo: service web {VIP}:{PORT}, mtls: strict, backend {}:{BACKEND_PORT} on {}; \
         starting both agents (config, logs: {}/)",
        b.ip,
        b.name,
        d.tmp.display()
    ));
    let mut sockets = Vec::new();
    for node in &nodes {
        let cgroup = d
            .cgroup_mount
            .join(format!("mesh-demo-{}-{}", node.tag, d.pid));
        make_cgroup(d.cleanup, &cgroup)?;
        let socket = d.tmp.join(format!("{}.sock", node.name));
        let log = d.tmp.join(format!("{}.log", node.name));
        let bpffs = format!("/sys/fs/bpf/mesh-demo-{}-{}", node.tag, d.pid);
        // nsenter, not `ip netns exec`: that mounts a sysfs of its own,
        // hiding the cgroup and bpffs mounts the agent needs.
        let mut agent = in_netns(&node.netns, d.agent_bin);
        agent
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--cgroup")
            .arg(&cgroup)
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--node-name")
            .arg(node.name)
            .arg("--identity-dir")
            .arg(d.tmp.join(node.name))
            .arg("--admin-socket")
            .arg(&socket)
            .args(["--metrics-addr", "127.0.0.1:0"]);
        let name = format!("{}'s mesh-agent", node.name);
        let pid = spawn_agent(d.cleanup, &name, agent, Path::new(&bpffs), &log)?;
        sockets.push((pid, socket, log, cgroup));
    }
    for (node, (pid, socket, log, _)) in nodes.iter().zip(&sockets) {
        wait_agent(d, node.name, *pid, socket, log)?;
    }
    wait_for_text(d, tcpdump, &dump_log, "listening on")?;

    let mut server = in_netns(&b.netns, "python3");
    server
        .args(["-u", "-c", ECHO_SERVER])
        .arg(b.ip.to_string())
        .arg(BACKEND_PORT.to_string());
    join_cgroup_on_exec(&mut server, &sockets[1].3)?;
    let server_log = d.tmp.join("echo-server.log");
    let echo = spawn_logged(d, "echo server", server, &server_log)?;
    wait_for_text(d, echo, &server_log, "listening")?;

    let marker = format!("mesh-demo-plaintext-{}", d.pid);
    step(format!(
        "demo: {}: python3 sends {marker:?} to {VIP}:{PORT} (capturing eth0); {}: python3 echo server",
        a.name, b.name
    ));
    let mut client = in_netns(&a.netns, "python3");
    client
        .args(["-c", CLIENT, VIP, &PORT.to_string(), &marker])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    join_cgroup_on_exec(&mut client, &sockets[0].3)?;
    let pid = spawn(d.cleanup, "client", client)?;
    let (mut child, status) = super::wait_exit(d.cleanup, pid, WAIT)?;
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    let mut lines = out.lines();
    let (peer, echoed) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    println!("    getpeername: {peer}, echo: {echoed:?}");
    if !status.success() || peer != format!("{VIP}:{PORT}") || echoed != marker {
        bail!(
            "the client on {} failed ({status}): want getpeername {VIP}:{PORT} and the echo {marker:?}; \
             its stderr: {}\nnode-a's agent log:\n{}",
            a.name,
            err.trim(),
            fs::read_to_string(&sockets[0].2).unwrap_or_default()
        );
    }

    // SIGTERM: tcpdump writes out what it holds, then exits.
    super::stop_now(d.cleanup, tcpdump);
    let wire = fs::read(&pcap).with_context(|| format!("could not read {}", pcap.display()))?;
    let seen = capture::summarize(&wire, marker.as_bytes())
        .with_context(|| format!("reading the capture {}", pcap.display()))?;
    let verdict = match seen.not_tls {
        0 => "all in".to_owned(),
        n => format!("{n} bytes NOT TLS, the rest in"),
    };
    step(format!(
        "demo: {}'s eth0 (tcpdump): {} packets, {} TCP payload bytes in {} connection(s), \
         {verdict} {} TLS records ({} application data); the plaintext marker: found {} times",
        a.name,
        seen.packets,
        seen.payload_bytes,
        seen.connections,
        seen.tls_records,
        seen.application_data,
        seen.marker_hits
    ));
    if seen.marker_hits > 0 || seen.not_tls > 0 || seen.application_data == 0 {
        bail!(
            "the capture of {}'s eth0 ({}) does not show a TLS-only tunnel: {seen:?}",
            a.name,
            pcap.display()
        );
    }

    step(format!("demo: meshctl tunnels ({})", a.name));
    let out = Command::new(d.meshctl_bin)
        .arg("--admin-socket")
        .arg(&sockets[0].1)
        .arg("tunnels")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {}", d.meshctl_bin.display()))?;
    if !out.status.success() {
        bail!(
            "`meshctl tunnels` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.trim().is_empty() {
            println!("    {line}");
        }
    }
    Ok(())
}

/// `program` run inside the namespace by nsenter, which execs it in place
/// (the child's PID is the program's, and a cgroup joined before exec holds
/// the program itself).
fn in_netns(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// `ip netns add` (the cleanup deletes it), loopback up: the VIP and the
/// agent's outbound listener are on it.
fn add_netns(d: &Demo, name: &str) -> Result<()> {
    register(d.cleanup, |c| {
        ip(&["netns", "add", name])?;
        c.netns.push(name.to_owned());
        Ok(())
    })?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

fn ip(args: &[&str]) -> Result<()> {
    quiet(Command::new("ip").args(args)).map(|_| ())
}

/// Runs a short command, its output kept unless it fails.
fn quiet(cmd: &mut Command) -> Result<String> {
    let shown = util::display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts a child with stdout and stderr in `log`.
fn spawn_logged(d: &Demo, name: &str, mut cmd: Command, log: &Path) -> Result<u32> {
    let out =
        fs::File::create(log).with_context(|| format!("could not create {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    spawn(d.cleanup, name, cmd)
}

/// Waits until the child writes `text` to its log, failing if it exits.
fn wait_for_text(d: &Demo, pid: u32, log: &Path, text: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = fs::read_to_string(log).unwrap_or_default();
        if seen.contains(text) {
            return Ok(());
        }
        if let Some(status) = super::exited(d.cleanup, pid)? {
            bail!("pid {pid} exited ({status}) before it said {text:?}; its output:\n{seen}");
        }
        if Instant::now() > deadline {
            bail!("pid {pid} did not say {text:?} within {WAIT:?}; its output:\n{seen}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the agent answers `meshctl status`, failing if it exits.
fn wait_agent(d: &Demo, node: &str, pid: u32, socket: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = super::exited(d.cleanup, pid)? {
            bail!(
                "{node}'s mesh-agent (pid {pid}) exited ({status}) before it was ready; its output:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if super::meshctl_status(d.meshctl_bin, socket)? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{node}'s mesh-agent (pid {pid}) was not ready after {WAIT:?}; its output:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}
