//! A test cluster on one machine: one network namespace per node, each
//! joined by a veth pair to a bridge in a "lan" namespace of its own, one
//! cgroup per node (its workloads) and one agent per node, each with a
//! node certificate of the cluster's own CA. Addresses are inside the
//! namespaces the cluster creates (10.77.0.0/24, fd77::/64), nowhere else.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Agent, TestCgroup, TestNetns, run_ok, run_with_timeout};

const IP_TIMEOUT: Duration = Duration::from_secs(10);
pub const TRUST_DOMAIN: &str = "mesh.test";

pub struct Node {
    pub name: String,
    /// Dropped first: the agent stops before its namespace goes.
    pub agent: Option<Agent>,
    pub cgroup: TestCgroup,
    pub netns: TestNetns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// cert.pem, key.pem, bundle.pem (`meshctl ca issue`).
    pub identity_dir: PathBuf,
}

impl Node {
    /// `program` inside this node: its network namespace and its cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.cgroup.command("ip");
        cmd.args(["netns", "exec", self.netns.name()]).arg(program);
        cmd
    }

    /// `program` inside this node's network namespace, in `cgroup` (a
    /// workload's: a child of the node's cgroup, `self.cgroup.child(..)`).
    pub fn command_in(&self, cgroup: &TestCgroup, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = cgroup.command("ip");
        cmd.args(["netns", "exec", self.netns.name()]).arg(program);
        cmd
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the node's agent runs")
    }

    pub fn agent_mut(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("the node's agent runs")
    }

    /// The agent's /metrics text, fetched from inside the node (its
    /// metrics address is a loopback port of the node's own namespace).
    pub fn scrape(&self) -> Result<String> {
        let status = self.agent().status()?;
        let addr = status["metrics_addr"]
            .as_str()
            .with_context(|| format!("{}: no metrics_addr in {status}", self.name))?
            .to_owned();
        let program = "import sys, urllib.request\nprint(urllib.request.urlopen('http://' + sys.argv[1] + '/metrics', timeout=10).read().decode())";
        let out = run_with_timeout(
            self.command("python3").args(["-c", program, &addr]),
            IP_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "scraping {addr} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The sum of the samples of `name` in OpenMetrics `text` whose labels
/// include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let have: Vec<(&str, &str)> = rest
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|want| have.contains(want))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum::<f64>() as u64
}

pub struct Cluster {
    /// Nodes before the lan: their veths go with their namespaces.
    pub nodes: Vec<Node>,
    lan: TestNetns,
    dir: PathBuf,
    pub ca_dir: PathBuf,
}

impl Cluster {
    /// `count` nodes named node-a, node-b, …, networked and with identities;
    /// no agents yet (`start_agents`).
    pub fn new(count: usize) -> Result<Cluster> {
        let (pid, n) = (std::process::id(), crate::next_id());
        let dir = std::env::temp_dir().join(format!("mesh-test-cluster-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let lan = TestNetns::new("lan")?;
        ip(&["-n", lan.name(), "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", lan.name(), "link", "set", "br0", "up"])?;
        let ca_dir = dir.join("ca");
        let mut cluster = Cluster {
            nodes: Vec::new(),
            lan,
            dir,
            ca_dir,
        };
        meshctl(&[
            "ca",
            "init",
            "--dir",
            path(&cluster.ca_dir)?,
            "--trust-domain",
            TRUST_DOMAIN,
        ])?;
        for i in 0..count {
            let node = cluster.add_node(i)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    fn add_node(&self, i: usize) -> Result<Node> {
        let letter = (b'a' + i as u8) as char;
        let name = format!("node-{letter}");
        let netns = TestNetns::new(&name)?;
        let cgroup = TestCgroup::new(&name)?;
        let (ip4, ip6) = (
            Ipv4Addr::new(10, 77, 0, i as u8 + 1),
            format!("fd77::{}", i + 1).parse()?,
        );
        let port = format!("p{i}");
        // Made inside the lan namespace, so no name is taken on the host.
        ip(&[
            "-n",
            self.lan.name(),
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        ip(&["-n", self.lan.name(), "link", "set", &port, "master", "br0"])?;
        ip(&["-n", self.lan.name(), "link", "set", &port, "up"])?;
        let ns = netns.name();
        ip(&["-n", ns, "addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        let identity_dir = self.dir.join(&name);
        self.issue(&name, &identity_dir, &[])?;
        Ok(Node {
            name,
            agent: None,
            cgroup,
            netns,
            ip4,
            ip6,
            identity_dir,
        })
    }

    /// Issues `node`'s certificate into `out` (`extra`: more `meshctl ca
    /// issue` flags, e.g. a lifetime).
    pub fn issue(&self, node: &str, out: &Path, extra: &[&str]) -> Result<()> {
        let mut args = vec![
            "ca",
            "issue",
            "--ca-dir",
            path(&self.ca_dir)?,
            "--node",
            node,
            "--out",
            path(out)?,
        ];
        args.extend_from_slice(extra);
        meshctl(&args)
    }

    /// The `nodes:` section every agent gets.
    pub fn nodes_yaml(&self) -> String {
        let mut yaml = String::from("nodes:\n");
        for n in &self.nodes {
            yaml.push_str(&format!("  - name: {}\n    address: {}\n", n.name, n.ip4));
        }
        yaml
    }

    /// Starts every node's agent on `services_yaml` (the `nodes:` section is
    /// added), with the tunnel on and `extra` flags.
    pub fn start_agents(&mut self, services_yaml: &str, extra: &[&str]) -> Result<()> {
        let yaml = format!("{}{services_yaml}", self.nodes_yaml());
        self.start_agents_each(|_| yaml.clone(), extra)
    }

    /// Like `start_agents`, each node with a whole configuration of its own
    /// (`nodes:` included, see `nodes_yaml`): what a node whose
    /// configuration lags behind, or lies, looks like.
    pub fn start_agents_each(
        &mut self,
        config: impl Fn(&Node) -> String,
        extra: &[&str],
    ) -> Result<()> {
        for node in &mut self.nodes {
            let yaml = config(node);
            let mut args = vec![
                "--node-name",
                &node.name,
                "--identity-dir",
                path(&node.identity_dir)?,
                // Namespaces of their own: nothing else binds these.
                "--metrics-addr",
                "127.0.0.1:0",
            ];
            args.extend_from_slice(extra);
            let agent = Agent::start_in(&node.netns, &yaml, &node.cgroup, &args)
                .with_context(|| format!("starting the agent of {}", node.name))?;
            node.agent = Some(agent);
        }
        Ok(())
    }

    /// Writes `services_yaml` (with `nodes:`) to every agent's config.
    pub fn write_config(&self, services_yaml: &str) -> Result<()> {
        self.write_config_each(|_| services_yaml.to_owned())
    }

    /// Writes each node's own `services_yaml(node)` (with `nodes:`).
    pub fn write_config_each(&self, services_yaml: impl Fn(&Node) -> String) -> Result<()> {
        for node in &self.nodes {
            let yaml = format!("{}{}", self.nodes_yaml(), services_yaml(node));
            node.agent().write_config(&yaml)?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.agent = None;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args), IP_TIMEOUT).map(|_| ())
}

/// `meshctl ARGS` (no agent: the CA commands), bounded; its stderr as the
/// error when it fails.
pub fn meshctl(args: &[&str]) -> Result<()> {
    let bin = crate::require_bin("meshctl")?;
    let out = run_with_timeout(Command::new(bin).args(args), IP_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "meshctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `p` as the UTF-8 text a command line takes.
pub fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
