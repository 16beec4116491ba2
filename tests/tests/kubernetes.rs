//! The Kubernetes source end to end: the agent (`--source=kubernetes`)
//! watches the test API server (`mesh_tests::kube_api`, proven against
//! kubectl in kube_api.rs), and what the API says reaches the kernel's maps,
//! read here straight from the pins.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_agent::bpf::Maps;
use mesh_agent::reconcile::{ip_from_words, ip_to_words};
use mesh_common::{PROTO_TCP, SCHEMA_VERSION, ServiceKey};
use mesh_tests::kube_api::KubeApi;
use mesh_tests::{Agent, TestBackend, TestCgroup, cluster::metric, run_probe};

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(20);

fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        ..Default::default()
    }
}

fn node(name: &str, zone: &str, address: &str) -> Node {
    Node {
        metadata: meta(None, name, &[("topology.kubernetes.io/zone", zone)]),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: address.into(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A ClusterIP Service named `name` in `default`, port 80 → "http".
fn service(name: &str, cluster_ips: &[IpAddr]) -> Service {
    let families = cluster_ips
        .iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" }.to_owned())
        .collect();
    Service {
        metadata: meta(Some("default"), name, &[]),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ips[0].to_string()),
            cluster_ips: Some(cluster_ips.iter().map(ToString::to_string).collect()),
            ip_families: Some(families),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An endpoint's conditions: (ready, serving, terminating).
type Conditions = (bool, bool, bool);
const READY: Conditions = (true, true, false);
const TERMINATING_SERVING: Conditions = (false, true, true);

/// One slice of `service` (named port "http" at `port`), endpoints on `NODE`.
fn slice(
    service: &str,
    name: &str,
    port: u16,
    endpoints: &[(IpAddr, Conditions)],
) -> EndpointSlice {
    slice_on(NODE, service, name, port, endpoints)
}

/// One slice of `service`, endpoints on `node`.
fn slice_on(
    node: &str,
    service: &str,
    name: &str,
    port: u16,
    endpoints: &[(IpAddr, Conditions)],
) -> EndpointSlice {
    let family = match endpoints.first().map(|(ip, _)| ip.is_ipv4()) {
        Some(false) => "IPv6",
        _ => "IPv4",
    };
    EndpointSlice {
        metadata: meta(
            Some("default"),
            name,
            &[("kubernetes.io/service-name", service)],
        ),
        address_type: family.into(),
        endpoints: endpoints
            .iter()
            .map(|(ip, (ready, serving, terminating))| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    serving: Some(*serving),
                    terminating: Some(*terminating),
                }),
                node_name: Some(node.into()),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(port.into()),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

fn start_agent(api: &KubeApi, cgroup: &TestCgroup, dir: &Path) -> Result<Agent> {
    start_agent_with(api, cgroup, dir, &[])
}

fn start_agent_with(
    api: &KubeApi,
    cgroup: &TestCgroup,
    dir: &Path,
    extra: &[&str],
) -> Result<Agent> {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let kubeconfig = format!("--kubeconfig={}", kubeconfig.display());
    let node = format!("--node-name={NODE}");
    let mut args = vec![
        "--source=kubernetes",
        &kubeconfig,
        &node,
        "--node-refresh-seconds=1",
    ];
    args.extend(extra);
    Agent::start_with("services: []\n", cgroup, &args)
}

/// The backends a connect to `vip:port` can be given now, read from the
/// pinned maps: the slots of the service's live generation.
fn kernel_backends(bpffs: &Path, vip: IpAddr, port: u16) -> Result<BTreeSet<SocketAddr>> {
    let maps = Maps::from_pins(&bpffs.join(format!("v{SCHEMA_VERSION}/maps")))?;
    let (addr, family) = ip_to_words(vip);
    let key = ServiceKey {
        addr,
        port: port.to_be(),
        proto: PROTO_TCP,
        family,
    };
    // The agent may flip generations while this reads: read again until
    // the generation held still.
    for _ in 0..100 {
        let Ok(before) = maps.services.get(&key, 0) else {
            return Ok(BTreeSet::new());
        };
        let mut out = BTreeSet::new();
        let mut torn = false;
        for slot in 0..before.slot_count {
            let slot_key = mesh_common::SlotKey {
                service_id: before.service_id,
                generation: before.generation,
                slot,
            };
            // A miss means the generation moved on (its slots, or backends
            // removed with it, are being deleted): read again.
            match maps
                .slots
                .get(&slot_key, 0)
                .and_then(|id| maps.backends.get(&id, 0))
            {
                Ok(b) => {
                    out.insert(SocketAddr::new(
                        ip_from_words(b.family, b.addr),
                        u16::from_be(b.port),
                    ));
                }
                Err(_) => torn = true,
            }
        }
        if !torn && maps.services.get(&key, 0).ok() == Some(before) {
            return Ok(out);
        }
    }
    bail!("the service entry of {vip}:{port} kept changing while read")
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(format!("{e:#}")),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} (last error: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` of the agent's metrics server: the whole response.
fn http_get(agent: &Agent, path: &str) -> Result<String> {
    let status = agent.status()?;
    let addr = status["metrics_addr"]
        .as_str()
        .context("no metrics_addr in status")?;
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    Ok(text)
}

fn scrape(agent: &Agent) -> Result<String> {
    http_get(agent, "/metrics")
}

/// Kernel writes so far (applies that reached the maps).
fn kernel_writes(agent: &Agent) -> Result<u64> {
    Ok(metric(
        &scrape(agent)?,
        "mesh_reconcile_duration_seconds_count",
        &[],
    ))
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[test]
fn services_and_endpoints_reach_the_kernel_terminating_ones_drain_and_a_resync_writes_nothing()
-> Result<()> {
    let api = KubeApi::start()?;
    let dir = tempdir("k8s-e2e")?;
    let one = TestBackend::new(1)?;
    let two = TestBackend::new(2)?;
    // Both backends listen on 127.0.0.1: give them distinct addresses by
    // port only, as the API allows one port per slice per name: two slices.
    let vip = IpAddr::from([127, 0, 18, 1]);
    api.apply(&node(NODE, "zone-a", "127.0.0.1"));
    api.apply(&service("web", &[vip]));
    api.apply(&slice("web", "web-1", one.port(), &[(loopback(1), READY)]));
    api.apply(&slice("web", "web-2", two.port(), &[(loopback(1), READY)]));
    let cgroup = TestCgroup::new("k8s-e2e")?;
    let mut agent = start_agent(&api, &cgroup, &dir)?;

    let both: BTreeSet<SocketAddr> = [one.addr(), two.addr()].into();
    wait_for("both endpoints in the kernel", || {
        Ok((kernel_backends(agent.bpffs(), vip, 80)? == both).then_some(()))
    })?;
    let seen = run_probe(&cgroup, SocketAddr::new(vip, 80), 40)?;
    assert!(
        seen.id_count(1) > 0 && seen.id_count(2) > 0,
        "connections reach both endpoints: {seen:?}"
    );
    let services = agent.meshctl_json(&["services"])?;
    let web = services["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "default/web:80/tcp/ipv4"))
        .with_context(|| format!("no default/web:80/tcp/ipv4 in {services}"))?;
    assert_eq!(web["origin"]["namespace"], "default", "{web}");
    assert_eq!(web["origin"]["name"], "web", "{web}");

    // One endpoint terminates but still serves: it drains (no new
    // connections while the other is usable).
    api.apply(&slice(
        "web",
        "web-2",
        two.port(),
        &[(loopback(1), TERMINATING_SERVING)],
    ));
    wait_for("the terminating endpoint out of the slot table", || {
        Ok((kernel_backends(agent.bpffs(), vip, 80)? == [one.addr()].into()).then_some(()))
    })?;
    let seen = run_probe(&cgroup, SocketAddr::new(vip, 80), 20)?;
    assert_eq!(seen.id_count(1), 20, "only the ready endpoint: {seen:?}");
    // Each kind's events are timed to the kernel write they caused.
    let metrics = scrape(&agent)?;
    assert!(
        metric(
            &metrics,
            "mesh_kubernetes_event_to_kernel_seconds_count",
            &[("kind", "EndpointSlice")]
        ) > 0,
        "{metrics}"
    );
    // …and serves again once nothing else is left.
    api.delete::<EndpointSlice>(Some("default"), "web-1");
    wait_for("the terminating endpoint serving alone", || {
        Ok((kernel_backends(agent.bpffs(), vip, 80)? == [two.addr()].into()).then_some(()))
    })?;

    // A relist of identical objects (410 Gone after a broken watch)
    // writes nothing to the kernel.
    let writes = kernel_writes(&agent)?;
    let relists = metric(&scrape(&agent)?, "mesh_kubernetes_relists_total", &[]);
    // An object no watch sees moves the resourceVersion on, so the
    // watches' own versions fall behind the compaction and resuming them
    // gets 410 Gone.
    api.apply(&node("node-z", "zone-z", "127.0.0.1"));
    api.compact();
    api.break_watches();
    wait_for("a relist of every kind", || {
        let now = metric(&scrape(&agent)?, "mesh_kubernetes_relists_total", &[]);
        Ok((now >= relists + 3).then_some(()))
    })?;
    assert_eq!(
        kernel_writes(&agent)?,
        writes,
        "an identical resync writes nothing"
    );
    assert_eq!(
        kernel_backends(agent.bpffs(), vip, 80)?,
        [two.addr()].into()
    );

    // A Service deleted while no agent watches is removed by the next
    // agent's first apply (the pins held it), and nothing else is touched.
    api.apply(&service("other", &[IpAddr::from([127, 0, 18, 2])]));
    api.apply(&slice(
        "other",
        "other-1",
        one.port(),
        &[(loopback(1), READY)],
    ));
    let other = IpAddr::from([127, 0, 18, 2]);
    wait_for("the second service", || {
        Ok((kernel_backends(agent.bpffs(), other, 80)? == [one.addr()].into()).then_some(()))
    })?;
    agent.kill()?;
    api.delete::<Service>(Some("default"), "other");
    assert_eq!(
        kernel_backends(agent.bpffs(), other, 80)?,
        [one.addr()].into(),
        "the pinned maps keep serving while no agent runs"
    );
    agent.kill_and_restart(&[])?;
    wait_for("the deleted service gone from the kernel", || {
        Ok(kernel_backends(agent.bpffs(), other, 80)?
            .is_empty()
            .then_some(()))
    })?;
    assert_eq!(
        kernel_backends(agent.bpffs(), vip, 80)?,
        [two.addr()].into()
    );
    Ok(())
}

#[test]
fn prefer_same_node_fails_over_to_other_nodes_while_the_local_backend_is_unhealthy() -> Result<()> {
    let api = KubeApi::start()?;
    let dir = tempdir("k8s-topology")?;
    let local = TestBackend::new(1)?;
    let remote = TestBackend::new(2)?;
    let vip = IpAddr::from([127, 0, 18, 20]);
    api.apply(&node(NODE, "zone-a", "127.0.0.1"));
    api.apply(&node("node-b", "zone-b", "127.0.0.2"));
    let mut near = service("near", &[vip]);
    near.metadata.annotations = Some(
        [
            ("mesh.dev/health-check", "tcp"),
            ("mesh.dev/health-check-interval-ms", "100"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    );
    near.spec.as_mut().unwrap().traffic_distribution = Some("PreferSameNode".into());
    api.apply(&near);
    api.apply(&slice(
        "near",
        "near-a",
        local.port(),
        &[(loopback(1), READY)],
    ));
    api.apply(&slice_on(
        "node-b",
        "near",
        "near-b",
        remote.port(),
        &[(loopback(1), READY)],
    ));
    let cgroup = TestCgroup::new("k8s-topology")?;
    let agent = start_agent(&api, &cgroup, &dir)?;
    let target = SocketAddr::new(vip, 80);

    wait_for("only this node's backend in the slot table", || {
        Ok((kernel_backends(agent.bpffs(), vip, 80)? == [local.addr()].into()).then_some(()))
    })?;
    let seen = run_probe(&cgroup, target, 20)?;
    assert_eq!(seen.id_count(1), 20, "this node's backend first: {seen:?}");

    // This node's backend goes down: its health checks fail and the other
    // node's backend takes the connections.
    let local_addr = local.addr();
    drop(local);
    wait_for("the other node's backend in the slot table", || {
        Ok((kernel_backends(agent.bpffs(), vip, 80)? == [remote.addr()].into()).then_some(()))
    })?;
    let seen = run_probe(&cgroup, target, 20)?;
    assert_eq!(seen.id_count(2), 20, "failed over: {seen:?}");

    // It comes back: connections return to it.
    let _back = mesh_tests::backends::listener_on(local_addr, 1)?;
    wait_for("this node's backend back in front", || {
        Ok((kernel_backends(agent.bpffs(), vip, 80)? == [local_addr].into()).then_some(()))
    })?;
    Ok(())
}

#[test]
fn meshctl_diff_and_the_metric_find_a_frontend_the_kernel_lost() -> Result<()> {
    let api = KubeApi::start()?;
    let dir = tempdir("k8s-diff")?;
    let backend = TestBackend::new(1)?;
    let vip = IpAddr::from([127, 0, 18, 30]);
    api.apply(&node(NODE, "zone-a", "127.0.0.1"));
    api.apply(&service("lost", &[vip]));
    api.apply(&slice(
        "lost",
        "lost-1",
        backend.port(),
        &[(loopback(1), READY)],
    ));
    let cgroup = TestCgroup::new("k8s-diff")?;
    let agent = start_agent(&api, &cgroup, &dir)?;
    wait_for("the service in the kernel", || {
        Ok((kernel_backends(agent.bpffs(), vip, 80)? == [backend.addr()].into()).then_some(()))
    })?;
    let diff = agent.meshctl_json(&["diff"])?;
    assert_eq!(diff["source_compared"], true, "{diff}");
    assert_eq!(diff["disagreements"], serde_json::json!([]), "{diff}");

    // Something outside the agent removes the frontend from the kernel.
    let mut maps = Maps::from_pins(&agent.bpffs().join(format!("v{SCHEMA_VERSION}/maps")))?;
    let (addr, family) = ip_to_words(vip);
    maps.services.remove(&ServiceKey {
        addr,
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        family,
    })?;
    let diff = agent.meshctl_json(&["diff"])?;
    let found = diff["disagreements"]
        .as_array()
        .context("disagreements")?
        .iter()
        .find(|d| d["service"] == "default/lost:80/tcp/ipv4")
        .with_context(|| format!("no disagreement for the lost frontend in {diff}"))?;
    assert_eq!(found["layer"], "kernel", "{found}");
    assert!(
        found["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no entry in MESH_SERVICES")),
        "{found}"
    );
    let text = agent.meshctl(&["diff"])?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("default/lost:80/tcp/ipv4"), "{text}");
    let metrics = scrape(&agent)?;
    assert_eq!(
        metric(&metrics, "mesh_state_disagreements", &[("layer", "kernel")]),
        1,
        "{metrics}"
    );
    // It keeps standing, and its age grows.
    std::thread::sleep(Duration::from_millis(1100));
    let diff = agent.meshctl_json(&["diff"])?;
    assert!(
        diff["disagreements"][0]["age_ms"].as_u64() >= Some(1000),
        "{diff}"
    );
    Ok(())
}

#[test]
fn this_nodes_pods_become_workloads_and_their_ips_node_local() -> Result<()> {
    use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
    let api = KubeApi::start()?;
    let dir = tempdir("k8s-pods")?;
    api.apply(&node(NODE, "zone-a", "127.0.0.1"));
    // The kubelet's cgroups of one BestEffort pod (cgroupfs driver), under
    // a --cgroup-root of the test's own.
    let mount = mesh_tests::cgroup::cgroup2_mount()?;
    let root = TestCgroup::new("k8s-pods")?;
    let kubepods = root.child("kubepods")?;
    let besteffort = kubepods.child("besteffort")?;
    let uid = "4f6c1a2e-0b7d-4c3e-9a51-2d8e6f7a9b10";
    let pod_cgroup = besteffort.child(&format!("pod{uid}"))?;
    let kubelet_root = format!("/{}", root.path().strip_prefix(&mount)?.display());
    let pod_ip: IpAddr = "10.99.0.7".parse()?;
    let mut pod = Pod {
        metadata: meta(Some("shop"), "cart-1", &[]),
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            service_account_name: Some("cart".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            qos_class: Some("BestEffort".into()),
            pod_ip: Some(pod_ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: pod_ip.to_string(),
            }]),
            ..Default::default()
        }),
    };
    pod.metadata.uid = Some(uid.into());
    api.apply(&pod);
    let cgroup = TestCgroup::new("k8s-pods-agent")?;
    let agent = start_agent_with(
        &api,
        &cgroup,
        &dir,
        &[&format!("--kubelet-cgroup-root={kubelet_root}")],
    )?;
    // Which cgroups the kernel knows an identity of.
    let workloads = |agent: &Agent| -> Result<Vec<u64>> {
        let maps = Maps::from_pins(&agent.bpffs().join(format!("v{SCHEMA_VERSION}/maps")))?;
        Ok(maps.workloads.keys().filter_map(Result::ok).collect())
    };
    let local = |agent: &Agent| -> Result<bool> {
        let view = agent.meshctl_json(&["redirect"])?;
        Ok(view["local_addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a == &serde_json::json!(pod_ip))))
    };
    wait_for("the pod's cgroup registered and its IP node-local", || {
        Ok((workloads(&agent)? == [pod_cgroup.id()] && local(&agent)?).then_some(()))
    })?;

    // The pod goes: its identity and address go with it.
    api.delete::<Pod>(Some("shop"), "cart-1");
    wait_for("the pod's cgroup and IP gone", || {
        Ok((workloads(&agent)?.is_empty() && !local(&agent)?).then_some(()))
    })?;
    Ok(())
}

/// With the tunnel on, the agent also learns which node hosts which
/// service account, so a peer node's stream may claim exactly the
/// identities of its own pods (the destination's check, docs/SECURITY.md).
#[test]
fn with_the_tunnel_on_a_peer_node_may_claim_only_its_own_pods_identities() -> Result<()> {
    use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
    let api = KubeApi::start()?;
    let dir = tempdir("k8s-claims")?;
    let meshctl = |args: &[&str]| mesh_tests::cluster::meshctl(args);
    let ca = dir.join("ca");
    let identity = dir.join("identity");
    let path = |p: &Path| p.display().to_string();
    meshctl(&[
        "ca",
        "init",
        "--dir",
        &path(&ca),
        "--trust-domain",
        "cluster.local",
    ])?;
    meshctl(&[
        "ca",
        "issue",
        "--ca-dir",
        &path(&ca),
        "--node",
        NODE,
        "--out",
        &path(&identity),
    ])?;
    api.apply(&node(NODE, "zone-a", "127.0.0.1"));
    api.apply(&node("node-b", "zone-b", "127.0.0.2"));
    api.apply(&service("web", &[IpAddr::from([127, 0, 18, 40])]));
    let pod = |name: &str, on: &str, sa: &str| Pod {
        metadata: meta(Some("shop"), name, &[]),
        spec: Some(PodSpec {
            node_name: Some(on.into()),
            service_account_name: Some(sa.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        }),
    };
    api.apply(&pod("cart-1", "node-b", "cart"));
    let cgroup = TestCgroup::new("k8s-claims")?;
    // Tunnel ports of this test's own (it runs in the host's namespace).
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let agent = start_agent_with(
        &api,
        &cgroup,
        &dir,
        &[
            &format!("--identity-dir={}", identity.display()),
            &format!("--tunnel-outbound=127.0.0.1:{port}"),
            &format!("--tunnel-outbound6=[::1]:{port}"),
            &format!("--tunnel-inbound=127.0.0.1:{}", port + 1),
        ],
    )?;
    let claim = |node: &str| -> Result<serde_json::Value> {
        agent.meshctl_json(&[
            "authz",
            "check",
            "--from",
            "spiffe://cluster.local/ns/shop/sa/cart",
            "--to",
            "default/web:80/tcp/ipv4",
            "--node",
            node,
        ])
    };
    let believed =
        |node: &str| -> Result<bool> { Ok(claim(node)?["claim_from_node"]["believed"] == true) };
    wait_for("node-b's claim believed", || {
        Ok(believed("node-b")?.then_some(()))
    })?;
    assert!(
        !believed("node-c")?,
        "a node hosting no such pod: {}",
        claim("node-c")?
    );

    // The pod moves to node-c: node-b may no longer claim it.
    api.delete::<Pod>(Some("shop"), "cart-1");
    api.apply(&pod("cart-2", "node-c", "cart"));
    wait_for("node-c's claim believed", || {
        Ok(believed("node-c")?.then_some(()))
    })?;
    assert!(!believed("node-b")?, "{}", claim("node-b")?);
    Ok(())
}

/// A change the kernel cannot take (its maps are full) is refused with
/// what to do, the last good state keeps serving, and it is retried: once
/// it fits, it applies without anything else changing in the API.
#[test]
fn a_change_that_does_not_fit_is_refused_and_applies_once_it_fits() -> Result<()> {
    let api = KubeApi::start()?;
    let dir = tempdir("k8s-full")?;
    let backend = TestBackend::new(1)?;
    api.apply(&node(NODE, "zone-a", "127.0.0.1"));
    let vips: Vec<IpAddr> = (50..53).map(|i| IpAddr::from([127, 0, 18, i])).collect();
    for (i, vip) in vips.iter().enumerate().take(2) {
        api.apply(&service(&format!("s{i}"), &[*vip]));
        api.apply(&slice(
            &format!("s{i}"),
            &format!("s{i}-1"),
            backend.port(),
            &[(loopback(1), READY)],
        ));
    }
    let cgroup = TestCgroup::new("k8s-full")?;
    // Ids start at 1 and index arrays of the map's size: room for two.
    let agent = start_agent_with(&api, &cgroup, &dir, &["--max-services=3"])?;
    for vip in &vips[..2] {
        wait_for("the first two services", || {
            Ok(
                (kernel_backends(agent.bpffs(), *vip, 80)? == [backend.addr()].into())
                    .then_some(()),
            )
        })?;
    }
    // A third does not fit.
    api.apply(&service("s2", &[vips[2]]));
    let status = wait_for("the refusal", || {
        let status = agent.status()?;
        Ok(status["last_reload_error"].is_string().then_some(status))
    })?;
    let error = status["last_reload_error"].as_str().unwrap_or_default();
    assert!(error.contains("--max-services"), "says what to do: {error}");
    for vip in &vips[..2] {
        assert_eq!(
            kernel_backends(agent.bpffs(), *vip, 80)?,
            [backend.addr()].into()
        );
    }
    assert!(
        kernel_backends(agent.bpffs(), vips[2], 80)?.is_empty(),
        "nothing half-written"
    );
    // Room is made: the waiting change applies by itself.
    api.delete::<Service>(Some("default"), "s0");
    wait_for("the third service in, the first out", || {
        Ok((kernel_backends(agent.bpffs(), vips[0], 80)?.is_empty()
            && agent
                .meshctl_json(&["services"])?
                .to_string()
                .contains("default/s2:80/tcp/ipv4"))
        .then_some(()))
    })?;
    assert_eq!(
        kernel_backends(agent.bpffs(), vips[1], 80)?,
        [backend.addr()].into()
    );
    Ok(())
}

#[test]
fn readyz_fails_while_a_watch_is_broken_longer_than_the_limit() -> Result<()> {
    let api = KubeApi::start()?;
    let dir = tempdir("k8s-readyz")?;
    api.apply(&node(NODE, "zone-a", "127.0.0.1"));
    let cgroup = TestCgroup::new("k8s-readyz")?;
    let agent = start_agent_with(&api, &cgroup, &dir, &["--watch-stale-seconds=1"])?;
    wait_for("/readyz 200", || {
        Ok(http_get(&agent, "/readyz")?
            .starts_with("HTTP/1.1 200")
            .then_some(()))
    })?;
    // The API server goes away: every watch breaks and cannot come back.
    drop(api);
    let answer = wait_for("/readyz 503", || {
        let answer = http_get(&agent, "/readyz")?;
        Ok(answer.starts_with("HTTP/1.1 503").then_some(answer))
    })?;
    assert!(answer.contains("watch has been failing"), "{answer}");
    let metrics = scrape(&agent)?;
    assert!(
        metric(&metrics, "mesh_kubernetes_watch_errors_total", &[]) > 0,
        "broken watches are counted"
    );
    Ok(())
}

/// Endpoints 10.x (never connected to: the check reads the maps only).
fn endpoints(first: u32, count: u32, v6: bool) -> Vec<(IpAddr, Conditions)> {
    (first..first + count)
        .map(|i| {
            let ip = if v6 {
                IpAddr::from([0xfd00, 0, 0, 0, 0, 0, (i >> 16) as u16, i as u16])
            } else {
                IpAddr::from([10, 77, (i >> 8) as u8, i as u8])
            };
            (ip, READY)
        })
        .collect()
}

/// Cilium #26912: a restart once replaced a multi-slice service with a
/// partial set. Here a dual-stack service spread over three slices per
/// family (120 endpoints each) churns (endpoints move between slices, new
/// ones come, old ones go) while the agent is killed and restarted; at
/// every step the kernel holds at least every endpoint that was in the
/// API both before and after the step.
#[test]
fn a_restart_during_churn_never_leaves_the_kernel_with_fewer_backends_than_the_slices() -> Result<()>
{
    let api = KubeApi::start()?;
    let dir = tempdir("k8s-churn")?;
    let v4 = IpAddr::from([127, 0, 18, 10]);
    // No connection is made in this test; the IPv6 VIP is still loopback.
    let v6: IpAddr = "::1".parse()?;
    api.apply(&node(NODE, "zone-a", "127.0.0.1"));
    api.apply(&service("big", &[v4, v6]));
    // Three slices per family; `state` is what the API holds.
    let mut state: BTreeMap<String, Vec<(IpAddr, Conditions)>> = BTreeMap::new();
    for (family, v6) in [("v4", false), ("v6", true)] {
        for s in 0..3u32 {
            state.insert(format!("big-{family}-{s}"), endpoints(s * 40, 40, v6));
        }
    }
    let union = |state: &BTreeMap<String, Vec<(IpAddr, Conditions)>>, v6: bool| {
        state
            .values()
            .flatten()
            .filter(|(ip, _)| ip.is_ipv6() == v6)
            .map(|(ip, _)| SocketAddr::new(*ip, 8080))
            .collect::<BTreeSet<_>>()
    };
    for (name, eps) in &state {
        api.apply(&slice("big", name, 8080, eps));
    }
    let cgroup = TestCgroup::new("k8s-churn")?;
    let mut agent = start_agent(&api, &cgroup, &dir)?;
    for (vip, v6) in [(v4, false), (v6, true)] {
        let want = union(&state, v6);
        wait_for("the union of the slices", || {
            Ok((kernel_backends(agent.bpffs(), vip, 80)? == want).then_some(()))
        })?;
    }
    // What the kernel must hold at any moment, per family; a thread
    // checks it without pause while the main thread churns and restarts.
    let required = std::sync::Arc::new(std::sync::Mutex::new([
        union(&state, false),
        union(&state, true),
    ]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checker = {
        let (required, stop) = (required.clone(), stop.clone());
        let bpffs = agent.bpffs().to_owned();
        std::thread::spawn(move || -> Result<u64> {
            let mut checks = 0u64;
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < deadline {
                // Held through the read: the main thread changes what is
                // required before it changes the API, so a read never
                // pairs an old requirement with a newer kernel.
                let want = required.lock().unwrap();
                for (i, vip) in [v4, v6].into_iter().enumerate() {
                    let kernel = kernel_backends(&bpffs, vip, 80)?;
                    let missing: Vec<_> = want[i].difference(&kernel).collect();
                    if !missing.is_empty() {
                        bail!(
                            "after {checks} checks: the kernel lacks {} endpoints that never left the API, e.g. {:?}",
                            missing.len(),
                            &missing[..missing.len().min(3)]
                        );
                    }
                    checks += 1;
                }
            }
            Ok(checks)
        })
    };
    let mut next = 1000u32;
    for step in 0..12u32 {
        let before = [union(&state, false), union(&state, true)];
        // Churn: move 10 endpoints from one slice to the next, retire 5,
        // add 5 new ones.
        let mut planned = state.clone();
        for (family, v6) in [("v4", false), ("v6", true)] {
            let from = format!("big-{family}-{}", step % 3);
            let to = format!("big-{family}-{}", (step + 1) % 3);
            let moved: Vec<_> = planned.get_mut(&from).unwrap().drain(..10).collect();
            let retired = 5.min(planned[&to].len());
            planned.get_mut(&to).unwrap().drain(..retired);
            planned.get_mut(&to).unwrap().extend(moved);
            planned.get_mut(&to).unwrap().extend(endpoints(next, 5, v6));
            next += 5;
        }
        let after = [union(&planned, false), union(&planned, true)];
        *required.lock().unwrap() = [
            before[0].intersection(&after[0]).copied().collect(),
            before[1].intersection(&after[1]).copied().collect(),
        ];
        for family in ["v4", "v6"] {
            let from = format!("big-{family}-{}", step % 3);
            let to = format!("big-{family}-{}", (step + 1) % 3);
            // The destination first, then the source: for a moment the
            // moved endpoints are in both, as a real controller does it.
            api.apply(&slice("big", &to, 8080, &planned[&to]));
            api.apply(&slice("big", &from, 8080, &planned[&from]));
        }
        state = planned;
        if step % 3 == 1 {
            agent.kill_and_restart(&[])?;
        }
        for (i, vip) in [v4, v6].into_iter().enumerate() {
            wait_for("the kernel to catch up with the step", || {
                Ok((kernel_backends(agent.bpffs(), vip, 80)? == after[i]).then_some(()))
            })
            .with_context(|| format!("step {step}"))?;
        }
        *required.lock().unwrap() = after;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let checks = checker.join().expect("checker thread")?;
    eprintln!("{checks} checks of the kernel against the slices");
    Ok(())
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> Result<TempDir> {
    let dir = std::env::temp_dir().join(format!("mesh-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(TempDir(dir))
}
