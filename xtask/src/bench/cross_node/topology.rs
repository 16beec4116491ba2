//! Two namespace "nodes" joined by one veth pair, each with a cgroup for
//! its workloads, a node certificate of the bench's own CA, and the peers
//! that carry node A's client to node B's backend: the mesh agents, a
//! stunnel pair and an HAProxy pair. Every address is inside the two
//! namespaces.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::super::env::{Cgroup, Netns, Pins, Proc, TempDir, output_within};
use super::super::load::ClientReport;
use super::super::peers::{Bins, Load, VIP_PORT, agent_has_flag, vip};
use super::super::same_node::REDIRECT_FLAG;
use super::exchange;

pub const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// The backend: node B's own address (a pod's, in the tests' clusters).
pub const BACKEND: SocketAddrV4 = SocketAddrV4::new(NODE_B, 8080);
const STUNNEL_FRONT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15101);
const STUNNEL_BACK: SocketAddrV4 = SocketAddrV4::new(NODE_B, 15102);
const HAPROXY_FRONT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15201);
const HAPROXY_BACK: SocketAddrV4 = SocketAddrV4::new(NODE_B, 15202);
const TRUST_DOMAIN: &str = "bench.local";

/// The two nodes, the backend running on B, and the identities.
pub struct Nodes {
    server: Proc,
    /// Node A's workloads (the client): agent A's programs are attached here.
    pub a_cg: Cgroup,
    /// Node B's workloads (the backend): agent B's programs are attached here.
    pub b_cg: Cgroup,
    pub a: Netns,
    pub b: Netns,
    dir: TempDir,
}

/// `program` inside `ns`'s network namespace only. Not `ip netns exec`:
/// that mounts a sysfs of its own and hides the cgroup and bpffs mounts.
pub fn in_ns(ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name()))
        .arg("--")
        .arg(program);
    cmd
}

impl Nodes {
    pub fn new(bins: &Bins) -> Result<Nodes> {
        let dir = TempDir::new("x-nodes")?;
        let a = Netns::new("x-a")?;
        let b = Netns::new("x-b")?;
        a.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ])?;
        for (ns, ip) in [(&a, NODE_A), (&b, NODE_B)] {
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
            ns.sysctl("net.core.somaxconn", "4096")?;
        }
        let a_cg = Cgroup::new("x-node-a")?;
        let b_cg = Cgroup::new("x-node-b")?;
        let ca = dir.path().join("ca");
        meshctl(
            bins,
            &[
                "ca",
                "init",
                "--dir",
                path(&ca)?,
                "--trust-domain",
                TRUST_DOMAIN,
            ],
        )?;
        for node in ["node-a", "node-b"] {
            let out = dir.path().join(node);
            meshctl(
                bins,
                &[
                    "ca",
                    "issue",
                    "--ca-dir",
                    path(&ca)?,
                    "--node",
                    node,
                    "--out",
                    path(&out)?,
                ],
            )?;
            // HAProxy wants the certificate and its key in one file.
            let pem = std::fs::read_to_string(out.join("cert.pem"))?
                + &std::fs::read_to_string(out.join("key.pem"))?;
            std::fs::write(out.join("haproxy.pem"), pem)?;
        }
        let ready = dir.path().join("server-ready");
        let mut cmd = in_ns(&b, &bins.xtask);
        cmd.arg("bench-server")
            .arg("--listen")
            .arg(BACKEND.to_string())
            .arg("--ready-file")
            .arg(&ready)
            .args(["--max-secs", "7200"])
            .env(exchange::ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        b_cg.join_on_exec(&mut cmd);
        let server = Proc::spawn("bench-server", &mut cmd)?;
        wait_file(&server, &ready, "bench-server on node B")?;
        Ok(Nodes {
            server,
            a_cg,
            b_cg,
            a,
            b,
            dir,
        })
    }

    fn identity(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    fn bundle(&self) -> PathBuf {
        self.identity("node-a").join("bundle.pem")
    }

    /// The load generator in node A's namespace and cgroup.
    pub fn client(&self, bins: &Bins, load: &Load, target: SocketAddrV4) -> Result<ClientReport> {
        let mut cmd = in_ns(&self.a, &bins.xtask);
        load.client_args(&mut cmd, target);
        cmd.env(exchange::ENV, "1");
        self.a_cg.join_on_exec(&mut cmd);
        load.run_client(&mut cmd)
    }

    /// CPU time (µs) the workloads have used: client (A) + backend (B).
    pub fn app_cpu_us(&self) -> Result<u64> {
        Ok(cpu_us(&self.a_cg)? + cpu_us(&self.b_cg)?)
    }

    pub fn server_alive(&self) -> Result<bool> {
        Ok(self.server.try_wait()?.is_none())
    }
}

/// `usage_usec` of a cgroup (user + system of every task in it).
pub fn cpu_us(cg: &Cgroup) -> Result<u64> {
    let path = cg.path().join("cpu.stat");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usage_usec in {}", path.display()))
}

/// A peer's processes on both nodes, in a cgroup of their own (for their CPU).
pub struct Carrier {
    pub target: SocketAddrV4,
    procs: Vec<(Proc, PathBuf)>,
    /// After `procs`: an agent stops before its pins are removed.
    _pins: Vec<Pins>,
    pub cgroup: Cgroup,
    /// Node A's agent's admin socket (mesh only).
    pub admin_a: Option<PathBuf>,
    _dir: TempDir,
}

impl Carrier {
    /// Logs of the processes that have exited, for an error message.
    pub fn exited(&self) -> Result<Option<String>> {
        for (p, log) in &self.procs {
            if let Some(status) = p.try_wait()? {
                return Ok(Some(format!(
                    "process {} exited ({status}): {}",
                    p.pid(),
                    tail(log)
                )));
            }
        }
        Ok(None)
    }
}

/// The config both agents get: the two nodes, one service whose backend is
/// on node B. Permissive, not strict: the tunnel carries the mesh peer's
/// connections all the same (both nodes run it), and direct's plaintext
/// connections to that backend from node A must not be dropped by node B's
/// strict enforcement.
fn mesh_yaml() -> String {
    format!(
        "nodes:\n  - name: node-a\n    address: {NODE_A}\n  - name: node-b\n    address: {NODE_B}\n\
         services:\n  - name: cross\n    vip: {}\n    port: {VIP_PORT}\n    mtls: permissive\n    \
         backends:\n      - address: {}\n        port: {}\n        node: node-b\n",
        vip(0),
        BACKEND.ip(),
        BACKEND.port()
    )
}

pub fn mesh(bins: &Bins, nodes: &Nodes, timeout: Duration) -> Result<Carrier> {
    let dir = TempDir::new("x-mesh")?;
    let cgroup = Cgroup::new("x-mesh")?;
    let config = dir.path().join("mesh.yaml");
    std::fs::write(&config, mesh_yaml())?;
    // Same-node redirect plays no part in a tunnelled connection (its client
    // leg stays off the sockhash); off, it adds nothing to the other peers'
    // loopback hop either.
    let redirect_off: &[&str] = if agent_has_flag(&bins.agent, REDIRECT_FLAG) {
        &[REDIRECT_FLAG, "off"]
    } else {
        &[]
    };
    let mut procs = Vec::new();
    let mut pins = Vec::new();
    let mut admins = Vec::new();
    for (node, ns, watched) in [
        ("node-a", &nodes.a, &nodes.a_cg),
        ("node-b", &nodes.b, &nodes.b_cg),
    ] {
        let bpffs = PathBuf::from(format!(
            "/sys/fs/bpf/{}-{}-x-{node}",
            super::super::env::PREFIX,
            std::process::id()
        ));
        let admin = dir.path().join(format!("{node}.sock"));
        let log_path = dir.path().join(format!("{node}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = in_ns(ns, &bins.agent);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--cgroup")
            .arg(watched.path())
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--node-name")
            .arg(node)
            .arg("--identity-dir")
            .arg(nodes.identity(node))
            .arg("--admin-socket")
            .arg(&admin)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(redirect_off)
            .env("MESH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cgroup.join_on_exec(&mut cmd);
        pins.push(Pins::new(&bins.agent, &bpffs)?);
        let proc = Proc::spawn("mesh-agent", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !meshctl_ok(bins, &admin) {
            if let Some(status) = proc.try_wait()? {
                bail!(
                    "mesh-agent of {node} exited at start ({status}): {}",
                    tail(&log_path)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-agent of {node} not ready after 30 s: {}",
                    tail(&log_path)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        procs.push((proc, log_path));
        admins.push(admin);
    }
    let admin_a = admins.swap_remove(0);
    let deadline = Instant::now() + timeout;
    loop {
        let v = meshctl_json(bins, &admin_a, &["services"])?;
        if v["services"][0]["backends"][0]["tunnel"] == true {
            break;
        }
        if Instant::now() > deadline {
            bail!("node A's agent never marked node B's backend for the tunnel: {v}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(Carrier {
        target: SocketAddrV4::new(vip(0), VIP_PORT),
        procs,
        _pins: pins,
        cgroup,
        admin_a: Some(admin_a),
        _dir: dir,
    })
}

/// The stunnel binary Debian installs, if any.
pub fn stunnel_bin() -> Option<&'static str> {
    ["stunnel4", "stunnel"]
        .into_iter()
        .find(|b| crate::util::on_path(b).is_some())
}

/// `stunnel -version`'s first line (it prints to stderr).
pub fn stunnel_version() -> Option<String> {
    let out = Command::new(stunnel_bin()?).arg("-version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.lines()
        .find(|l| l.starts_with("stunnel "))
        .map(|l| l.trim().to_string())
}

pub fn stunnel(nodes: &Nodes) -> Result<Carrier> {
    let bin = stunnel_bin().context("stunnel is not installed (Debian package stunnel4)")?;
    let dir = TempDir::new("x-stunnel")?;
    let cgroup = Cgroup::new("x-stunnel")?;
    let mut procs = Vec::new();
    for (node, ns, client, accept, connect) in [
        ("node-a", &nodes.a, true, STUNNEL_FRONT, STUNNEL_BACK),
        ("node-b", &nodes.b, false, STUNNEL_BACK, BACKEND),
    ] {
        let id = nodes.identity(node);
        // Mutual TLS 1.3 with the nodes' certificates; each side checks the
        // other's chain against the bench's CA.
        let conf = format!(
            "foreground = yes\npid =\ndebug = 4\n\n[cross]\nclient = {}\naccept = {accept}\n\
             connect = {connect}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n\
             sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\nsocket = l:TCP_NODELAY=1\n\
             socket = r:TCP_NODELAY=1\n",
            if client { "yes" } else { "no" },
            id.join("cert.pem").display(),
            id.join("key.pem").display(),
            nodes.bundle().display(),
        );
        let cfg = dir.path().join(format!("{node}.conf"));
        std::fs::write(&cfg, conf)?;
        let log_path = dir.path().join(format!("{node}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = in_ns(ns, bin);
        cmd.arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cgroup.join_on_exec(&mut cmd);
        procs.push((Proc::spawn("stunnel", &mut cmd)?, log_path));
    }
    Ok(Carrier {
        target: STUNNEL_FRONT,
        procs,
        _pins: Vec::new(),
        cgroup,
        admin_a: None,
        _dir: dir,
    })
}

pub fn haproxy(nodes: &Nodes) -> Result<Carrier> {
    if crate::util::on_path("haproxy").is_none() && !Path::new("/usr/sbin/haproxy").exists() {
        bail!("haproxy is not installed (Debian package haproxy)");
    }
    let dir = TempDir::new("x-haproxy")?;
    let cgroup = Cgroup::new("x-haproxy")?;
    let bundle = nodes.bundle();
    let mut procs = Vec::new();
    for node in ["node-a", "node-b"] {
        let pem = nodes.identity(node).join("haproxy.pem");
        // Mutual TLS 1.3 both ways: A's server line presents A's certificate
        // and verifies B's; B's bind requires and verifies A's.
        let tls = format!(
            "crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
            pem.display(),
            bundle.display()
        );
        let section = if node == "node-a" {
            format!("    bind {HAPROXY_FRONT}\n    server b {HAPROXY_BACK} ssl {tls}\n")
        } else {
            format!("    bind {HAPROXY_BACK} ssl {tls}\n    server b {BACKEND}\n")
        };
        let cfg = format!(
            "global\n    maxconn 2000\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    \
             timeout client 30s\n    timeout server 30s\n\nlisten cross\n{section}"
        );
        let path = dir.path().join(format!("{node}.cfg"));
        std::fs::write(&path, cfg)?;
        let log_path = dir.path().join(format!("{node}.log"));
        let log = std::fs::File::create(&log_path)?;
        let ns = if node == "node-a" { &nodes.a } else { &nodes.b };
        let mut cmd = in_ns(ns, "haproxy");
        // -db: stay in the foreground, so the PID we hold is HAProxy's.
        cmd.arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cgroup.join_on_exec(&mut cmd);
        procs.push((Proc::spawn("haproxy", &mut cmd)?, log_path));
    }
    Ok(Carrier {
        target: HAPROXY_FRONT,
        procs,
        _pins: Vec::new(),
        cgroup,
        admin_a: None,
        _dir: dir,
    })
}

pub fn haproxy_version() -> Option<String> {
    let out = Command::new("haproxy").arg("-v").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

pub fn meshctl_json(bins: &Bins, admin: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let mut cmd = Command::new(&bins.meshctl);
    cmd.arg("--admin-socket")
        .arg(admin)
        .args(args)
        .args(["-o", "json"]);
    let out = output_within("meshctl", &mut cmd, Duration::from_secs(10))?;
    serde_json::from_slice(&out).with_context(|| format!("meshctl {args:?} printed invalid JSON"))
}

fn meshctl_ok(bins: &Bins, admin: &Path) -> bool {
    Command::new(&bins.meshctl)
        .arg("--admin-socket")
        .arg(admin)
        .arg("status")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn meshctl(bins: &Bins, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(&bins.meshctl);
    cmd.args(args);
    output_within("meshctl", &mut cmd, Duration::from_secs(20)).map(drop)
}

fn wait_file(proc: &Proc, file: &Path, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        if let Some(status) = proc.try_wait()? {
            bail!("{what} exited ({status})");
        }
        if Instant::now() > deadline {
            bail!("{what} not ready after 10 s");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let start = log.len().saturating_sub(2000);
    log.get(start..).unwrap_or(&log).trim().to_string()
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
