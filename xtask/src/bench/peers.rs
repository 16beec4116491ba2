//! The systems under test, each in a network namespace of its own with the
//! same addresses: backends on 10.200.0.1..=10:8080 (a veth pair inside it),
//! service VIPs from 10.96.0.1 up, port 80. Nothing outside the namespace is
//! ever addressed, and every netfilter rule lives inside it.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use mesh_common::{FAMILY_V4, PROTO_TCP, ServiceKey, ServiceValue, map_names};

use super::env::{Cgroup, Netns, Pins, Proc, TempDir, output_within};
use super::load::{ClientReport, Mode};

pub const BACKEND_PORT: u16 = 8080;
pub const VIP_PORT: u16 = 80;
pub const BACKENDS_PER_SERVICE: u32 = 10;
/// The client's source address: distinct from every backend, so
/// kube-proxy's hairpin (masquerade) rules never fire.
pub const CLIENT_SRC: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const VIP_NET: &str = "10.96.0.0/12";

pub fn backend(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + j)
}

pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i)
}

/// The binaries a benchmark runs.
pub struct Bins {
    pub xtask: PathBuf,
    pub agent: PathBuf,
    pub meshctl: PathBuf,
    /// The bare redirect object (BPF), the same-node scenario's yardstick.
    pub bare_redirect: PathBuf,
}

/// How the VIPs are reached inside a node.
#[derive(Copy, Clone, PartialEq, Eq)]
pub enum VipRoute {
    /// Routed out of bench0: netfilter or the socket LB must rewrite them,
    /// or the connection goes nowhere (bench1 drops it).
    Routed,
    /// Local addresses, for a proxy that listens on them.
    Local,
}

/// A network namespace with the backends running in it.
pub struct Node {
    pub ns: Netns,
    _server: Proc,
    _dir: TempDir,
}

impl Node {
    pub fn new(bins: &Bins, hint: &str, backends: u32, route: VipRoute) -> Result<Node> {
        Self::new_in(bins, hint, backends, route, None)
    }

    /// As [`Node::new`], with the backends' server in `cgroup`: workloads of
    /// the agent that watches that cgroup, as pods of one node are.
    pub fn new_in(
        bins: &Bins,
        hint: &str,
        backends: u32,
        route: VipRoute,
        cgroup: Option<&Cgroup>,
    ) -> Result<Node> {
        let ns = Netns::new(hint)?;
        // A veth pair with both ends in the namespace (this kernel has no
        // dummy driver): what is routed out of bench0 arrives on bench1,
        // is not local there and is dropped, never leaving the namespace.
        ns.ip(&[
            "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
        ])?;
        ns.ip(&["link", "set", "bench0", "up"])?;
        ns.ip(&["link", "set", "bench1", "up"])?;
        ns.ip(&["addr", "add", &format!("{CLIENT_SRC}/32"), "dev", "bench0"])?;
        for j in 0..backends {
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/32", backend(j)),
                "dev",
                "bench0",
            ])?;
        }
        match route {
            VipRoute::Routed => ns.ip(&[
                "route",
                "add",
                VIP_NET,
                "dev",
                "bench0",
                "src",
                &CLIENT_SRC.to_string(),
            ])?,
            VipRoute::Local => ns.ip(&["route", "add", "local", VIP_NET, "dev", "lo"])?,
        }
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        ns.sysctl("net.core.somaxconn", "4096")?;

        let dir = TempDir::new(&format!("{hint}-srv"))?;
        let ready = dir.path().join("ready");
        let mut cmd = ns.exec(&bins.xtask);
        cmd.arg("bench-server").arg("--ready-file").arg(&ready);
        for j in 0..backends {
            cmd.arg("--listen")
                .arg(SocketAddrV4::new(backend(j), BACKEND_PORT).to_string());
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        if let Some(cg) = cgroup {
            cg.join_on_exec(&mut cmd);
        }
        let server = Proc::spawn("bench-server", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Some(status) = server.try_wait()? {
                bail!("bench-server in {} exited ({status})", ns.name());
            }
            if Instant::now() > deadline {
                bail!("bench-server in {} not ready after 10 s", ns.name());
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(Node {
            ns,
            _server: server,
            _dir: dir,
        })
    }

    /// Puts every thread of the backends' server on `cpu` (None: on any).
    pub fn pin_server(&self, cpu: Option<usize>) -> Result<()> {
        let tasks = format!("/proc/{}/task", self._server.pid());
        for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
            let tid: libc::pid_t = task?.file_name().to_string_lossy().parse()?;
            super::load::pin(tid, cpu)
                .with_context(|| format!("pinning bench-server thread {tid} to {cpu:?}"))?;
        }
        Ok(())
    }

    /// Runs the load generator inside this node (and `cgroup`).
    pub fn client(
        &self,
        bins: &Bins,
        cgroup: &Cgroup,
        load: &Load,
        first: SocketAddrV4,
        targets: u32,
    ) -> Result<ClientReport> {
        let mut cmd = self.ns.exec(&bins.xtask);
        load.client_args(&mut cmd, first);
        cmd.arg("--targets").arg(targets.to_string());
        if let Some(cpu) = load.cpu {
            cmd.arg("--cpu").arg(cpu.to_string());
        }
        cgroup.join_on_exec(&mut cmd);
        load.run_client(&mut cmd)
    }

    /// Sends a few connections until they all succeed: the peer is ready
    /// and its path really works. Bounded by `timeout`.
    pub fn wait_path(
        &self,
        bins: &Bins,
        cgroup: &Cgroup,
        first: SocketAddrV4,
        targets: u32,
        timeout: Duration,
        serving: Option<(&Proc, &Path)>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let load = Load {
            mode: Mode::Connect,
            threads: 1,
            duration_ms: 2000,
            max_ops: 200,
            cpu: None,
        };
        loop {
            if let Some((proc, log)) = serving
                && let Some(status) = proc.try_wait()?
            {
                bail!(
                    "the proxy exited ({status}): {}",
                    std::fs::read_to_string(log).unwrap_or_default().trim()
                );
            }
            let r = self.client(bins, cgroup, &load, first, targets)?;
            if r.errors == 0 && r.ops > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "connections to {first} (+{targets}) in {} keep failing: {}",
                    self.ns.name(),
                    r.first_error.unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

#[derive(Clone, Copy)]
pub struct Load {
    pub mode: Mode,
    pub threads: u32,
    pub duration_ms: u64,
    pub max_ops: u64,
    /// The CPU the client runs on; None leaves it to the scheduler.
    pub cpu: Option<usize>,
}

impl Load {
    /// `bench-client` and the arguments every scenario gives it.
    pub fn client_args(&self, cmd: &mut Command, first: SocketAddrV4) {
        cmd.arg("bench-client")
            .arg("--mode")
            .arg(match self.mode {
                Mode::Connect => "connect",
                Mode::Rr => "rr",
                Mode::Bulk => "bulk",
            })
            .arg("--first")
            .arg(first.to_string())
            .arg("--threads")
            .arg(self.threads.to_string())
            .arg("--duration-ms")
            .arg(self.duration_ms.to_string())
            .arg("--max-ops")
            .arg(self.max_ops.to_string());
    }

    /// Runs the client `cmd` (bounded by the load's duration) and reads its
    /// report.
    pub fn run_client(&self, cmd: &mut Command) -> Result<ClientReport> {
        let timeout = Duration::from_millis(self.duration_ms) + Duration::from_secs(30);
        let out = output_within("bench-client", cmd, timeout)?;
        serde_json::from_slice(&out).context("bench-client printed invalid JSON")
    }
}

// ---------------------------------------------------------------- mesh ----

/// The agent's config for `n` services with `b` backends each; `changed`
/// moves one backend of one service to another address.
pub fn mesh_config(n: u32, b: u32, changed: Option<(u32, u32)>) -> String {
    let mut y = String::with_capacity(n as usize * (40 + 40 * b as usize));
    if n == 0 {
        return "services: []\n".into();
    }
    y.push_str("services:\n");
    for i in 0..n {
        let _ = write!(
            y,
            "  - name: s{i:06}\n    vip: {}\n    port: {VIP_PORT}\n    backends: [",
            vip(i)
        );
        for j in 0..b {
            let addr = match changed {
                Some((svc, version)) if svc == i && j == 0 => {
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 202, 0, 0)) + version % 60_000)
                }
                _ => backend(j),
            };
            let sep = if j + 1 < b { ", " } else { "" };
            let _ = write!(y, "{{address: {addr}, port: {BACKEND_PORT}}}{sep}");
        }
        y.push_str("]\n");
    }
    y
}

pub fn service_key(i: u32) -> ServiceKey {
    ServiceKey {
        addr: [u32::from_ne_bytes(vip(i).octets()), 0, 0, 0],
        port: VIP_PORT.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    }
}

/// A running `mesh-agent` for `cgroup`, started with no services; `load`
/// programs a config and measures until the kernel's map has it.
pub struct MeshAgent {
    // Order matters: the agent stops before its pins are removed.
    proc: Proc,
    _pins: Pins,
    dir: TempDir,
    pub bpffs: PathBuf,
    services: Option<HashMap<MapData, ServiceKey, ServiceValue>>,
}

impl MeshAgent {
    pub fn start(bins: &Bins, cgroup: &Cgroup, capacity: u32, extra: &[&str]) -> Result<Self> {
        Self::launch(bins, cgroup, capacity, extra, false)
    }

    /// Like `start`, with `--config` an empty directory (`config_dir()`)
    /// whose `*.yaml` files make the configuration.
    pub fn start_conf_d(
        bins: &Bins,
        cgroup: &Cgroup,
        capacity: u32,
        extra: &[&str],
    ) -> Result<Self> {
        Self::launch(bins, cgroup, capacity, extra, true)
    }

    /// The directory of a `start_conf_d` agent's config files.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("conf.d")
    }

    fn launch(
        bins: &Bins,
        cgroup: &Cgroup,
        capacity: u32,
        extra: &[&str],
        conf_d: bool,
    ) -> Result<Self> {
        let hint = format!("agent-{}", super::env::next_seq());
        let dir = TempDir::new(&hint)?;
        let bpffs = PathBuf::from(format!(
            "/sys/fs/bpf/{}-{}-{hint}",
            super::env::PREFIX,
            std::process::id()
        ));
        let socket = dir.path().join("admin.sock");
        let config = if conf_d {
            let config = dir.path().join("conf.d");
            std::fs::create_dir_all(&config)?;
            config
        } else {
            let config = dir.path().join("mesh.yaml");
            std::fs::write(&config, mesh_config(0, 0, None))?;
            config
        };
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        // Room for every slot and backend twice: a reload writes the new
        // generation before deleting the old one.
        let room = (capacity * BACKENDS_PER_SERVICE * 2 + 1024).to_string();
        let mut cmd = Command::new(&bins.agent);
        // Agents of consecutive peers must not fight over the metrics port.
        cmd.env("MESH_METRICS_ADDR", "off");
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--cgroup")
            .arg(cgroup.path())
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--admin-socket")
            .arg(&socket)
            // Reloads are triggered by SIGHUP, so the file poll never adds delay.
            .args(["--watch-interval-ms", "3600000"])
            .args(["--max-services", &(capacity + 1024).to_string()])
            .args(["--max-backends", &room, "--max-slots", &room])
            .args(extra)
            .env("MESH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let pins = Pins::new(&bins.agent, &bpffs)?;
        let proc = Proc::spawn("mesh-agent", &mut cmd)?;
        let mut agent = MeshAgent {
            proc,
            _pins: pins,
            dir,
            bpffs,
            services: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.proc.try_wait()? {
                bail!("mesh-agent exited at start ({status}): {}", agent.log());
            }
            let ok = Command::new(&bins.meshctl)
                .arg("--admin-socket")
                .arg(&socket)
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("mesh-agent not ready after 30 s: {}", agent.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
        let path = agent
            .bpffs
            .join(format!("v{}/maps", mesh_common::SCHEMA_VERSION))
            .join(map_names::SERVICES);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))?;
        let map = Map::from_map_data(data)?;
        agent.services = Some(HashMap::try_from(map)?);
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// `meshctl <args> -o json` against this agent.
    pub fn meshctl_json(&self, bins: &Bins, args: &[&str]) -> Result<serde_json::Value> {
        let mut cmd = Command::new(&bins.meshctl);
        cmd.arg("--admin-socket")
            .arg(self.dir.path().join("admin.sock"))
            .args(args)
            .args(["-o", "json"])
            .stdin(Stdio::null());
        let out = output_within("meshctl", &mut cmd, Duration::from_secs(10))?;
        serde_json::from_slice(&out)
            .with_context(|| format!("meshctl {args:?} printed invalid JSON"))
    }

    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        log.chars()
            .rev()
            .take(2000)
            .collect::<String>()
            .chars()
            .rev()
            .collect()
    }

    fn map(&self) -> &HashMap<MapData, ServiceKey, ServiceValue> {
        self.services.as_ref().expect("opened at start")
    }

    /// The kernel's entry for service `i`.
    pub fn service(&self, i: u32) -> Option<ServiceValue> {
        self.map().get(&service_key(i), 0).ok()
    }

    /// Writes `yaml`, sends SIGHUP and waits until `done` holds; returns the
    /// time from the signal to that moment.
    pub fn reload(
        &self,
        yaml: &str,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<Duration> {
        let config = self.dir.path().join("mesh.yaml");
        let tmp = self.dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &config)?;
        let log_path = self.dir.path().join("agent.log");
        let log_len = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let start = Instant::now();
        self.proc.signal(libc::SIGHUP)?;
        let mut polls = 0u64;
        loop {
            if done(self) {
                return Ok(start.elapsed());
            }
            polls += 1;
            // A refused config never reaches the kernel: say why at once.
            if polls.is_multiple_of(500) {
                let log = std::fs::read(&log_path).unwrap_or_default();
                let new = String::from_utf8_lossy(log.get(log_len..).unwrap_or_default());
                if let Some(line) = new.lines().find(|l| l.contains("reload refused")) {
                    let why = line.find("reload refused").map_or(line, |i| &line[i..]);
                    bail!("mesh-agent refused the config: {}", why.trim());
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "the kernel's map did not show the change within {timeout:?}; agent log: {}",
                    self.log()
                );
            }
            if let Some(status) = self.proc.try_wait()? {
                bail!("mesh-agent exited ({status}): {}", self.log());
            }
            thread::sleep(Duration::from_micros(100));
        }
    }

    /// Programs `n` services and returns how long until all are in the map.
    pub fn program(&self, n: u32, timeout: Duration) -> Result<Duration> {
        // Keys become present in any order; once present they stay, so a
        // cursor makes the whole wait O(n) lookups.
        let mut cursor = 0;
        self.reload(&mesh_config(n, BACKENDS_PER_SERVICE, None), timeout, |a| {
            while cursor < n && a.service(cursor).is_some_and(|v| v.slot_count > 0) {
                cursor += 1;
            }
            cursor == n
        })
    }

    /// Resident memory of the agent, in KiB (VmRSS).
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in /proc/<agent>/status")
    }
}

/// Does this agent build have same-node redirect? (Built on another branch;
/// detected by its flag, never assumed.)
pub fn agent_has_flag(agent: &Path, flag: &str) -> bool {
    Command::new(agent)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

// ------------------------------------------------------------ iptables ----

/// kube-proxy's iptables-mode nat table for `n` services with `b` endpoints
/// each, as iptables-restore input: KUBE-SERVICES dispatches on VIP:port to
/// one KUBE-SVC-* chain per service, which picks an endpoint's KUBE-SEP-*
/// chain with `statistic --mode random --probability 1/(b-k)`; the SEP
/// chain marks hairpin traffic for masquerade and DNATs.
pub fn iptables_rules(n: u32, b: u32) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    chains.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for i in 0..n {
        let svc = format!("KUBE-SVC-{:016X}", mix(u64::from(i)));
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/s{i}:http cluster IP\" -m tcp --dport {VIP_PORT} -j {svc}",
            vip(i)
        );
        for j in 0..b {
            let sep = format!(
                "KUBE-SEP-{:016X}",
                mix(u64::from(i) << 8 | u64::from(j) | 1 << 40)
            );
            let ep = backend(j);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let stat = if j + 1 < b {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / f64::from(b - j)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"bench/s{i}:http -> {ep}:{BACKEND_PORT}\"{stat} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {ep}/32 -m comment --comment \"bench/s{i}:http\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"bench/s{i}:http\" -m tcp -j DNAT --to-destination {ep}:{BACKEND_PORT}"
            );
        }
    }
    chains + &rules + "COMMIT\n"
}

/// A cheap 64-bit mix, for chain names that look like kube-proxy's hashes.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

// ------------------------------------------------------------ nftables ----

/// kube-proxy's nftables-mode nat path: a `service-ips` verdict map keyed
/// by VIP . proto . port jumps to a per-service chain, which picks an
/// endpoint chain with `numgen random mod N vmap`; the endpoint chain marks
/// hairpin traffic and DNATs.
///
/// The ruleset comes in transactions of `NFT_SERVICES_PER_TRANSACTION`
/// services: the kernel binds each anonymous vmap by walking the whole
/// transaction (`__nft_set_trans_bind`), so one transaction of 10,000
/// services takes minutes (1,000: 1.6 s, 2,000: 4.8 s, 4,000: 33 s here).
/// The loaded rules are the same either way.
pub fn nft_rules(n: u32, b: u32) -> Vec<String> {
    let mut batches = vec![nft_base_rules()];
    let mut start = 0;
    while start < n {
        let end = (start + NFT_SERVICES_PER_TRANSACTION).min(n);
        batches.push(nft_service_rules(start..end, b));
        start = end;
    }
    batches
}

const NFT_SERVICES_PER_TRANSACTION: u32 = 500;

/// The table, base chains and the `service-ips` map.
fn nft_base_rules() -> String {
    let mut s = String::new();
    s.push_str("add table ip kube-proxy\n");
    s.push_str("add chain ip kube-proxy mark-for-masquerade\n");
    s.push_str("add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n");
    s.push_str("add chain ip kube-proxy masquerading\n");
    s.push_str("add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n");
    s.push_str("add rule ip kube-proxy masquerading mark set mark xor 0x4000\n");
    s.push_str("add rule ip kube-proxy masquerading masquerade fully-random\n");
    s.push_str("add chain ip kube-proxy services\n");
    s.push_str(
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n",
    );
    s.push_str("add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n");
    s.push_str(
        "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n",
    );
    s.push_str("add rule ip kube-proxy nat-prerouting jump services\n");
    s.push_str("add rule ip kube-proxy nat-output jump services\n");
    s.push_str("add rule ip kube-proxy nat-postrouting jump masquerading\n");
    s.push_str("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n");
    s.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    s
}

/// The chains, endpoint vmap and `service-ips` element of some services.
fn nft_service_rules(services: std::ops::Range<u32>, b: u32) -> String {
    let mut s = String::new();
    for i in services {
        let svc = format!(
            "service-{:08X}-bench/s{i}/tcp/http",
            mix(u64::from(i)) as u32
        );
        let _ = writeln!(s, "add chain ip kube-proxy {svc}");
        let mut vmap = String::new();
        for j in 0..b {
            let ep = backend(j);
            let chain = format!(
                "endpoint-{:08X}-bench/s{i}/tcp/http__{ep}/{BACKEND_PORT}",
                mix(u64::from(i) << 8 | u64::from(j)) as u32
            );
            let _ = writeln!(s, "add chain ip kube-proxy {chain}");
            let _ = writeln!(
                s,
                "add rule ip kube-proxy {chain} ip saddr {ep} jump mark-for-masquerade"
            );
            let _ = writeln!(
                s,
                "add rule ip kube-proxy {chain} meta l4proto tcp dnat to {ep}:{BACKEND_PORT}"
            );
            let sep = if j + 1 < b { ", " } else { "" };
            let _ = write!(vmap, "{j} : goto {chain}{sep}");
        }
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {svc} numgen random mod {b} vmap {{ {vmap} }}"
        );
        let _ = writeln!(
            s,
            "add element ip kube-proxy service-ips {{ {} . tcp . {VIP_PORT} : goto {svc} }}",
            vip(i)
        );
    }
    s
}

// ------------------------------------------------------------- haproxy ----

/// HAProxy as a userspace L4 proxy: one `listen` section per service,
/// binding its VIP and balancing at random over the service's backends.
pub fn haproxy_config(n: u32, b: u32, maxconn: u32) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "global\n    maxconn {maxconn}\n    nbthread 2\n\ndefaults\n    mode tcp\n    \
         timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n"
    );
    for i in 0..n {
        let _ = write!(
            s,
            "listen s{i}\n    bind {}:{VIP_PORT}\n    balance random\n",
            vip(i)
        );
        for j in 0..b {
            let _ = writeln!(s, "    server b{j} {}:{BACKEND_PORT}", backend(j));
        }
    }
    s
}

/// Starts HAProxy inside `node`; stopped by PID on drop.
pub fn start_haproxy(node: &Node, dir: &Path, n: u32, b: u32) -> Result<Proc> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let hard = lim.rlim_max;
    let spare = hard.saturating_sub(u64::from(n) + 200) / 2;
    if spare < 64 {
        bail!(
            "HAProxy needs one socket per service: {n} listeners do not fit this machine's \
             hard open-file limit ({hard}), which this environment does not let root raise"
        );
    }
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(n, b, spare.min(10_000) as u32))?;
    let log = std::fs::File::create(dir.join("haproxy.log"))?;
    let mut cmd = node.ns.exec("haproxy");
    // One socket per service plus two per connection: raise the soft fd
    // limit to the hard one for HAProxy alone and size maxconn to fit.
    // SAFETY: setrlimit is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: hard,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // -db: stay in the foreground, so the PID we hold is HAProxy's.
    cmd.arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Proc::spawn("haproxy", &mut cmd)
}

/// Loads a ruleset given as several transactions, in order, within one
/// time bound; returns how long it took in all.
pub fn load_rule_batches(
    node: &Node,
    dir: &Path,
    program: &str,
    args: &[&str],
    batches: &[String],
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    for batch in batches {
        let left = timeout.checked_sub(start.elapsed()).unwrap_or_default();
        load_rules(node, dir, program, args, batch, left)?;
    }
    Ok(start.elapsed())
}

/// Loads a ruleset inside `node`, bounded in time; returns how long it took.
pub fn load_rules(
    node: &Node,
    dir: &Path,
    program: &str,
    args: &[&str],
    text: &str,
    timeout: Duration,
) -> Result<Duration> {
    let path = dir.join(format!("{program}.rules"));
    std::fs::write(&path, text)?;
    let mut cmd = node.ns.exec(program);
    cmd.args(args).arg(&path);
    let start = Instant::now();
    output_within(program, &mut cmd, timeout)?;
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(vip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(vip(255), Ipv4Addr::new(10, 96, 1, 0));
        assert_eq!(backend(9), Ipv4Addr::new(10, 200, 0, 10));
        // 100,000 VIPs stay inside 10.96.0.0/12.
        assert!(u32::from(vip(99_999)) < u32::from(Ipv4Addr::new(10, 112, 0, 0)));
    }

    #[test]
    fn kube_proxy_layouts() {
        let ipt = iptables_rules(2, 3);
        assert_eq!(ipt.matches("-j KUBE-SVC-").count(), 2);
        assert_eq!(ipt.matches("--probability 0.3333333333").count(), 2);
        assert_eq!(ipt.matches("--probability 0.5000000000").count(), 2);
        assert_eq!(ipt.matches("-j DNAT").count(), 6);
        let batches = nft_rules(1_001, 3);
        assert_eq!(batches.len(), 4, "base + 500 + 500 + 1 services");
        let nft = nft_rules(2, 3).concat();
        assert_eq!(nft.matches("numgen random mod 3 vmap").count(), 2);
        assert_eq!(
            nft.matches("add element ip kube-proxy service-ips").count(),
            2
        );
        let cfg = mesh_config(3, 2, Some((1, 5)));
        assert_eq!(cfg.matches("- name:").count(), 3);
        assert!(cfg.contains("10.202.0.5"));
    }
}
