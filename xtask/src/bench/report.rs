//! Turning results into what people read: the targets from the issue as
//! same-run ratios, a summary on the terminal, and BENCHMARKS.md with
//! hand-written SVG bar charts (no plotting dependency to build).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::results::{Results, Row, Status, Target};

const MB_PER_MIB: f64 = 1.048_576;

fn target(
    name: &str,
    goal: &str,
    measured: Option<f64>,
    ok: impl Fn(f64) -> bool,
    detail: String,
) -> Target {
    Target {
        name: name.into(),
        goal: goal.into(),
        measured,
        met: measured.map(ok),
        detail,
    }
}

/// The issue's targets, each computed from numbers of this same run.
pub fn targets(r: &Results) -> Vec<Target> {
    let cps = |peer: &str, n: u64| r.metric("connect", peer, Some(n), "conn_per_s");
    let scales: Vec<u64> = r
        .scenario("connect")
        .map(|s| {
            let mut v: Vec<u64> = s
                .rows
                .iter()
                .filter(|row| row.peer == "mesh" && row.status == Status::Ok)
                .filter_map(|row| row.scale)
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    let mut out = Vec::new();

    // Scales where mesh should have run but did not: a target over them is
    // not met by omission, so it is reported as incomplete.
    let mesh_missing: Vec<String> = r
        .scenario("connect")
        .map(|s| {
            s.rows
                .iter()
                .filter(|row| row.peer == "mesh" && matches!(row.status, Status::Failed(_)))
                .map(|row| int(row.scale.unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let incomplete = if mesh_missing.is_empty() {
        String::new()
    } else {
        format!(
            " — INCOMPLETE: mesh failed at {} services, so the target is not judged",
            mesh_missing.join(", ")
        )
    };
    // Time per connection relative to direct: the worst scale counts.
    let per_scale: Vec<(u64, f64)> = scales
        .iter()
        .filter_map(|&n| Some((n, cps("direct", n)? / cps("mesh", n)?)))
        .collect();
    let worst = per_scale
        .iter()
        .map(|p| p.1)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let mut t = target(
        "Connect path vs direct",
        "≤ 1.05× direct (time per connection)",
        worst,
        |v| v <= 1.05,
        format!(
            "direct conn/s ÷ mesh conn/s per scale: {}; the worst is shown{incomplete}",
            per_scale
                .iter()
                .map(|(n, v)| format!("{}: {v:.3}×", int(*n)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    if !mesh_missing.is_empty() {
        t.met = None;
    }
    out.push(t);
    let (lo, hi) = (scales.first().copied(), scales.last().copied());
    let flat = match (lo, hi) {
        (Some(lo), Some(hi)) if lo != hi => {
            Some(cps("mesh", lo).unwrap_or(f64::NAN) / cps("mesh", hi).unwrap_or(f64::NAN))
        }
        _ => None,
    }
    .filter(|v| v.is_finite());
    let mut t = target(
        "Connect path flat in service count",
        "flat from 10 to 100,000 services (≤ 1.05× time per connection)",
        flat,
        |v| v <= 1.05,
        format!(
            "mesh conn/s at {} services ÷ at {} services (the largest scale mesh ran at){incomplete}",
            int(lo.unwrap_or(0)),
            int(hi.unwrap_or(0)),
        ),
    );
    if hi != Some(100_000) {
        // Flat up to a smaller scale does not show flat up to 100,000.
        t.met = None;
    }
    out.push(t);
    out.push(target(
        "Connect path vs iptables at 10,000 services",
        "≥ 5× the connections/s of iptables mode",
        cps("mesh", 10_000)
            .zip(cps("iptables", 10_000))
            .map(|(m, i)| m / i),
        |v| v >= 5.0,
        "mesh conn/s ÷ iptables (kube-proxy layout) conn/s, both at 10,000 services".into(),
    ));
    // The debug-log switch when off, against the same connect program loaded
    // with its log sites removed, in the same interleaved trials.
    let ns = |peer: &str, n: u64| r.metric("kernel-cost", peer, Some(n), "ns_per_run");
    let removed = format!("mesh_connect4{}", super::connect::LOG_NEVER_SUFFIX);
    let pairs: Vec<(u64, f64, f64)> = scales
        .iter()
        .filter_map(|&n| Some((n, ns("mesh_connect4", n)?, ns(&removed, n)?)))
        .collect();
    let pooled = (!pairs.is_empty())
        .then(|| pairs.iter().map(|p| p.1).sum::<f64>() / pairs.iter().map(|p| p.2).sum::<f64>());
    out.push(target(
        "Kernel debug log switched off",
        "≤ 1.05× the connect program's time with its log sites removed",
        pooled,
        |v| v <= 1.05,
        format!(
            "mesh_connect4 ns per run with the switch off ÷ with the sites removed at load \
             (`--kernel-debug-log never`), summed over the scales: {}",
            pairs
                .iter()
                .map(|(n, on, off)| format!("{}: {on:.0} / {off:.0} ns", int(*n)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    let redirect = r
        .scenario("same-node")
        .and_then(|s| s.rows.iter().find(|row| row.peer == "mesh-redirect"));
    let why = redirect
        .map(|row| match &row.status {
            Status::Ok => String::new(),
            Status::NotAvailable(w) | Status::Failed(w) | Status::Skipped(w) => {
                format!(" — not measured: {w}")
            }
        })
        .unwrap_or_default();
    let bare = super::same_node::BARE;
    for placement in super::same_node::PLACEMENTS {
        let on = placement.label();
        // metric of peer a ÷ the same metric of peer b, in this placement.
        let ratio = |a: &str, b: &str, m: &str| {
            let sn = |peer: &str| r.metric("same-node", peer, Some(placement.cpus), m);
            sn(a).zip(sn(b)).map(|(x, y)| x / y)
        };
        let how = |what: &str| format!("{what}, client and server on {on}{why}");
        out.push(target(
            &format!("Same-node round-trip time, {on}"),
            "≤ 0.65× plain loopback TCP",
            ratio("mesh-redirect", "loopback", "rtt_p50_us"),
            |v| v <= 0.65,
            how("mesh-redirect p50 RTT ÷ loopback p50 RTT"),
        ));
        out.push(target(
            &format!("Same-node throughput, {on}"),
            "≥ 1.3× plain loopback TCP",
            ratio("mesh-redirect", "loopback", "gbit_s"),
            |v| v >= 1.3,
            how("mesh-redirect Gbit/s ÷ loopback Gbit/s"),
        ));
        out.push(target(
            &format!("Same-node redirect vs bare mechanism, RTT, {on}"),
            "≤ 1.05× the bare sock_ops + sk_msg program's RTT",
            ratio("mesh-redirect", bare, "rtt_p50_us"),
            |v| v <= 1.05,
            how(&format!("mesh-redirect p50 RTT ÷ {bare} p50 RTT")),
        ));
        out.push(target(
            &format!("Same-node redirect vs bare mechanism, throughput, {on}"),
            "≥ 0.95× the bare sock_ops + sk_msg program's Gbit/s",
            ratio("mesh-redirect", bare, "gbit_s"),
            |v| v >= 0.95,
            how(&format!("mesh-redirect Gbit/s ÷ {bare} Gbit/s")),
        ));
    }
    let cp = |m: &str| r.metric("control-plane", "mesh", Some(10_000), m);
    out.push(target(
        "Programming 10,000 services",
        "≤ 1 s",
        cp("program_s"),
        |v| v <= 1.0,
        "seconds from SIGHUP to all 10,000 services in the kernel's map".into(),
    ));
    let conf_d = |m: &str| r.metric("control-plane", super::control::CONF_D, Some(10_000), m);
    out.push(target(
        "Endpoint change to kernel, p99",
        "≤ 5 ms",
        cp("change_p99_ms"),
        |v| v <= 5.0,
        "ms from SIGHUP to the changed service's new generation in the kernel, at 10,000 services, \
         config as one file (the agent reads the whole file, re-parses only changed entries)"
            .into(),
    ));
    out.push(target(
        "Endpoint change to kernel, p99 (conf.d)",
        "≤ 5 ms",
        conf_d("change_p99_ms"),
        |v| v <= 5.0,
        "ms from the rename of the service's file into the config directory to its new generation \
         in the kernel (inotify, no signal), at 10,000 services, one file per service"
            .into(),
    ));
    out.push(target(
        "Agent memory at 10,000 services",
        "≤ 30 MB RSS",
        cp("rss_mib").map(|v| v * MB_PER_MIB),
        |v| v <= 30.0,
        "VmRSS of the agent right after programming 10,000 services, in MB (10^6 bytes), config \
         as one file"
            .into(),
    ));
    out.push(target(
        "Agent memory at 10,000 services (conf.d)",
        "≤ 30 MB RSS",
        conf_d("rss_mib").map(|v| v * MB_PER_MIB),
        |v| v <= 30.0,
        "VmRSS of the agent after programming 10,000 services, in MB (10^6 bytes), one file per \
         service"
            .into(),
    ));
    for (peer, kind, how) in [
        (
            "mesh-http-checks",
            "HTTP",
            "by HTTP GET on kept connections",
        ),
        (
            "mesh-tcp-checks",
            "TCP",
            "by half-open TCP connect (SYN-ACK, then RST)",
        ),
    ] {
        out.push(target(
            &format!("{kind} health checks of 1,000 backends"),
            "≤ 5% of one core",
            r.metric("health-checks", peer, Some(1_000), "cpu_percent"),
            |v| v <= 5.0,
            format!(
                "the whole agent's CPU (user + system, all threads) while it checks 1,000 \
                 backends {how} every second, in % of one core"
            ),
        ));
    }
    out.extend(super::cross_node::targets(r));
    out
}

/// A control-plane row: its scale, and the config layout it ran with.
fn control_label(row: &Row) -> String {
    let n = int(row.scale.unwrap_or(0));
    if row.peer == super::control::CONF_D {
        format!("{n} services, conf.d (file each)")
    } else {
        format!("{n} services, one file")
    }
}

fn fmt_target(t: &Target) -> (String, &'static str) {
    let v = t.measured.map_or("not measured".to_string(), |v| {
        if t.goal.contains('×') {
            format!("{v:.2}×")
        } else if t.goal.contains("µs") {
            format!("{v:.1} µs")
        } else if t.goal.contains("ms") {
            format!("{v:.2} ms")
        } else if t.goal.contains('%') {
            format!("{v:.2}%")
        } else if t.goal.contains("MB") {
            format!("{v:.1} MB")
        } else {
            format!("{v:.3} s")
        }
    });
    let met = match (t.met, t.measured) {
        (Some(true), _) => "met",
        (Some(false), _) => "**MISSED**",
        (None, Some(_)) => "not judged (incomplete)",
        (None, None) => "not measured",
    };
    (v, met)
}

pub fn print_summary(r: &Results) {
    println!("\n==> bench: summary");
    if let Some(s) = r.scenario("connect") {
        println!("    connect path (conn/s, p99 µs):");
        for row in &s.rows {
            println!(
                "      {:>7} {:<9} {}",
                row.scale.unwrap_or(0),
                row.peer,
                cell(row, "conn_per_s", 0, "p99_us")
            );
        }
    }
    if let Some(s) = r.scenario("same-node") {
        println!("    same-node (round trips/s, p99 µs; Gbit/s):");
        for row in &s.rows {
            let gbit = if row.status == Status::Ok {
                cell(row, "gbit_s", 2, "")
            } else {
                String::new()
            };
            println!(
                "      {:<14} {:<9} {}  {gbit}",
                row.peer,
                super::same_node::label(row.scale),
                cell(row, "rr_per_s", 0, "rtt_p99_us")
            );
        }
    }
    println!("    targets:");
    for t in &r.targets {
        let (v, met) = fmt_target(t);
        println!(
            "      {:<45} {:<40} {:>12}  {}",
            t.name,
            t.goal,
            v,
            met.trim_matches('*')
        );
    }
}

fn cell(row: &Row, main: &str, digits: usize, extra: &str) -> String {
    match &row.status {
        Status::Ok => {
            let m = row.metrics.get(main).copied().unwrap_or(f64::NAN);
            match row.metrics.get(extra) {
                Some(e) => format!("{m:>10.digits$} ({e:.1})"),
                None => format!("{m:>10.digits$}"),
            }
        }
        Status::NotAvailable(w) | Status::Failed(w) | Status::Skipped(w) => {
            format!("— {}", short(w))
        }
    }
}

fn short(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > 100 {
        s.chars().take(100).collect::<String>() + "…"
    } else {
        s
    }
}

fn status_text(row: &Row) -> String {
    match &row.status {
        Status::Ok => String::new(),
        Status::NotAvailable(w) => format!("not available: {}", short(w)),
        Status::Failed(w) => format!("failed: {}", short(w)),
        Status::Skipped(w) => format!("skipped: {}", short(w)),
    }
}

fn int(n: u64) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        num(n as f64)
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 100.0 {
        let s = format!("{v:.0}");
        // Thousands separators.
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A markdown table of rows: the columns are (header, metric).
fn table(rows: &[&Row], label: &dyn Fn(&Row) -> String, cols: &[(&str, &str)]) -> String {
    let mut s = String::from("| ");
    s.push_str(
        &std::iter::once("")
            .chain(cols.iter().map(|c| c.0))
            .collect::<Vec<_>>()
            .join(" | "),
    );
    s.push_str(" |\n|");
    s.push_str(&"---|".repeat(cols.len() + 1));
    s.push('\n');
    for row in rows {
        let _ = write!(s, "| {} |", label(row));
        if row.status == Status::Ok {
            for (_, m) in cols {
                let _ = write!(
                    s,
                    " {} |",
                    row.metrics.get(*m).map_or("–".into(), |v| num(*v))
                );
            }
        } else {
            let _ = write!(s, " {} |", status_text(row));
            s.push_str(&" |".repeat(cols.len() - 1));
        }
        s.push('\n');
    }
    s
}

pub fn write_markdown(r: &Results, root: &Path) -> Result<()> {
    let charts = root.join("bench/charts");
    std::fs::create_dir_all(&charts)?;
    let mut md = String::new();
    let m = &r.meta;
    md.push_str("# Benchmarks\n\n");
    md.push_str("<!-- Generated by `cargo xtask bench`; edit xtask/src/bench/report.rs, not this file. -->\n\n");
    if m.quick {
        md.push_str(
            "> **These are the numbers of a `--quick` run**, not a full one: fewer trials, \
             shorter trials, and no 100,000-service scale. Run `cargo xtask bench` (without \
             `--quick`) for the full set.\n\n",
        );
    }
    if r.scenarios
        .iter()
        .flat_map(|s| &s.rows)
        .any(|row| matches!(row.status, Status::Failed(_) | Status::NotAvailable(_)))
    {
        md.push_str("> **Some cases did not run** (see [What did not run, and why](#what-did-not-run-and-why)); the targets that depend on them are reported as not measured or not judged.\n\n");
    }
    let _ = write!(
        md,
        "mesh against what a user would pick instead — kube-proxy's iptables and nftables \
         modes (their rule layouts, loaded into the kernel's netfilter) and HAProxy as a \
         userspace L4 proxy — on the same machine, in the same run, with interleaved \
         repeated trials. Raw numbers: [`bench/results/latest.json`](bench/results/latest.json).\n\n\
         Run {} at commit `{}`{} ({:.0} s wall time).\n\n",
        m.date_utc,
        m.commit,
        if m.dirty {
            " plus uncommitted changes"
        } else {
            ""
        },
        m.wall_s
    );
    for merged in &m.merged {
        let _ = write!(
            md,
            "> Re-run later and merged into these results (same machine kind): {merged}.\n\n"
        );
    }
    md.push_str("## Machine\n\n");
    let _ = writeln!(md, "- CPU: {} × {} ({} GiB RAM)", m.cpus, m.cpu, m.mem_gib);
    let _ = writeln!(md, "- Kernel: {}; OS: {}", m.kernel, m.os);
    for (k, v) in &m.tools {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(
        md,
        "- Load: {} trials of {} ms per peer and case, peers interleaved (rotated each trial); \
         connect-path client threads: {}\n",
        m.trials, m.trial_ms, m.client_threads
    );
    md.push_str(
        "## Reproduce\n\n```sh\ncargo xtask bench          # full run (tens of minutes)\n\
         cargo xtask bench --quick  # under five minutes\n\
         cargo xtask bench --only connect,same-node   # some scenarios; results file left alone\n```\n\n\
         Needs root on a Debian machine. It installs iptables, nftables, haproxy and stunnel4 from \
         Debian's packages if missing. Every topology lives in network namespaces the \
         benchmark creates (`mesh-bench-<pid>-…`), on a veth pair inside each namespace: backends on \
         10.200.0.1–10:8080, service VIPs from 10.96.0.1:80; every netfilter rule is loaded \
         inside those namespaces only. The mesh agent attaches to a cgroup the benchmark \
         makes, and the load generator (`cargo xtask bench-client`, Rust, hdrhistogram) runs \
         inside that cgroup and namespace. Everything is removed on exit, Ctrl-C included.\n\n",
    );

    md.push_str("## Targets\n\nEach measured value is a ratio or value from this same run. A missed target is reported as missed; the benchmark is not tuned to the targets.\n\n");
    md.push_str("| target | goal | measured | result | how |\n|---|---|---|---|---|\n");
    for t in &r.targets {
        let (v, met) = fmt_target(t);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            t.name, t.goal, v, met, t.detail
        );
    }
    md.push('\n');

    if let Some(s) = r.scenario("connect") {
        let _ = write!(md, "## 1. {}\n\n{}\n\n", s.title, s.method);
        let peers = super::connect::PEERS;
        let mut scales: Vec<u64> = s.rows.iter().filter_map(|x| x.scale).collect();
        scales.sort();
        scales.dedup();
        let by = |peer: &str, n: u64| s.rows.iter().find(|x| x.peer == peer && x.scale == Some(n));
        for (metric, head) in [
            (
                "conn_per_s",
                "Connections per second (median trial; higher is better)",
            ),
            ("p50_us", "p50 latency per connection, µs (lower is better)"),
            ("p99_us", "p99 latency, µs"),
            ("p999_us", "p99.9 latency, µs"),
        ] {
            let _ = writeln!(md, "**{head}**\n");
            let _ = writeln!(md, "| services | {} |", peers.join(" | "));
            let _ = writeln!(md, "|---|{}", "---|".repeat(peers.len()));
            for &n in &scales {
                let _ = write!(md, "| {} |", int(n));
                for p in peers {
                    let v = match by(p, n) {
                        Some(row) if row.status == Status::Ok => {
                            row.metrics.get(metric).map_or("–".into(), |v| num(*v))
                        }
                        Some(row) => status_text(row),
                        None => "–".into(),
                    };
                    let _ = write!(md, " {v} |");
                }
                md.push('\n');
            }
            md.push('\n');
        }
        let _ = writeln!(
            md,
            "Setup time per peer (s: rules loaded / agent programmed / proxy ready):\n"
        );
        let _ = writeln!(md, "| services | {} |", peers.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(peers.len()));
        for &n in &scales {
            let _ = write!(md, "| {} |", num(n as f64));
            for p in peers {
                let v = by(p, n)
                    .and_then(|row| row.metric("setup_s"))
                    .map_or("–".into(), num);
                let _ = write!(md, " {v} |");
            }
            md.push('\n');
        }
        md.push('\n');
        let groups: Vec<String> = scales
            .iter()
            .map(|n| format!("{} services", int(*n)))
            .collect();
        let series = |metric: &str| -> Vec<(String, Vec<Option<f64>>)> {
            peers
                .iter()
                .map(|p| {
                    (
                        p.to_string(),
                        scales
                            .iter()
                            .map(|&n| by(p, n).and_then(|row| row.metric(metric)))
                            .collect(),
                    )
                })
                .collect()
        };
        chart(
            &charts,
            "connect-rate.svg",
            "Connect path: connections/s (higher is better)",
            "conn/s",
            &groups,
            &series("conn_per_s"),
        )?;
        chart(
            &charts,
            "connect-p99.svg",
            "Connect path: p99 latency (lower is better)",
            "µs",
            &groups,
            &series("p99_us"),
        )?;
        md.push_str("![connections per second](bench/charts/connect-rate.svg)\n\n![p99 latency](bench/charts/connect-p99.svg)\n\n");
    }

    if let Some(s) = r.scenario("same-node") {
        let _ = write!(md, "## 2. {}\n\n{}\n\n", s.title, s.method);
        let rows: Vec<&Row> = s.rows.iter().collect();
        let same_node_label =
            |row: &Row| format!("{}, {}", row.peer, super::same_node::label(row.scale));
        md.push_str(&table(
            &rows,
            &|row| same_node_label(row),
            &[
                ("round trips/s", "rr_per_s"),
                ("RTT p50 µs", "rtt_p50_us"),
                ("RTT p99 µs", "rtt_p99_us"),
                ("Gbit/s", "gbit_s"),
                ("Gbit/s min", "gbit_s_min"),
                ("Gbit/s max", "gbit_s_max"),
                ("sockets redirected", "redir_sockets"),
                ("MiB redirected", "redir_mib"),
            ],
        ));
        md.push('\n');
        let groups: Vec<String> = s.rows.iter().map(same_node_label).collect();
        let one = |metric: &str| {
            vec![(
                metric.to_string(),
                s.rows.iter().map(|x| x.metric(metric)).collect(),
            )]
        };
        chart(
            &charts,
            "same-node-rr.svg",
            "Same node: round trips/s (higher is better)",
            "round trips/s",
            &groups,
            &one("rr_per_s"),
        )?;
        chart(
            &charts,
            "same-node-gbit.svg",
            "Same node: bulk throughput (higher is better)",
            "Gbit/s",
            &groups,
            &one("gbit_s"),
        )?;
        md.push_str("![round trips](bench/charts/same-node-rr.svg)\n\n![throughput](bench/charts/same-node-gbit.svg)\n\n");
    }

    if let Some(s) = r.scenario("control-plane") {
        let _ = write!(md, "## 3. {}\n\n{}\n\n", s.title, s.method);
        let rows: Vec<&Row> = s.rows.iter().collect();
        md.push_str(&table(
            &rows,
            &|row| control_label(row),
            &[
                ("program s", "program_s"),
                ("µs/service", "program_us_per_service"),
                ("change p50 ms", "change_p50_ms"),
                ("change p99 ms", "change_p99_ms"),
                ("change max ms", "change_max_ms"),
                ("changes timed", "changes"),
                ("RSS idle MiB", "rss_idle_mib"),
                ("RSS programmed MiB", "rss_mib"),
                ("RSS after changes MiB", "rss_after_changes_mib"),
            ],
        ));
        md.push('\n');
        let groups: Vec<String> = s.rows.iter().map(control_label).collect();
        chart(
            &charts,
            "control-program.svg",
            "Time to program N services (lower is better)",
            "s",
            &groups,
            &[(
                "program_s".into(),
                s.rows.iter().map(|x| x.metric("program_s")).collect(),
            )],
        )?;
        chart(
            &charts,
            "control-change.svg",
            "Endpoint change to kernel map (lower is better)",
            "ms",
            &groups,
            &[
                (
                    "p50".into(),
                    s.rows.iter().map(|x| x.metric("change_p50_ms")).collect(),
                ),
                (
                    "p99".into(),
                    s.rows.iter().map(|x| x.metric("change_p99_ms")).collect(),
                ),
            ],
        )?;
        md.push_str("![programming time](bench/charts/control-program.svg)\n\n![endpoint change](bench/charts/control-change.svg)\n\n");
    }

    if let Some(s) = r.scenario("kernel-cost") {
        let _ = write!(md, "## 4. {}\n\n{}\n\n", s.title, s.method);
        let rows: Vec<&Row> = s.rows.iter().collect();
        md.push_str(&table(
            &rows,
            &|row| format!("{} @ {} services", row.peer, int(row.scale.unwrap_or(0))),
            &[
                ("ns per run", "ns_per_run"),
                ("runs", "runs"),
                ("runs per connection", "runs_per_connection"),
                ("ns per connection", "ns_per_connection"),
            ],
        ));
        md.push('\n');
        let ok: Vec<&Row> = s
            .rows
            .iter()
            .filter(|x| x.peer == "mesh_connect4" && x.status == Status::Ok)
            .collect();
        let groups: Vec<String> = ok
            .iter()
            .map(|x| format!("{} services", int(x.scale.unwrap_or(0))))
            .collect();
        chart(
            &charts,
            "kernel-ns.svg",
            "mesh_connect4: ns per run (lower is better)",
            "ns",
            &groups,
            &[(
                "mesh_connect4".into(),
                ok.iter().map(|x| x.metric("ns_per_run")).collect(),
            )],
        )?;
        md.push_str("![kernel cost](bench/charts/kernel-ns.svg)\n\n");
    }

    if let Some(s) = r.scenario("health-checks") {
        let _ = write!(md, "## 5. {}\n\n{}\n\n", s.title, s.method);
        let rows: Vec<&Row> = s.rows.iter().collect();
        md.push_str(&table(
            &rows,
            &|row| row.peer.clone(),
            &[
                ("checker CPU, % of a core", "cpu_percent"),
                ("CPU µs per check", "cpu_us_per_check"),
                ("checks/s at the backends", "checks_per_s"),
                ("% measured in the window", "cpu_percent_measured"),
            ],
        ));
        md.push('\n');
    }

    if let Some(s) = r.scenario("micro") {
        let _ = write!(md, "## 6. {}\n\n{}\n\n", s.title, s.method);
        let rows: Vec<&Row> = s.rows.iter().collect();
        md.push_str(&table(
            &rows,
            &|row| format!("`{}`", row.case.as_deref().unwrap_or(&row.peer)),
            &[
                ("mean ns", "mean_ns"),
                ("95% CI low", "mean_ci_low_ns"),
                ("95% CI high", "mean_ci_high_ns"),
                ("median ns", "median_ns"),
            ],
        ));
        md.push('\n');
    }

    super::cross_node::markdown(r, 7, &mut md);

    let failures: Vec<String> = r
        .scenarios
        .iter()
        .flat_map(|s| s.rows.iter().map(move |row| (s, row)))
        .filter_map(|(s, row)| match &row.status {
            Status::Failed(w) | Status::NotAvailable(w) => Some(format!(
                "- {} / {}{}: {}",
                s.id,
                row.peer,
                row.scale
                    .map_or(String::new(), |n| format!(" at {} services", int(n))),
                w.replace('\n', " ")
            )),
            _ => None,
        })
        .collect();
    if !failures.is_empty() {
        md.push_str("## What did not run, and why\n\n");
        md.push_str(&failures.join("\n"));
        md.push_str("\n\n");
    }
    md.push_str(
        "## How to read these numbers\n\n\
         - Client, backends and (for HAProxy) the proxy share this machine's CPUs; a peer that \
         spends CPU per connection (netfilter rule walks, a proxy's two extra sockets) shows it \
         as fewer connections per second.\n\
         - iptables runs with the legacy backend (`iptables-legacy-restore`), the one kube-proxy's \
         iptables mode was built around; rules match kube-proxy's layout (KUBE-SERVICES → \
         KUBE-SVC-* → `statistic --mode random` → KUBE-SEP-* with the hairpin mark and DNAT). \
         Its cost grows with the number of services because KUBE-SERVICES is walked rule by rule.\n\
         - nftables follows kube-proxy's nftables mode: a `service-ips` verdict map to a \
         per-service chain, `numgen random mod N vmap` to endpoint chains, DNAT there.\n\
         - HAProxy: one `listen` section per service (bind VIP:80, `balance random`), \
         `nbthread 2`, TCP mode.\n\
         - mesh rewrites the destination in `connect()` (cgroup/connect4), so no packet carries \
         the VIP and there is no NAT or conntrack; the direct baseline connects to a random \
         backend without any of that.\n\
         - The connect client closes with RST (SO_LINGER 0) for every peer, so no TIME_WAIT \
         state limits a long run.\n",
    );
    let path = root.join("BENCHMARKS.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))
}

const COLORS: [&str; 6] = [
    "#4e79a7", "#e15759", "#f28e2b", "#76b7b2", "#59a14f", "#b07aa1",
];

fn chart(
    dir: &Path,
    file: &str,
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> Result<()> {
    let svg = grouped_bars(title, unit, groups, series);
    std::fs::write(dir.join(file), svg).with_context(|| format!("writing {file}"))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn compact(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A grouped bar chart: one group per `groups` entry, one bar per series;
/// missing values are marked "n/a" so absence is visible, not hidden.
pub fn grouped_bars(
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> String {
    let (w, h) = (760.0, 380.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 70.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = series
        .iter()
        .flat_map(|s| s.1.iter().flatten())
        .fold(0.0f64, |m, &v| m.max(v));
    // A "nice" axis maximum: 1, 2 or 5 times a power of ten.
    let nice = if max <= 0.0 {
        1.0
    } else {
        let p = 10f64.powf(max.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * p)
            .find(|&c| c >= max)
            .unwrap_or(10.0 * p)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>
"#,
        w / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let v = nice * f64::from(i) / 5.0;
        let y = top + plot_h - plot_h * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            compact(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle" fill="#444">{}</text>"##,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        esc(unit)
    );
    let ng = groups.len().max(1) as f64;
    let ns = series.len().max(1) as f64;
    let group_w = plot_w / ng;
    let bar_w = (group_w * 0.8 / ns).min(60.0);
    for (g, name) in groups.iter().enumerate() {
        let gx = left + group_w * g as f64 + (group_w - bar_w * ns) / 2.0;
        for (k, (_, values)) in series.iter().enumerate() {
            let x = gx + bar_w * k as f64;
            match values.get(g).copied().flatten() {
                Some(v) => {
                    let bh = plot_h * v / nice;
                    let y = top + plot_h - bh;
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#222">{}</text>"##,
                        bar_w - 2.0,
                        COLORS[k % COLORS.len()],
                        x + bar_w / 2.0 - 1.0,
                        y - 3.0,
                        compact(v)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#999">n/a</text>"##,
                        x + bar_w / 2.0,
                        top + plot_h - 4.0
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#222">{}</text>"##,
            left + group_w * (g as f64 + 0.5),
            top + plot_h + 18.0,
            esc(name)
        );
    }
    if series.len() > 1 {
        let mut x = left;
        for (k, (name, _)) in series.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"##,
                h - 30.0,
                COLORS[k % COLORS.len()],
                x + 16.0,
                h - 20.0,
                esc(name)
            );
            x += 24.0 + 8.0 * name.len() as f64;
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_mark_missing_values_and_scale() {
        let svg = grouped_bars(
            "t <x>",
            "conn/s",
            &["10".into(), "1000".into()],
            &[
                ("a".into(), vec![Some(1500.0), None]),
                ("b".into(), vec![Some(10.0), Some(3.0)]),
            ],
        );
        assert!(svg.contains("n/a") && svg.contains("t &lt;x&gt;") && svg.contains(">2.0k<"));
        assert_eq!(num(1234567.0), "1,234,567");
    }
}
