//! Scenario 5: criterion micro-benchmarks of the agent's pure logic
//! (mesh-agent/benches/agent.rs), run through cargo and read back from
//! criterion's own estimates.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::results::{Row, ScenarioResult};
use super::{Ctx, Scenario};
use crate::util::{self, step};

pub struct Micro;

#[derive(Deserialize)]
struct Benchmark {
    full_id: String,
}

#[derive(Deserialize)]
struct Estimates {
    mean: Estimate,
    median: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
    confidence_interval: Interval,
}

#[derive(Deserialize)]
struct Interval {
    lower_bound: f64,
    upper_bound: f64,
}

impl Scenario for Micro {
    fn id(&self) -> &'static str {
        "micro"
    }

    fn run(&self, ctx: &Ctx) -> Result<Vec<ScenarioResult>> {
        let out = util::target_dir()?.join("criterion");
        // Old estimates of benchmarks that no longer exist must not be reported.
        let _ = std::fs::remove_dir_all(&out);
        let mut cmd = util::cargo();
        cmd.args(["bench", "-p", "mesh-agent", "--bench", "agent", "--"])
            .arg("--noplot");
        if ctx.quick {
            cmd.args(["--warm-up-time", "0.5", "--measurement-time", "1"]);
        }
        util::run(&mut cmd)?;
        let mut rows = Vec::new();
        collect(&out, &mut rows)?;
        rows.sort_by(|a, b| a.metrics["order"].total_cmp(&b.metrics["order"]));
        for r in &mut rows {
            r.metrics.remove("order");
            step(format!(
                "bench: micro: {:<40} {:>12.0} ns",
                r.case.as_deref().unwrap_or_default(),
                r.metrics["mean_ns"]
            ));
        }
        Ok(vec![ScenarioResult {
            id: "micro".into(),
            title: "Micro-benchmarks (criterion): slot tables and the config parser".into(),
            method: "cargo bench -p mesh-agent --bench agent; mean and median time per \
                     iteration with criterion's 95% confidence interval of the mean."
                .into(),
            rows,
        }])
    }
}

/// Finds `<id>/new/{benchmark,estimates}.json` under criterion's output.
fn collect(dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let bench = path.join("new/benchmark.json");
        if bench.exists() {
            let b: Benchmark = serde_json::from_str(&std::fs::read_to_string(&bench)?)
                .with_context(|| format!("{}", bench.display()))?;
            let est_path = path.join("new/estimates.json");
            let e: Estimates = serde_json::from_str(&std::fs::read_to_string(&est_path)?)
                .with_context(|| format!("{}", est_path.display()))?;
            rows.push(Row::case(
                "criterion",
                &b.full_id,
                BTreeMap::from([
                    ("mean_ns".into(), e.mean.point_estimate),
                    (
                        "mean_ci_low_ns".into(),
                        e.mean.confidence_interval.lower_bound,
                    ),
                    (
                        "mean_ci_high_ns".into(),
                        e.mean.confidence_interval.upper_bound,
                    ),
                    ("median_ns".into(), e.median.point_estimate),
                    ("order".into(), order(&b.full_id)),
                ]),
            ));
        } else {
            collect(&path, rows)?;
        }
    }
    Ok(())
}

/// Sorts benchmark ids by group, then function, then numeric parameter.
fn order(id: &str) -> f64 {
    let group = if id.starts_with("slots") { 0.0 } else { 1e9 };
    let func = if id.contains("scaled") { 1e8 } else { 0.0 };
    let param: f64 = id
        .rsplit('/')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    group + func + param
}
