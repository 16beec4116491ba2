//! Scenario: cross-node traffic. Two namespace nodes joined by a veth pair,
//! both agents on; node A's client reaches node B's backend four ways in
//! one run: plaintext direct, the mesh tunnel (HBONE over mutual TLS 1.3),
//! a stunnel pair and an HAProxy TLS pair (both mutual TLS 1.3 with the
//! same node certificates). Targets are ratios to direct in the same run.

mod exchange;
mod topology;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use self::exchange::{client, enabled as exchange_enabled, server};
use self::topology::{Carrier, Nodes};
use super::load::{ClientReport, Mode, new_hist};
use super::peers::Load;
use super::results::{Results, Row, ScenarioResult, Status, Target};
use super::{Ctx, Scenario, summarize, trial_order};
use crate::util::step;

pub const ID: &str = "cross-node";
pub const PEERS: [&str; 4] = ["direct", "mesh", "stunnel", "haproxy"];
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub struct CrossNode;

struct Peer {
    name: &'static str,
    /// None for direct: nothing carries its bytes.
    carrier: Option<Carrier>,
    target: std::net::SocketAddrV4,
}

/// The loads of one trial, in order: (metric prefix, load).
fn loads(ctx: &Ctx) -> [(&'static str, Load); 4] {
    let d = ctx.trial_ms;
    [
        // 128 KiB writes: bounded at 1 TiB per stream.
        ("bulk1", load(Mode::Bulk, 1, d, 8_000_000)),
        ("bulk8", load(Mode::Bulk, 8, d, 8_000_000)),
        ("rr", load(Mode::Rr, 1, d, 50_000_000)),
        ("connect", load(Mode::Connect, ctx.threads, d, 10_000_000)),
    ]
}

fn load(mode: Mode, threads: u32, duration_ms: u64, max_ops: u64) -> Load {
    Load {
        mode,
        threads,
        duration_ms,
        max_ops,
        cpu: None,
    }
}

/// What one peer gave over all trials of one load.
#[derive(Default)]
struct Samples {
    reports: Vec<ClientReport>,
    /// CPU µs of the carrier (agents or proxies) and of client + backend.
    carrier_us: u64,
    app_us: u64,
}

impl Scenario for CrossNode {
    fn id(&self) -> &'static str {
        ID
    }

    fn run(&self, ctx: &Ctx) -> Result<Vec<ScenarioResult>> {
        let nodes = Nodes::new(&ctx.bins)?;
        let mut rows = Vec::new();
        let mut peers = Vec::new();
        for name in PEERS {
            let made = match name {
                "direct" => Ok(None),
                "mesh" => topology::mesh(&ctx.bins, &nodes, ctx.setup_timeout).map(Some),
                "stunnel" if topology::stunnel_bin().is_none() => Err(unavailable(
                    "stunnel is not installed (Debian package stunnel4)",
                )),
                "stunnel" => topology::stunnel(&nodes).map(Some),
                "haproxy" => topology::haproxy(&nodes).map(Some),
                _ => unreachable!("unknown peer {name}"),
            };
            let peer = made.and_then(|carrier| {
                let target = carrier.as_ref().map_or(topology::BACKEND, |c| c.target);
                let p = Peer {
                    name,
                    carrier,
                    target,
                };
                wait_path(ctx, &nodes, &p)?;
                Ok(p)
            });
            match peer {
                Ok(p) => peers.push(p),
                Err(e) => {
                    let why = format!("{e:#}");
                    step(format!("bench: {ID}: {name} cannot run: {why}"));
                    let status = match why.strip_prefix(UNAVAILABLE) {
                        Some(w) => Status::NotAvailable(w.to_string()),
                        None => Status::Failed(why),
                    };
                    rows.push(Row::without(name, None, status));
                }
            }
        }
        let loads = loads(ctx);
        let mut samples: Vec<Vec<Samples>> = peers
            .iter()
            .map(|_| loads.iter().map(|_| Samples::default()).collect())
            .collect();
        let mut tunnelled_before = None;
        if let Some(m) = peers.iter().find(|p| p.name == "mesh") {
            tunnelled_before = Some(tunnelled(ctx, m)?);
        }
        for t in 0..ctx.trials {
            for k in trial_order(peers.len(), t) {
                let p = &peers[k];
                for (i, (_, l)) in loads.iter().enumerate() {
                    let (c0, a0) = (carrier_us(p)?, nodes.app_cpu_us()?);
                    let r = nodes.client(&ctx.bins, l, p.target)?;
                    let (c1, a1) = (carrier_us(p)?, nodes.app_cpu_us()?);
                    let s = &mut samples[k][i];
                    s.carrier_us += c1.saturating_sub(c0);
                    s.app_us += a1.saturating_sub(a0);
                    s.reports.push(r);
                }
                if let Some(c) = &p.carrier
                    && let Some(why) = c.exited()?
                {
                    bail!("{}: {why}", p.name);
                }
                if !nodes.server_alive()? {
                    bail!("the backend on node B exited");
                }
            }
        }
        for (p, s) in peers.iter().zip(&samples) {
            let mut m = metrics(s);
            if let Some(before) = tunnelled_before.filter(|_| p.name == "mesh") {
                m.insert(
                    "tunnelled_conns".into(),
                    tunnelled(ctx, p)?.saturating_sub(before) as f64,
                );
            }
            step(format!(
                "bench: {ID}: {:<8} 1 stream {:>6.2} Gbit/s  8 streams {:>6.2} Gbit/s  1 KiB p50 {:>7.1} µs p99 {:>7.1} µs  {:>7.0} conn/s  {:>6.2} CPU s/GiB ({:.2} with client+server)  errors {}",
                p.name,
                m["gbit_s_1"],
                m["gbit_s_8"],
                m["rtt_p50_us"],
                m["rtt_p99_us"],
                m["conn_per_s"],
                m.get("cpu_s_per_gib").copied().unwrap_or(f64::NAN),
                m.get("cpu_s_per_gib_all").copied().unwrap_or(f64::NAN),
                m["errors"],
            ));
            if let Some(e) = s
                .iter()
                .flat_map(|x| &x.reports)
                .find_map(|r| r.first_error.clone())
            {
                step(format!("bench: {ID}: {}: first error: {e}", p.name));
            }
            rows.push(Row::ok(p.name, None, m));
        }
        rows.sort_by_key(|r| PEERS.iter().position(|p| *p == r.peer));
        let versions = [
            topology::stunnel_version().unwrap_or_else(|| "stunnel: not installed".into()),
            topology::haproxy_version().unwrap_or_else(|| "haproxy: not installed".into()),
        ];
        Ok(vec![ScenarioResult {
            id: ID.into(),
            title: "Cross-node: mTLS tunnel vs plaintext, stunnel and HAProxy".into(),
            method: format!(
                "Two network namespaces (node A 10.78.0.1, node B 10.78.0.2) joined by one \
                 veth pair; both mesh agents run the whole time, each with a node certificate \
                 from a CA the bench makes (`meshctl ca init` / `ca issue`, ECDSA P-256). The \
                 client runs in node A's namespace and in the cgroup agent A watches; the \
                 backend (bench-server) runs on node B at {backend}, in the cgroup agent B \
                 watches. direct: the client connects to {backend} in plaintext. mesh: to the \
                 VIP {vip} (a service with `mtls: permissive`, backend `node: node-b`; strict would drop direct's plaintext at node B): agent A's \
                 connect4 hands it to its outbound listener and the agent carries it over HBONE \
                 (HTTP/2 CONNECT in mutual TLS 1.3) to agent B on :15008, which connects to the \
                 backend. stunnel: to a stunnel client on A (127.0.0.1), TLS 1.3 to a stunnel \
                 server on B, which connects to the backend. haproxy: to HAProxy on A (mode tcp, \
                 `server … ssl crt … verify required`), TLS 1.3 to HAProxy on B (`bind … ssl crt \
                 … verify required`), which connects to the backend. stunnel and HAProxy use \
                 mutual TLS with the same node certificates, TCP_NODELAY, and their default \
                 session caching; the agents run with same-node redirect off (it plays no part \
                 in a tunnelled connection). Per trial and peer: bulk upload over 1 and over 8 \
                 connections (128 KiB writes, the receiver counts and confirms the bytes), 1 KiB \
                 request / 1 KiB response round trips back to back on one connection, and new \
                 connections per second ({threads} client threads, each: connect, 64-byte \
                 request and response, close with RST), each for {ms} ms; {trials} interleaved \
                 trials; rates are the median trial, percentiles over all trials. CPU s/GiB: \
                 the cgroup `usage_usec` of the carrier's own processes (both agents, both \
                 stunnels or both HAProxies; none for direct) over the bulk trials ÷ GiB \
                 moved; \"with client+server\" adds the client's and the backend's cgroups, the \
                 same for every peer. Kernel work is charged to whichever of those tasks it \
                 runs in; nothing is pinned. Versions: {v}.",
                backend = topology::BACKEND,
                vip = std::net::SocketAddrV4::new(super::peers::vip(0), super::peers::VIP_PORT),
                threads = ctx.threads,
                ms = ctx.trial_ms,
                trials = ctx.trials,
                v = versions.join("; "),
            ),
            rows,
        }])
    }
}

/// Error text that marks a peer as not available rather than failed.
const UNAVAILABLE: &str = "unavailable: ";

fn unavailable(why: &str) -> anyhow::Error {
    anyhow::anyhow!("{UNAVAILABLE}{why}")
}

fn carrier_us(p: &Peer) -> Result<u64> {
    p.carrier
        .as_ref()
        .map_or(Ok(0), |c| topology::cpu_us(&c.cgroup))
}

fn tunnelled(ctx: &Ctx, p: &Peer) -> Result<u64> {
    let admin = p
        .carrier
        .as_ref()
        .and_then(|c| c.admin_a.as_ref())
        .ok_or_else(|| anyhow::anyhow!("{} has no agent", p.name))?;
    let v = topology::meshctl_json(&ctx.bins, admin, &["services"])?;
    v["services"][0]["tunnelled"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("meshctl services: no tunnelled counter in {v}"))
}

/// A few connections until they all succeed: the peer is up and its whole
/// path works. Bounded by the setup timeout.
fn wait_path(ctx: &Ctx, nodes: &Nodes, p: &Peer) -> Result<()> {
    let deadline = Instant::now() + ctx.setup_timeout;
    let probe = load(Mode::Connect, 1, 2000, 50);
    loop {
        if let Some(c) = &p.carrier
            && let Some(why) = c.exited()?
        {
            bail!("{why}");
        }
        let r = nodes.client(&ctx.bins, &probe, p.target)?;
        if r.errors == 0 && r.ops > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "connections to {} from node A keep failing: {}",
                p.target,
                r.first_error.unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metrics(s: &[Samples]) -> BTreeMap<String, f64> {
    let [bulk1, bulk8, rr, connect] = s else {
        unreachable!("one Samples per load")
    };
    let mut m = BTreeMap::new();
    let rate = |r: &ClientReport, per: f64| per * 1e9 / r.elapsed_ns.max(1) as f64;
    for (key, b) in [("gbit_s_1", bulk1), ("gbit_s_8", bulk8)] {
        let mut g: Vec<f64> = b
            .reports
            .iter()
            .map(|r| rate(r, r.bytes as f64 * 8e-9))
            .collect();
        let (med, lo, hi) = summarize(&mut g);
        m.insert(key.to_string(), med);
        m.insert(format!("{key}_min"), lo);
        m.insert(format!("{key}_max"), hi);
    }
    let bytes: u64 = [bulk1, bulk8]
        .iter()
        .flat_map(|b| &b.reports)
        .map(|r| r.bytes)
        .sum();
    let gib = bytes as f64 / GIB;
    let carrier_s = (bulk1.carrier_us + bulk8.carrier_us) as f64 / 1e6;
    let app_s = (bulk1.app_us + bulk8.app_us) as f64 / 1e6;
    m.insert("gib_moved".into(), gib);
    m.insert("cpu_s_per_gib".into(), carrier_s / gib);
    m.insert("cpu_s_per_gib_all".into(), (carrier_s + app_s) / gib);
    for (prefix, x) in [("rtt", rr), ("conn", connect)] {
        let mut h = new_hist();
        for r in &x.reports {
            r.add_to(&mut h);
        }
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        m.insert(format!("{prefix}_p50_us"), us(0.5));
        m.insert(format!("{prefix}_p99_us"), us(0.99));
    }
    let mut rr_rates: Vec<f64> = rr.reports.iter().map(|r| rate(r, r.ops as f64)).collect();
    m.insert("rr_per_s".into(), summarize(&mut rr_rates).0);
    let mut cps: Vec<f64> = connect
        .reports
        .iter()
        .map(|r| rate(r, r.ops as f64))
        .collect();
    m.insert("conn_per_s".into(), summarize(&mut cps).0);
    let errors: u64 = s.iter().flat_map(|x| &x.reports).map(|r| r.errors).sum();
    m.insert("errors".into(), errors as f64);
    m
}

/// The cross-node targets, from this same run.
pub fn targets(r: &Results) -> Vec<Target> {
    let get = |peer: &str, m: &str| r.metric(ID, peer, None, m);
    let ratio = |m: &str| get("mesh", m).zip(get("direct", m)).map(|(a, b)| a / b);
    let mut out = vec![
        Target {
            name: "Cross-node single-stream throughput".into(),
            goal: "≥ 0.3× plaintext direct".into(),
            measured: ratio("gbit_s_1"),
            met: ratio("gbit_s_1").map(|v| v >= 0.3),
            detail: "mesh Gbit/s ÷ direct Gbit/s, one connection, node A → node B (Istio's \
                     ztunnel reached 0.15× on this kind of machine)"
                .into(),
        },
        {
            let added = get("mesh", "rtt_p50_us")
                .zip(get("direct", "rtt_p50_us"))
                .map(|(a, b)| a - b);
            Target {
                name: "Cross-node added round trip, p50".into(),
                goal: "≤ 60 µs added to plaintext direct".into(),
                measured: added,
                met: added.map(|v| v <= 60.0),
                detail: "mesh p50 − direct p50 of a 1 KiB request / 1 KiB response on one \
                         connection (ztunnel added about 125 µs)"
                    .into(),
            }
        },
        Target {
            name: "Cross-node new connections per second".into(),
            goal: "≥ 0.7× plaintext direct".into(),
            measured: ratio("conn_per_s"),
            met: ratio("conn_per_s").map(|v| v >= 0.7),
            detail: "mesh conn/s ÷ direct conn/s (connect, 64-byte exchange, close)".into(),
        },
    ];
    // "Ahead of both stunnel and HAProxy on every row": one target per row,
    // the margin over the better of the two (> 1× is ahead).
    for (what, m, higher) in [
        ("single-stream throughput", "gbit_s_1", true),
        ("8-stream throughput", "gbit_s_8", true),
        ("1 KiB round trip p50", "rtt_p50_us", false),
        ("1 KiB round trip p99", "rtt_p99_us", false),
        ("new connections per second", "conn_per_s", true),
        ("CPU s per GiB (carrier)", "cpu_s_per_gib", false),
        (
            "CPU s per GiB (with client+server)",
            "cpu_s_per_gib_all",
            false,
        ),
    ] {
        let others: Vec<f64> = ["stunnel", "haproxy"]
            .iter()
            .filter_map(|p| get(p, m))
            .collect();
        let best = if higher {
            others.iter().copied().reduce(f64::max)
        } else {
            others.iter().copied().reduce(f64::min)
        };
        let margin = get("mesh", m)
            .zip(best)
            .map(|(mesh, best)| if higher { mesh / best } else { best / mesh });
        let missing: Vec<&str> = ["stunnel", "haproxy"]
            .into_iter()
            .filter(|p| get(p, m).is_none())
            .collect();
        let mut detail = if higher {
            format!("mesh ÷ the better of stunnel and HAProxy ({m})")
        } else {
            format!("the better of stunnel and HAProxy ÷ mesh ({m}; lower is better)")
        };
        if !missing.is_empty() {
            let _ = write!(
                detail,
                " — INCOMPLETE: no {} value, so \"ahead of both\" is not judged",
                missing.join(", ")
            );
        }
        out.push(Target {
            name: format!("Cross-node vs stunnel and HAProxy: {what}"),
            goal: "> 1× the better of the two (ahead of both)".into(),
            measured: margin,
            met: margin.filter(|_| missing.is_empty()).map(|v| v > 1.0),
            detail,
        });
    }
    out
}

/// BENCHMARKS.md's section for this scenario (`n`: its number).
pub fn markdown(r: &Results, n: u32, md: &mut String) {
    let Some(s) = r.scenario(ID) else { return };
    let _ = write!(md, "## {n}. {}\n\n{}\n\n", s.title, s.method);
    let cols = [
        ("1 stream Gbit/s", "gbit_s_1"),
        ("8 streams Gbit/s", "gbit_s_8"),
        ("1 KiB RTT p50 µs", "rtt_p50_us"),
        ("1 KiB RTT p99 µs", "rtt_p99_us"),
        ("new conn/s", "conn_per_s"),
        ("CPU s/GiB (carrier)", "cpu_s_per_gib"),
        ("CPU s/GiB (+client, server)", "cpu_s_per_gib_all"),
        ("errors", "errors"),
    ];
    let _ = writeln!(
        md,
        "| | {} |\n|---|{}",
        cols.map(|c| c.0).join(" | "),
        "---|".repeat(cols.len())
    );
    let direct = |m: &str| r.metric(ID, "direct", None, m);
    for row in &s.rows {
        let _ = write!(md, "| {} |", row.peer);
        match &row.status {
            Status::Ok => {
                for (_, m) in cols {
                    let v = row.metric(m);
                    let cell = match (v, direct(m)) {
                        (Some(v), _) if m == "errors" => format!("{v:.0}"),
                        (Some(v), Some(d)) if row.peer != "direct" && d > 0.0 => {
                            format!("{} ({:.2}×)", num(v), v / d)
                        }
                        (Some(v), _) => num(v),
                        (None, _) => "–".into(),
                    };
                    let _ = write!(md, " {cell} |");
                }
            }
            Status::NotAvailable(w) | Status::Failed(w) | Status::Skipped(w) => {
                let _ = write!(
                    md,
                    " not run: {} |{}",
                    w.replace('\n', " "),
                    " |".repeat(cols.len() - 1)
                );
            }
        }
        md.push('\n');
    }
    md.push_str(
        "\nIn brackets: the ratio to plaintext direct in the same run. The mesh row's \
         `tunnelled_conns` in the results file counts the connections agent A carried \
         through the tunnel during the trials.\n\n",
    );
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
