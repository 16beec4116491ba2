//! Health: active checks take a dead backend out of rotation within
//! interval × threshold and bring it back when it recovers; passive outlier
//! detection ejects a backend whose connects fail, with no active checks at
//! all; panic mode decides what happens when nothing is healthy. HTTP
//! checks keep their connection open between checks, and a backend that
//! closes it stays healthy.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use mesh_tests::{
    Agent, HttpBackend, KeepAlive, TestBackend, TestCgroup, listener_on, one_service_yaml,
    run_probe,
};
use serde_json::Value;

fn vip(last: u8) -> SocketAddr {
    mesh_tests::loopback_vip(16, last, 80)
}

/// Polls `meshctl services` until backend `index` has `health` and the
/// kernel has the matching state (`active` when healthy, `unhealthy`
/// otherwise, unless panic mode keeps it `active`).
fn wait_health(agent: &Agent, index: usize, health: &str, timeout: Duration) -> Result<Value> {
    wait_backend(
        agent,
        index,
        health,
        if health == "healthy" {
            "active"
        } else {
            "unhealthy"
        },
        timeout,
    )
}

fn wait_backend(
    agent: &Agent,
    index: usize,
    health: &str,
    state: &str,
    timeout: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let services = agent.meshctl_json(&["services"])?;
        let backend = &services["services"][0]["backends"][index];
        if backend["health"] == health && backend["state"] == state {
            return Ok(services);
        }
        if Instant::now() > deadline {
            bail!("backend {index} never became {health}: {services}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const TCP_CHECK: &str = "    health_check: {type: tcp, interval_ms: 100, timeout_ms: 100, unhealthy_threshold: 3, healthy_threshold: 2, jitter_percent: 0}\n";

#[test]
fn a_killed_backend_leaves_rotation_within_interval_times_threshold_and_returns() -> Result<()> {
    let a = TestBackend::new(1)?;
    let a_addr = a.addr();
    let b = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("activetcp")?;
    let vip = vip(1);
    let agent = Agent::start(
        &one_service_yaml(vip, TCP_CHECK, &[a_addr, b.addr()]),
        &cgroup,
    )?;
    assert_eq!(run_probe(&cgroup, vip, 100)?.ok, 100);

    let killed_at = Instant::now();
    drop(a);
    wait_health(&agent, 0, "unhealthy", Duration::from_secs(5))?;
    let detected = killed_at.elapsed();
    // 3 failed checks 100 ms apart, plus the phase of the first one and the
    // apply: far below a second over interval × threshold.
    assert!(
        detected < Duration::from_millis(300 + 1_000),
        "took {detected:?}"
    );
    let result = run_probe(&cgroup, vip, 100)?;
    assert_eq!(result.id_count(2), 100, "only the live backend: {result:?}");

    // It comes back on the same address: healthy again, back in rotation.
    let _a = listener_on(a_addr, 1)?;
    wait_health(&agent, 0, "healthy", Duration::from_secs(5))?;
    let result = run_probe(&cgroup, vip, 200)?;
    assert_eq!(result.ok, 200);
    assert!(result.id_count(1) > 0, "back in rotation: {result:?}");
    Ok(())
}

#[test]
fn http_checks_follow_the_status_the_backend_reports() -> Result<()> {
    // Both answer HTTP: the check runs against every backend of the service.
    let a = HttpBackend::new(1)?;
    let b = HttpBackend::new(2)?;
    let cgroup = TestCgroup::new("activehttp")?;
    let vip = vip(2);
    let check = "    health_check: {type: http, path: /healthz, interval_ms: 100, timeout_ms: 100, unhealthy_threshold: 2, healthy_threshold: 2}\n";
    let agent = Agent::start(
        &one_service_yaml(vip, check, &[a.addr(), b.addr()]),
        &cgroup,
    )?;

    a.set_status(503);
    wait_health(&agent, 0, "unhealthy", Duration::from_secs(5))?;
    assert_eq!(run_probe(&cgroup, vip, 50)?.id_count(2), 50);
    a.set_status(200);
    wait_health(&agent, 0, "healthy", Duration::from_secs(5))?;
    assert!(run_probe(&cgroup, vip, 60)?.id_count(1) > 0);
    Ok(())
}

/// Polls until every backend has answered `n` health checks.
fn wait_requests(backends: &[&HttpBackend], n: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while backends.iter().any(|b| b.requests() < n) {
        if Instant::now() > deadline {
            let seen: Vec<u64> = backends.iter().map(|b| b.requests()).collect();
            bail!("fewer than {n} checks arrived within {timeout:?}: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The agent's mark (its default `--socket-mark`) as `ss -e` shows it.
const AGENT_FWMARK: &str = "fwmark:0x4d455348";

#[test]
fn http_checks_reuse_one_marked_connection() -> Result<()> {
    let a = HttpBackend::new(1)?;
    let cgroup = TestCgroup::new("hckeep")?;
    let vip = vip(6);
    let check = "    health_check: {type: http, path: /healthz, interval_ms: 100, timeout_ms: 100, unhealthy_threshold: 2, healthy_threshold: 2, jitter_percent: 0}\n";
    let agent = Agent::start(&one_service_yaml(vip, check, &[a.addr()]), &cgroup)?;

    wait_requests(&[&a], 20, Duration::from_secs(10))?;
    // A check that times out on a loaded machine drops its connection, so
    // allow a reconnect or two; a connection per check would be 20 or more.
    assert!(
        a.connections() <= 3,
        "{} connections for {} checks",
        a.connections(),
        a.requests()
    );
    let services = agent.meshctl_json(&["services"])?;
    assert_eq!(services["services"][0]["backends"][0]["health"], "healthy");

    // The kept connection is the agent's and carries its mark.
    let out = std::process::Command::new("ss")
        .args(["-tnHe", "state", "established", "dst"])
        .arg(a.addr().to_string())
        .output()?;
    let ss = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ss failed: {out:?}");
    assert!(
        ss.lines().any(|l| l.contains(AGENT_FWMARK)),
        "no connection to {} with {AGENT_FWMARK}:\n{ss}",
        a.addr()
    );
    Ok(())
}

#[test]
fn backends_that_close_the_connection_stay_healthy_and_keep_being_checked() -> Result<()> {
    // One says `Connection: close`; the other closes an idle connection
    // without warning, so each check finds its kept connection dead.
    let closing = HttpBackend::with(1, KeepAlive::Close)?;
    let dropping = HttpBackend::with(2, KeepAlive::DropIdle)?;
    let cgroup = TestCgroup::new("hcclose")?;
    let vip = vip(7);
    // One failure would flip a backend: a dead kept connection must not
    // count as one.
    let check = "    health_check: {type: http, path: /healthz, interval_ms: 200, timeout_ms: 200, unhealthy_threshold: 1, healthy_threshold: 1, jitter_percent: 0}\n";
    let agent = Agent::start(
        &one_service_yaml(vip, check, &[closing.addr(), dropping.addr()]),
        &cgroup,
    )?;

    wait_requests(&[&closing, &dropping], 10, Duration::from_secs(15))?;
    let services = agent.meshctl_json(&["services"])?;
    for (i, b) in [&closing, &dropping].into_iter().enumerate() {
        let view = &services["services"][0]["backends"][i];
        assert_eq!(view["health"], "healthy", "backend {i}: {services}");
        assert_eq!(view["health_transitions"], 0, "backend {i}: {services}");
        // Every check on a new connection (the one being accepted now may
        // not have sent its request yet).
        assert!(
            b.connections() >= b.requests(),
            "backend {i}: {} connections, {} checks",
            b.connections(),
            b.requests()
        );
    }
    Ok(())
}

#[test]
fn passive_outlier_detection_ejects_a_failing_backend_without_active_checks() -> Result<()> {
    let a = TestBackend::new(1)?;
    let b = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("outlier")?;
    let vip = vip(3);
    let outlier = "    outlier_detection: {consecutive_failures: 3, ejection_ms: 1500}\n";
    let agent = Agent::start(
        &one_service_yaml(vip, outlier, &[a.addr(), b.addr()]),
        &cgroup,
    )?;
    drop(a);

    // Clients hit the dead backend until the kernel has counted 3 failed
    // connects in a row and the agent has ejected it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failed = 0;
    while agent.meshctl_json(&["services"])?["services"][0]["backends"][0]["state"] != "unhealthy" {
        failed += run_probe(&cgroup, vip, 10)?.error_count();
        if Instant::now() > deadline {
            bail!("never ejected after {failed} failed connects");
        }
    }
    assert!(failed >= 3, "ejected after {failed} failures");
    let services = agent.meshctl_json(&["services"])?;
    assert_eq!(services["services"][0]["backends"][0]["health"], "ejected");
    let result = run_probe(&cgroup, vip, 100)?;
    assert_eq!(
        result.id_count(2),
        100,
        "no connect reaches the ejected backend: {result:?}"
    );

    // The ejection ends by itself.
    wait_health(&agent, 0, "healthy", Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn when_every_backend_is_down_panic_mode_decides() -> Result<()> {
    let cgroup = TestCgroup::new("panic")?;
    for (mode, last) in [("all", 4u8), ("none", 5)] {
        let a = TestBackend::new(1)?;
        let b = TestBackend::new(2)?;
        let vip = vip(last);
        let extra = format!("{TCP_CHECK}    panic_mode: {mode}\n");
        let agent = Agent::start(
            &one_service_yaml(vip, &extra, &[a.addr(), b.addr()]),
            &cgroup,
        )?;
        drop((a, b));
        // Panic mode `all` keeps both in the kernel as active.
        let state = if mode == "all" { "active" } else { "unhealthy" };
        wait_backend(&agent, 0, "unhealthy", state, Duration::from_secs(5))?;
        let services = wait_backend(&agent, 1, "unhealthy", state, Duration::from_secs(5))?;
        let slots: Vec<u64> = (0..2)
            .map(|i| {
                services["services"][0]["backends"][i]["slots"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        let status = agent.status()?;
        let result = run_probe(&cgroup, vip, 10)?;
        if mode == "all" {
            assert_eq!(
                status["panic_services"],
                serde_json::json!(["web"]),
                "{status}"
            );
            assert_eq!(slots, [1, 1], "both stay in the table");
            assert_eq!(
                result.errors.get("ECONNREFUSED"),
                Some(&10),
                "sent on, refused by the dead backends"
            );
            let services = agent.meshctl_json(&["services"])?;
            assert_eq!(services["services"][0]["no_backend"], Value::from(0u64));
        } else {
            assert_eq!(status["panic_services"], serde_json::json!([]), "{status}");
            assert_eq!(slots, [0, 0], "nothing left in the table");
            let services = agent.meshctl_json(&["services"])?;
            assert_eq!(
                services["services"][0]["no_backend"],
                Value::from(10u64),
                "refused by the kernel"
            );
        }
    }
    Ok(())
}
