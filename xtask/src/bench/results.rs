//! The machine-readable results (`bench/results/latest.json`): what ran,
//! where, and every number, so a report can be rebuilt and runs compared.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const SCHEMA: u32 = 1;

/// Every scenario a full results file has, and the peers each must list
/// (a peer that could not run is still listed, with its reason).
pub const EXPECTED: &[(&str, &[&str])] = &[
    ("connect", &super::connect::PEERS),
    ("same-node", &super::same_node::PEERS),
    (super::cross_node::ID, &super::cross_node::PEERS),
    ("control-plane", &["mesh", "mesh-conf.d"]),
    ("kernel-cost", &super::kstats::PROGRAMS),
    ("health-checks", &super::health::PEERS),
    ("micro", &["criterion"]),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub schema: u32,
    pub meta: Meta,
    pub scenarios: Vec<ScenarioResult>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    pub commit: String,
    /// The working tree had uncommitted changes when the run started.
    pub dirty: bool,
    pub date_utc: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: u32,
    pub mem_gib: f64,
    pub os: String,
    pub quick: bool,
    pub trials: u32,
    pub trial_ms: u64,
    pub client_threads: u32,
    /// Versions of the peers and tools (iptables, nft, haproxy, …).
    pub tools: BTreeMap<String, String>,
    pub wall_s: f64,
    /// Scenarios re-run later (`--only … --merge`) and put in place of this
    /// run's: which, from what commit, when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub id: String,
    pub title: String,
    /// How it was measured, in a sentence or two.
    pub method: String,
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub peer: String,
    /// Number of services (or bytes, …) the row was measured at; None when
    /// the scenario has no scale.
    pub scale: Option<u64>,
    /// Which case of the scenario, when scale alone does not say (e.g. a
    /// micro-benchmark's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
    pub status: Status,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "reason")]
pub enum Status {
    Ok,
    /// Not built into this version (e.g. a feature on another branch).
    NotAvailable(String),
    /// Tried and failed; the error says why.
    Failed(String),
    /// Left out of this run (e.g. a scale above --quick's).
    Skipped(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    /// The target as stated in the issue, e.g. "≤ 1.05× direct".
    pub goal: String,
    /// The measured value in the goal's unit; None if it could not be measured.
    pub measured: Option<f64>,
    pub met: Option<bool>,
    /// What was compared, in the same run.
    pub detail: String,
}

impl Row {
    pub fn ok(peer: &str, scale: Option<u64>, mut metrics: BTreeMap<String, f64>) -> Self {
        // JSON has no NaN or infinity; a value that could not be computed is absent.
        metrics.retain(|_, v| v.is_finite());
        Row {
            peer: peer.to_string(),
            scale,
            case: None,
            status: Status::Ok,
            metrics,
        }
    }

    pub fn case(peer: &str, case: &str, metrics: BTreeMap<String, f64>) -> Self {
        Row {
            case: Some(case.to_string()),
            ..Row::ok(peer, None, metrics)
        }
    }

    pub fn without(peer: &str, scale: Option<u64>, status: Status) -> Self {
        Row {
            peer: peer.to_string(),
            scale,
            case: None,
            status,
            metrics: BTreeMap::new(),
        }
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        (self.status == Status::Ok)
            .then(|| self.metrics.get(name).copied())
            .flatten()
    }
}

impl Results {
    pub fn scenario(&self, id: &str) -> Option<&ScenarioResult> {
        self.scenarios.iter().find(|s| s.id == id)
    }

    /// A metric of one peer at one scale.
    pub fn metric(
        &self,
        scenario: &str,
        peer: &str,
        scale: Option<u64>,
        name: &str,
    ) -> Option<f64> {
        self.scenario(scenario)?
            .rows
            .iter()
            .find(|r| r.peer == peer && r.scale == scale)?
            .metric(name)
    }

    /// Names of the expected scenarios or peers this file lacks.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for (id, peers) in EXPECTED {
            match self.scenario(id) {
                None => missing.push(format!("scenario {id}")),
                Some(s) => {
                    for peer in *peers {
                        if !s.rows.iter().any(|r| r.peer == *peer) {
                            missing.push(format!("{id}: peer {peer}"));
                        }
                    }
                }
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed results file parses and has every scenario and peer.
    /// No timing thresholds: numbers depend on the machine.
    #[test]
    fn committed_results_are_complete() {
        let path = crate::util::workspace_root().join("bench/results/latest.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask bench`", path.display()));
        let results: Results = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", path.display()));
        assert_eq!(results.schema, SCHEMA);
        assert!(!results.meta.commit.is_empty() && !results.meta.kernel.is_empty());
        assert!(!results.meta.cpu.is_empty());
        assert_eq!(results.missing(), Vec::<String>::new());
        // Every scenario measured something, and every failure says why.
        for s in &results.scenarios {
            assert!(
                s.rows.iter().any(|r| r.status == Status::Ok),
                "scenario {} has no measured row",
                s.id
            );
            for r in &s.rows {
                match &r.status {
                    Status::Ok => assert!(!r.metrics.is_empty(), "{} {}: no metrics", s.id, r.peer),
                    Status::NotAvailable(why) | Status::Failed(why) | Status::Skipped(why) => {
                        assert!(!why.is_empty(), "{} {}: no reason given", s.id, r.peer)
                    }
                }
            }
        }
        assert!(!results.targets.is_empty());
    }

    #[test]
    fn missing_lists_absent_scenarios_and_peers() {
        let r = Results {
            schema: SCHEMA,
            meta: Meta::default(),
            scenarios: vec![ScenarioResult {
                id: "connect".into(),
                title: String::new(),
                method: String::new(),
                rows: vec![Row::ok("direct", Some(10), BTreeMap::new())],
            }],
            targets: vec![],
        };
        let missing = r.missing();
        assert!(missing.contains(&"connect: peer mesh".to_string()));
        assert!(missing.contains(&"scenario micro".to_string()));
    }
}
