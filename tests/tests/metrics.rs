//! `/metrics`, `/healthz` and `/readyz` of a real agent: real programs,
//! real sockets, and the exposition read by a strict OpenMetrics parser, as
//! a Prometheus server would read it. Counters must equal what the probes saw.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{Agent, TestBackend, TestCgroup, UdpBackend, hold_connections, run_probe};
use openmetrics_parser::{
    MetricFamily, MetricsExposition, OpenMetricsType, OpenMetricsValue, openmetrics,
};
use serde_json::Value;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const WAIT: Duration = Duration::from_secs(10);

/// A loopback IPv4 VIP unique to this test process.
fn vip4(last: u8, port: u16) -> SocketAddr {
    mesh_tests::loopback_vip(15, last, port)
}

struct HttpResponse {
    status: u16,
    content_type: String,
    body: String,
}

/// One bounded HTTP/1.1 GET over loopback.
fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    assert!(addr.ip().is_loopback(), "only loopback is ever scraped");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.take(16 << 20).read_to_string(&mut raw)?;
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        bail!("no HTTP header end in {raw:?}");
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    Ok(HttpResponse {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// Where the agent serves metrics, from `meshctl status`.
fn metrics_addr(agent: &Agent) -> Result<SocketAddr> {
    let status = agent.status()?;
    status["metrics_addr"]
        .as_str()
        .with_context(|| format!("no metrics_addr in status {status}"))?
        .parse()
        .context("metrics_addr")
}

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

struct Scrape {
    exposition: Exposition,
    text: String,
}

fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let response = http_get(addr, "/metrics")?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.content_type, CONTENT_TYPE);
    let exposition = openmetrics::parse_openmetrics(&response.body)
        .map_err(|e| anyhow::anyhow!("not valid OpenMetrics: {e:?}\n{}", response.body))?;
    Ok(Scrape {
        exposition,
        text: response.body,
    })
}

impl Scrape {
    fn family(&self, name: &str) -> &MetricFamily<OpenMetricsType, OpenMetricsValue> {
        self.exposition
            .families
            .get(name)
            .unwrap_or_else(|| panic!("family {name} missing from:\n{}", self.text))
    }

    /// Every sample of a family as (labels, value); histograms give their count.
    fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.family(name)
            .iter_samples()
            .map(|s| {
                let labels = s
                    .get_labelset()
                    .expect("samples of a parsed family have label names")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let value = match &s.value {
                    OpenMetricsValue::Counter(c) => c.value.as_f64(),
                    OpenMetricsValue::Gauge(g) | OpenMetricsValue::Unknown(g) => g.as_f64(),
                    OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
                    OpenMetricsValue::Info => 1.0,
                    other => panic!("{name}: unexpected value {other:?}"),
                };
                (labels, value)
            })
            .collect()
    }

    /// The value of the one sample whose labels include all of `want`.
    fn value(&self, name: &str, want: &[(&str, &str)]) -> u64 {
        let matching: Vec<f64> = self
            .samples(name)
            .into_iter()
            .filter(|(labels, _)| {
                want.iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{name}{want:?}: expected one sample, got {matching:?} in:\n{}",
            self.text
        );
        matching[0] as u64
    }
}

/// Every family the agent exposes, with its type (names as the parser
/// reports them: counters without `_total`, info without `_info`).
const FAMILIES: &[(&str, OpenMetricsType)] = &[
    ("mesh_build", OpenMetricsType::Info),
    ("mesh_service_connections", OpenMetricsType::Counter),
    ("mesh_service_udp_flows", OpenMetricsType::Counter),
    ("mesh_service_no_backend", OpenMetricsType::Counter),
    ("mesh_service_policy_denials", OpenMetricsType::Counter),
    ("mesh_backend_connections", OpenMetricsType::Counter),
    ("mesh_backend_udp_flows", OpenMetricsType::Counter),
    ("mesh_backend_active_connections", OpenMetricsType::Gauge),
    ("mesh_backend_state", OpenMetricsType::Gauge),
    ("mesh_backend_health", OpenMetricsType::Gauge),
    ("mesh_backend_health_transitions", OpenMetricsType::Counter),
    ("mesh_redirect_sockets", OpenMetricsType::Counter),
    ("mesh_redirect_messages", OpenMetricsType::Counter),
    ("mesh_redirect_bytes", OpenMetricsType::Counter),
    ("mesh_redirect_fallback_messages", OpenMetricsType::Counter),
    ("mesh_redirect_fallback_bytes", OpenMetricsType::Counter),
    ("mesh_map_entries", OpenMetricsType::Gauge),
    ("mesh_map_capacity", OpenMetricsType::Gauge),
    (
        "mesh_reconcile_duration_seconds",
        OpenMetricsType::Histogram,
    ),
    ("mesh_config_reloads", OpenMetricsType::Counter),
    (
        "mesh_config_last_reload_success_timestamp_seconds",
        OpenMetricsType::Gauge,
    ),
    ("mesh_sockets_destroyed", OpenMetricsType::Counter),
];

#[test]
fn metrics_count_what_the_probes_saw_and_parse_as_openmetrics() -> Result<()> {
    let backends = [
        TestBackend::new(1)?,
        TestBackend::new(2)?,
        TestBackend::new(3)?,
    ];
    let dns_backend = UdpBackend::new(7)?;
    let parent = TestCgroup::new("metrics")?;
    let frontend = parent.child("frontend")?;
    let stranger = parent.child("stranger")?;
    let (web, empty, dns) = (vip4(1, 80), vip4(2, 80), vip4(3, 53));
    let be = |b: &TestBackend| format!("127.0.0.1:{}", b.port());
    let yaml = format!(
        "workloads:\n  - {{name: frontend, cgroup: {frontend}}}\n\
         services:\n\
         \x20 - name: web\n    vip: {web_ip}\n    port: 80\n\
         \x20   policy:\n      default: deny\n      allow: [frontend]\n\
         \x20   backends:\n\
         \x20     - {{address: 127.0.0.1, port: {p1}, weight: 1}}\n\
         \x20     - {{address: 127.0.0.1, port: {p2}, weight: 1}}\n\
         \x20     - {{address: 127.0.0.1, port: {p3}, weight: 1, state: draining}}\n\
         \x20 - name: empty\n    vip: {empty_ip}\n    port: 80\n    allow_empty: true\n    backends: []\n\
         \x20 - name: dns\n    vip: {dns_ip}\n    port: 53\n    protocol: udp\n\
         \x20   backends:\n      - {{address: 127.0.0.1, port: {pu}}}\n",
        frontend = frontend.path().display(),
        web_ip = web.ip(),
        empty_ip = empty.ip(),
        dns_ip = dns.ip(),
        p1 = backends[0].port(),
        p2 = backends[1].port(),
        p3 = backends[2].port(),
        pu = dns_backend.port(),
    );
    let agent = Agent::start_with(
        &yaml,
        &parent,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--max-services",
            "64",
            "--max-backends",
            "128",
            "--max-slots",
            "4096",
        ],
    )?;
    let addr = metrics_addr(&agent)?;
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    assert!(agent.log().contains(&format!("http://{addr}/metrics")));

    let ready = http_get(addr, "/readyz")?;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    let live = http_get(addr, "/healthz")?;
    assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));
    assert_eq!(http_get(addr, "/nope")?.status, 404);

    // Traffic: allowed, denied by policy, refused for no backend, UDP flows.
    let allowed = run_probe(&frontend, web, 30)?;
    assert_eq!(allowed.ok, 30, "{allowed:?}");
    let denied = run_probe(&stranger, web, 5)?;
    assert_eq!(denied.errors.get("EPERM"), Some(&5), "{denied:?}");
    let refused = run_probe(&frontend, empty, 4)?;
    assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&4), "{refused:?}");
    let flows = mesh_tests::run_udp_probe(&frontend, dns, 6, 1, false)?;
    assert_eq!(flows.ok, 6, "{flows:?}");
    let held = hold_connections(&frontend, web, 3)?;
    assert_eq!(held.result.ok, 3, "{:?}", held.result);

    // A refused reload counts as a failure; the histogram only times applies.
    agent.write_config("services: [oops\n")?;
    agent.wait_for_reload_failures(1, WAIT)?;

    // Live connections settle (the probe's closed ones leave MESH_ACTIVE).
    let deadline = Instant::now() + WAIT;
    let s = loop {
        let s = scrape(addr)?;
        let active: u64 = [&backends[0], &backends[1], &backends[2]]
            .iter()
            .map(|b| {
                s.value(
                    "mesh_backend_active_connections",
                    &[("service", "web"), ("backend", &be(b))],
                )
            })
            .sum();
        if active == 3 || Instant::now() >= deadline {
            assert_eq!(active, 3, "held connections:\n{}", s.text);
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let redirect = agent.meshctl_json(&["redirect"])?;
    let services = agent.meshctl_json(&["services"])?;

    // Every family, with the right type.
    for (name, kind) in FAMILIES {
        assert_eq!(
            s.family(name).family_type,
            *kind,
            "{name} has the wrong type"
        );
    }
    assert_eq!(s.family("mesh_redirect_bytes").unit, "bytes");
    assert!(!s.text.contains("{}"), "unlabelled samples carry no braces");
    assert_eq!(
        s.family("mesh_config_last_reload_success_timestamp_seconds")
            .unit,
        "seconds"
    );

    // Per service and protocol: exactly what the probes saw.
    let web_tcp = [("service", "web"), ("protocol", "tcp")];
    assert_eq!(s.value("mesh_service_connections", &web_tcp), 30 + 3);
    assert_eq!(s.value("mesh_service_policy_denials", &web_tcp), 5);
    assert_eq!(s.value("mesh_service_no_backend", &web_tcp), 0);
    let empty_tcp = [("service", "empty"), ("protocol", "tcp")];
    assert_eq!(s.value("mesh_service_no_backend", &empty_tcp), 4);
    assert_eq!(s.value("mesh_service_connections", &empty_tcp), 0);
    let dns_udp = [("service", "dns"), ("protocol", "udp")];
    assert_eq!(s.value("mesh_service_udp_flows", &dns_udp), 6);

    // Per backend: connections by the id each server reported.
    for (i, b) in backends.iter().enumerate() {
        let id = b.id();
        let seen = allowed.id_count(id) + held.result.id_count(id);
        let labels = [("service", "web"), ("backend", &be(b))];
        assert_eq!(
            s.value("mesh_backend_connections", &labels),
            seen,
            "backend {id}"
        );
        let draining = i == 2;
        let state = |st| s.value("mesh_backend_state", &[labels[0], labels[1], ("state", st)]);
        assert_eq!(state("draining"), u64::from(draining), "backend {id}");
        assert_eq!(state("active"), u64::from(!draining), "backend {id}");
        assert_eq!(s.value("mesh_backend_health", &labels), 1);
        assert_eq!(s.value("mesh_backend_health_transitions", &labels), 0);
    }
    assert_eq!(backends[2].accepted(), 0, "draining takes no connections");
    let dns_be = [
        ("service", "dns"),
        ("backend", &*format!("127.0.0.1:{}", dns_backend.port())),
    ];
    assert_eq!(s.value("mesh_backend_udp_flows", &dns_be), 6);

    // Redirect: the same kernel counters meshctl reads.
    let c = &redirect["counters"];
    for (family, labels, field) in [
        (
            "mesh_redirect_sockets",
            &[("result", "added")][..],
            "sockets_added",
        ),
        (
            "mesh_redirect_sockets",
            &[("result", "skipped")][..],
            "sockets_skipped",
        ),
        ("mesh_redirect_messages", &[][..], "msgs_redirected"),
        ("mesh_redirect_bytes", &[][..], "bytes_redirected"),
        ("mesh_redirect_fallback_messages", &[][..], "msgs_fallback"),
        ("mesh_redirect_fallback_bytes", &[][..], "bytes_fallback"),
    ] {
        assert_eq!(
            Some(s.value(family, labels)),
            c[field].as_u64(),
            "{family} vs meshctl redirect {field}"
        );
    }

    // Map fill: entries the agent wrote, capacities as configured.
    let slots: u64 = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|svc| svc["backends"].as_array().unwrap())
        .map(|b| b["slots"].as_u64().unwrap())
        .sum();
    for (map, entries, capacity) in [
        ("MESH_SERVICES", 3, 64),
        ("MESH_BACKENDS", 4, 128),
        ("MESH_SLOTS", slots, 4096),
    ] {
        assert_eq!(
            s.value("mesh_map_entries", &[("map", map)]),
            entries,
            "{map}"
        );
        assert_eq!(
            s.value("mesh_map_capacity", &[("map", map)]),
            capacity,
            "{map}"
        );
    }

    // Reconcile and reloads: one apply, one success, one refusal.
    assert_eq!(s.value("mesh_reconcile_duration_seconds", &[]), 1);
    assert_eq!(s.value("mesh_config_reloads", &[("result", "success")]), 1);
    assert_eq!(s.value("mesh_config_reloads", &[("result", "failure")]), 1);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let stamp = s.value("mesh_config_last_reload_success_timestamp_seconds", &[]);
    assert!(stamp > 0 && stamp <= now, "{stamp} vs {now}");
    assert_eq!(s.value("mesh_sockets_destroyed", &[]), 0);

    // Build info: version and commit.
    let (labels, _) = &s.samples("mesh_build")[0];
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!labels["git_commit"].is_empty(), "{labels:?}");
    drop(held);
    Ok(())
}

#[test]
fn metrics_can_be_turned_off_and_a_taken_port_is_refused_with_what_to_do() -> Result<()> {
    let backend = TestBackend::new(1)?;
    let cgroup = TestCgroup::new("metrics-off")?;
    let yaml = format!(
        "services:\n  - name: web\n    vip: {}\n    port: 80\n    backends:\n      - {{address: 127.0.0.1, port: {}}}\n",
        vip4(9, 80).ip(),
        backend.port()
    );
    {
        let agent = Agent::start_with(&yaml, &cgroup, &["--metrics-addr", "off"])?;
        assert_eq!(agent.status()?["metrics_addr"], Value::Null);
        let table = agent.meshctl(&["status"])?;
        assert!(
            String::from_utf8_lossy(&table.stdout).contains("off"),
            "{table:?}"
        );
    }

    // The port is held by this test; the agent must refuse to start.
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.to_string();
    let (code, log) = Agent::start_expect_failure_with(&yaml, &cgroup, &["--metrics-addr", &port])?;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains(&port) && log.contains("--metrics-addr"),
        "{log}"
    );
    Ok(())
}
