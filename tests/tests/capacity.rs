//! Map capacity: a configuration that does not fit is refused with the map's
//! name and what to raise, and never leaves a half-written state behind.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use mesh_tests::{Agent, TestBackend, TestCgroup, run_probe};
use serde_json::Value;

fn vip(last: u8) -> SocketAddr {
    mesh_tests::loopback_vip(11, last, 80)
}

fn service(name: &str, vip: SocketAddr, backends: &[(&TestBackend, u32)]) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    vip: {}\n    port: {}\n    backends:\n",
        vip.ip(),
        vip.port()
    );
    for (b, weight) in backends {
        yaml += &format!(
            "      - {{address: {}, port: {}, weight: {weight}}}\n",
            b.addr().ip(),
            b.port()
        );
    }
    yaml
}

#[test]
fn more_services_than_the_map_holds_is_refused_at_start_naming_the_map() -> Result<()> {
    let b = TestBackend::new(1)?;
    let cgroup = TestCgroup::new("capstart")?;
    let yaml = format!(
        "services:\n{}{}{}",
        service("a", vip(1), &[(&b, 1)]),
        service("b", vip(2), &[(&b, 1)]),
        service("c", vip(3), &[(&b, 1)]),
    );
    let (code, log) = Agent::start_expect_failure_with(&yaml, &cgroup, &["--max-services", "2"])?;
    assert_ne!(code, 0);
    assert!(log.contains("MESH_SERVICES is too small"), "{log}");
    assert!(
        log.contains("needs 3 entries") && log.contains("--max-services"),
        "{log}"
    );
    Ok(())
}

#[test]
fn a_reload_that_does_not_fit_is_refused_and_the_previous_state_serves() -> Result<()> {
    let a = TestBackend::new(1)?;
    let b = TestBackend::new(2)?;
    let c = TestBackend::new(3)?;
    let cgroup = TestCgroup::new("capreload")?;
    let vip = vip(4);
    let start = format!("services:\n{}", service("web", vip, &[(&a, 1), (&b, 1)]));
    let agent = Agent::start_with(&start, &cgroup, &["--max-slots", "6"])?;
    let before = run_probe(&cgroup, vip, 40)?;
    assert_eq!(before.id_count(1) + before.id_count(2), 40, "{before:?}");

    // 1:2:7 needs 10 slots (plus the 2 live ones while it is written).
    let too_big = format!(
        "services:\n{}",
        service("web", vip, &[(&a, 1), (&b, 2), (&c, 7)])
    );
    agent.write_config(&too_big)?;
    agent.sighup()?;
    let status = agent.wait_for_reload_failures(1, Duration::from_secs(10))?;
    let error = status["last_reload_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("MESH_SLOTS") && error.contains("--max-slots"),
        "{error}"
    );
    assert_eq!(status["config_generation"], Value::from(1u64));

    let after = run_probe(&cgroup, vip, 40)?;
    assert_eq!(after.id_count(1) + after.id_count(2), 40, "{after:?}");
    assert_eq!(
        c.accepted(),
        0,
        "the refused backend never got a connection"
    );
    let services = agent.meshctl_json(&["services"])?;
    assert_eq!(
        services["services"][0]["backends"].as_array().map(Vec::len),
        Some(2),
        "meshctl shows the state that serves: {services}"
    );
    Ok(())
}
