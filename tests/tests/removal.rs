//! What happens to established sockets when their backend goes: destroyed at
//! once when the service asks for it (the default for UDP), left alone
//! otherwise (the default for TCP), and only after the drain timeout when
//! one is set.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use mesh_tests::{
    Agent, TestBackend, TestCgroup, UdpBackend, hold_and_watch, one_service_yaml, run_probe,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

fn vip(last: u8) -> SocketAddr {
    mesh_tests::loopback_vip(14, last, 80)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn tcp_sockets_of_a_removed_backend_are_destroyed_when_asked() -> Result<()> {
    let old = TestBackend::holding(1)?;
    let new = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("destroy")?;
    let vip = vip(1);
    let destroy = "    destroy_on_removal: true\n";
    let agent = Agent::start(&one_service_yaml(vip, destroy, &[old.addr()]), &cgroup)?;
    let mut held = hold_and_watch(&cgroup, vip, 10, false, 5_000)?;
    assert_eq!(held.result.id_count(1), 10, "{:?}", held.result);

    let removed_at = unix_ms();
    agent.write_config(&one_service_yaml(vip, destroy, &[new.addr()]))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;

    let report = held.watch_report()?;
    assert_eq!(report.errors.get("ECONNABORTED"), Some(&10), "{report:?}");
    let latest = report
        .event_unix_ms
        .iter()
        .max()
        .copied()
        .unwrap_or(u64::MAX);
    assert!(
        latest.saturating_sub(removed_at) < 1_000,
        "every socket saw its error within a second of the config change"
    );
    assert_eq!(agent.status()?["sockets_destroyed"], Value::from(10u64));
    assert_eq!(
        run_probe(&cgroup, vip, 5)?.id_count(2),
        5,
        "clients reconnect to the new backend"
    );
    Ok(())
}

#[test]
fn tcp_sockets_are_left_alone_by_default() -> Result<()> {
    let old = TestBackend::holding(1)?;
    let new = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("keep")?;
    let vip = vip(2);
    let agent = Agent::start(&one_service_yaml(vip, "", &[old.addr()]), &cgroup)?;
    let mut held = hold_and_watch(&cgroup, vip, 10, false, 1_500)?;

    agent.write_config(&one_service_yaml(vip, "", &[new.addr()]))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;
    let report = held.watch_report()?;
    assert!(
        report.errors.is_empty(),
        "no socket was touched: {report:?}"
    );
    assert_eq!(agent.status()?["sockets_destroyed"], Value::from(0u64));
    Ok(())
}

#[test]
fn connected_udp_sockets_of_a_removed_backend_are_destroyed_by_default() -> Result<()> {
    let old = UdpBackend::new(1)?;
    let new = UdpBackend::new(2)?;
    let cgroup = TestCgroup::new("udpdestroy")?;
    let vip = vip(3);
    let udp = "    protocol: udp\n";
    let agent = Agent::start(&one_service_yaml(vip, udp, &[old.addr()]), &cgroup)?;
    let mut held = hold_and_watch(&cgroup, vip, 10, true, 5_000)?;
    assert_eq!(held.result.id_count(1), 10, "{:?}", held.result);

    agent.write_config(&one_service_yaml(vip, udp, &[new.addr()]))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;
    let report = held.watch_report()?;
    assert_eq!(report.errors.get("ECONNABORTED"), Some(&10), "{report:?}");
    Ok(())
}

#[test]
fn a_drain_timeout_keeps_old_connections_then_removes_the_backend() -> Result<()> {
    let old = TestBackend::holding(1)?;
    let new = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("draintimeout")?;
    let vip = vip(4);
    let drain = "    drain_timeout_seconds: 2\n    destroy_on_removal: true\n";
    let agent = Agent::start(&one_service_yaml(vip, drain, &[old.addr()]), &cgroup)?;
    let mut held = hold_and_watch(&cgroup, vip, 10, false, 8_000)?;

    agent.write_config(&one_service_yaml(vip, drain, &[new.addr()]))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;
    let draining_since = unix_ms();

    // While draining: new connections go to the new backend only, and the
    // old backend is still there, draining, with its live connections.
    assert_eq!(run_probe(&cgroup, vip, 20)?.id_count(2), 20);
    let services = agent.meshctl_json(&["services"])?;
    let old_view = &services["services"][0]["backends"][1];
    assert_eq!(old_view["state"], "draining", "{services}");
    assert_eq!(old_view["active"], Value::from(10u64), "{services}");

    // Then the drain ends: the backend is removed and its sockets destroyed.
    agent.wait_for_generation(3, WAIT)?;
    let report = held.watch_report()?;
    assert_eq!(report.errors.get("ECONNABORTED"), Some(&10), "{report:?}");
    let first = report.event_unix_ms.iter().min().copied().unwrap_or(0);
    assert!(
        first >= draining_since + 1_500,
        "sockets lived through the drain ({} ms)",
        first.saturating_sub(draining_since)
    );
    let services = agent.meshctl_json(&["services"])?;
    assert_eq!(
        services["services"][0]["backends"].as_array().map(Vec::len),
        Some(1)
    );
    Ok(())
}
