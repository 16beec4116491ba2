//! Scenario 2: same-node request/response and bulk throughput over one
//! established connection: plain loopback TCP, mesh (socket LB only, and
//! with same-node redirect when this agent build has it), and HAProxy.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use anyhow::Result;

use super::env::{Cgroup, Proc, TempDir};
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
        for (p, (rr, bulk)) in peers.iter().zip(&reports) {
            let m = metrics(rr, bulk);
            step(format!(
                "bench: same-node: {:<13} {:>9.0} round trips/s  p50 {:>6.1} µs  p99 {:>6.1} µs  {:>6.2} Gbit/s",
                p.name, m["rr_per_s"], m["rtt_p50_us"], m["rtt_p99_us"], m["gbit_s"]
            ));
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
                 service VIP.",
                ctx.trial_ms, ctx.trial_ms, ctx.trials
            ),
            rows,
        }])
    }
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
    let node = Node::new(&ctx.bins, &hint, 1, route)?;
    let mut peer = Peer {
        name,
        _agent: None,
        _proxy: None,
        cgroup: None,
        node,
        _dir: dir,
        target: SocketAddrV4::new(vip(0), VIP_PORT),
    };
    match name {
        "loopback" => peer.target = SocketAddrV4::new(backend(0), BACKEND_PORT),
        "mesh" | "mesh-redirect" => {
            let cg = Cgroup::new(&hint)?;
            // The agent redirects by default; "mesh" is the socket LB alone.
            let extra: &[&str] = if name == "mesh-redirect" {
                &[REDIRECT_FLAG, "on"]
            } else if has_redirect_flag(&ctx.bins.agent) {
                &[REDIRECT_FLAG, "off"]
            } else {
                &[]
            };
            let agent = MeshAgent::start(&ctx.bins, &cg, 1, extra)?;
            agent.reload(&peers::mesh_config(1, 1, None), ctx.setup_timeout, |a| {
                a.service(0).is_some()
            })?;
            peer._agent = Some(agent);
            peer.cgroup = Some(cg);
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

fn has_redirect_flag(agent: &std::path::Path) -> bool {
    peers::agent_has_flag(agent, REDIRECT_FLAG)
}
