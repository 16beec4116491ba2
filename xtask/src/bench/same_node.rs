//! Scenario 2: same-node request/response and bulk throughput over one
//! established connection: plain loopback TCP, mesh (socket LB only, and
//! with same-node redirect when this agent build has it), and HAProxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::bare::BareRedirect;
use super::env::{Cgroup, Proc, TempDir};
use super::kstats;
use super::load::{ClientReport, Mode, new_hist};
use super::peers::{self, BACKEND_PORT, Load, MeshAgent, Node, VIP_PORT, VipRoute, backend, vip};
use super::results::{Row, ScenarioResult, Status};
use super::{Ctx, Scenario, summarize, trial_order};
use crate::util::step;

/// The flag a same-node-redirect build of the agent has.
pub const REDIRECT_FLAG: &str = "--same-node-redirect";

pub struct SameNode;

struct Peer {
    name: &'static str,
    _agent: Option<MeshAgent>,
    _proxy: Option<Proc>,
    _bare: Option<BareRedirect>,
    cgroup: Option<Cgroup>,
    node: Node,
    _dir: TempDir,
    target: SocketAddrV4,
}

pub const PEERS: [&str; 5] = ["loopback", "mesh", "mesh-redirect", BARE, "haproxy"];

/// The bare sock_ops + sk_msg redirect, mesh-redirect's yardstick.
pub const BARE: &str = "bare-redirect";

/// Where the client and the backends' server run, both pinned: two pods of
/// a node on two cores, or sharing one. Left to the scheduler, a trial
/// would be one or the other by chance, and the two differ by more than
/// the peers do (a wakeup across cores costs this VM an interrupt between
/// virtual CPUs).
#[derive(Clone, Copy)]
pub struct Placement {
    /// The row's scale: how many CPUs the pair is spread over.
    pub cpus: u64,
    client: usize,
    server: usize,
}

pub const PLACEMENTS: [Placement; 2] = [
    Placement {
        cpus: 2,
        client: 0,
        server: 1,
    },
    Placement {
        cpus: 1,
        client: 0,
        server: 0,
    },
];

impl Placement {
    pub fn label(self) -> &'static str {
        label(Some(self.cpus))
    }
}

/// How a row's scale (CPUs) reads in reports.
pub fn label(cpus: Option<u64>) -> &'static str {
    match cpus {
        Some(1) => "one CPU",
        Some(2) => "two CPUs",
        _ => "unpinned",
    }
}

impl Scenario for SameNode {
    fn id(&self) -> &'static str {
        "same-node"
    }

    fn run(&self, ctx: &Ctx) -> Result<Vec<ScenarioResult>> {
        let mut rows = Vec::new();
        let mut peers = Vec::new();
        let has_redirect = peers::agent_has_flag(&ctx.bins.agent, REDIRECT_FLAG);
        for name in PEERS {
            let status = if name == "mesh-redirect" && !has_redirect {
                Status::NotAvailable(format!(
                    "not available in this build: `mesh-agent run --help` has no {REDIRECT_FLAG}"
                ))
            } else {
                match setup(ctx, name) {
                    Ok(p) => {
                        peers.push(p);
                        continue;
                    }
                    Err(e) => Status::Failed(format!("{e:#}")),
                }
            };
            for placement in PLACEMENTS {
                rows.push(Row::without(name, Some(placement.cpus), status.clone()));
            }
        }
        let mut rr = Load {
            mode: Mode::Rr,
            threads: 1,
            duration_ms: ctx.trial_ms,
            max_ops: 50_000_000,
            cpu: None,
        };
        let mut bulk = Load {
            mode: Mode::Bulk,
            threads: 1,
            duration_ms: ctx.trial_ms,
            // 128 KiB writes: 1 TiB at most.
            max_ops: 8_000_000,
            cpu: None,
        };
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        for placement in PLACEMENTS {
            if placement.server >= online {
                for p in &peers {
                    rows.push(Row::without(
                        p.name,
                        Some(placement.cpus),
                        Status::NotAvailable(format!("this machine has {online} CPU(s)")),
                    ));
                }
                continue;
            }
            (rr.cpu, bulk.cpu) = (Some(placement.client), Some(placement.client));
            let counters_before = peers
                .iter()
                .map(|p| p.redirect_counters(ctx, has_redirect))
                .collect::<Result<Vec<_>>>()?;
            let mut reports: Vec<(Vec<ClientReport>, Vec<ClientReport>)> =
                peers.iter().map(|_| (Vec::new(), Vec::new())).collect();
            for t in 0..ctx.trials {
                for k in trial_order(peers.len(), t) {
                    let p = &peers[k];
                    p.node.pin_server(Some(placement.server))?;
                    let cg = p.cgroup.as_ref().unwrap_or(&ctx.plain);
                    reports[k]
                        .0
                        .push(p.node.client(&ctx.bins, cg, &rr, p.target, 1)?);
                    reports[k]
                        .1
                        .push(p.node.client(&ctx.bins, cg, &bulk, p.target, 1)?);
                }
            }
            // Kernel cost of the redirect programs, from a pass of its own
            // after the measured trials (the kernel's run-time accounting
            // adds a little to every program run, so it never overlaps them).
            let mut profiles = Vec::new();
            for p in &peers {
                let programs = p.redirect_programs();
                if placement.cpus != 2 || programs.is_none() {
                    profiles.push(BTreeMap::new());
                    continue;
                }
                p.node.pin_server(Some(placement.server))?;
                profiles.push(self::profile(ctx, p, &rr, &bulk).unwrap_or_else(|e| {
                    step(format!(
                        "bench: same-node: {}: no kernel profile: {e:#}",
                        p.name
                    ));
                    BTreeMap::new()
                }));
            }
            let measured = peers
                .iter()
                .zip(&reports)
                .zip(counters_before)
                .zip(profiles);
            for (((p, (rr, bulk)), before), profile) in measured {
                let mut m = metrics(rr, bulk);
                m.extend(profile);
                step(format!(
                    "bench: same-node: {:<13} {}  {:>9.0} round trips/s  p50 {:>6.1} µs  p99 {:>6.1} µs  {:>6.2} Gbit/s",
                    p.name,
                    placement.label(),
                    m["rr_per_s"],
                    m["rtt_p50_us"],
                    m["rtt_p99_us"],
                    m["gbit_s"]
                ));
                if let (Some(before), Some(after)) =
                    (before, p.redirect_counters(ctx, has_redirect)?)
                {
                    let r: BTreeMap<String, f64> = after
                        .iter()
                        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
                        .collect();
                    step(format!(
                        "bench: same-node: {:<13} {}  redirect: {} sockets, {:.0} MiB redirected, {:.0} MiB fallback",
                        p.name,
                        placement.label(),
                        r["redir_sockets"],
                        r["redir_mib"],
                        r["fallback_mib"]
                    ));
                    m.extend(r);
                }
                rows.push(Row::ok(p.name, Some(placement.cpus), m));
            }
        }
        for p in &peers {
            p.node.pin_server(None)?;
        }
        rows.sort_by_key(|r| {
            (
                std::cmp::Reverse(r.scale),
                PEERS.iter().position(|p| *p == r.peer),
            )
        });
        Ok(vec![ScenarioResult {
            id: "same-node".into(),
            title: "Same-node request/response and bulk throughput".into(),
            method: format!(
                "One established connection inside one network namespace. Round trips: \
                 64-byte request, 64-byte response, back to back, for {} ms. Bulk: 128 KiB \
                 writes for {} ms, the receiver counts and confirms the bytes. The client and \
                 the backends' server are pinned: on two CPUs (client on CPU 0, server on CPU \
                 1, as two pods on two cores) and then both on CPU 0 (pods sharing a core); \
                 the agent and HAProxy are left to the scheduler. {} interleaved trials per \
                 peer and placement; rates are the median trial, percentiles over all trials. \
                 \"loopback\" connects straight to the backend, and so does \"bare-redirect\": \
                 the least sock_ops + sk_msg program that redirects (every established IPv4 \
                 socket of its cgroup in a sockhash, every message to its peer; \
                 xtask/bare-redirect), the mechanism alone as the yardstick for mesh-redirect. \
                 The others go through a service VIP. The mesh peers' backend server runs in \
                 the agent's cgroup (a workload of that node), and the agent learns the \
                 namespace's addresses by itself; the redirect columns are the agent's own kernel counters \
                 (MESH_REDIR_STAT) over the peer's trials in that placement.",
                ctx.trial_ms, ctx.trial_ms, ctx.trials
            ),
            rows,
        }])
    }
}

/// One round-trip and one bulk trial on `p` with BPF_ENABLE_STATS on:
/// ns per run of each redirect program and runs per round trip / per MiB.
fn profile(ctx: &Ctx, p: &Peer, rr: &Load, bulk: &Load) -> Result<BTreeMap<String, f64>> {
    let (pid, programs) = p.redirect_programs().context("no redirect programs")?;
    let cg = p.cgroup.as_ref().context("no cgroup")?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow::anyhow!("BPF_ENABLE_STATS: {e}"))?;
    let mut out = BTreeMap::new();
    // The same columns for mesh's programs and the bare ones.
    let short = |l: &str| match l {
        "mesh_redir_sockops" | "bare_sockops" => "redir_sockops",
        "mesh_redir_msg" | "bare_msg" => "redir_msg",
        _ => "lb_sockops",
    };
    for (load, unit, per) in [(rr, "rt", 0u8), (bulk, "mib", 1)] {
        let before = kstats::of_process_named(pid, programs)?;
        let r = p.node.client(&ctx.bins, cg, load, p.target, 1)?;
        let after = kstats::of_process_named(pid, programs)?;
        let units = if per == 0 {
            r.ops as f64
        } else {
            r.bytes as f64 / (1024.0 * 1024.0)
        };
        for (name, &(t1, c1)) in &after {
            let (t0, c0) = before.get(name).copied().unwrap_or_default();
            let (t, c) = (t1.saturating_sub(t0), c1.saturating_sub(c0));
            let prog = short(name);
            if c > 0 {
                out.insert(format!("{prog}_ns_per_run_{unit}"), t as f64 / c as f64);
            }
            out.insert(format!("{prog}_runs_per_{unit}"), c as f64 / units.max(1.0));
        }
    }
    let line: Vec<String> = out.iter().map(|(k, v)| format!("{k}={v:.1}")).collect();
    step(format!(
        "bench: same-node: {}: kernel profile: {}",
        p.name,
        line.join(" ")
    ));
    Ok(out)
}

fn metrics(rr: &[ClientReport], bulk: &[ClientReport]) -> BTreeMap<String, f64> {
    let mut hist = new_hist();
    let mut rates = Vec::new();
    let mut errors = 0;
    for r in rr {
        r.add_to(&mut hist);
        rates.push(r.ops as f64 * 1e9 / r.elapsed_ns.max(1) as f64);
        errors += r.errors;
    }
    let mut gbits: Vec<f64> = bulk
        .iter()
        .map(|r| r.bytes as f64 * 8.0 / r.elapsed_ns.max(1) as f64)
        .collect();
    errors += bulk.iter().map(|r| r.errors).sum::<u64>();
    let (rr_median, _, _) = summarize(&mut rates);
    let (gbit, gbit_min, gbit_max) = summarize(&mut gbits);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    BTreeMap::from([
        ("rr_per_s".into(), rr_median),
        ("rtt_p50_us".into(), us(0.5)),
        ("rtt_p99_us".into(), us(0.99)),
        ("rtt_mean_us".into(), hist.mean() / 1000.0),
        ("gbit_s".into(), gbit),
        ("gbit_s_min".into(), gbit_min),
        ("gbit_s_max".into(), gbit_max),
        ("errors".into(), errors as f64),
    ])
}

fn setup(ctx: &Ctx, name: &'static str) -> Result<Peer> {
    let hint = format!("s-{name}");
    let dir = TempDir::new(&hint)?;
    let route = if name == "haproxy" {
        VipRoute::Local
    } else {
        VipRoute::Routed
    };
    // The mesh peers' backend server is a workload of their agent, in its
    // cgroup, as a pod on the same node is (and the bare program's, in the
    // cgroup it is attached to).
    let own_cgroup = matches!(name, "mesh" | "mesh-redirect" | BARE);
    let cgroup = if own_cgroup {
        Some(Cgroup::new(&hint)?)
    } else {
        None
    };
    let node = Node::new_in(&ctx.bins, &hint, 1, route, cgroup.as_ref())?;
    let mut peer = Peer {
        name,
        _agent: None,
        _proxy: None,
        _bare: None,
        cgroup,
        node,
        _dir: dir,
        target: SocketAddrV4::new(vip(0), VIP_PORT),
    };
    match name {
        "loopback" => peer.target = SocketAddrV4::new(backend(0), BACKEND_PORT),
        BARE => {
            // No load balancer: straight to the backend, as loopback.
            peer.target = SocketAddrV4::new(backend(0), BACKEND_PORT);
            let cg = peer.cgroup.as_ref().expect("made above");
            peer._bare = Some(BareRedirect::attach(&ctx.bins.bare_redirect, cg)?);
        }
        "mesh" | "mesh-redirect" => {
            let cg = peer.cgroup.as_ref().expect("made above");
            // The agent redirects by default; "mesh" is the socket LB alone.
            let extra: &[&str] = if name == "mesh-redirect" {
                &[REDIRECT_FLAG, "on"]
            } else if has_redirect_flag(&ctx.bins.agent) {
                &[REDIRECT_FLAG, "off"]
            } else {
                &[]
            };
            let agent = MeshAgent::start(&ctx.bins, cg, 1, extra)?;
            agent.reload(&peers::mesh_config(1, 1, None), ctx.setup_timeout, |a| {
                a.service(0).is_some()
            })?;
            if has_redirect_flag(&ctx.bins.agent) {
                wait_local(ctx, &agent)?;
            }
            peer._agent = Some(agent);
        }
        "haproxy" => {
            let dir = peer._dir.path().to_path_buf();
            peer._proxy = Some(peers::start_haproxy(&peer.node, &dir, 1, 1)?);
        }
        _ => unreachable!("unknown peer {name}"),
    }
    let cg = peer.cgroup.as_ref().unwrap_or(&ctx.plain);
    let log = peer._dir.path().join("haproxy.log");
    let serving = peer._proxy.as_ref().map(|p| (p, log.as_path()));
    peer.node
        .wait_path(&ctx.bins, cg, peer.target, 1, ctx.setup_timeout, serving)?;
    Ok(peer)
}

/// Waits until the agent counts the workload namespace's addresses (the
/// client's source and the backend) as node-local: it learns them from the
/// namespace its cgroup's server lives in, on its own refresh.
fn wait_local(ctx: &Ctx, agent: &MeshAgent) -> Result<()> {
    let want = [IpAddr::V4(peers::CLIENT_SRC), IpAddr::V4(backend(0))];
    let deadline = Instant::now() + ctx.setup_timeout.max(Duration::from_secs(15));
    loop {
        let v = agent.meshctl_json(&ctx.bins, &["redirect"])?;
        let local: Vec<IpAddr> = serde_json::from_value(v["local_addresses"].clone())
            .context("meshctl redirect: no local_addresses")?;
        if want.iter().all(|a| local.contains(a)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent never learned its workloads' addresses {want:?}: it has {local:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Peer {
    /// The process holding this peer's redirect programs, and their names.
    fn redirect_programs(&self) -> Option<(u32, &'static [&'static str])> {
        match (&self._agent, &self._bare) {
            (Some(agent), _) if self.name == "mesh-redirect" => {
                Some((agent.pid(), &kstats::REDIRECT_PROGRAMS))
            }
            (_, Some(_)) => Some((std::process::id(), &super::bare::PROGRAMS)),
            _ => None,
        }
    }

    /// The agent's redirect counters, as metrics of a row; None for peers
    /// without a redirecting agent build.
    fn redirect_counters(
        &self,
        ctx: &Ctx,
        has_redirect: bool,
    ) -> Result<Option<BTreeMap<String, f64>>> {
        let Some(agent) = self._agent.as_ref().filter(|_| has_redirect) else {
            return Ok(None);
        };
        let v = agent.meshctl_json(&ctx.bins, &["redirect"])?;
        let c = &v["counters"];
        let get = |k: &str| {
            c[k].as_u64()
                .map(|n| n as f64)
                .context(format!("no counter {k}"))
        };
        Ok(Some(BTreeMap::from([
            ("redir_sockets".into(), get("sockets_added")?),
            (
                "redir_mib".into(),
                get("bytes_redirected")? / (1024.0 * 1024.0),
            ),
            (
                "fallback_mib".into(),
                get("bytes_fallback")? / (1024.0 * 1024.0),
            ),
        ])))
    }
}

fn has_redirect_flag(agent: &std::path::Path) -> bool {
    peers::agent_has_flag(agent, REDIRECT_FLAG)
}
