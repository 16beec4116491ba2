//! Same-node redirect end to end: the real agent attaches sock_ops + sk_msg
//! to a test cgroup; real clients and servers in that cgroup (and in test
//! network namespaces, so the interface counters read are the test's own)
//! move data, and every byte is checked.
//!
//! Proof that redirection happens: the kernel's counters move AND the
//! namespace's own `lo` (or veth) carries no payload while the data still
//! arrives; with the switch off the same run puts the payload on `lo`.

use std::time::Duration;

use anyhow::Result;
use mesh_tests::{
    Agent, BulkReport, BulkServer, TestCgroup, TestNetns, link_bytes, run_bulk, veth_pair,
};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(40);
const MIB: u64 = 1 << 20;

fn counters(agent: &Agent) -> Result<Value> {
    agent.meshctl_json(&["redirect"])
}

fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap_or(u64::MAX)
}

fn switch(agent: &Agent, on: bool) -> Result<()> {
    let v = agent.meshctl_json(&["redirect", if on { "on" } else { "off" }])?;
    assert_eq!(v["enabled"], Value::from(on), "{v}");
    Ok(())
}

fn assert_ok(r: &BulkReport) {
    assert!(r.ok, "{}: {:?}", r.scenario, r.errors);
}

/// Observations that must not depend on the switch (EAGAIN retries do: see
/// `mesh_tests::bulk::Patient`).
fn semantics(r: &BulkReport) -> Vec<(String, String)> {
    r.observed
        .iter()
        .filter(|(k, _)| k.as_str() != "eagain_retries")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn redirected_payload_skips_loopback_and_the_switch_turns_it_off_at_runtime() -> Result<()> {
    let cgroup = TestCgroup::new("redir-lo")?;
    let ns = TestNetns::new("redir-lo")?;
    let agent = Agent::start("services: []\n", &cgroup)?;
    let bytes = 256 * MIB;
    let args = ["local", "--scenario", "bulk", "--bytes", "268435456"];

    let before = counters(&agent)?;
    assert_eq!(
        before["enabled"],
        Value::from(true),
        "on by default: {before}"
    );
    let (_, tx0) = link_bytes(Some(&ns), "lo")?;
    let r = run_bulk(&cgroup, Some(&ns), &args, LIMIT)?;
    assert_ok(&r);
    let (_, tx1) = link_bytes(Some(&ns), "lo")?;
    let after = counters(&agent)?;
    // Only the handshake and FIN packets cross lo, never the payload.
    assert!(
        tx1 - tx0 < MIB,
        "lo carried {} bytes for a {bytes}-byte redirected transfer",
        tx1 - tx0
    );
    assert!(counter(&after, "bytes_redirected") - counter(&before, "bytes_redirected") >= bytes);
    assert!(counter(&after, "sockets_added") >= 2, "{after}");

    // The kernel removes closed sockets from the sockhash by itself.
    assert_eq!(after["sockets_in_map"], Value::from(0u64), "{after}");

    // Switched off at runtime: the same transfer goes over lo.
    switch(&agent, false)?;
    let r = run_bulk(&cgroup, Some(&ns), &args, LIMIT)?;
    assert_ok(&r);
    let (_, tx2) = link_bytes(Some(&ns), "lo")?;
    let off = counters(&agent)?;
    assert!(tx2 - tx1 >= bytes, "lo carried only {} bytes", tx2 - tx1);
    assert_eq!(
        counter(&off, "bytes_redirected"),
        counter(&after, "bytes_redirected"),
        "{off}"
    );

    // And back on, without restarting or re-attaching anything.
    switch(&agent, true)?;
    let r = run_bulk(&cgroup, Some(&ns), &args, LIMIT)?;
    assert_ok(&r);
    let (_, tx3) = link_bytes(Some(&ns), "lo")?;
    assert!(tx3 - tx2 < MIB, "lo carried {} bytes", tx3 - tx2);

    // The table form names the counters too.
    let out = agent.meshctl(&["redirect"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("redirected msgs / bytes") && text.contains("enabled"),
        "{text}"
    );
    Ok(())
}

#[test]
fn every_application_pattern_is_byte_exact_with_redirect_on_and_off() -> Result<()> {
    let cgroup = TestCgroup::new("redir-exact")?;
    let ns = TestNetns::new("redir-exact")?;
    let agent = Agent::start("services: []\n", &cgroup)?;
    let cases: &[(&str, &str)] = &[
        ("echo", "127.0.0.1:0"),
        ("echo", "[::1]:0"),
        ("writev", "127.0.0.1:0"),
        ("sendfile", "127.0.0.1:0"),
        ("splice-tx", "127.0.0.1:0"),
        ("peek", "127.0.0.1:0"),
        ("half-close", "127.0.0.1:0"),
        ("half-close", "[::1]:0"),
        ("rst", "127.0.0.1:0"),
        ("rst", "[::1]:0"),
    ];
    let mut on_reports = Vec::new();
    for (scenario, bind) in cases {
        let before = counter(&counters(&agent)?, "bytes_redirected");
        let args = ["local", "--scenario", scenario, "--bind", bind];
        let r = run_bulk(&cgroup, Some(&ns), &args, LIMIT)?;
        assert_ok(&r);
        let moved = counter(&counters(&agent)?, "bytes_redirected") - before;
        assert!(
            moved >= r.bytes,
            "{scenario} on {bind}: {moved} bytes redirected of {}",
            r.bytes
        );
        on_reports.push(r);
    }
    switch(&agent, false)?;
    for ((scenario, bind), on) in cases.iter().zip(&on_reports) {
        let args = ["local", "--scenario", scenario, "--bind", bind];
        let off = run_bulk(&cgroup, Some(&ns), &args, LIMIT)?;
        assert_ok(&off);
        assert_eq!(
            semantics(on),
            semantics(&off),
            "{scenario} on {bind}: what the application saw differs between redirect on and off"
        );
    }
    Ok(())
}

#[test]
fn thousands_of_concurrent_epoll_connections_and_gibibytes_stay_exact() -> Result<()> {
    let cgroup = TestCgroup::new("redir-many")?;
    let agent = Agent::start("services: []\n", &cgroup)?;
    let conns = 3000u64;
    let r = run_bulk(
        &cgroup,
        None,
        &[
            "local",
            "--scenario",
            "epoll",
            "--conns",
            &conns.to_string(),
        ],
        LIMIT,
    )?;
    assert_ok(&r);
    let c = counters(&agent)?;
    assert!(counter(&c, "sockets_added") >= 2 * conns, "{c}");
    assert!(counter(&c, "bytes_redirected") >= r.bytes, "{c}");

    // Several GiB through one redirected connection, checked against a
    // pattern with a prime period.
    let bytes = 3u64 << 30;
    let r = run_bulk(
        &cgroup,
        None,
        &["local", "--scenario", "bulk", "--bytes", &bytes.to_string()],
        LIMIT,
    )?;
    assert_ok(&r);
    assert_eq!(r.bytes, bytes);
    let c2 = counters(&agent)?;
    assert!(counter(&c2, "bytes_redirected") - counter(&c, "bytes_redirected") >= bytes);
    assert_eq!(c2["sockets_in_map"], Value::from(0u64), "{c2}");
    Ok(())
}

/// Two "pods" in their own namespaces joined by a veth, as a node's pods are.
struct Pods {
    a: TestNetns,
    b: TestNetns,
    addr_a: String,
    addr_b: String,
}

fn pods(hint: &str) -> Result<Pods> {
    let a = TestNetns::new(&format!("{hint}-a"))?;
    let b = TestNetns::new(&format!("{hint}-b"))?;
    let net = std::process::id() % 250 + 1;
    let (addr_a, addr_b) = (format!("10.251.{net}.1"), format!("10.251.{net}.2"));
    veth_pair(&a, "mesh0", &addr_a, &b, "mesh1", &addr_b)?;
    Ok(Pods {
        a,
        b,
        addr_a,
        addr_b,
    })
}

/// Server in pod b, client in pod a; returns (client report, veth tx bytes of a).
fn transfer(cgroup: &TestCgroup, p: &Pods, bytes: u64) -> Result<(BulkReport, u64)> {
    let server = BulkServer::start(
        cgroup,
        Some(&p.b),
        &["--scenario", "bulk", "--bind", &format!("{}:0", p.addr_b)],
    )?;
    let (_, tx0) = link_bytes(Some(&p.a), "mesh0")?;
    let r = run_bulk(
        cgroup,
        Some(&p.a),
        &[
            "client",
            "--scenario",
            "bulk",
            "--target",
            &server.addr,
            "--bytes",
            &bytes.to_string(),
        ],
        LIMIT,
    )?;
    let (_, tx1) = link_bytes(Some(&p.a), "mesh0")?;
    server.finish(LIMIT)?;
    Ok((r, tx1 - tx0))
}

#[test]
fn pod_to_pod_is_redirected_and_an_off_node_peer_takes_the_normal_path() -> Result<()> {
    let cgroup = TestCgroup::new("redir-pods")?;
    let p = pods("redir")?;
    let bytes = 64 * MIB;

    // Both pods declared local: bytes skip the veth entirely.
    {
        let agent = Agent::start_with(
            "services: []\n",
            &cgroup,
            &["--local-address", &p.addr_a, "--local-address", &p.addr_b],
        )?;
        let (r, veth) = transfer(&cgroup, &p, bytes)?;
        assert_ok(&r);
        assert!(
            veth < MIB,
            "veth carried {veth} bytes of a redirected transfer"
        );
        let c = counters(&agent)?;
        assert!(counter(&c, "bytes_redirected") >= bytes, "{c}");
    }

    // Only pod a is on this node; b stands for another node: the normal
    // path carries every byte, and nothing is redirected.
    let agent = Agent::start_with("services: []\n", &cgroup, &["--local-address", &p.addr_a])?;
    let (r, veth) = transfer(&cgroup, &p, bytes)?;
    assert_ok(&r);
    assert!(veth >= bytes, "veth carried only {veth} bytes");
    let c = counters(&agent)?;
    assert_eq!(counter(&c, "bytes_redirected"), 0, "{c}");
    assert_eq!(counter(&c, "sockets_added"), 0, "{c}");
    assert!(counter(&c, "sockets_skipped") >= 2, "{c}");
    Ok(())
}

#[test]
fn the_agent_flag_starts_with_redirect_off() -> Result<()> {
    let cgroup = TestCgroup::new("redir-flag")?;
    let ns = TestNetns::new("redir-flag")?;
    let agent = Agent::start_with("services: []\n", &cgroup, &["--same-node-redirect", "off"])?;
    let c = counters(&agent)?;
    assert_eq!(c["enabled"], Value::from(false), "{c}");
    let (_, tx0) = link_bytes(Some(&ns), "lo")?;
    let r = run_bulk(&cgroup, Some(&ns), &["local", "--scenario", "echo"], LIMIT)?;
    assert_ok(&r);
    let (_, tx1) = link_bytes(Some(&ns), "lo")?;
    assert!(tx1 - tx0 >= 2 * r.bytes, "lo carried {} bytes", tx1 - tx0);
    let c = counters(&agent)?;
    assert_eq!(counter(&c, "sockets_added"), 0, "{c}");
    assert_eq!(counter(&c, "bytes_redirected"), 0, "{c}");
    Ok(())
}
