//! Kernel-side debug logs (aya-log) behind the `MESH_CONFIG` switch: on, a
//! connect to a VIP leaves the kernel's line in the agent's log; off, it
//! leaves none.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mesh_tests::{Agent, TestBackend, TestCgroup, run_probe};

fn vip(last: u8) -> SocketAddr {
    mesh_tests::loopback_vip(21, last, 80)
}

/// One service `web` at `vip` with `backend`; `extra` goes into the
/// backend's entry.
fn web(vip: SocketAddr, backend: &TestBackend, extra: &str) -> String {
    format!(
        "services:\n  - name: web\n    vip: {}\n    port: {}\n    backends:\n      - {{address: 127.0.0.1, port: {}{extra}}}\n",
        vip.ip(),
        vip.port(),
        backend.port()
    )
}

/// Lines the kernel logged for a forwarded connect.
fn hits(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("mesh_kernel") && l.contains("hit: backend"))
        .count()
}

/// Waits (bounded) until the agent's log holds `n` kernel hit lines.
fn wait_for_hits(agent: &Agent, n: usize) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = agent.log();
        if hits(&log) >= n {
            return Ok(log);
        }
        if Instant::now() > deadline {
            bail!(
                "expected {n} kernel log lines, saw {}; log:\n{log}",
                hits(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn switch(agent: &Agent, on: &str) -> Result<()> {
    let out = agent.meshctl(&["debug-log", on])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = agent.status()?;
    assert_eq!(
        status["kernel_debug_log"],
        serde_json::Value::from(on == "on")
    );
    Ok(())
}

#[test]
fn kernel_debug_log_follows_its_switch() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let cgroup = TestCgroup::new("klog")?;
    let vip = vip(1);
    let yaml = web(vip, &backend, "");
    let agent = Agent::start(&yaml, &cgroup)?;
    let out = agent.meshctl(&["status"])?;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.contains("kernel debug log") && l.contains("off")),
        "off by default:\n{table}"
    );

    // Off (the default): connects leave no kernel line.
    assert_eq!(run_probe(&cgroup, vip, 5)?.ok, 5);
    // On: each connect leaves one.
    switch(&agent, "on")?;
    assert_eq!(run_probe(&cgroup, vip, 3)?.ok, 3);
    let log = wait_for_hits(&agent, 3)?;
    assert_eq!(
        hits(&log),
        3,
        "one line per connect, none from the off phase"
    );
    assert!(log.contains("service 1 hit: backend"), "{log}");

    // Off again: more connects, then one with the switch on. The kernel's
    // ring is ordered, so once that last line is in, any line of the off
    // phase would be too.
    switch(&agent, "off")?;
    assert_eq!(run_probe(&cgroup, vip, 5)?.ok, 5);
    switch(&agent, "on")?;
    assert_eq!(run_probe(&cgroup, vip, 1)?.ok, 1);
    let log = wait_for_hits(&agent, 4)?;
    assert_eq!(hits(&log), 4, "the off phase logged nothing:\n{log}");
    Ok(())
}

#[test]
fn kernel_debug_log_flag_at_start_and_denials() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let cgroup = TestCgroup::new("klogdeny")?;
    let vip = vip(2);
    let yaml = web(vip, &backend, ", state: draining");
    let agent = Agent::start_with(&yaml, &cgroup, &["--kernel-debug-log", "on"])?;
    assert_eq!(
        agent.status()?["kernel_debug_log"],
        serde_json::Value::from(true)
    );
    // No active backend: refused, and the kernel says why.
    assert_eq!(run_probe(&cgroup, vip, 2)?.ok, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = agent.log();
        if log.contains("has no usable backend") && log.contains("mesh_kernel") {
            break;
        }
        if Instant::now() > deadline {
            bail!("no kernel line for the refused connect; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Instructions the verifier processed, summed over the programs process
/// `pid` holds (from /proc/PID/fdinfo).
fn verified_insns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let is_prog = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("verified_insns:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// `--kernel-debug-log never`: the same object loaded with its log sites
/// marked absent is smaller to the verifier (it never walks the sites, so it
/// removes them as dead code), it still balances, and the switch refuses
/// with an error that says what to do.
#[test]
fn never_loads_the_programs_without_their_log_sites() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let kept_cgroup = TestCgroup::new("klogkept")?;
    let removed_cgroup = TestCgroup::new("klognever")?;
    let vip = vip(3);
    let yaml = web(vip, &backend, "");
    let kept = Agent::start(&yaml, &kept_cgroup)?;
    let removed = Agent::start_with(&yaml, &removed_cgroup, &["--kernel-debug-log", "never"])?;
    let (with_sites, without) = (verified_insns(kept.pid())?, verified_insns(removed.pid())?);
    assert!(
        without > 0 && without < with_sites,
        "verified instructions: {without} without log sites, {with_sites} with"
    );

    assert_eq!(run_probe(&removed_cgroup, vip, 3)?.ok, 3);
    let out = removed.meshctl(&["debug-log", "on"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "switching on must fail");
    assert!(stderr.contains("--kernel-debug-log never"), "{stderr}");
    let status = removed.status()?;
    assert_eq!(status["kernel_debug_log"], serde_json::Value::from(false));
    assert_eq!(
        status["kernel_log_sites_removed"],
        serde_json::Value::from(true)
    );
    let table = String::from_utf8_lossy(&removed.meshctl(&["status"])?.stdout).into_owned();
    assert!(table.contains("log sites removed"), "{table}");
    assert_eq!(run_probe(&removed_cgroup, vip, 2)?.ok, 2);
    assert_eq!(hits(&removed.log()), 0, "{}", removed.log());
    Ok(())
}
