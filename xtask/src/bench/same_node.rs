//! Scenario 2: same-node request/response and bulk throughput over one
//! established connection: plain loopback TCP, mesh (socket LB only, and
//! with same-node redirect when this agent build has it), and HAProxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

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
    cgroup: Option<Cgroup>,
    node: Node,
    _dir: TempDir,
    target: SocketAddrV4,
}

const PEERS: [&str; 4] = ["loopback", "mesh", "mesh-redirect", "haproxy"];

impl Scenario for SameNode {
    fn id(&self) -> &'static str {
        "same-node"
    }

    fn run(&self, ctx: &Ctx) -> Result<Vec<ScenarioResult>> {
        let mut rows = Vec::new();
        let mut peers = Vec::new();
        let has_redirect = peers::agent_has_flag(&ctx.bins.agent, REDIRECT_FLAG);
        for name in PEERS {
            if name == "mesh-redirect" && !has_redirect {
                rows.push(Row::without(
                    name,
                    None,
                    Status::NotAvailable(format!(
                        "not available in this build: `mesh-agent run --help` has no {REDIRECT_FLAG}"
                    )),
                ));
                continue;
            }
            match setup(ctx, name) {
                Ok(p) => peers.push(p),
                Err(e) => rows.push(Row::without(name, None, Status::Failed(format!("{e:#}")))),
            }
        }
        let rr = Load {
            mode: Mode::Rr,
            threads: 1,
            duration_ms: ctx.trial_ms,
            max_ops: 50_000_000,
        };
        let bulk = Load {
            mode: Mode::Bulk,
            threads: 1,
            duration_ms: ctx.trial_ms,
            // 128 KiB writes: 1 TiB at most.
            max_ops: 8_000_000,
        };
        let mut reports: Vec<(Vec<ClientReport>, Vec<ClientReport>)> =
            peers.iter().map(|_| (Vec::new(), Vec::new())).collect();
        for t in 0..ctx.trials {
            for k in trial_order(peers.len(), t) {
                let p = &peers[k];
                let cg = p.cgroup.as_ref().unwrap_or(&ctx.plain);
                reports[k]
                    .0
                    .push(p.node.client(&ctx.bins, cg, &rr, p.target, 1)?);
                reports[k]
                    .1
                    .push(p.node.client(&ctx.bins, cg, &bulk, p.target, 1)?);
            }
        }
        // Kernel cost of the redirect path, from a pass of its own after the
        // measured trials (the kernel's run-time accounting adds a little
        // to every program run, so it never overlaps them).
        let mut profile = BTreeMap::new();
        if let Some(p) = peers.iter().find(|p| p.name == "mesh-redirect") {
            match self::profile(ctx, p, &rr, &bulk) {
                Ok(m) => profile = m,
                Err(e) => step(format!("bench: same-node: no kernel profile: {e:#}")),
            }
        }
        for (p, (rr, bulk)) in peers.iter().zip(&reports) {
            let m = metrics(rr, bulk);
            step(format!(
                "bench: same-node: {:<13} {:>9.0} round trips/s  p50 {:>6.1} µs  p99 {:>6.1} µs  {:>6.2} Gbit/s",
                p.name, m["rr_per_s"], m["rtt_p50_us"], m["rtt_p99_us"], m["gbit_s"]
            ));
            let mut m = m;
            if let Some(agent) = &p._agent
                && has_redirect
            {
                let r = redirect_metrics(ctx, agent)?;
                step(format!(
                    "bench: same-node: {:<13} redirect: {} sockets, {:.0} MiB redirected, {:.0} MiB fallback",
                    p.name, r["redir_sockets"], r["redir_mib"], r["fallback_mib"]
                ));
                m.extend(r);
                if p.name == "mesh-redirect" {
                    m.extend(profile.clone());
                }
            }
            rows.push(Row::ok(p.name, None, m));
        }
        rows.sort_by_key(|r| PEERS.iter().position(|p| *p == r.peer));
        Ok(vec![ScenarioResult {
            id: "same-node".into(),
            title: "Same-node request/response and bulk throughput".into(),
            method: format!(
                "One established connection inside one network namespace. Round trips: \
                 64-byte request, 64-byte response, back to back, for {} ms. Bulk: 128 KiB \
                 writes for {} ms, the receiver counts and confirms the bytes. {} interleaved \
                 trials per peer; rates are the median trial, percentiles over all trials. \
                 \"loopback\" connects straight to the backend; the others go through a \
                 service VIP. The mesh peers' backend server runs in the agent's cgroup (a \
                 workload of that node), and the agent learns the namespace's addresses by \
                 itself; the redirect columns are the agent's own kernel counters \
                 (MESH_REDIR_STAT) over all of the peer's trials.",
                ctx.trial_ms, ctx.trial_ms, ctx.trials
            ),
            rows,
        }])
    }
}

/// One round-trip and one bulk trial on `p` with BPF_ENABLE_STATS on:
/// ns per run of each program and runs per round trip / per MiB.
fn profile(ctx: &Ctx, p: &Peer, rr: &Load, bulk: &Load) -> Result<BTreeMap<String, f64>> {
    let agent = p._agent.as_ref().context("no agent")?;
    let cg = p.cgroup.as_ref().context("no cgroup")?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow::anyhow!("BPF_ENABLE_STATS: {e}"))?;
    let mut out = BTreeMap::new();
    let short = |l: &str| match l {
        "mesh_redir_sockops" => "redir_sockops",
        "mesh_redir_msg" => "redir_msg",
        _ => "lb_sockops",
    };
    for (load, unit, per) in [(rr, "rt", 0u8), (bulk, "mib", 1)] {
        let before = kstats::of_process_named(agent.pid(), &kstats::REDIRECT_PROGRAMS)?;
        let r = p.node.client(&ctx.bins, cg, load, p.target, 1)?;
        let after = kstats::of_process_named(agent.pid(), &kstats::REDIRECT_PROGRAMS)?;
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
        "bench: same-node: kernel profile: {}",
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
    // cgroup, as a pod on the same node is.
    let mesh = matches!(name, "mesh" | "mesh-redirect");
    let cgroup = if mesh {
        Some(Cgroup::new(&hint)?)
    } else {
        None
    };
    let node = Node::new_in(&ctx.bins, &hint, 1, route, cgroup.as_ref())?;
    let mut peer = Peer {
        name,
        _agent: None,
        _proxy: None,
        cgroup,
        node,
        _dir: dir,
        target: SocketAddrV4::new(vip(0), VIP_PORT),
    };
    match name {
        "loopback" => peer.target = SocketAddrV4::new(backend(0), BACKEND_PORT),
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

/// The agent's redirect counters, as metrics of the row.
fn redirect_metrics(ctx: &Ctx, agent: &MeshAgent) -> Result<BTreeMap<String, f64>> {
    let v = agent.meshctl_json(&ctx.bins, &["redirect"])?;
    let c = &v["counters"];
    let get = |k: &str| {
        c[k].as_u64()
            .map(|n| n as f64)
            .context(format!("no counter {k}"))
    };
    Ok(BTreeMap::from([
        ("redir_sockets".into(), get("sockets_added")?),
        (
            "redir_mib".into(),
            get("bytes_redirected")? / (1024.0 * 1024.0),
        ),
        (
            "fallback_mib".into(),
            get("bytes_fallback")? / (1024.0 * 1024.0),
        ),
    ]))
}

fn has_redirect_flag(agent: &std::path::Path) -> bool {
    peers::agent_has_flag(agent, REDIRECT_FLAG)
}
