//! Scenario 1, the service connect path (new TCP connection + one 64-byte
//! request/response), at each scale, against every peer; and scenario 4,
//! the kernel's own run-time statistics of mesh's programs during it.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::env::{Cgroup, TempDir};
use super::kstats::{self, ProgStats};
use super::load::{ClientReport, Mode, new_hist};
use super::peers::{
    self, BACKEND_PORT, BACKENDS_PER_SERVICE, Load, MeshAgent, Node, VIP_PORT, VipRoute, backend,
    vip,
};
use super::results::{Row, ScenarioResult, Status};
use super::{Ctx, Scenario, summarize, trial_order};
use crate::util::step;

pub struct Connect;

/// One system under test, standing for the whole scale.
struct Peer {
    name: &'static str,
    // Drop order: agent and proxies stop first, then the cgroup and netns go.
    agent: Option<MeshAgent>,
    _proxy: Option<super::env::Proc>,
    cgroup: Option<Cgroup>,
    node: Node,
    _dir: TempDir,
    first: SocketAddrV4,
    targets: u32,
    setup_s: f64,
}

impl Scenario for Connect {
    fn id(&self) -> &'static str {
        "connect"
    }

    fn run(&self, ctx: &Ctx) -> Result<Vec<ScenarioResult>> {
        let mut rows = Vec::new();
        let mut krows = Vec::new();
        for &n in &ctx.scales {
            self.scale(ctx, n, &mut rows, &mut krows)?;
        }
        for &n in &ctx.skipped_scales {
            for p in PEERS {
                rows.push(Row::without(
                    p,
                    Some(u64::from(n)),
                    Status::Skipped("scale left out of --quick runs".into()),
                ));
            }
        }
        Ok(vec![
            ScenarioResult {
                id: "connect".into(),
                title: "Service connect path: new TCP connection + one 64-byte request/response"
                    .into(),
                method: format!(
                    "{} client threads, each opening a connection to a random service VIP \
                     (direct: a random backend), sending 64 bytes, reading 64 bytes, closing \
                     with RST; {} interleaved trials of {} ms per peer; {BACKENDS_PER_SERVICE} \
                     backends per service. Connections/s is the median trial; latency \
                     percentiles are over all trials. \"mesh-log-never\" is the same agent \
                     started with `--kernel-debug-log never`: its programs are loaded with \
                     the debug-log sites removed, where \"mesh\" keeps them behind the off \
                     switch.",
                    ctx.threads, ctx.trials, ctx.trial_ms
                ),
                rows,
            },
            ScenarioResult {
                id: "kernel-cost".into(),
                title: "Kernel cost of mesh's programs (BPF run-time statistics)".into(),
                method: format!(
                    "run_time_ns / run_cnt of each program of the benchmark's agent, at \
                     each scale, from {} more trials of the connect load per agent after the \
                     measured ones, with the kernel's BPF statistics enabled \
                     (BPF_ENABLE_STATS) for them only: the accounting adds two clock reads \
                     to every program run, so it is kept out of the connect rows. Rows \
                     marked \"(log sites removed)\" are the connect program of the \
                     mesh-log-never agent, in the same interleaved trials as mesh's.",
                    ctx.trials
                ),
                rows: krows,
            },
        ])
    }
}

pub const PEERS: [&str; 6] = [
    "direct",
    "mesh",
    "mesh-log-never",
    "iptables",
    "nftables",
    "haproxy",
];

/// The agent with `--kernel-debug-log never`: its programs are loaded with
/// the debug-log sites removed, beside "mesh" whose sites stay (switch off),
/// so the run shows what the off switch costs.
const LOG_NEVER: &str = "mesh-log-never";
/// Kernel-cost rows of that agent: `mesh_connect4` + this.
pub const LOG_NEVER_SUFFIX: &str = " (log sites removed)";

impl Connect {
    fn scale(&self, ctx: &Ctx, n: u32, rows: &mut Vec<Row>, krows: &mut Vec<Row>) -> Result<()> {
        step(format!(
            "bench: connect: setting up {} peers with {n} services",
            PEERS.len()
        ));
        let mut peers = Vec::new();
        for name in PEERS {
            if let Some(why) = not_run_at(name, n) {
                step(format!(
                    "bench: connect: {name} at {n} services skipped: {why}"
                ));
                rows.push(Row::without(name, Some(u64::from(n)), Status::Skipped(why)));
                continue;
            }
            let start = Instant::now();
            match setup(ctx, name, n) {
                Ok(mut p) => {
                    p.setup_s = start.elapsed().as_secs_f64();
                    step(format!(
                        "bench: connect: {name} ready in {:.1} s",
                        p.setup_s
                    ));
                    peers.push(p);
                }
                Err(e) => {
                    step(format!(
                        "bench: connect: {name} at {n} services failed: {e:#}"
                    ));
                    rows.push(Row::without(
                        name,
                        Some(u64::from(n)),
                        Status::Failed(format!("{e:#}")),
                    ));
                }
            }
        }
        let load = Load {
            mode: Mode::Connect,
            threads: ctx.threads,
            duration_ms: ctx.trial_ms,
            max_ops: 5_000_000,
            cpu: None,
        };
        let mut reports: Vec<Vec<ClientReport>> = peers.iter().map(|_| Vec::new()).collect();
        for t in 0..ctx.trials {
            for k in trial_order(peers.len(), t) {
                let p = &peers[k];
                let cg = p.cgroup.as_ref().unwrap_or(&ctx.plain);
                reports[k].push(p.node.client(&ctx.bins, cg, &load, p.first, p.targets)?);
            }
        }
        let kernel = kernel_cost(ctx, &peers, &load);
        for (p, reps) in peers.iter().zip(&reports) {
            let mut m = connect_metrics(reps);
            m.insert("setup_s".into(), p.setup_s);
            step(format!(
                "bench: connect: {n:>6} services {:<14} {:>9.0} conn/s  p50 {:>7.1} µs  p99 {:>7.1} µs  errors {}",
                p.name, m["conn_per_s"], m["p50_us"], m["p99_us"], m["errors"]
            ));
            rows.push(Row::ok(p.name, Some(u64::from(n)), m));
        }
        let scale = Some(u64::from(n));
        match kernel {
            Ok(kernel) => {
                let first = krows.len();
                for (p, (stats, conns)) in peers.iter().zip(&kernel) {
                    if p.name == "mesh" {
                        krows.extend(stats.rows(&kstats::PROGRAMS, scale, *conns, ""));
                    } else if p.name == LOG_NEVER {
                        // Only the connect program has log sites.
                        krows.extend(stats.rows(
                            &kstats::PROGRAMS[..1],
                            scale,
                            *conns,
                            LOG_NEVER_SUFFIX,
                        ));
                    }
                }
                for r in &krows[first..] {
                    let m = |k: &str| r.metrics.get(k).copied().unwrap_or(f64::NAN);
                    step(format!(
                        "bench: connect: {n:>6} services {:<36} {:>6.0} ns per run  {:>5.2} runs per connection",
                        r.peer,
                        m("ns_per_run"),
                        m("runs_per_connection")
                    ));
                }
            }
            Err(e) => krows.extend(
                kstats::PROGRAMS
                    .iter()
                    .map(|prog| Row::without(prog, scale, Status::Failed(format!("{e:#}")))),
            ),
        }
        if !peers.iter().any(|p| p.name == "mesh") {
            for prog in kstats::PROGRAMS {
                krows.push(Row::without(
                    prog,
                    Some(u64::from(n)),
                    Status::Failed("the mesh peer could not be set up at this scale".into()),
                ));
            }
        }
        Ok(())
    }
}

/// The agents' programs' run-time statistics over `ctx.trials` more
/// interleaved trials of `load` per agent peer, with BPF_ENABLE_STATS on for
/// those only; per peer (empty for peers without an agent): the totals and
/// the connections the load completed.
fn kernel_cost(ctx: &Ctx, peers: &[Peer], load: &Load) -> Result<Vec<(ProgStats, u64)>> {
    // The fd turns the statistics off again when dropped, on every path.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow::anyhow!("BPF_ENABLE_STATS: {e}"))?;
    let mut out: Vec<(ProgStats, u64)> = peers.iter().map(|_| Default::default()).collect();
    let agents: Vec<usize> = (0..peers.len())
        .filter(|&k| peers[k].agent.is_some())
        .collect();
    for t in 0..ctx.trials {
        for j in trial_order(agents.len(), t) {
            let k = agents[j];
            let (p, agent) = (&peers[k], peers[k].agent.as_ref().expect("filtered above"));
            let cg = p.cgroup.as_ref().unwrap_or(&ctx.plain);
            let before = kstats::of_process(agent.pid())?;
            let r = p.node.client(&ctx.bins, cg, load, p.first, p.targets)?;
            let after = kstats::of_process(agent.pid())?;
            out[k].0.add_delta(&before, &after);
            out[k].1 += r.ops;
        }
    }
    Ok(out)
}

pub fn connect_metrics(reps: &[ClientReport]) -> BTreeMap<String, f64> {
    let mut hist = new_hist();
    let mut rates: Vec<f64> = Vec::new();
    let (mut ops, mut errors) = (0, 0);
    for r in reps {
        r.add_to(&mut hist);
        rates.push(r.ops as f64 * 1e9 / r.elapsed_ns.max(1) as f64);
        ops += r.ops;
        errors += r.errors;
    }
    let (median, min, max) = summarize(&mut rates);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    BTreeMap::from([
        ("conn_per_s".into(), median),
        ("conn_per_s_min".into(), min),
        ("conn_per_s_max".into(), max),
        ("p50_us".into(), us(0.5)),
        ("p99_us".into(), us(0.99)),
        ("p999_us".into(), us(0.999)),
        ("mean_us".into(), hist.mean() / 1000.0),
        ("connections".into(), ops as f64),
        ("errors".into(), errors as f64),
    ])
}

/// Largest scales at which the kube-proxy layouts are loaded here.
const NFT_MAX_SERVICES: u32 = 10_000;
const IPTABLES_MAX_SERVICES: u32 = 30_000;

/// Why a peer is not set up at a scale: loading its rules alone would take
/// longer than the whole benchmark (load times measured on this machine).
fn not_run_at(name: &str, n: u32) -> Option<String> {
    match name {
        "nftables" if n > NFT_MAX_SERVICES => Some(format!(
            "loading grows with the table: each 500-service transaction re-validates the whole \
             ruleset (measured here: 1 s per transaction into an empty table, 17 s at 20,000 \
             services), so {n} services would take hours; run up to {NFT_MAX_SERVICES}"
        )),
        "iptables" if n > IPTABLES_MAX_SERVICES => Some(format!(
            "iptables-legacy-restore grows faster than linearly (measured here: 10 s for \
             10,000 services, 109 s for 30,000), so {n} services would take about half an \
             hour; run up to {IPTABLES_MAX_SERVICES}"
        )),
        _ => None,
    }
}

fn setup(ctx: &Ctx, name: &'static str, n: u32) -> Result<Peer> {
    let b = BACKENDS_PER_SERVICE;
    let hint = format!("c{n}-{name}");
    let dir = TempDir::new(&hint)?;
    let route = if name == "haproxy" {
        VipRoute::Local
    } else {
        VipRoute::Routed
    };
    let node = Node::new(&ctx.bins, &hint, b, route)?;
    let vips = (SocketAddrV4::new(vip(0), VIP_PORT), n);
    let mut peer = Peer {
        name,
        agent: None,
        _proxy: None,
        cgroup: None,
        node,
        _dir: dir,
        first: vips.0,
        targets: vips.1,
        setup_s: 0.0,
    };
    let dir = peer._dir.path().to_path_buf();
    match name {
        "direct" => {
            peer.first = SocketAddrV4::new(backend(0), BACKEND_PORT);
            peer.targets = b;
        }
        "mesh" | LOG_NEVER => {
            let cg = Cgroup::new(&hint)?;
            let extra: &[&str] = if name == LOG_NEVER {
                &["--kernel-debug-log", "never"]
            } else {
                &[]
            };
            let agent = MeshAgent::start(&ctx.bins, &cg, n, extra)?;
            agent.program(n, ctx.setup_timeout)?;
            peer.agent = Some(agent);
            peer.cgroup = Some(cg);
        }
        "iptables" => {
            peers::load_rules(
                &peer.node,
                &dir,
                "iptables-legacy-restore",
                &[],
                &peers::iptables_rules(n, b),
                ctx.setup_timeout,
            )?;
        }
        "nftables" => {
            peers::load_rule_batches(
                &peer.node,
                &dir,
                "nft",
                &["-f"],
                &peers::nft_rules(n, b),
                ctx.setup_timeout,
            )?;
        }
        "haproxy" => {
            peer._proxy = Some(peers::start_haproxy(&peer.node, &dir, n, b)?);
        }
        _ => unreachable!("unknown peer {name}"),
    }
    // Every peer must really carry connections, to the first and last VIP.
    let cg = peer.cgroup.as_ref().unwrap_or(&ctx.plain);
    let wait = if name == "haproxy" {
        ctx.setup_timeout
    } else {
        Duration::from_secs(10)
    };
    let log = dir.join("haproxy.log");
    let serving = peer._proxy.as_ref().map(|p| (p, log.as_path()));
    peer.node
        .wait_path(&ctx.bins, cg, peer.first, peer.targets, wait, serving)?;
    Ok(peer)
}
