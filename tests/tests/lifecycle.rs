//! The agent can die, restart and change its map layout while traffic
//! flows, without a single failed connection: programs stay attached
//! through their pinned links, and a new agent takes over from pinned state.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::Result;
use mesh_agent::{bpf::Maps, config::parse_str, reconcile::service_keys};
use mesh_tests::{Agent, TestBackend, TestCgroup, spawn_probe};

fn vip(last: u8) -> SocketAddr {
    format!("127.15.{}.{last}:80", std::process::id() % 250 + 1)
        .parse()
        .unwrap()
}

fn config(vip: SocketAddr, backends: &[(&TestBackend, u32)]) -> String {
    let mut yaml = format!(
        "services:\n  - name: web\n    vip: {}\n    port: {}\n    backends:\n",
        vip.ip(),
        vip.port()
    );
    for (b, w) in backends {
        yaml += &format!(
            "      - {{address: {}, port: {}, weight: {w}}}\n",
            b.addr().ip(),
            b.port()
        );
    }
    yaml
}

/// Checks that the pinned maps hold exactly what `yaml` asks for: one
/// service entry per key, exactly its live generation of slots, exactly its
/// backends, and nothing left over from earlier agents.
fn assert_maps_match(agent: &Agent, yaml: &str, version: u32) -> Result<()> {
    let desired = parse_str(yaml, "expected.yaml")?;
    let maps = Maps::from_pins(&agent.bpffs().join(format!("v{version}/maps")))?;
    let services: Vec<_> = maps.services.iter().collect::<Result<_, _>>()?;
    let expected_keys: BTreeSet<_> = desired.services.iter().flat_map(service_keys).collect();
    let keys: BTreeSet<_> = services.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, expected_keys, "service entries");
    let slots: Vec<_> = maps.slots.keys().collect::<Result<_, _>>()?;
    for (_, value) in &services {
        let live = slots
            .iter()
            .filter(|s| s.service_id == value.service_id && s.generation == value.generation)
            .count();
        assert_eq!(
            live as u32, value.slot_count,
            "a complete table for {value:?}"
        );
    }
    let total: u32 = services.iter().map(|(_, v)| v.slot_count).sum();
    assert_eq!(slots.len() as u32, total, "no stale generations");
    let backends: BTreeSet<(u16, [u32; 4])> = maps
        .backends
        .iter()
        .map(|r| r.map(|(_, b)| (u16::from_be(b.port), b.addr)))
        .collect::<Result<_, _>>()?;
    let want: BTreeSet<(u16, [u32; 4])> = desired.services[0]
        .backends
        .iter()
        .map(|b| (b.port, mesh_agent::reconcile::ip_to_words(b.address).0))
        .collect();
    assert_eq!(backends, want, "backend entries");
    Ok(())
}

#[test]
fn sigkill_and_restart_three_times_under_load_fails_no_connection() -> Result<()> {
    let backends = [
        TestBackend::new(1)?,
        TestBackend::new(2)?,
        TestBackend::new(3)?,
    ];
    let cgroup = TestCgroup::new("restart")?;
    let vip = vip(1);
    let yaml = config(
        vip,
        &[(&backends[0], 1), (&backends[1], 2), (&backends[2], 3)],
    );
    let mut agent = Agent::start(&yaml, &cgroup)?;

    let load = spawn_probe(&cgroup, vip, 40_000)?;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        agent.kill_and_restart(&[])?;
    }
    let result = load.finish()?;
    assert_eq!(
        result.ok, 40_000,
        "no connection failed: {:?}",
        result.errors
    );
    assert_eq!(
        agent.status()?["config_generation"],
        serde_json::Value::from(1u64)
    );
    assert_maps_match(&agent, &yaml, mesh_common::SCHEMA_VERSION)?;
    Ok(())
}

#[test]
fn an_upgrade_to_another_map_layout_fails_no_connection_and_removes_old_pins() -> Result<()> {
    let backends = [TestBackend::new(1)?, TestBackend::new(2)?];
    let cgroup = TestCgroup::new("upgrade")?;
    let vip = vip(2);
    let yaml = config(vip, &[(&backends[0], 1), (&backends[1], 1)]);
    let mut agent = Agent::start(&yaml, &cgroup)?;
    let old = agent
        .bpffs()
        .join(format!("v{}", mesh_common::SCHEMA_VERSION));
    let new_version = mesh_common::SCHEMA_VERSION + 1;
    let new = agent.bpffs().join(format!("v{new_version}"));
    assert!(old.exists());

    let load = spawn_probe(&cgroup, vip, 20_000)?;
    std::thread::sleep(Duration::from_millis(300));
    agent.kill_and_restart(&["--schema-version", &new_version.to_string()])?;
    let result = load.finish()?;

    assert_eq!(
        result.ok, 20_000,
        "no connection failed: {:?}",
        result.errors
    );
    assert!(!old.exists(), "the old layout's pins are gone");
    assert!(
        new.join("links").read_dir()?.count() > 0,
        "the new layout is attached"
    );
    assert_maps_match(&agent, &yaml, new_version)?;
    Ok(())
}
