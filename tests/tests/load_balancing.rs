//! The socket load balancer end to end: the real agent loads the real
//! programs into the kernel, attaches them to a cgroup made for the test, and
//! real clients inside that cgroup connect to a loopback VIP.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use mesh_tests::{
    Agent, TestBackend, TestCgroup, chi_square, chi_square_p_value, listener_on, run_probe,
    run_probe_marked,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A config with one service at `vip` and the given (backend, weight) pairs.
fn config(vip: SocketAddr, backends: &[(&TestBackend, u32)]) -> String {
    let mut yaml = format!(
        "services:\n  - name: web\n    vip: {}\n    port: {}\n    backends:\n",
        vip.ip(),
        vip.port()
    );
    for (backend, weight) in backends {
        yaml += &format!(
            "      - address: {}\n        port: {}\n        weight: {weight}\n",
            backend.addr().ip(),
            backend.port()
        );
    }
    yaml
}

/// A unique loopback VIP per test, so tests running at once never share one.
fn vip(last: u8) -> SocketAddr {
    mesh_tests::loopback_vip(10, last, 80)
}

/// Per-backend connection counts as `meshctl services -o json` reports them.
fn kernel_counts(agent: &Agent) -> Result<Vec<(String, u64)>> {
    let services = agent.meshctl_json(&["services"])?;
    let backends = services["services"][0]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(backends
        .iter()
        .map(|b| {
            (
                format!("{}:{}", b["address"].as_str().unwrap_or(""), b["port"]),
                b["connections"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect())
}

#[test]
fn weighted_split_follows_the_weights_and_meshctl_reports_the_kernel_counts() -> Result<()> {
    let backends = [
        TestBackend::new(1)?,
        TestBackend::new(2)?,
        TestBackend::new(3)?,
    ];
    let cgroup = TestCgroup::new("weighted")?;
    let vip = vip(1);
    let weights = [1u32, 2, 7];
    let pairs: Vec<_> = backends.iter().zip(weights).collect();
    let agent = Agent::start(&config(vip, &pairs), &cgroup)?;

    let result = run_probe(&cgroup, vip, 10_000)?;
    assert_eq!(result.ok, 10_000, "every connect succeeds: {result:?}");

    let observed: Vec<u64> = (1..=3).map(|id| result.id_count(id)).collect();
    let stat = chi_square(&observed, &weights.map(f64::from));
    let p = chi_square_p_value(stat, 2);
    assert!(
        p > 0.001,
        "split {observed:?} is not 1:2:7 (chi2 {stat:.2}, p {p:.5})"
    );

    // The kernel's own counters agree with what the clients saw.
    let counts = kernel_counts(&agent)?;
    for (backend, seen) in backends.iter().zip(&observed) {
        let name = backend.addr().to_string();
        let kernel = counts.iter().find(|(n, _)| *n == name).map(|(_, c)| *c);
        assert_eq!(kernel, Some(*seen), "meshctl count for {name}: {counts:?}");
    }
    // And the servers accepted exactly those connections: nothing leaked to
    // another address.
    for (backend, seen) in backends.iter().zip(&observed) {
        assert_eq!(backend.accepted(), *seen);
    }
    Ok(())
}

#[test]
fn getpeername_shows_the_vip_not_the_backend() -> Result<()> {
    let backend = TestBackend::new(7)?;
    let cgroup = TestCgroup::new("peername")?;
    let vip = vip(2);
    let _agent = Agent::start(&config(vip, &[(&backend, 1)]), &cgroup)?;

    let result = run_probe(&cgroup, vip, 50)?;
    assert_eq!(result.ok, 50, "{result:?}");
    assert_eq!(result.id_count(7), 50, "reached the backend: {result:?}");
    assert_eq!(
        result.peers.get(&vip.to_string()),
        Some(&50),
        "getpeername() must return the VIP: {:?}",
        result.peers
    );
    Ok(())
}

#[test]
fn a_service_whose_backends_are_all_removed_refuses_connects_at_once() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let vip = vip(3);
    // Something listens on the VIP itself: if a connect ever went to the VIP
    // instead of being refused, this listener would see it.
    let on_vip = listener_on(vip, 99)?;
    let cgroup = TestCgroup::new("empty")?;
    let agent = Agent::start(&config(vip, &[(&backend, 1)]), &cgroup)?;
    assert_eq!(run_probe(&cgroup, vip, 5)?.id_count(1), 5);

    agent.write_config(&format!(
        "services:\n  - name: web\n    vip: {}\n    port: {}\n    allow_empty: true\n    backends: []\n",
        vip.ip(),
        vip.port()
    ))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;

    let result = run_probe(&cgroup, vip, 50)?;
    assert_eq!(result.ok, 0, "{result:?}");
    let refused = result.errors.get("ECONNREFUSED").copied().unwrap_or(0)
        + result.errors.get("EHOSTUNREACH").copied().unwrap_or(0);
    assert_eq!(refused, 50, "{result:?}");
    assert_eq!(on_vip.accepted(), 0, "no connect may reach the VIP itself");

    // Refused in the kernel at connect(), not after a SYN timeout: the
    // slowest of 50 attempts must be far below the first SYN retry (1 s).
    let slowest = result.connect_ns.iter().max().copied().unwrap_or(u64::MAX);
    assert!(
        slowest < Duration::from_millis(10).as_nanos() as u64,
        "slowest refused connect took {slowest} ns"
    );

    let services = agent.meshctl_json(&["services"])?;
    assert_eq!(services["services"][0]["no_backend"], Value::from(50u64));
    Ok(())
}

#[test]
fn a_reload_that_changes_weights_applies_to_the_next_connection() -> Result<()> {
    let a = TestBackend::new(1)?;
    let b = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("reweight")?;
    let vip = vip(4);
    let agent = Agent::start(&config(vip, &[(&a, 1), (&b, 0)]), &cgroup)?;
    assert_eq!(run_probe(&cgroup, vip, 20)?.id_count(1), 20);

    // SIGHUP.
    agent.write_config(&config(vip, &[(&a, 0), (&b, 1)]))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;
    assert_eq!(run_probe(&cgroup, vip, 20)?.id_count(2), 20);

    // A plain file change, no signal: the agent watches the file.
    agent.write_config(&config(vip, &[(&a, 1), (&b, 0)]))?;
    agent.wait_for_generation(3, WAIT)?;
    assert_eq!(run_probe(&cgroup, vip, 20)?.id_count(1), 20);
    Ok(())
}

#[test]
fn a_broken_reload_is_refused_and_the_last_good_config_keeps_serving() -> Result<()> {
    let a = TestBackend::new(1)?;
    let b = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("badreload")?;
    let vip = vip(5);
    let agent = Agent::start(&config(vip, &[(&a, 1)]), &cgroup)?;

    // Broken YAML, then a config that parses but is invalid (port 0).
    let broken = [
        "services:\n  - name: web\n    vip: [unclosed\n".to_owned(),
        config(vip, &[(&b, 1)]).replace(&format!("port: {}", b.port()), "port: 0"),
    ];
    for (i, text) in broken.iter().enumerate() {
        agent.write_config(text)?;
        agent.sighup()?;
        let status = agent.wait_for_reload_failures(i as u64 + 1, WAIT)?;
        let error = status["last_reload_error"].as_str().unwrap_or_default();
        let file = agent.config_path().display().to_string();
        assert!(
            error.starts_with(&format!("{file}:")),
            "error names the file: {error}"
        );
        assert_eq!(status["config_generation"], Value::from(1u64), "{status}");

        let result = run_probe(&cgroup, vip, 20)?;
        assert_eq!(
            result.id_count(1),
            20,
            "old config still serves: {result:?}"
        );
    }
    assert_eq!(b.accepted(), 0);
    Ok(())
}

#[test]
fn sockets_outside_the_attached_cgroup_are_untouched() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let vip = vip(6);
    let on_vip = listener_on(vip, 99)?;
    let attached = TestCgroup::new("attached")?;
    let other = TestCgroup::new("other")?;
    let _agent = Agent::start(&config(vip, &[(&backend, 1)]), &attached)?;

    assert_eq!(run_probe(&attached, vip, 20)?.id_count(1), 20);
    let outside = run_probe(&other, vip, 20)?;
    assert_eq!(
        outside.id_count(99),
        20,
        "a sibling cgroup reaches the VIP itself: {outside:?}"
    );
    assert_eq!(on_vip.accepted(), 20);
    Ok(())
}

#[test]
fn a_bad_config_at_start_exits_non_zero_naming_file_line_and_column() -> Result<()> {
    let cgroup = TestCgroup::new("badstart")?;
    let yaml = "services:\n  - name: web\n    vip: 127.10.0.1\n    port: 0\n    backends:\n      - address: 127.0.0.1\n        port: 8080\n";
    let (code, stderr) = Agent::start_expect_failure(yaml, &cgroup)?;
    assert_ne!(code, 0);
    assert!(stderr.contains(":4:11: port 0"), "stderr: {stderr}");
    Ok(())
}

#[test]
fn sockets_carrying_the_agent_mark_are_untouched() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let vip = vip(7);
    let on_vip = listener_on(vip, 99)?;
    let cgroup = TestCgroup::new("mark")?;
    let mark: u32 = 0x0042_0042;
    let _agent = Agent::start_with(
        &config(vip, &[(&backend, 1)]),
        &cgroup,
        &["--socket-mark", &mark.to_string()],
    )?;

    assert_eq!(run_probe(&cgroup, vip, 10)?.id_count(1), 10);
    let marked = run_probe_marked(&cgroup, vip, 10, mark)?;
    assert_eq!(
        marked.id_count(99),
        10,
        "marked sockets reach the VIP itself: {marked:?}"
    );
    let other_mark = run_probe_marked(&cgroup, vip, 10, mark + 1)?;
    assert_eq!(other_mark.id_count(1), 10, "{other_mark:?}");
    assert_eq!(on_vip.accepted(), 10);
    Ok(())
}
