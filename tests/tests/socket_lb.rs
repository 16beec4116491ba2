//! The complete socket load balancer, hook by hook and algorithm by
//! algorithm, each test in its own cgroup with its own agent.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use mesh_tests::{
    Agent, TestBackend, TestCgroup, UdpBackend, chi_square, chi_square_p_value, hold_connections,
    listener_on, run_probe, run_udp_probe,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A loopback IPv4 VIP unique to this test process.
fn vip4(last: u8, port: u16) -> SocketAddr {
    mesh_tests::loopback_vip(12, last, port)
}

/// IPv6 has one loopback address, so IPv6 VIPs differ by port.
fn vip6(offset: u16) -> SocketAddr {
    let port = 20_000 + (std::process::id() % 2_000) as u16 * 10 + offset;
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
}

fn host(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("'{}'", a.ip()),
    }
}

/// One service's YAML; `extra` adds service-level lines (4-space indent).
fn service(name: &str, vip: SocketAddr, extra: &str, backends: &[(SocketAddr, u32)]) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    vip: {}\n    port: {}\n{extra}    backends:\n",
        host(vip),
        vip.port()
    );
    for (addr, weight) in backends {
        yaml += &format!(
            "      - {{address: {}, port: {}, weight: {weight}}}\n",
            host(*addr),
            addr.port()
        );
    }
    yaml
}

fn config(services: &[String]) -> String {
    format!("services:\n{}", services.concat())
}

fn p_value(observed: &[u64], weights: &[f64]) -> f64 {
    chi_square_p_value(chi_square(observed, weights), observed.len() as u32 - 1)
}

#[test]
fn ipv6_connect_and_getpeername_show_the_vip() -> Result<()> {
    let backends = [
        listener_on(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)), 1)?,
        listener_on(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)), 2)?,
    ];
    let cgroup = TestCgroup::new("v6")?;
    let vip = vip6(1);
    let pairs: Vec<_> = backends.iter().map(|b| (b.addr(), 1)).collect();
    let _agent = Agent::start(&config(&[service("web6", vip, "", &pairs)]), &cgroup)?;

    let result = run_probe(&cgroup, vip, 400)?;
    assert_eq!(result.ok, 400, "{result:?}");
    assert!(
        result.id_count(1) > 100 && result.id_count(2) > 100,
        "{result:?}"
    );
    assert_eq!(
        result.peers.get(&vip.to_string()),
        Some(&400),
        "{:?}",
        result.peers
    );
    Ok(())
}

#[test]
fn ipv4_mapped_ipv6_sockets_reach_ipv4_services() -> Result<()> {
    let backend = TestBackend::new(5)?;
    let cgroup = TestCgroup::new("mapped")?;
    let vip = vip4(1, 80);
    let _agent = Agent::start(
        &config(&[service("web", vip, "", &[(backend.addr(), 1)])]),
        &cgroup,
    )?;
    let SocketAddr::V4(v4) = vip else {
        unreachable!()
    };
    let mapped = SocketAddr::from((v4.ip().to_ipv6_mapped(), vip.port()));

    let result = run_probe(&cgroup, mapped, 20)?;
    assert_eq!(result.id_count(5), 20, "{result:?}");
    assert_eq!(
        result.peers.get(&mapped.to_string()),
        Some(&20),
        "{:?}",
        result.peers
    );
    Ok(())
}

#[test]
fn udp_unconnected_is_balanced_per_socket_and_replies_come_from_the_vip() -> Result<()> {
    let backends = [
        UdpBackend::new(1)?,
        UdpBackend::new(2)?,
        UdpBackend::new(3)?,
    ];
    let cgroup = TestCgroup::new("udp")?;
    let vip = vip4(2, 53);
    let weights = [1u32, 2, 7];
    let pairs: Vec<_> = backends.iter().map(|b| b.addr()).zip(weights).collect();
    let agent = Agent::start(
        &config(&[service("dns", vip, "    protocol: udp\n", &pairs)]),
        &cgroup,
    )?;

    // 600 sockets, 5 datagrams each: every socket sticks to one backend.
    let result = run_udp_probe(&cgroup, vip, 600, 5, false)?;
    assert_eq!(result.ok, 3000, "{result:?}");
    assert_eq!(result.sticky_sockets, 600, "{result:?}");
    assert_eq!(
        result.sources.get(&vip.to_string()),
        Some(&3000),
        "{:?}",
        result.sources
    );
    let per_socket: Vec<u64> = (1..=3).map(|id| result.id_count(id) / 5).collect();
    let p = p_value(&per_socket, &weights.map(f64::from));
    assert!(p > 0.001, "split {per_socket:?} (p {p:.5})");

    let services = agent.meshctl_json(&["services"])?;
    assert_eq!(services["services"][0]["udp_flows"], Value::from(600u64));
    Ok(())
}

/// Connected (connect4/6 + getpeername + recvmsg) and unconnected
/// (sendmsg + recvmsg) UDP, over both families.
#[test]
fn udp_sockets_of_both_families_see_the_vip_as_peer_and_source() -> Result<()> {
    let v4 = UdpBackend::new(4)?;
    let v6 = UdpBackend::on(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)), 6)?;
    let cgroup = TestCgroup::new("udpconn")?;
    let (vip_v4, vip_v6) = (vip4(9, 53), vip6(2));
    let udp = "    protocol: udp\n";
    let _agent = Agent::start(
        &config(&[
            service("dns4", vip_v4, udp, &[(v4.addr(), 1)]),
            service("dns6", vip_v6, udp, &[(v6.addr(), 1)]),
        ]),
        &cgroup,
    )?;
    for (vip, id) in [(vip_v4, 4), (vip_v6, 6)] {
        let connected = run_udp_probe(&cgroup, vip, 20, 3, true)?;
        assert_eq!(connected.id_count(id), 60, "{connected:?}");
        assert_eq!(
            connected.peers.get(&vip.to_string()),
            Some(&20),
            "{connected:?}"
        );
        assert_eq!(
            connected.sources.get(&vip.to_string()),
            Some(&60),
            "{connected:?}"
        );

        let unconnected = run_udp_probe(&cgroup, vip, 20, 3, false)?;
        assert_eq!(unconnected.id_count(id), 60, "{unconnected:?}");
        assert_eq!(
            unconnected.sources.get(&vip.to_string()),
            Some(&60),
            "{unconnected:?}"
        );
    }
    Ok(())
}

#[test]
fn tcp_and_udp_share_one_vip_and_port() -> Result<()> {
    let tcp = TestBackend::new(1)?;
    // The UDP backend answers on the same port number over UDP.
    let udp = UdpBackend::on(tcp.addr(), 2)?;
    let cgroup = TestCgroup::new("both")?;
    let vip = vip4(3, 53);
    let _agent = Agent::start(
        &config(&[service(
            "dns",
            vip,
            "    protocol: both\n",
            &[(tcp.addr(), 1)],
        )]),
        &cgroup,
    )?;
    assert_eq!(run_probe(&cgroup, vip, 10)?.id_count(1), 10);
    assert_eq!(run_udp_probe(&cgroup, vip, 10, 1, false)?.id_count(2), 10);
    assert_eq!(udp.received(), 10);
    Ok(())
}

#[test]
fn maglev_keeps_clients_on_their_backend_when_one_of_ten_is_removed() -> Result<()> {
    let backends: Vec<TestBackend> = (1..=10).map(TestBackend::new).collect::<Result<_>>()?;
    let vip = vip4(4, 80);
    let all: Vec<_> = backends.iter().map(|b| (b.addr(), 1)).collect();
    // 200 clients, each its own cgroup below the one the agent attaches to
    // (host-network clients are told apart by cgroup). About 1% of clients
    // are expected to move, so 5% leaves a wide margin.
    let parent = TestCgroup::new("maglev")?;
    let children: Vec<TestCgroup> = (0..200)
        .map(|i| parent.child(&format!("client{i}")))
        .collect::<Result<_>>()?;
    let maglev = "    algorithm: maglev\n";
    let agent = Agent::start(&config(&[service("web", vip, maglev, &all)]), &parent)?;

    let backend_of = |cg: &TestCgroup| -> Result<u32> {
        let r = run_probe(cg, vip, 3)?;
        anyhow::ensure!(
            r.ids.len() == 1 && r.ok == 3,
            "one client, one backend: {r:?}"
        );
        Ok(r.ids.keys().next().unwrap().parse()?)
    };
    let before: Vec<u32> = children.iter().map(backend_of).collect::<Result<_>>()?;
    let distinct: std::collections::BTreeSet<_> = before.iter().collect();
    assert!(
        distinct.len() >= 8,
        "clients spread over backends: {before:?}"
    );

    agent.write_config(&config(&[service("web", vip, maglev, &all[1..])]))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;
    let after: Vec<u32> = children.iter().map(backend_of).collect::<Result<_>>()?;

    let survivors: Vec<(u32, u32)> = before
        .iter()
        .copied()
        .zip(after.iter().copied())
        .filter(|&(b, _)| b != 1)
        .collect();
    let kept = survivors.iter().filter(|(b, a)| b == a).count();
    let ratio = kept as f64 / survivors.len() as f64;
    assert!(
        ratio >= 0.95,
        "only {kept}/{} clients kept their backend",
        survivors.len()
    );
    assert!(
        after.iter().all(|&b| b != 1),
        "nobody reaches the removed backend"
    );
    Ok(())
}

#[test]
fn least_conn_sends_new_connections_to_the_backend_with_fewest_live_ones() -> Result<()> {
    let a = TestBackend::new(1)?;
    let b = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("leastconn")?;
    let vip = vip4(5, 80);
    let lc = "    algorithm: least-conn\n";
    let agent = Agent::start(
        &config(&[service("web", vip, lc, &[(a.addr(), 1), (b.addr(), 0)])]),
        &cgroup,
    )?;

    // 20 connections held open on A.
    let held = hold_connections(&cgroup, vip, 20)?;
    assert_eq!(held.result.ids.get("1"), Some(&20), "{:?}", held.result);
    let live_on = |agent: &Agent, i: usize| -> Result<u64> {
        let s = agent.meshctl_json(&["services"])?;
        Ok(s["services"][0]["backends"][i]["active"]
            .as_u64()
            .unwrap_or(u64::MAX))
    };
    assert_eq!(
        live_on(&agent, 0)?,
        20,
        "the kernel counts the held connections"
    );

    agent.write_config(&config(&[service(
        "web",
        vip,
        lc,
        &[(a.addr(), 1), (b.addr(), 1)],
    )]))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;
    let result = run_probe(&cgroup, vip, 50)?;
    assert_eq!(
        result.id_count(2),
        50,
        "all new connections go to B: {result:?}"
    );

    // Closing the held connections brings A's count back to zero.
    drop(held);
    let deadline = std::time::Instant::now() + WAIT;
    while live_on(&agent, 0)? != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "live count never dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        live_on(&agent, 1)?,
        0,
        "B's short connections are all closed"
    );
    Ok(())
}

#[test]
fn affinity_holds_within_the_timeout_and_expires_after_it() -> Result<()> {
    let backends: Vec<TestBackend> = (1..=4).map(TestBackend::new).collect::<Result<_>>()?;
    let pairs: Vec<_> = backends.iter().map(|b| (b.addr(), 1)).collect();
    let parent = TestCgroup::new("affinity")?;
    let clients = [parent.child("a")?, parent.child("b")?];
    let vip = vip4(6, 80);
    let aff = "    affinity: true\n    affinity_timeout_seconds: 1\n";
    let agent = Agent::start(&config(&[service("web", vip, aff, &pairs)]), &parent)?;

    for client in &clients {
        let r = run_probe(client, vip, 30)?;
        assert_eq!(r.ok, 30);
        assert_eq!(r.ids.len(), 1, "one client keeps one backend: {r:?}");
    }
    let events = agent.meshctl_json(&["events", "--limit", "100"])?;
    let hits = |events: &Value| -> Vec<bool> {
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["affinity_hit"].as_bool().unwrap())
            .collect()
    };
    let first = hits(&events);
    assert_eq!(first.len(), 60);
    assert_eq!(
        first.iter().filter(|h| !**h).count(),
        2,
        "one miss per client"
    );

    // After the timeout the next connect is a fresh choice, then sticks again.
    std::thread::sleep(Duration::from_millis(1500));
    run_probe(&clients[0], vip, 5)?;
    let events = agent.meshctl_json(&["events", "--limit", "5"])?;
    assert_eq!(hits(&events), [false, true, true, true, true]);
    Ok(())
}

#[test]
fn draining_backends_get_no_new_connections_while_old_ones_continue() -> Result<()> {
    let a = TestBackend::new(1)?;
    let b = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("drain")?;
    let vip = vip4(7, 80);
    let both = |a_state: &str| {
        format!(
            "services:\n  - name: web\n    vip: {}\n    port: 80\n    backends:\n      - {{address: 127.0.0.1, port: {}, state: {a_state}}}\n      - {{address: 127.0.0.1, port: {}}}\n",
            vip.ip(),
            a.port(),
            b.port()
        )
    };
    let agent = Agent::start(&both("active"), &cgroup)?;
    let held = hold_connections(&cgroup, vip, 20)?;
    let held_on_a = held.result.id_count(1);
    assert!(held_on_a > 0, "{:?}", held.result);

    agent.write_config(&both("draining"))?;
    agent.sighup()?;
    agent.wait_for_generation(2, WAIT)?;
    let result = run_probe(&cgroup, vip, 100)?;
    assert_eq!(
        result.id_count(2),
        100,
        "no new connection to the draining backend"
    );

    let services = agent.meshctl_json(&["services"])?;
    let a_view = &services["services"][0]["backends"][0];
    assert_eq!(a_view["state"], "draining");
    assert_eq!(
        a_view["active"],
        Value::from(held_on_a),
        "its connections live on: {a_view}"
    );
    Ok(())
}

#[test]
fn policy_denies_with_eperm_allows_by_identity_and_counts_both() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let parent = TestCgroup::new("policy")?;
    let frontend = parent.child("frontend")?;
    let frontend_container = frontend.child("container")?;
    let batch = parent.child("batch")?;
    let stranger = parent.child("stranger")?;
    let vip = vip4(8, 80);
    let yaml = format!(
        "workloads:\n  - {{name: frontend, cgroup: {}}}\n  - {{name: batch, cgroup: {}}}\n{}",
        frontend.path().display(),
        batch.path().display(),
        config(&[service(
            "web",
            vip,
            "    policy:\n      default: deny\n      allow: [frontend]\n",
            &[(backend.addr(), 1)],
        )])
    );
    let agent = Agent::start(&yaml, &parent)?;

    assert_eq!(run_probe(&frontend, vip, 10)?.id_count(1), 10);
    assert_eq!(
        run_probe(&frontend_container, vip, 10)?.id_count(1),
        10,
        "a pod's containers share its identity"
    );
    for denied in [&batch, &stranger] {
        let r = run_probe(denied, vip, 10)?;
        assert_eq!(r.errors.get("EPERM"), Some(&10), "{r:?}");
    }
    assert_eq!(backend.accepted(), 20);

    let services = agent.meshctl_json(&["services"])?;
    assert_eq!(services["services"][0]["connections"], Value::from(20u64));
    assert_eq!(services["services"][0]["denied"], Value::from(20u64));
    let events = agent.meshctl_json(&["events", "--limit", "50"])?;
    let mut verdicts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for e in events["events"].as_array().unwrap() {
        let identity = e["identity"].as_str().unwrap_or("-").to_owned();
        *verdicts
            .entry((identity, e["verdict"].as_str().unwrap().to_owned()))
            .or_default() += 1;
    }
    assert_eq!(
        verdicts.get(&("frontend".into(), "forwarded".into())),
        Some(&20),
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.get(&("batch".into(), "denied".into())),
        Some(&10),
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.get(&("-".into(), "denied".into())),
        Some(&10),
        "{verdicts:?}"
    );
    Ok(())
}

/// A closed TCP socket takes its reverse translation with it: left to the
/// LRU, dead entries would fill MESH_REV_NAT and make every later connect
/// pay for an eviction.
#[test]
fn closed_connections_leave_no_reverse_translation_behind() -> Result<()> {
    let backends = [TestBackend::new(1)?, TestBackend::new(2)?];
    let cgroup = TestCgroup::new("revnat")?;
    let vip = vip4(10, 80);
    let pairs: Vec<_> = backends.iter().map(|b| (b.addr(), 1)).collect();
    let agent = Agent::start(&config(&[service("web", vip, "", &pairs)]), &cgroup)?;

    let result = run_probe(&cgroup, vip, 300)?;
    assert_eq!(result.ok, 300, "{result:?}");
    // While open, every socket's peer was the VIP: the entries were there.
    assert_eq!(result.peers.get(&vip.to_string()), Some(&300), "{result:?}");

    let maps = mesh_agent::bpf::Maps::from_pins(
        &agent
            .bpffs()
            .join(format!("v{}/maps", mesh_common::SCHEMA_VERSION)),
    )?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = maps.rev_nat.keys().count();
        if left == 0 {
            return Ok(());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} reverse translations of closed sockets are still in MESH_REV_NAT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
