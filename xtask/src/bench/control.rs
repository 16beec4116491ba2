//! Scenario 3, the control plane: how long the agent takes to program N
//! services into the kernel, how long one endpoint change in the config
//! takes to reach the kernel's map, and the agent's resident memory.
//! Everything is read from the pinned maps, not from the agent's word.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::env::Cgroup;
use super::peers::{
    BACKEND_PORT, BACKENDS_PER_SERVICE, MeshAgent, VIP_PORT, backend, mesh_config, vip,
};
use super::results::{Row, ScenarioResult, Status};
use super::{Ctx, Scenario};
use crate::util::step;

pub struct ControlPlane;

impl Scenario for ControlPlane {
    fn id(&self) -> &'static str {
        "control-plane"
    }

    fn run(&self, ctx: &Ctx) -> Result<Vec<ScenarioResult>> {
        let mut rows = Vec::new();
        for &n in &ctx.control_scales {
            match measure(ctx, n) {
                Ok(m) => {
                    step(format!(
                        "bench: control-plane: {n:>6} services programmed in {:.3} s; endpoint change p50 {:.2} ms p99 {:.2} ms; RSS {:.1} MiB",
                        m["program_s"], m["change_p50_ms"], m["change_p99_ms"], m["rss_mib"]
                    ));
                    rows.push(Row::ok("mesh", Some(u64::from(n)), m));
                }
                Err(e) => rows.push(Row::without(
                    "mesh",
                    Some(u64::from(n)),
                    Status::Failed(format!("{e:#}")),
                )),
            }
            match measure_conf_d(ctx, n) {
                Ok(m) => {
                    step(format!(
                        "bench: control-plane: {n:>6} services, one file each: endpoint change p50 {:.2} ms p99 {:.2} ms; RSS {:.1} MiB",
                        m["change_p50_ms"], m["change_p99_ms"], m["rss_mib"]
                    ));
                    rows.push(Row::ok(CONF_D, Some(u64::from(n)), m));
                }
                Err(e) => rows.push(Row::without(
                    CONF_D,
                    Some(u64::from(n)),
                    Status::Failed(format!("{e:#}")),
                )),
            }
        }
        for &n in &ctx.control_skipped {
            for peer in ["mesh", CONF_D] {
                rows.push(Row::without(
                    peer,
                    Some(u64::from(n)),
                    Status::Skipped("scale left out of --quick runs".into()),
                ));
            }
        }
        Ok(vec![ScenarioResult {
            id: "control-plane".into(),
            title: "Control plane: programming time, endpoint-change latency, memory".into(),
            method: format!(
                "An agent starts with no services; the config file is replaced with N services \
                 ({BACKENDS_PER_SERVICE} backends each) and the agent sent SIGHUP; the time runs \
                 until every service's entry is in the pinned MESH_SERVICES map. Then, {} times, \
                 one backend address of a random service is changed in the file, SIGHUP, and \
                 the time runs until that service's entry in the kernel flips to the new \
                 generation (polled every 100 µs; the agent re-reads the whole file, and \
                 re-parses the service entries whose text changed). The agent runs with \
                 `--inotify off` here, so the reload starts at the signal, not at the rename. \
                 The `{CONF_D}` rows do the same changes with the configuration as a directory \
                 of one file per service: the changed service's file is replaced (written \
                 beside, renamed over) and the time runs from the rename to the kernel, with no \
                 signal: the agent learns of the file from inotify and reads only that file. \
                 Programming time is not timed for those rows (the files are written one by \
                 one). RSS is VmRSS of the agent after programming and after the changes.",
                ctx.changes
            ),
            rows,
        }])
    }
}

/// The peer name of the rows with the configuration as a directory.
pub const CONF_D: &str = "mesh-conf.d";

fn measure(ctx: &Ctx, n: u32) -> Result<BTreeMap<String, f64>> {
    let cg = Cgroup::new(&format!("cp{n}"))?;
    // Reloads start at SIGHUP, as they always did here: with inotify the
    // agent would start at the rename, before the clock.
    let agent = MeshAgent::start(&ctx.bins, &cg, n, &["--inotify", "off"])?;
    let idle_kib = agent.rss_kib()?;
    let program = agent.program(n, ctx.setup_timeout)?;
    let programmed_kib = agent.rss_kib()?;
    let mut latencies = Vec::new();
    for (c, i) in changes(ctx, n) {
        let old = agent.service(i).map(|v| v.generation).unwrap_or_default();
        let yaml = mesh_config(n, BACKENDS_PER_SERVICE, Some((i, c + 1)));
        let d = agent.reload(&yaml, ctx.setup_timeout, |a| {
            a.service(i).is_some_and(|v| v.generation != old)
        })?;
        latencies.push(d.as_secs_f64() * 1000.0);
    }
    let after_kib = agent.rss_kib()?;
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| nearest_rank(&latencies, p);
    drop(agent);
    Ok(BTreeMap::from([
        ("program_s".into(), program.as_secs_f64()),
        (
            "program_us_per_service".into(),
            program.as_secs_f64() * 1e6 / f64::from(n),
        ),
        ("change_p50_ms".into(), q(0.5)),
        ("change_p99_ms".into(), q(0.99)),
        ("change_max_ms".into(), q(1.0)),
        ("changes".into(), latencies.len() as f64),
        ("rss_idle_mib".into(), idle_kib as f64 / 1024.0),
        ("rss_mib".into(), programmed_kib as f64 / 1024.0),
        ("rss_after_changes_mib".into(), after_kib as f64 / 1024.0),
    ]))
}

/// One service's file in conf.d: the same service as `mesh_config` writes.
fn service_file(i: u32, changed: Option<u32>) -> String {
    let mut y = format!(
        "services:\n  - name: s{i:06}\n    vip: {}\n    port: {VIP_PORT}\n    backends: [",
        vip(i)
    );
    for j in 0..BACKENDS_PER_SERVICE {
        let addr = match changed {
            Some(version) if j == 0 => std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(10, 202, 0, 0)) + version % 60_000,
            ),
            _ => backend(j),
        };
        let sep = if j + 1 < BACKENDS_PER_SERVICE {
            ", "
        } else {
            ""
        };
        let _ = write!(y, "{{address: {addr}, port: {BACKEND_PORT}}}{sep}");
    }
    y.push_str("]\n");
    y
}

/// The same endpoint changes with `--config` a directory of one file per
/// service, noticed through inotify.
fn measure_conf_d(ctx: &Ctx, n: u32) -> Result<BTreeMap<String, f64>> {
    let cg = Cgroup::new(&format!("cpd{n}"))?;
    let agent = MeshAgent::start_conf_d(&ctx.bins, &cg, n, &[])?;
    let dir = agent.config_dir();
    let idle_kib = agent.rss_kib()?;
    let replace = |i: u32, text: &str| -> Result<Instant> {
        let tmp = dir.join(format!("s{i:06}.yaml.tmp"));
        std::fs::write(&tmp, text)?;
        let start = Instant::now();
        std::fs::rename(&tmp, dir.join(format!("s{i:06}.yaml")))?;
        Ok(start)
    };
    for i in 0..n {
        replace(i, &service_file(i, None))?;
    }
    let deadline = Instant::now() + ctx.setup_timeout;
    let mut cursor = 0;
    while cursor < n {
        if agent.service(cursor).is_some_and(|v| v.slot_count > 0) {
            cursor += 1;
            continue;
        }
        if Instant::now() > deadline {
            bail!(
                "only {cursor} of {n} services reached the kernel within {:?}; agent log: {}",
                ctx.setup_timeout,
                agent.log()
            );
        }
        thread::sleep(Duration::from_millis(1));
    }
    let programmed_kib = agent.rss_kib()?;
    let mut latencies = Vec::new();
    for (c, i) in changes(ctx, n) {
        let old = agent.service(i).map(|v| v.generation).unwrap_or_default();
        let start = replace(i, &service_file(i, Some(c + 1)))?;
        loop {
            if agent.service(i).is_some_and(|v| v.generation != old) {
                latencies.push(start.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if start.elapsed() > ctx.setup_timeout {
                bail!(
                    "the kernel's map did not show the change within {:?}; agent log: {}",
                    ctx.setup_timeout,
                    agent.log()
                );
            }
            thread::sleep(Duration::from_micros(100));
        }
    }
    let after_kib = agent.rss_kib()?;
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| nearest_rank(&latencies, p);
    drop(agent);
    Ok(BTreeMap::from([
        ("change_p50_ms".into(), q(0.5)),
        ("change_p99_ms".into(), q(0.99)),
        ("change_max_ms".into(), q(1.0)),
        ("changes".into(), latencies.len() as f64),
        ("rss_idle_mib".into(), idle_kib as f64 / 1024.0),
        ("rss_mib".into(), programmed_kib as f64 / 1024.0),
        ("rss_after_changes_mib".into(), after_kib as f64 / 1024.0),
    ]))
}

/// The endpoint changes of a run at `n` services: (change number, index of
/// the service changed), the services picked by a fixed xorshift so every
/// run and layout changes the same ones. Fewer at 100,000 services, where
/// each one-file reload takes longest.
fn changes(ctx: &Ctx, n: u32) -> impl Iterator<Item = (u32, u32)> {
    let count = if n >= 100_000 {
        ctx.changes.min(10)
    } else {
        ctx.changes
    };
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..count).map(move |c| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (c, (x % u64::from(n)) as u32)
    })
}

/// The `p` quantile of `sorted` by nearest rank (NaN when it is empty).
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}
