//! `cargo xtask bench`: mesh against the alternatives a user would pick
//! (kube-proxy's iptables and nftables layouts, HAProxy), on the same
//! machine in the same run, with interleaved repeated trials. Writes
//! bench/results/latest.json and regenerates BENCHMARKS.md and its charts.
//!
//! Each scenario is a module implementing [`Scenario`]; a new one (say,
//! cross-node encrypted traffic between namespace "nodes") is one more
//! module and one more line in [`scenarios`].

mod bare;
mod connect;
mod control;
mod cross_node;
mod env;
mod health;
mod kstats;
mod load;
mod micro;
mod peers;
mod report;
mod results;
mod same_node;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

pub use load::{ClientArgs, ServerArgs};

/// `bench-client`; the cross-node scenario asks for its own exchanges
/// through the environment, so the subcommand's flags stay as they are.
pub fn client(args: ClientArgs) -> Result<()> {
    if cross_node::exchange_enabled() {
        cross_node::client(args)
    } else {
        load::client(args)
    }
}

/// `bench-server`; see [`client`].
pub fn server(args: ServerArgs) -> Result<()> {
    if cross_node::exchange_enabled() {
        cross_node::server(args)
    } else {
        load::server(args)
    }
}

use self::env::Cgroup;
use self::peers::Bins;
use self::results::{Meta, Results, Row, SCHEMA, ScenarioResult, Status};
use crate::util::{self, step};

#[derive(Args)]
pub struct BenchArgs {
    /// A shorter run (under five minutes): fewer scales, trials and changes.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma-separated ids); the results file is
    /// then not written, so a partial run never replaces a complete one.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// With --only: put the re-run scenarios in place of theirs in
    /// bench/results/latest.json (noted in the file and the report, with
    /// this run's commit and date) and rebuild BENCHMARKS.md.
    #[arg(long, requires = "only")]
    merge: bool,
    /// Interleaved trials per peer [default: 3 quick, 5 full].
    #[arg(long)]
    trials: Option<u32>,
    /// Length of one trial in milliseconds [default: 1000 quick, 3000 full].
    #[arg(long)]
    trial_ms: Option<u64>,
    /// Service counts to run instead of the defaults (connect and
    /// control-plane), e.g. `--scales 10,1000`; the results file is then
    /// not written.
    #[arg(long, value_delimiter = ',')]
    scales: Vec<u32>,
    /// Only rebuild BENCHMARKS.md and the charts from bench/results/latest.json.
    #[arg(long)]
    report_only: bool,
    /// Client threads for the connect scenario.
    #[arg(long, default_value_t = 2)]
    threads: u32,
}

/// What every scenario gets.
pub struct Ctx {
    bins: Bins,
    quick: bool,
    trials: u32,
    trial_ms: u64,
    threads: u32,
    /// Service counts for the connect scenario (and those left out).
    scales: Vec<u32>,
    skipped_scales: Vec<u32>,
    control_scales: Vec<u32>,
    control_skipped: Vec<u32>,
    /// Endpoint changes timed per scale.
    changes: u32,
    /// Bound on setting up one peer (loading rules, starting a proxy).
    setup_timeout: Duration,
    /// The cgroup clients of non-mesh peers run in (no programs attached).
    plain: Cgroup,
}

/// One benchmark scenario: sets up what it needs inside its own
/// namespaces and cgroups, measures, and returns its results (a scenario
/// may report more than one result, e.g. connect also reports kernel cost).
pub trait Scenario {
    fn id(&self) -> &'static str;
    fn run(&self, ctx: &Ctx) -> Result<Vec<ScenarioResult>>;
}

fn scenarios() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(connect::Connect),
        Box::new(same_node::SameNode),
        Box::new(cross_node::CrossNode),
        Box::new(control::ControlPlane),
        Box::new(health::HealthChecks),
        Box::new(micro::Micro),
    ]
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.report_only {
        let root = util::workspace_root();
        let path = root.join("bench/results/latest.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut results: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} does not parse", path.display()))?;
        results.targets = report::targets(&results);
        std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
        report::write_markdown(&results, &root)?;
        report::print_summary(&results);
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "the benchmark makes network namespaces and cgroups and loads eBPF programs, so it \
             needs root; run as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask bench --quick`"
        );
    }
    let started = Instant::now();
    let known: Vec<&str> = scenarios().iter().map(|s| s.id()).collect();
    if let Some(bad) = args.only.iter().find(|o| !known.contains(&o.as_str())) {
        bail!(
            "--only {bad}: no such scenario (known: {})",
            known.join(", ")
        );
    }
    crate::setup::run()?;
    install_peers()?;
    env::install_interrupt_handler()?;

    // Release builds: the agent as users run it, and a load generator that
    // is not the bottleneck.
    util::build_kernel_programs()?;
    step("bench: building mesh-agent, meshctl and the load generator (release)");
    util::run(util::cargo_build().args([
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "--bins",
        "-p",
        "xtask",
    ]))?;
    let release = util::target_dir()?.join("release");
    let bins = Bins {
        xtask: release.join("xtask"),
        agent: release.join("mesh-agent"),
        meshctl: release.join("meshctl"),
        bare_redirect: bare::build()?,
    };

    let quick = args.quick;
    let (scales, skipped_scales) = if quick {
        (vec![10, 1_000, 10_000], vec![100_000])
    } else {
        (vec![10, 1_000, 10_000, 100_000], vec![])
    };
    let (control_scales, control_skipped) = if quick {
        (vec![1_000, 10_000], vec![100_000])
    } else {
        (vec![1_000, 10_000, 100_000], vec![])
    };
    let partial = !args.only.is_empty() || !args.scales.is_empty();
    let (scales, skipped_scales, control_scales, control_skipped) = if args.scales.is_empty() {
        (scales, skipped_scales, control_scales, control_skipped)
    } else {
        (args.scales.clone(), vec![], args.scales.clone(), vec![])
    };
    let ctx = Ctx {
        bins,
        quick,
        trials: args.trials.unwrap_or(if quick { 3 } else { 5 }),
        trial_ms: args.trial_ms.unwrap_or(if quick { 1000 } else { 3000 }),
        threads: args.threads,
        scales,
        skipped_scales,
        control_scales,
        control_skipped,
        changes: if quick { 20 } else { 50 },
        setup_timeout: Duration::from_secs(if quick { 120 } else { 900 }),
        plain: Cgroup::new("plain")?,
    };
    let mut meta = meta(&ctx)?;

    let mut all = Vec::new();
    for s in scenarios() {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == s.id()) {
            continue;
        }
        step(format!("bench: scenario {}", s.id()));
        match s.run(&ctx) {
            Ok(results) => all.extend(results),
            Err(e) => {
                // One broken scenario must not lose the others' numbers.
                eprintln!("warning: scenario {} failed: {e:#}", s.id());
                all.push(ScenarioResult {
                    id: s.id().into(),
                    title: s.id().into(),
                    method: String::new(),
                    rows: vec![Row::without("all", None, Status::Failed(format!("{e:#}")))],
                });
            }
        }
    }
    meta.wall_s = started.elapsed().as_secs_f64();
    let mut results = Results {
        schema: SCHEMA,
        meta,
        scenarios: all,
        targets: Vec::new(),
    };
    results.targets = report::targets(&results);
    report::print_summary(&results);
    if !partial {
        for m in results.missing() {
            eprintln!("warning: the results lack {m}");
        }
    }

    if !args.only.is_empty() && args.merge {
        let root = util::workspace_root();
        let path = root.join("bench/results/latest.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut base: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} does not parse", path.display()))?;
        for new in results.scenarios {
            let note = format!(
                "{} at commit `{}`{} on {}{}",
                new.id,
                results.meta.commit,
                if results.meta.dirty {
                    " plus uncommitted changes"
                } else {
                    ""
                },
                results.meta.date_utc,
                if results.meta.quick { " (--quick)" } else { "" },
            );
            base.meta
                .merged
                .retain(|m| !m.starts_with(&format!("{} at ", new.id)));
            base.meta.merged.push(note);
            match base.scenarios.iter_mut().find(|s| s.id == new.id) {
                Some(old) => *old = new,
                None => base.scenarios.push(new),
            }
        }
        base.targets = report::targets(&base);
        std::fs::write(&path, serde_json::to_string_pretty(&base)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        report::write_markdown(&base, &root)?;
        step(format!(
            "bench: merged {} into {} and rebuilt BENCHMARKS.md",
            args.only.join(","),
            path.display()
        ));
        return Ok(());
    }
    if !args.only.is_empty() {
        step(
            "bench: --only given, so bench/results/latest.json and BENCHMARKS.md are left as they were",
        );
        return Ok(());
    }
    let root = util::workspace_root();
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("latest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    step(format!("bench: wrote {}", path.display()));
    report::write_markdown(&results, &root)?;
    step(format!(
        "bench: wrote BENCHMARKS.md and bench/charts/*.svg ({:.0} s in all)",
        results.meta.wall_s
    ));
    Ok(())
}

/// The peers come from Debian's packages.
const PEER_PACKAGES: &[(&str, &str)] = &[
    ("iptables-legacy-restore", "iptables"),
    ("nft", "nftables"),
    ("haproxy", "haproxy"),
    ("stunnel4", "stunnel4"),
];

fn install_peers() -> Result<()> {
    let missing: Vec<&str> = PEER_PACKAGES
        .iter()
        .filter(|(bin, _)| {
            util::on_path(bin).is_none() && !std::path::Path::new("/usr/sbin").join(bin).exists()
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        step("bench: iptables, nftables, haproxy, stunnel4 ... already installed");
        return Ok(());
    }
    step(format!("bench: installing {}", missing.join(" ")));
    util::run(Command::new("apt-get").arg("update"))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )
}

fn meta(ctx: &Ctx) -> Result<Meta> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let first_line = |program: &str, args: &[&str]| {
        util::probe(Command::new(program).args(args))
            .and_then(|o| o.lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
    };
    let root = util::workspace_root();
    let git = |args: &[&str]| util::probe(Command::new("git").arg("-C").arg(&root).args(args));
    let cpuinfo = read("/proc/cpuinfo");
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .unwrap_or("unknown")
        .trim_matches('"')
        .to_string();
    let tools = BTreeMap::from([
        (
            "iptables".to_string(),
            first_line("iptables-legacy", &["--version"]),
        ),
        ("nft".to_string(), first_line("nft", &["--version"])),
        ("haproxy".to_string(), first_line("haproxy", &["-v"])),
        ("rustc".to_string(), first_line("rustc", &["--version"])),
        (
            "mesh-agent".to_string(),
            first_line(
                ctx.bins.agent.to_str().unwrap_or("mesh-agent"),
                &["--version"],
            ),
        ),
    ]);
    Ok(Meta {
        commit: git(&["rev-parse", "HEAD"])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into()),
        dirty: git(&["status", "--porcelain"]).is_some_and(|s| !s.trim().is_empty()),
        date_utc: first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into()),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u32),
        mem_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        os,
        quick: ctx.quick,
        trials: ctx.trials,
        trial_ms: ctx.trial_ms,
        client_threads: ctx.threads,
        tools,
        wall_s: 0.0,
        merged: Vec::new(),
    })
}

/// Peer order in trial `t`: rotated each trial, so no peer always runs
/// first (warm caches) or last (a hot machine).
pub fn trial_order(peers: usize, t: u32) -> impl Iterator<Item = usize> {
    (0..peers).map(move |k| (k + t as usize) % peers.max(1))
}

/// Median, min and max of trial values (NaN when there are none).
pub fn summarize(values: &mut [f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trials_rotate_and_median() {
        let orders: Vec<Vec<usize>> = (0..3).map(|t| trial_order(3, t).collect()).collect();
        assert_eq!(orders, [[0, 1, 2], [1, 2, 0], [2, 0, 1]]);
        assert_eq!(summarize(&mut [3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summarize(&mut [4.0, 1.0]), (2.5, 1.0, 4.0));
        assert!(summarize(&mut []).0.is_nan());
    }
}
