//! The test Kubernetes API server (mesh_tests::kube_api) checked against
//! clients nobody here wrote: kubectl (Debian's kubernetes-client, or
//! whichever `kubectl` is on PATH; `$KUBECTL` picks another) lists, pages,
//! selects, gets and watches from it; kube-rs's watcher lists, watches,
//! and relists after a 410; and a plain TCP client reads the wire itself
//! for what the clients hide (BOOKMARKs, the 410 ERROR event, dropped
//! connections, continue tokens).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeStatus, Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroupList, APIResourceList, APIVersions, ObjectMeta, Status,
};
use k8s_openapi::jiff::Timestamp;
use mesh_tests::kube_api::KubeApi;
use mesh_tests::{next_id, run_with_timeout};
use serde_json::Value;

/// Any one step (a kubectl run, an awaited event) takes at most this long.
const STEP: Duration = Duration::from_secs(60);

// ---- fixtures: real API objects ----

fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        }),
        ..ObjectMeta::default()
    }
}

fn service(namespace: &str, name: &str, cluster_ip: &str, labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: meta(Some(namespace), name, labels),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ip_families: Some(vec!["IPv4".into()]),
            selector: Some([("app".to_owned(), name.to_owned())].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                target_port: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                        "http".into(),
                    ),
                ),
                ..ServicePort::default()
            }]),
            session_affinity: Some("None".into()),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn endpoint_slice(
    namespace: &str,
    service: &str,
    suffix: &str,
    addresses: &[&str],
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(namespace),
            &format!("{service}-{suffix}"),
            &[("kubernetes.io/service-name", service)],
        ),
        address_type: "IPv4".into(),
        endpoints: addresses
            .iter()
            .enumerate()
            .map(|(i, address)| Endpoint {
                addresses: vec![(*address).into()],
                conditions: Some(EndpointConditions {
                    ready: Some(i % 2 == 0),
                    serving: Some(true),
                    terminating: Some(i % 2 == 1),
                }),
                node_name: Some("node-a".into()),
                zone: Some("zone-1".into()),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str) -> Pod {
    Pod {
        metadata: meta(Some(namespace), name, &[("app", "web")]),
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("web".into()),
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "web".into(),
                image: Some("registry.example/web:1".into()),
                ..Default::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            qos_class: Some("BestEffort".into()),
            ..PodStatus::default()
        }),
    }
}

fn node(name: &str, zone: &str, ip: &str) -> Node {
    Node {
        metadata: meta(None, name, &[("topology.kubernetes.io/zone", zone)]),
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            ..NodeStatus::default()
        }),
    }
}

/// What a client must read back for `object` applied at `rv`: the object
/// as k8s-openapi serializes it, with that resourceVersion. The uid and
/// creationTimestamp the server chose are checked and taken out of
/// `served`, which is returned for comparison.
fn expect_served<K: serde::Serialize>(object: &K, rv: u64, mut served: Value) -> (Value, Value) {
    let mut expected = serde_json::to_value(object).expect("fixture serializes");
    expected["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    let meta = served["metadata"]
        .as_object_mut()
        .expect("served object has metadata");
    let uid = meta.remove("uid").expect("served object has a uid");
    let uid = uid.as_str().expect("uid is a string");
    assert!(
        uid.len() == 36 && uid.matches('-').count() == 4,
        "uid {uid:?} is not UUID-shaped"
    );
    let created = meta
        .remove("creationTimestamp")
        .expect("served object has a creationTimestamp");
    created
        .as_str()
        .expect("creationTimestamp is a string")
        .parse::<Timestamp>()
        .expect("creationTimestamp is RFC 3339");
    (served, expected)
}

// ---- kubectl ----

/// A scratch directory of this test's, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(hint: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "mesh-kube-api-{hint}-{}-{}",
            std::process::id(),
            next_id()
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The kubectl to test with: `$KUBECTL`, else `kubectl` on PATH.
fn kubectl_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBECTL") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubectl is not on PATH: run `cargo xtask setup` (it installs Debian's \
                 kubernetes-client), or point $KUBECTL at a kubectl binary"
            )
        })
}

/// kubectl pointed at one server, with its own kubeconfig and cache.
struct Kubectl {
    binary: PathBuf,
    scratch: Scratch,
}

impl Kubectl {
    fn new(api: &KubeApi, hint: &str) -> Kubectl {
        let scratch = Scratch::new(hint);
        api.write_kubeconfig(&scratch.0.join("kubeconfig"))
            .expect("write kubeconfig");
        Kubectl {
            binary: kubectl_binary(),
            scratch,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--kubeconfig")
            .arg(self.scratch.0.join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.scratch.0.join("cache"))
            .arg("--request-timeout=30s")
            .args(args)
            // kubectl must not find anything of the machine's.
            .env("HOME", &self.scratch.0)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// Runs kubectl to completion: (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = run_with_timeout(&mut self.command(args), STEP)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e:#}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl, which must succeed, and parses its JSON output.
    fn json(&self, args: &[&str]) -> Value {
        let (ok, stdout, stderr) = self.run(args);
        assert!(ok, "kubectl {args:?} failed: {stderr}");
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("kubectl {args:?} printed no JSON ({e}): {stdout}"))
    }
}

/// The items of a `-o json` list, by namespace/name.
fn items_by_name(list: &Value) -> BTreeMap<String, Value> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {list}"))
        .iter()
        .map(|item| {
            let ns = item["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = item["metadata"]["name"].as_str().unwrap_or_default();
            (format!("{ns}/{name}"), item.clone())
        })
        .collect()
}

fn names(list: &Value) -> Vec<String> {
    items_by_name(list).into_keys().collect()
}

#[test]
fn kubectl_lists_exactly_what_was_applied() {
    let api = KubeApi::start().unwrap();
    let kubectl = Kubectl::new(&api, "list");
    let services = [
        service("shop", "web", "10.96.0.10", &[("app", "web")]),
        service("shop", "db", "10.96.0.11", &[]),
        service(
            "kube-system",
            "dns",
            "10.96.0.2",
            &[("k8s-app", "kube-dns")],
        ),
    ];
    let slices = [
        endpoint_slice("shop", "web", "abc12", &["10.244.1.5", "10.244.1.6"]),
        endpoint_slice("shop", "web", "def34", &["10.244.2.7"]),
        endpoint_slice("kube-system", "dns", "x9y8z", &["10.244.0.3"]),
    ];
    let mut applied: Vec<(&str, Value, u64)> = Vec::new();
    for s in &services {
        applied.push(("services", serde_json::to_value(s).unwrap(), api.apply(s)));
    }
    for s in &slices {
        applied.push((
            "endpointslices",
            serde_json::to_value(s).unwrap(),
            api.apply(s),
        ));
    }

    for kind in ["services", "endpointslices"] {
        let served = items_by_name(&kubectl.json(&["get", kind, "-A", "-o", "json"]));
        let mine: Vec<_> = applied.iter().filter(|(k, ..)| *k == kind).collect();
        assert_eq!(served.len(), mine.len(), "{kind}: {served:?}");
        for (_, object, rv) in mine {
            let key = format!(
                "{}/{}",
                object["metadata"]["namespace"].as_str().unwrap(),
                object["metadata"]["name"].as_str().unwrap()
            );
            let item = served
                .get(&key)
                .unwrap_or_else(|| panic!("{kind}: {key} missing"));
            let (served, expected) = expect_served(object, *rv, item.clone());
            assert_eq!(served, expected, "{kind} {key}");
        }
    }

    // One namespace's, through the namespaced path.
    let shop = kubectl.json(&["get", "services", "-n", "shop", "-o", "json"]);
    assert_eq!(names(&shop), ["shop/db", "shop/web"]);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/shop/services")),
        "{:?}",
        api.requests()
    );
}

#[test]
fn kubectl_pages_with_chunk_size() {
    let api = KubeApi::start().unwrap();
    let kubectl = Kubectl::new(&api, "paging");
    let mut expected = Vec::new();
    for i in 0..7 {
        let namespace = if i < 4 { "shop" } else { "tools" };
        let name = format!("web-{i}");
        api.apply(&pod(
            namespace,
            &name,
            "node-a",
            &format!("10.244.1.{}", 10 + i),
        ));
        expected.push(format!("{namespace}/{name}"));
    }
    let list = kubectl.json(&["get", "pods", "-A", "--chunk-size=2", "-o", "json"]);
    assert_eq!(names(&list), expected);

    let pages: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?"))
        .collect();
    assert_eq!(pages.len(), 4, "7 pods in pages of 2: {pages:?}");
    assert!(pages.iter().all(|r| r.contains("limit=2")), "{pages:?}");
    assert!(!pages[0].contains("continue="), "{pages:?}");
    assert!(
        pages[1..].iter().all(|r| r.contains("continue=")),
        "{pages:?}"
    );
}

#[test]
fn kubectl_selects_by_label_and_field() {
    let api = KubeApi::start().unwrap();
    let kubectl = Kubectl::new(&api, "selectors");
    api.apply(&service("shop", "web", "10.96.0.10", &[("app", "web")]));
    api.apply(&service(
        "shop",
        "other-proxy",
        "10.96.0.12",
        &[("service.kubernetes.io/service-proxy-name", "other")],
    ));
    api.apply(&service(
        "shop",
        "headless",
        "None",
        &[("service.kubernetes.io/headless", "")],
    ));
    api.apply(&pod("shop", "a-1", "node-a", "10.244.1.1"));
    api.apply(&pod("shop", "b-1", "node-b", "10.244.2.1"));
    api.apply(&pod("tools", "a-2", "node-a", "10.244.1.2"));

    let proxied = kubectl.json(&[
        "get",
        "services",
        "-A",
        "-l",
        "!service.kubernetes.io/service-proxy-name",
        "-o",
        "json",
    ]);
    assert_eq!(names(&proxied), ["shop/headless", "shop/web"]);
    // kube-proxy's own selector.
    let kube_proxy = kubectl.json(&[
        "get",
        "services",
        "-A",
        "-l",
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        "-o",
        "json",
    ]);
    assert_eq!(names(&kube_proxy), ["shop/web"]);
    let web = kubectl.json(&["get", "services", "-A", "-l", "app=web", "-o", "json"]);
    assert_eq!(names(&web), ["shop/web"]);

    let on_a = kubectl.json(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=node-a",
        "-o",
        "json",
    ]);
    assert_eq!(names(&on_a), ["shop/a-1", "tools/a-2"]);
    let not_a = kubectl.json(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName!=node-a",
        "-o",
        "json",
    ]);
    assert_eq!(names(&not_a), ["shop/b-1"]);

    // An unknown field label is refused as the real server refuses it.
    let (ok, _, stderr) = kubectl.run(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.bogus=x",
        "-o",
        "json",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("field label not supported: spec.bogus"),
        "{stderr}"
    );
}

#[test]
fn kubectl_gets_one_node() {
    let api = KubeApi::start().unwrap();
    let kubectl = Kubectl::new(&api, "node");
    let node_a = node("node-a", "zone-1", "192.168.0.10");
    let rv = api.apply(&node_a);
    api.apply(&node("node-b", "zone-2", "192.168.0.11"));

    let served = kubectl.json(&["get", "nodes", "node-a", "-o", "json"]);
    let (served, expected) = expect_served(&node_a, rv, served);
    assert_eq!(served, expected);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/nodes/node-a?")),
        "{:?}",
        api.requests()
    );

    let (ok, _, stderr) = kubectl.run(&["get", "nodes", "node-x", "-o", "json"]);
    assert!(!ok);
    assert!(
        stderr.contains("(NotFound)") && stderr.contains("nodes \"node-x\" not found"),
        "{stderr}"
    );
}

/// A child process of ours, killed by PID on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 20 ms until it holds; false after `limit`.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

#[test]
fn kubectl_watch_sees_changes_in_order() {
    let api = KubeApi::start().unwrap();
    let kubectl = Kubectl::new(&api, "watch");
    let db = service("shop", "db", "10.96.0.11", &[]);
    let db_rv = api.apply(&db);

    let mut child = kubectl
        .command(&[
            "get",
            "services",
            "-A",
            "--watch",
            "-o",
            "json",
            "--output-watch-events",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl --watch");
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let kubectl_watch = Running(child);
    // kubectl prints one (indented) JSON object per event.
    let (tx, events) = mpsc::channel::<Value>();
    let reader = std::thread::spawn(move || {
        for value in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
            let Ok(value) = value else { return };
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| -> Value {
        events
            .recv_timeout(STEP)
            .unwrap_or_else(|e| panic!("kubectl --watch printed no {what} ({e})"))
    };

    let first = next("event for the existing service");
    assert_eq!(first["type"], "ADDED", "{first}");
    assert_eq!(first["object"]["metadata"]["name"], "db");
    assert_eq!(
        first["object"]["metadata"]["resourceVersion"],
        db_rv.to_string()
    );
    assert!(
        eventually(STEP, || api.watchers() == 1),
        "kubectl never opened its watch: {:?}",
        api.requests()
    );

    let mut web = service("shop", "web", "10.96.0.10", &[("app", "web")]);
    let added = api.apply(&web);
    web.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    let modified = api.apply(&web);
    let deleted = api
        .delete::<Service>(Some("shop"), "web")
        .expect("web was there");
    for (kind, rv) in [
        ("ADDED", added),
        ("MODIFIED", modified),
        ("DELETED", deleted),
    ] {
        let event = next(kind);
        assert_eq!(event["type"], kind, "{event}");
        assert_eq!(event["object"]["metadata"]["name"], "web", "{event}");
        assert_eq!(
            event["object"]["metadata"]["resourceVersion"],
            rv.to_string(),
            "{event}"
        );
        assert_eq!(
            event["object"]["spec"]["sessionAffinity"],
            if kind == "ADDED" { "None" } else { "ClientIP" },
            "{event}"
        );
    }
    let watches: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.contains("watch="))
        .collect();
    assert_eq!(watches.len(), 1, "{watches:?}");
    assert!(
        watches[0].starts_with("GET /api/v1/services?") && watches[0].contains("resourceVersion="),
        "{watches:?}"
    );

    drop(kubectl_watch);
    let _ = reader.join();
    let mut errors = String::new();
    let _ = stderr.read_to_string(&mut errors);
    assert!(
        !errors.contains("rror"),
        "kubectl --watch complained: {errors}"
    );
}

// ---- the wire, with a plain TCP client ----

/// One HTTP/1.1 exchange on a new connection: (status, body).
fn get(addr: SocketAddr, target: &str) -> (u16, Value) {
    let mut stream = connect(addr, target);
    let mut reader = BufReader::new(&mut stream);
    let (status, chunked) = read_head(&mut reader);
    assert!(!chunked, "{target} answered with a stream");
    let mut body = String::new();
    reader
        .read_to_string(&mut body)
        .expect("read the answer to the end");
    let body = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"));
    (status, body)
}

fn connect(addr: SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect to the test API server");
    stream
        .set_read_timeout(Some(STEP))
        .expect("set a read timeout");
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    stream
}

/// Reads a response head: (status, whether the body is chunked).
fn read_head(reader: &mut impl BufRead) -> (u16, bool) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        if line == "\r\n" || line.is_empty() {
            return (status, chunked);
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        if lower.starts_with("content-type:") {
            assert!(lower.contains("application/json"), "{line}");
        }
    }
}

/// What a watch stream gives next.
#[derive(Debug)]
enum Next {
    Event(Value),
    /// The final chunk: the server ended the watch cleanly.
    End,
    /// The connection closed mid-stream.
    Dropped,
}

/// A watch read off the wire: chunked transfer decoded by hand.
struct Watch {
    reader: BufReader<TcpStream>,
    /// Bytes of events not yet split into lines.
    pending: Vec<u8>,
}

impl Watch {
    fn open(addr: SocketAddr, target: &str) -> Watch {
        let stream = connect(addr, target);
        let mut reader = BufReader::new(stream);
        let (status, chunked) = read_head(&mut reader);
        assert_eq!(status, 200, "{target}");
        assert!(chunked, "{target}: a watch is a chunked stream");
        Watch {
            reader,
            pending: Vec::new(),
        }
    }

    fn next(&mut self) -> Next {
        loop {
            if let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=at).collect();
                let event = serde_json::from_slice(&line)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&line)));
                return Next::Event(event);
            }
            let mut size = String::new();
            match self.reader.read_line(&mut size) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("the watch sent nothing for {STEP:?}")
                }
                Ok(0) | Err(_) => return Next::Dropped,
                Ok(_) => {}
            }
            let size = usize::from_str_radix(size.trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size:?}"));
            let mut data = vec![0u8; size + 2];
            if self.reader.read_exact(&mut data).is_err() {
                return Next::Dropped;
            }
            assert_eq!(&data[size..], b"\r\n", "chunk not ended by CRLF");
            if size == 0 {
                return Next::End;
            }
            self.pending.extend_from_slice(&data[..size]);
        }
    }

    fn event(&mut self) -> Value {
        match self.next() {
            Next::Event(event) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

#[test]
fn discovery_and_unknown_paths_as_the_real_server() {
    let api = KubeApi::start().unwrap();
    let (status, version) = get(api.addr(), "/version");
    assert_eq!(status, 200);
    assert_eq!(version["gitVersion"], "v1.35.0");

    let (_, core) = get(api.addr(), "/api");
    let core: APIVersions = serde_json::from_value(core).unwrap();
    assert_eq!(core.versions, ["v1"]);
    let (_, groups) = get(api.addr(), "/apis");
    let groups: APIGroupList = serde_json::from_value(groups).unwrap();
    assert_eq!(groups.groups[0].name, "discovery.k8s.io");
    let (_, v1) = get(api.addr(), "/api/v1");
    let v1: APIResourceList = serde_json::from_value(v1).unwrap();
    let served: Vec<&str> = v1.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(served, ["services", "pods", "nodes"]);
    let (_, discovery) = get(api.addr(), "/apis/discovery.k8s.io/v1");
    let discovery: APIResourceList = serde_json::from_value(discovery).unwrap();
    assert_eq!(discovery.resources[0].kind, "EndpointSlice");

    for path in [
        "/api/v1/configmaps",
        "/apis/apps/v1",
        "/healthz",
        "/api/v1/services/web",
    ] {
        let (status, body) = get(api.addr(), path);
        assert_eq!(status, 404, "{path}");
        let body: Status = serde_json::from_value(body).unwrap();
        assert_eq!(body.reason.as_deref(), Some("NotFound"), "{path}");
        assert_eq!(body.code, Some(404));
    }
    let (status, body) = get(api.addr(), "/api/v1/namespaces/shop/services/web");
    assert_eq!(status, 404);
    assert_eq!(body["message"], "services \"web\" not found");
}

#[test]
fn list_with_limit_returns_a_continue_token_that_finishes_the_list() {
    let api = KubeApi::start().unwrap();
    for name in ["a", "b", "c", "d", "e"] {
        api.apply(&service("shop", name, "10.96.0.20", &[]));
    }
    let (status, first) = get(api.addr(), "/api/v1/services?limit=2");
    assert_eq!(status, 200);
    assert_eq!(first["kind"], "ServiceList");
    assert_eq!(first["apiVersion"], "v1");
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    let snapshot = first["metadata"]["resourceVersion"].clone();
    // Items of a typed list carry no kind, as the real server sends them.
    assert_eq!(first["items"][0].get("kind"), None);

    // Changes after the first page are not seen by the rest of the list.
    let mut changed = service("shop", "d", "10.96.0.20", &[("changed", "yes")]);
    changed.metadata.labels.get_or_insert_default();
    api.apply(&changed);
    api.apply(&service("shop", "f", "10.96.0.21", &[]));

    let mut seen = names(&first);
    let mut token = first["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_owned();
    for page in 1.. {
        assert!(page < 10, "the list never finished");
        let (status, next) = get(
            api.addr(),
            &format!("/api/v1/services?limit=2&continue={token}"),
        );
        assert_eq!(status, 200, "{next}");
        assert_eq!(next["metadata"]["resourceVersion"], snapshot);
        for item in next["items"].as_array().unwrap() {
            assert_eq!(item["metadata"].get("labels"), None, "{item}");
        }
        seen.extend(names(&next));
        match next["metadata"]["continue"].as_str() {
            Some(t) => token = t.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, ["shop/a", "shop/b", "shop/c", "shop/d", "shop/e"]);
    let (_, now) = get(api.addr(), "/api/v1/services");
    assert_eq!(names(&now).len(), 6);
    assert_eq!(now["metadata"].get("continue"), None);

    // resourceVersion=0 is served whole from the watch cache: no paging.
    let (_, any) = get(api.addr(), "/api/v1/services?limit=2&resourceVersion=0");
    assert_eq!(names(&any).len(), 6);
}

#[test]
fn compacted_versions_get_410() {
    let api = KubeApi::start().unwrap();
    let old = api.apply(&service("shop", "a", "10.96.0.20", &[]));
    api.apply(&service("shop", "b", "10.96.0.21", &[]));
    let (_, page) = get(api.addr(), "/api/v1/services?limit=1");
    let token = page["metadata"]["continue"].as_str().unwrap().to_owned();
    api.apply(&service("shop", "c", "10.96.0.22", &[]));
    api.compact();
    let now = api.resource_version();

    // A watch from before the compaction: 200, then one ERROR event.
    let mut watch = Watch::open(
        api.addr(),
        &format!("/api/v1/services?watch=true&resourceVersion={old}&allowWatchBookmarks=true"),
    );
    let error = watch.event();
    assert_eq!(error["type"], "ERROR");
    let status: Status = serde_json::from_value(error["object"].clone()).unwrap();
    assert_eq!(status.status.as_deref(), Some("Failure"));
    assert_eq!(status.code, Some(410));
    assert_eq!(status.reason.as_deref(), Some("Expired"));
    assert_eq!(
        status.message.as_deref(),
        Some(format!("too old resource version: {old} ({now})").as_str())
    );
    assert!(matches!(watch.next(), Next::End));

    // An exact list from before it, and a continue token from before it.
    let (status, body) = get(
        api.addr(),
        &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact"),
    );
    assert_eq!(
        (status, &body["reason"], &body["code"]),
        (410, &"Expired".into(), &410.into()),
        "{body}"
    );
    let (status, body) = get(
        api.addr(),
        &format!("/api/v1/services?limit=1&continue={token}"),
    );
    assert_eq!(status, 410, "{body}");
    // The token it hands back continues (inconsistently) at the latest.
    let fresh = body["metadata"]["continue"]
        .as_str()
        .expect("a fresh token");
    let (status, rest) = get(
        api.addr(),
        &format!("/api/v1/services?limit=5&continue={fresh}"),
    );
    assert_eq!(status, 200, "{rest}");
    assert_eq!(names(&rest), ["shop/b", "shop/c"]);

    // From the compaction on, watches resume as before.
    let mut watch = Watch::open(
        api.addr(),
        &format!("/api/v1/services?watch=1&resourceVersion={now}"),
    );
    let d = api.apply(&service("shop", "d", "10.96.0.23", &[]));
    let added = watch.event();
    assert_eq!(added["type"], "ADDED");
    assert_eq!(
        added["object"]["metadata"]["resourceVersion"],
        d.to_string()
    );
    assert_eq!(added["object"]["kind"], "Service");
}

#[test]
fn bookmarks_arrive_on_watches_that_allow_them() {
    let api = KubeApi::start().unwrap();
    let rv = api.apply(&service("shop", "a", "10.96.0.20", &[]));
    api.set_bookmark_interval(Duration::from_millis(50));
    let mut with = Watch::open(
        api.addr(),
        &format!("/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"),
    );
    let mut without = Watch::open(
        api.addr(),
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    for _ in 0..3 {
        let bookmark = with.event();
        assert_eq!(bookmark["type"], "BOOKMARK", "{bookmark}");
        assert_eq!(bookmark["object"]["kind"], "Service");
        assert_eq!(bookmark["object"]["apiVersion"], "v1");
        assert_eq!(
            bookmark["object"]["metadata"],
            serde_json::json!({"resourceVersion": rv.to_string()})
        );
    }
    // Pods change; a bookmark then carries the newer version.
    let pod_rv = api
        .apply(&pod("shop", "p", "node-a", "10.244.1.1"))
        .to_string();
    assert!(
        (0..100).any(|_| with.event()["object"]["metadata"]["resourceVersion"] == pod_rv.as_str()),
        "no bookmark at the pod's version {pod_rv}"
    );
    // The watch that did not allow them had none queued before its first event.
    let b = api.apply(&service("shop", "b", "10.96.0.21", &[]));
    let first = without.event();
    assert_eq!(first["type"], "ADDED", "{first}");
    assert_eq!(
        first["object"]["metadata"]["resourceVersion"],
        b.to_string()
    );
}

#[test]
fn watches_apply_selectors_as_the_watch_cache_does() {
    let api = KubeApi::start().unwrap();
    let rv = api.resource_version();
    let mut on_a = Watch::open(
        api.addr(),
        &format!(
            "/api/v1/pods?watch=true&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dnode-a"
        ),
    );
    let mut labelled = Watch::open(
        api.addr(),
        &format!(
            "/api/v1/namespaces/shop/pods?watch=true&resourceVersion={rv}&labelSelector=app%3Dweb"
        ),
    );
    api.apply(&pod("shop", "p", "node-b", "10.244.2.1"));
    let moved = api.apply(&pod("shop", "p", "node-a", "10.244.2.1"));
    let mut relabelled = pod("shop", "p", "node-a", "10.244.2.1");
    relabelled.metadata.labels = Some([("app".to_owned(), "db".to_owned())].into());
    let stopped = api.apply(&relabelled);
    api.apply(&pod("tools", "q", "node-a", "10.244.1.9"));

    // Moving onto node-a is ADDED there.
    let e = on_a.event();
    assert_eq!(
        (
            e["type"].as_str(),
            e["object"]["metadata"]["resourceVersion"].as_str()
        ),
        (Some("ADDED"), Some(moved.to_string().as_str()))
    );
    let e = on_a.event();
    assert_eq!(e["type"], "MODIFIED");
    let e = on_a.event();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("q"))
    );

    // Losing the label is DELETED, with the last matching state at the
    // change's version; the other namespace is never seen.
    assert_eq!(labelled.event()["type"], "ADDED");
    assert_eq!(labelled.event()["type"], "MODIFIED");
    let gone = labelled.event();
    assert_eq!(gone["type"], "DELETED");
    assert_eq!(gone["object"]["metadata"]["labels"]["app"], "web");
    assert_eq!(
        gone["object"]["metadata"]["resourceVersion"],
        stopped.to_string()
    );
    api.delete::<Pod>(Some("shop"), "p");
    let last = api.apply(&pod("shop", "r", "node-b", "10.244.2.2"));
    let e = labelled.event();
    assert_eq!(
        (
            e["type"].as_str(),
            e["object"]["metadata"]["resourceVersion"].as_str()
        ),
        (Some("ADDED"), Some(last.to_string().as_str()))
    );
}

#[test]
fn break_watches_drops_connections_mid_stream() {
    let api = KubeApi::start().unwrap();
    let rv = api.resource_version();
    let mut services = Watch::open(
        api.addr(),
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    let mut slices = Watch::open(
        api.addr(),
        &format!("/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion={rv}"),
    );
    api.apply(&service("shop", "web", "10.96.0.10", &[]));
    api.apply(&endpoint_slice("shop", "web", "abc12", &["10.244.1.5"]));
    assert_eq!(services.event()["type"], "ADDED");
    assert_eq!(slices.event()["object"]["kind"], "EndpointSlice");
    assert_eq!(api.watchers(), 2);

    api.break_watches();
    assert!(matches!(services.next(), Next::Dropped));
    assert!(matches!(slices.next(), Next::Dropped));
    assert!(
        eventually(STEP, || api.watchers() == 0),
        "watches still open: {}",
        api.watchers()
    );

    // A client watches again, from where it was, and misses nothing.
    let mut again = Watch::open(
        api.addr(),
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    assert_eq!(again.event()["object"]["metadata"]["name"], "web");
}

#[test]
fn watch_ends_cleanly_at_its_timeout() {
    let api = KubeApi::start().unwrap();
    api.apply(&node("node-a", "zone-1", "192.168.0.10"));
    // No resourceVersion: the current state first, then changes.
    let mut watch = Watch::open(api.addr(), "/api/v1/nodes?watch=true&timeoutSeconds=1");
    assert_eq!(watch.event()["object"]["metadata"]["name"], "node-a");
    assert!(matches!(watch.next(), Next::End));
    assert!(eventually(STEP, || api.watchers() == 0));
}

// ---- kube-rs, the client the agent uses ----

#[tokio::test(flavor = "current_thread")]
async fn kube_rs_watcher_lists_watches_and_relists_after_410() {
    use futures_util::StreamExt;
    use kube::runtime::watcher::{self, Event};

    let api = KubeApi::start().unwrap();
    let scratch = Scratch::new("kube-rs");
    let path = scratch.0.join("kubeconfig");
    api.write_kubeconfig(&path).unwrap();
    for i in 0..3 {
        api.apply(&service("shop", &format!("svc-{i}"), "10.96.0.30", &[]));
    }
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&path).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let services: kube::Api<Service> = kube::Api::all(client);
    let config = watcher::Config::default()
        .labels("!service.kubernetes.io/service-proxy-name")
        .page_size(2);
    let mut events = watcher::watcher(services, config).boxed();
    let mut next = async || {
        tokio::time::timeout(STEP, events.next())
            .await
            .expect("the watcher stalled")
            .expect("the watcher ended")
    };

    // The initial list, in pages of 2.
    let mut listed = Vec::new();
    loop {
        match next().await.unwrap() {
            Event::Init => {}
            Event::InitApply(s) => listed.push(s.metadata.name.unwrap()),
            Event::InitDone => break,
            other => panic!("during the initial list: {other:?}"),
        }
    }
    assert_eq!(listed, ["svc-0", "svc-1", "svc-2"]);
    let lists = api.requests();
    assert!(lists.iter().any(|r| r.contains("continue=")), "{lists:?}");

    // A change while watching.
    let rv = api.apply(&service("shop", "svc-3", "10.96.0.31", &[]));
    match next().await.unwrap() {
        Event::Apply(s) => assert_eq!(s.metadata.resource_version, Some(rv.to_string())),
        other => panic!("expected the new service: {other:?}"),
    }

    // The connection dropped, then history compacted past what the
    // watcher saw: it watches again from its version, gets 410, and
    // lists again from scratch. (The watcher runs only when polled, so
    // none of this reaches it before it reconnects.)
    api.break_watches();
    api.apply(&service("shop", "svc-4", "10.96.0.32", &[]));
    api.compact();
    let mut relisted = Vec::new();
    let mut expired = false;
    for _ in 0..100 {
        match next().await {
            Err(watcher::Error::WatchError(e)) if e.code == 410 => expired = true,
            Err(e) => panic!("unexpected watcher error: {e}"),
            Ok(Event::Init) => {}
            Ok(Event::InitApply(s)) => relisted.push(s.metadata.name.unwrap()),
            Ok(Event::InitDone) => break,
            Ok(other) => panic!("before the relist: {other:?}"),
        }
    }
    assert!(expired, "the watcher never saw 410: {:?}", api.requests());
    assert_eq!(relisted, ["svc-0", "svc-1", "svc-2", "svc-3", "svc-4"]);
}

#[tokio::test(flavor = "current_thread")]
async fn kube_rs_streaming_list_ends_at_the_initial_events_bookmark() {
    use futures_util::StreamExt;
    use kube::runtime::watcher::{self, Event};

    let api = KubeApi::start().unwrap();
    let scratch = Scratch::new("kube-rs-stream");
    let path = scratch.0.join("kubeconfig");
    api.write_kubeconfig(&path).unwrap();
    api.apply(&pod("shop", "a-1", "node-a", "10.244.1.1"));
    api.apply(&pod("shop", "b-1", "node-b", "10.244.2.1"));
    api.apply(&pod("tools", "a-2", "node-a", "10.244.1.2"));
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&path).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let pods: kube::Api<Pod> = kube::Api::all(kube::Client::try_from(config).unwrap());
    let config = watcher::Config::default()
        .fields("spec.nodeName=node-a")
        .streaming_lists();
    let mut events = watcher::watcher(pods, config).boxed();
    let mut next = async || {
        tokio::time::timeout(STEP, events.next())
            .await
            .expect("the watcher stalled")
            .expect("the watcher ended")
            .expect("no watcher error")
    };

    let mut initial = Vec::new();
    loop {
        match next().await {
            Event::Init => {}
            Event::InitApply(p) => initial.push(p.metadata.name.unwrap()),
            Event::InitDone => break,
            other => panic!("during the initial events: {other:?}"),
        }
    }
    assert_eq!(initial, ["a-1", "a-2"]);
    let requests = api.requests();
    assert!(
        requests.iter().all(|r| r.contains("watch=true")),
        "a streaming list makes no list request: {requests:?}"
    );
    assert!(
        requests[0].contains("sendInitialEvents=true"),
        "{requests:?}"
    );

    // The same stream goes on with changes.
    let rv = api.apply(&pod("shop", "a-3", "node-a", "10.244.1.3"));
    match next().await {
        Event::Apply(p) => assert_eq!(p.metadata.resource_version, Some(rv.to_string())),
        other => panic!("expected the new pod: {other:?}"),
    }
    assert_eq!(api.watchers(), 1);
}

#[test]
fn an_identical_apply_is_no_write() {
    let api = KubeApi::start().unwrap();
    let web = service("shop", "web", "10.96.0.10", &[]);
    let rv = api.apply(&web);
    let mut watch = Watch::open(
        api.addr(),
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    // The same object again, as a resync would write it: nothing happens.
    assert_eq!(api.apply(&web), rv);
    assert_eq!(api.resource_version(), rv);
    let served: Service = api.get(Some("shop"), "web").unwrap();
    assert_eq!(served.metadata.resource_version, Some(rv.to_string()));
    // The uid and creationTimestamp it was given are kept on a replace.
    let mut changed = web.clone();
    changed.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    let next = api.apply(&changed);
    assert_eq!(next, rv + 1);
    let replaced: Service = api.get(Some("shop"), "web").unwrap();
    assert_eq!(replaced.metadata.uid, served.metadata.uid);
    assert_eq!(
        replaced.metadata.creation_timestamp,
        served.metadata.creation_timestamp
    );
    // The watch's first event is the real change.
    let first = watch.event();
    assert_eq!(first["type"], "MODIFIED", "{first}");
    assert_eq!(
        first["object"]["metadata"]["resourceVersion"],
        next.to_string()
    );
}
