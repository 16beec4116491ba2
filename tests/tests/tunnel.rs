//! The cross-node mTLS tunnel end to end: three namespace nodes, an agent
//! each, a client on one reaching a backend on another through the VIP.

use std::time::Duration;

use anyhow::Result;
use mesh_tests::{BulkReport, BulkServer, Cluster, run_bulk};

const LIMIT: Duration = Duration::from_secs(60);

/// One service, VIP on loopback, its only backend `backend` on `node`.
fn service_yaml(mtls: &str, backend: &str, node: &str) -> String {
    format!(
        "services:\n  - name: web\n    vip: 127.77.0.1\n    port: 80\n    mtls: {mtls}\n    backends:\n      - address: {backend}\n        port: 9000\n        node: {node}\n"
    )
}

fn assert_ok(r: &BulkReport) {
    assert!(r.ok, "{} failed: {:?}", r.scenario, r.errors);
}

#[test]
fn a_client_reaches_a_backend_on_another_node_through_the_tunnel() -> Result<()> {
    let mut cluster = Cluster::new(3)?;
    let backend = cluster.nodes[1].ip4.to_string();
    cluster.start_agents(&service_yaml("strict", &backend, "node-b"), &[])?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let server = BulkServer::start(
        &b.cgroup,
        Some(&b.netns),
        &["--scenario", "echo", "--bind", &format!("{backend}:9000")],
    )?;
    let r = run_bulk(
        &a.cgroup,
        Some(&a.netns),
        &["client", "--scenario", "echo", "--target", "127.77.0.1:80"],
        LIMIT,
    )?;
    assert_ok(&r);
    assert_ok(&server.finish(LIMIT)?);
    let services = a.agent().meshctl_json(&["services"])?;
    let web = &services["services"][0];
    assert!(web["tunnelled"].as_u64() >= Some(1), "{web}");
    Ok(())
}
