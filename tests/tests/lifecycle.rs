//! The agent can die, restart and change its map layout while traffic
//! flows, without a single failed connection: programs stay attached
//! through their pinned links, and a new agent takes over from pinned state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use mesh_agent::{bpf::Maps, config::parse_str, reconcile::service_keys};
use mesh_tests::{Agent, TestBackend, TestCgroup, hold_connections, run_probe, spawn_probe};

fn vip(last: u8) -> SocketAddr {
    mesh_tests::loopback_vip(15, last, 80)
}

fn config(vip: SocketAddr, backends: &[(&TestBackend, u32)]) -> String {
    format!("services:\n{}", service("web", vip, "", backends))
}

/// One item of `services:`; `extra` holds more of its fields (indented).
fn service(name: &str, vip: SocketAddr, extra: &str, backends: &[(&TestBackend, u32)]) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    vip: {}\n    port: {}\n{extra}    backends:\n",
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

/// A pin an earlier agent of the same layout left for a map this build no
/// longer has (here: one renamed to `MESH_SOCK_STATE`, the pinned LRU map
/// that became socket-local storage) is removed at start; the others stay.
#[test]
fn a_restart_removes_pins_of_maps_this_build_does_not_have() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let cgroup = TestCgroup::new("stalepin")?;
    let yaml = config(vip(9), &[(&backend, 1)]);
    let mut agent = Agent::start(&yaml, &cgroup)?;
    agent.kill()?;
    let maps = agent
        .bpffs()
        .join(format!("v{}/maps", mesh_common::SCHEMA_VERSION));
    let stale = maps.join("MESH_SOCK_STATE");
    std::fs::rename(maps.join(mesh_common::map_names::AFFINITY), &stale)?;
    agent.kill_and_restart(&[])?;
    assert!(!stale.exists(), "{}", agent.log());
    assert!(
        agent
            .log()
            .contains("removed the pin of a map this agent no longer has"),
        "{}",
        agent.log()
    );
    assert!(maps.join(mesh_common::map_names::AFFINITY).exists());
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

/// Backend ids by port in one layout's pinned maps.
fn backend_ids(agent: &Agent, version: u32) -> Result<BTreeMap<u16, u32>> {
    let maps = Maps::from_pins(&agent.bpffs().join(format!("v{version}/maps")))?;
    maps.backends
        .iter()
        .map(|r| Ok(r.map(|(id, b)| (u16::from_be(b.port), id))?))
        .collect()
}

/// Live TCP connections per backend port of one service, as `meshctl`
/// reads them from the agent's `MESH_ACTIVE`.
fn live_by_port(agent: &Agent, service: &str) -> Result<BTreeMap<u16, u64>> {
    let services = agent.meshctl_json(&["services"])?;
    let svc = services["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == service))
        .with_context(|| format!("service {service} in {services}"))?;
    svc["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .map(|b| {
            let port = b["port"].as_u64().context("port")? as u16;
            Ok((port, b["active"].as_u64().context("active")?))
        })
        .collect()
}

/// Polls (≤ 10 s) until a service's live counts are `want`; returns the last.
fn wait_for_live(
    agent: &Agent,
    service: &str,
    want: &BTreeMap<u16, u64>,
) -> Result<BTreeMap<u16, u64>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live = live_by_port(agent, service)?;
        if &live == want || Instant::now() > deadline {
            return Ok(live);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_upgrade_to_another_map_layout_carries_socket_state() -> Result<()> {
    let least = [TestBackend::new(1)?, TestBackend::new(2)?];
    let sticky = [TestBackend::new(3)?, TestBackend::new(4)?];
    let filler = TestBackend::new(5)?;
    let cgroup = TestCgroup::new("migrate")?;
    let (filler_vip, lc_vip, sticky_vip) = (vip(1), vip(3), vip(4));
    let lc = service(
        "least",
        lc_vip,
        "    algorithm: least-conn\n",
        &[(&least[0], 1), (&least[1], 1)],
    );
    let affinity = "    affinity: true\n    affinity_timeout_seconds: 300\n";
    let old_yaml = format!(
        "services:\n{lc}{}",
        service(
            "sticky",
            sticky_vip,
            affinity,
            &[(&sticky[0], 1), (&sticky[1], 1)]
        )
    );
    let mut agent = Agent::start(&old_yaml, &cgroup)?;

    let mut held = hold_connections(&cgroup, lc_vip, 6)?;
    assert_eq!(held.result.ok, 6, "{:?}", held.result);
    let held_per_port: BTreeMap<u16, u64> = least
        .iter()
        .map(|b| (b.port(), held.result.id_count(b.id())))
        .collect();
    assert_eq!(
        live_by_port(&agent, "least")?,
        held_per_port,
        "counted before"
    );
    let first = run_probe(&cgroup, sticky_vip, 1)?;
    let chosen = sticky
        .iter()
        .find(|b| first.id_count(b.id()) == 1)
        .with_context(|| format!("{first:?}"))?;
    // Same backend order as before, so each backend's id moves by the
    // filler's.
    let sticky_weights: Vec<(&TestBackend, u32)> = sticky
        .iter()
        .map(|b| (b, u32::from(b.id() != chosen.id())))
        .collect();
    let old_ids = backend_ids(&agent, mesh_common::SCHEMA_VERSION)?;

    // The new agent: another layout, a service first in its config that
    // takes the smallest ids (so every id changes), and the backend this
    // client sticks to no longer gets new clients (weight 0): only the
    // carried affinity can send it there.
    agent.kill()?;
    agent.write_config(&format!(
        "services:\n{}{lc}{}",
        service("a-first", filler_vip, "", &[(&filler, 1)]),
        service("sticky", sticky_vip, affinity, &sticky_weights)
    ))?;
    let new_version = mesh_common::SCHEMA_VERSION + 1;
    agent.kill_and_restart(&["--schema-version", &new_version.to_string()])?;
    let new_ids = backend_ids(&agent, new_version)?;
    for b in least.iter().chain(&sticky) {
        assert_ne!(
            old_ids.get(&b.port()),
            new_ids.get(&b.port()),
            "ids must change for the test to prove their translation"
        );
    }
    assert!(
        !agent
            .bpffs()
            .join(format!("v{}", mesh_common::SCHEMA_VERSION))
            .exists(),
        "the old layout's pins are gone"
    );

    // (a) Sockets connected before the upgrade still see the VIP.
    let peers = held.peers_now()?;
    assert_eq!(
        peers.peers,
        BTreeMap::from([(lc_vip.to_string(), 6)]),
        "getpeername after the upgrade"
    );
    // (b) The new MESH_ACTIVE counts exactly the held connections...
    assert_eq!(
        live_by_port(&agent, "least")?,
        held_per_port,
        "live counts after the upgrade"
    );
    // (c) ...and the client keeps its backend.
    let after = run_probe(&cgroup, sticky_vip, 20)?;
    assert_eq!(
        after.id_count(chosen.id()),
        20,
        "affinity after the upgrade: {after:?}"
    );

    // Closing the held connections brings the counts to zero.
    drop(held);
    let zero = least.iter().map(|b| (b.port(), 0)).collect();
    assert_eq!(
        wait_for_live(&agent, "least", &zero)?,
        zero,
        "every close uncounted once"
    );
    assert!(
        agent.log().contains("migrated: carried socket state"),
        "{}",
        agent.log()
    );
    Ok(())
}
