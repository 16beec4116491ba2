//! The kernel's own accounting of BPF programs: run_time_ns and run_cnt,
//! read for the programs one agent process holds (found through its fds,
//! so programs of other agents on the machine are never counted).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};

use super::results::{Row, Status};

/// The programs a connection to a service runs through: the socket load
/// balancer, the reverse translation, and the two sock_ops programs (load
/// balancer accounting, same-node redirect), which the kernel calls at every
/// TCP state change of the socket. Names are cut at 15 bytes by the kernel.
pub const PROGRAMS: [&str; 4] = [
    "mesh_connect4",
    "mesh_getpeername4",
    "mesh_sockops",
    "mesh_redir_sockops",
];

/// Program name → (run_time_ns, run_cnt).
pub type Snapshot = BTreeMap<&'static str, (u64, u64)>;

/// The BPF program ids a process holds open.
fn prog_ids(pid: u32) -> Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let is_prog = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// Same-node redirect's programs and the load balancer's sock_ops, which
/// runs on the same sockets.
pub const REDIRECT_PROGRAMS: [&str; 3] = ["mesh_redir_sockops", "mesh_redir_msg", "mesh_sockops"];

/// Run-time stats of the mesh programs held by process `pid`.
pub fn of_process(pid: u32) -> Result<Snapshot> {
    of_process_named(pid, &PROGRAMS)
}

/// Run-time stats of the programs named `programs` held by process `pid`.
pub fn of_process_named(pid: u32, programs: &[&'static str]) -> Result<Snapshot> {
    let ids = prog_ids(pid)?;
    let mut snap = Snapshot::new();
    for info in aya::programs::loaded_programs().flatten() {
        if !ids.contains(&info.id()) {
            continue;
        }
        let name = info.name_as_str().unwrap_or_default();
        if let Some(full) = programs
            .iter()
            .find(|p| !name.is_empty() && p.starts_with(name))
        {
            let e = snap.entry(full).or_default();
            e.0 += info.run_time().as_nanos() as u64;
            e.1 += info.run_count();
        }
    }
    Ok(snap)
}

/// Sums of deltas over several measured intervals.
#[derive(Default)]
pub struct ProgStats {
    total: BTreeMap<&'static str, (u64, u64)>,
}

impl ProgStats {
    pub fn add_delta(&mut self, before: &Snapshot, after: &Snapshot) {
        for (name, &(t1, c1)) in after {
            let (t0, c0) = before.get(name).copied().unwrap_or_default();
            let e = self.total.entry(name).or_default();
            e.0 += t1.saturating_sub(t0);
            e.1 += c1.saturating_sub(c0);
        }
    }

    /// One row per program of `programs`, named `<program><suffix>`;
    /// `connections` is what the load completed.
    pub fn rows(
        &self,
        programs: &[&'static str],
        scale: Option<u64>,
        connections: u64,
        suffix: &str,
    ) -> Vec<Row> {
        programs
            .iter()
            .map(|&p| {
                let name = format!("{p}{suffix}");
                match self.total.get(p) {
                    Some(&(t, c)) if c > 0 => Row::ok(
                        &name,
                        scale,
                        BTreeMap::from([
                            ("ns_per_run".into(), t as f64 / c as f64),
                            ("runs".into(), c as f64),
                            (
                                "runs_per_connection".into(),
                                c as f64 / connections.max(1) as f64,
                            ),
                            (
                                "ns_per_connection".into(),
                                t as f64 / connections.max(1) as f64,
                            ),
                        ]),
                    ),
                    Some(_) => Row::without(
                        &name,
                        scale,
                        Status::Skipped(
                            "not run by this load (the client never calls getpeername())".into(),
                        ),
                    ),
                    None => Row::without(
                        &name,
                        scale,
                        Status::Failed("program not found among the agent's fds".into()),
                    ),
                }
            })
            .collect()
    }
}
