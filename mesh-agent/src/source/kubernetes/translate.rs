//! Kubernetes Services and EndpointSlices → mesh services, read as
//! kube-proxy and Cilium's kube-proxy replacement read them. Pure: no API
//! calls, no clock; the same objects always give the same services.
//!
//! - One mesh service per ClusterIP (one per family on a dual-stack
//!   Service) per TCP or UDP service port. SCTP ports are not served
//!   (the kernel programs steer TCP and UDP only).
//! - Its backends are the union of the Service's EndpointSlices of that
//!   family, matched by port name and protocol (`endpoints`).
//! - Mesh settings come from `mesh.dev/*` annotations (`annotations`).
//! - Only ClusterIPs are frontends: NodePorts, externalIPs and load
//!   balancer addresses of the same Service are not served here.

mod annotations;
mod endpoints;
#[cfg(test)]
mod fixtures;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service as KubeService, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub use self::annotations::KNOWN_ANNOTATIONS;
use crate::config::DEFAULT_AFFINITY_TIMEOUT_S;
use crate::state::{MtlsMode, Origin, PanicMode, Policy, Protocol, Service};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy; kube-proxy skips them.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// What translation needs to know about the node the agent runs on.
#[derive(Clone, Copy, Debug)]
pub struct ThisNode<'a> {
    /// The Node's name, as endpoints' `nodeName` and `hints.forNodes` say it.
    pub name: &'a str,
    /// Its `topology.kubernetes.io/zone` label, if it has one.
    pub zone: Option<&'a str>,
}

/// Why a Service is not served at all (kube-proxy skips these too); not an
/// error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// `type: ExternalName`: a DNS alias, no virtual IP.
    ExternalName,
    /// `clusterIP: None`: DNS returns the pods themselves.
    Headless,
    /// Labelled `service.kubernetes.io/service-proxy-name` (the value): another
    /// proxy serves it.
    ProxyName(String),
    /// No ClusterIP (not allocated yet, or a spec without one).
    NoClusterIp,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::ExternalName => f.write_str("type ExternalName (a DNS alias, no virtual IP)"),
            Skip::Headless => f.write_str("headless (clusterIP: None)"),
            Skip::ProxyName(proxy) => write!(
                f,
                "labelled {SERVICE_PROXY_NAME_LABEL}={proxy:?} (another proxy serves it)"
            ),
            Skip::NoClusterIp => f.write_str("no ClusterIP allocated"),
        }
    }
}

/// Why `svc` is not served, or `None` when it is.
pub fn skip_reason(svc: &KubeService) -> Option<Skip> {
    if let Some(proxy) = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_PROXY_NAME_LABEL))
    {
        return Some(Skip::ProxyName(proxy.clone()));
    }
    let Some(spec) = &svc.spec else {
        return Some(Skip::NoClusterIp);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some(Skip::ExternalName);
    }
    match cluster_ip_texts(spec).first() {
        Some(&"None") => Some(Skip::Headless),
        Some(ip) if !ip.is_empty() => None,
        _ => Some(Skip::NoClusterIp),
    }
}

/// An address family, as frontend names and EndpointSlices' `addressType`
/// spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// The EndpointSlice `addressType` of this family.
    pub fn address_type(self) -> &'static str {
        match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// The mesh name of one frontend:
/// `<namespace>/<name>:<port>/<tcp|udp>/<ipv4|ipv6>`, e.g.
/// `default/web:80/tcp/ipv4`.
pub fn frontend_name(
    namespace: &str,
    name: &str,
    port: u16,
    protocol: Protocol,
    family: Family,
) -> String {
    format!("{namespace}/{name}:{port}/{protocol}/{family}")
}

/// A Service that cannot be served as it is written.
#[derive(Debug, thiserror::Error)]
#[error("Service {service}: {problem}")]
pub struct TranslateError {
    /// `namespace/name`.
    pub service: String,
    pub problem: Problem,
}

/// What is wrong with a Service. Values from the object are printed
/// quoted and escaped (`{:?}`), so no control character reaches a log.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error(
        "metadata.{field} is {value:?}; a Service needs a name and a namespace without control characters"
    )]
    BadMetadata { field: &'static str, value: String },
    #[error(
        "annotation {key:?} is not one mesh knows; remove it or fix its spelling (known: {})",
        KNOWN_ANNOTATIONS.join(", ")
    )]
    UnknownAnnotation { key: String },
    #[error("annotation {key} is {value:?}; accepted: {accepted}")]
    BadAnnotation {
        key: &'static str,
        value: String,
        accepted: &'static str,
    },
    #[error("annotation {key} is set, but {needs}; {remedy}")]
    AnnotationWithout {
        key: &'static str,
        needs: &'static str,
        remedy: &'static str,
    },
    #[error(
        "annotation {} is {timeout} ms, longer than the check interval of {interval} ms; a \
         check must end before the next one starts, so lower the timeout or raise {}",
        annotations::HEALTH_CHECK_TIMEOUT_MS,
        annotations::HEALTH_CHECK_INTERVAL_MS
    )]
    TimeoutOverInterval { timeout: u32, interval: u32 },
    #[error(
        "annotation {} is strict, but port {port}/UDP is UDP; the mTLS tunnel (HBONE) carries \
         TCP only, so set it to permissive (UDP then goes directly) or remove the UDP port",
        annotations::MTLS
    )]
    StrictUdp { port: u16 },
    #[error(
        "{field} is {value:?}, which is not an IP address; expected the ClusterIP the API server allocated"
    )]
    BadClusterIp { field: &'static str, value: String },
    #[error(
        "spec.clusterIPs has two {family} addresses ({first} and {second}); accepted: at most \
         one per family"
    )]
    TwoClusterIps {
        family: Family,
        first: IpAddr,
        second: IpAddr,
    },
    #[error("spec.ports[{index}].port is {value}; accepted: a port from 1 to 65535")]
    BadPort { index: usize, value: i32 },
    #[error("spec.ports[{index}].protocol is {value:?}; accepted: TCP, UDP, SCTP")]
    UnknownProtocol { index: usize, value: String },
    #[error(
        "spec.ports[{index}] is port {port}/{protocol} again; accepted: each port and protocol once"
    )]
    DuplicatePort {
        index: usize,
        port: u16,
        protocol: Protocol,
    },
    #[error(
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds is {value}; accepted: 1 to 86400 seconds"
    )]
    AffinityTimeout { value: i32 },
}

/// The mesh services of `svc`: one per ClusterIP per TCP or UDP port, each
/// with the backends `slices` give it for this node (topology applied).
/// A Service that `skip_reason` skips gives none. Only the slices labelled
/// with this Service's name, in its namespace, count.
pub fn translate<'a>(
    svc: &KubeService,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &ThisNode,
) -> Result<Vec<Service>, TranslateError> {
    if skip_reason(svc).is_some() {
        return Ok(Vec::new());
    }
    let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let fail = |problem| TranslateError {
        service: format!("{}/{}", namespace.escape_debug(), name.escape_debug()),
        problem,
    };
    for (field, value) in [("namespace", namespace), ("name", name)] {
        if value.is_empty() || value.chars().any(char::is_control) {
            return Err(fail(Problem::BadMetadata {
                field,
                value: value.to_owned(),
            }));
        }
    }
    // Not skipped, so it has a spec.
    let Some(spec) = &svc.spec else {
        return Ok(Vec::new());
    };
    let settings = annotations::settings(svc.metadata.annotations.as_ref()).map_err(fail)?;
    let affinity_timeout_s = affinity(spec).map_err(fail)?;
    let cluster_ips = cluster_ips(spec).map_err(fail)?;
    let ports = ports(spec).map_err(fail)?;
    if settings.mtls == Some(MtlsMode::Strict)
        && let Some(udp) = ports.iter().find(|p| p.protocol == Protocol::Udp)
    {
        return Err(fail(Problem::StrictUdp { port: udp.port }));
    }
    let topology = endpoints::Topology::of(svc);
    let slices: Vec<&EndpointSlice> = slices
        .into_iter()
        .filter(|slice| belongs_to(slice, namespace, name))
        .collect();

    let mut services = Vec::with_capacity(cluster_ips.len() * ports.len());
    for &vip in &cluster_ips {
        let family = Family::of(vip);
        let family_slices: Vec<&EndpointSlice> = slices
            .iter()
            .copied()
            .filter(|s| s.address_type == family.address_type())
            .collect();
        for port in &ports {
            let frontend = SocketAddr::new(vip, port.port);
            let backends = endpoints::backends(
                &family_slices,
                family,
                &port.matcher(),
                topology,
                node,
                frontend,
            );
            services.push(Service {
                name: frontend_name(namespace, name, port.port, port.protocol, family),
                vip,
                port: port.port,
                protocol: port.protocol,
                algorithm: settings.algorithm,
                affinity_timeout_s,
                policy: Policy::default(),
                drain_timeout_s: settings.drain_timeout_s,
                destroy_on_removal: None,
                same_node_redirect: settings.same_node_redirect,
                health_check: settings.health_check.clone(),
                outlier_detection: None,
                panic_mode: PanicMode::default(),
                mtls: settings.mtls,
                backends,
                origin: Some(Origin {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                }),
            });
        }
    }
    Ok(services)
}

/// Whether `slice` is one of the Service `namespace/name`'s.
fn belongs_to(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    slice.metadata.namespace.as_deref() == Some(namespace)
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .is_some_and(|service| service == name)
}

/// `clusterIPs` when set (dual-stack), else `clusterIP`.
fn cluster_ip_texts(spec: &ServiceSpec) -> Vec<&str> {
    match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    }
}

/// The ClusterIPs, at most one per family, in the spec's order (the
/// primary first).
fn cluster_ips(spec: &ServiceSpec) -> Result<Vec<IpAddr>, Problem> {
    let field = if spec.cluster_ips.as_ref().is_some_and(|ips| !ips.is_empty()) {
        "spec.clusterIPs"
    } else {
        "spec.clusterIP"
    };
    let mut ips: Vec<IpAddr> = Vec::with_capacity(2);
    for text in cluster_ip_texts(spec) {
        let ip: IpAddr = text.parse().map_err(|_| Problem::BadClusterIp {
            field,
            value: text.to_owned(),
        })?;
        if let Some(&first) = ips
            .iter()
            .find(|other| Family::of(**other) == Family::of(ip))
        {
            return Err(Problem::TwoClusterIps {
                family: Family::of(ip),
                first,
                second: ip,
            });
        }
        ips.push(ip);
    }
    Ok(ips)
}

/// One served port of the Service.
struct ServicePort<'a> {
    /// Empty when the port has no name.
    name: &'a str,
    port: u16,
    protocol: Protocol,
}

impl ServicePort<'_> {
    fn matcher(&self) -> endpoints::PortMatch<'_> {
        endpoints::PortMatch {
            name: self.name,
            protocol: match self.protocol {
                Protocol::Udp => "UDP",
                Protocol::Tcp | Protocol::Both => "TCP",
            },
        }
    }
}

/// The TCP and UDP ports, in the spec's order; SCTP ports are left out.
fn ports(spec: &ServiceSpec) -> Result<Vec<ServicePort<'_>>, Problem> {
    let mut ports: Vec<ServicePort> = Vec::new();
    for (index, raw) in spec.ports.iter().flatten().enumerate() {
        let protocol = match raw.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => continue,
            other => {
                return Err(Problem::UnknownProtocol {
                    index,
                    value: other.to_owned(),
                });
            }
        };
        let port = match u16::try_from(raw.port) {
            Ok(port @ 1..) => port,
            _ => {
                return Err(Problem::BadPort {
                    index,
                    value: raw.port,
                });
            }
        };
        if ports
            .iter()
            .any(|p| p.port == port && p.protocol == protocol)
        {
            return Err(Problem::DuplicatePort {
                index,
                port,
                protocol,
            });
        }
        ports.push(ServicePort {
            name: raw.name.as_deref().unwrap_or_default(),
            port,
            protocol,
        });
    }
    Ok(ports)
}

/// `sessionAffinity: ClientIP` → the timeout (Kubernetes' 3 h default).
fn affinity(spec: &ServiceSpec) -> Result<Option<u32>, Problem> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Ok(None);
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|config| config.client_ip.as_ref())
        .and_then(|client_ip| client_ip.timeout_seconds);
    match timeout {
        None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
        Some(seconds @ 1..=86_400) => Ok(Some(seconds as u32)),
        Some(value) => Err(Problem::AffinityTimeout { value }),
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::state::{Algorithm, BackendState, PRIORITY_PREFERRED, PRIORITY_TERMINATING};

    const NODE: ThisNode = ThisNode {
        name: "node-a",
        zone: Some("zone-a"),
    };

    /// Each frontend's name and its backends' `address:port`.
    fn frontends(services: &[Service]) -> Vec<(String, Vec<String>)> {
        services
            .iter()
            .map(|s| {
                let backends = s
                    .backends
                    .iter()
                    .map(|b| b.socket_addr().to_string())
                    .collect();
                (s.name.clone(), backends)
            })
            .collect()
    }

    fn owned(expected: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        expected
            .iter()
            .map(|(name, backends)| {
                (
                    name.to_string(),
                    backends.iter().map(|b| b.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn frontend_names() {
        assert_eq!(
            frontend_name("default", "web", 80, Protocol::Tcp, Family::Ipv4),
            "default/web:80/tcp/ipv4"
        );
        assert_eq!(
            frontend_name("kube-system", "kube-dns", 53, Protocol::Udp, Family::Ipv6),
            "kube-system/kube-dns:53/udp/ipv6"
        );
    }

    #[test]
    fn a_plain_service_gets_the_mesh_defaults() {
        let svc = service(
            "shop",
            "web",
            &["10.96.0.10"],
            &[port(Some("http"), "TCP", 80)],
        );
        let slice = slice(
            "shop",
            "web",
            "web-1",
            "IPv4",
            &[slice_port(Some("http"), "TCP", 8080)],
            vec![on_node(endpoint("10.1.0.2"), "node-b")],
        );
        let services = translate(&svc, [&slice], &NODE).unwrap();
        assert_eq!(
            services,
            [Service {
                name: "shop/web:80/tcp/ipv4".into(),
                vip: "10.96.0.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                algorithm: Algorithm::Weighted,
                affinity_timeout_s: None,
                policy: Policy::default(),
                drain_timeout_s: 0,
                destroy_on_removal: None,
                same_node_redirect: true,
                health_check: None,
                outlier_detection: None,
                panic_mode: PanicMode::All,
                mtls: None,
                backends: vec![crate::state::Backend {
                    address: "10.1.0.2".parse().unwrap(),
                    port: 8080,
                    weight: 1,
                    state: BackendState::Active,
                    node: Some("node-b".into()),
                    tunnel: false,
                    priority: PRIORITY_PREFERRED,
                }],
                origin: Some(Origin {
                    namespace: "shop".into(),
                    name: "web".into(),
                }),
            }]
        );
    }

    /// Named target ports resolve per slice; a port matches by name and
    /// protocol; TCP and UDP on one port number are two frontends; SCTP is
    /// not served.
    #[test]
    fn ports_match_by_name_and_protocol_per_slice() {
        let svc = service(
            "default",
            "dns",
            &["10.96.0.53"],
            &[
                port(Some("dns-tcp"), "TCP", 53),
                port(Some("dns"), "UDP", 53),
                port(Some("metrics"), "TCP", 9153),
                port(Some("sctp"), "SCTP", 53),
                port(Some("web"), "TCP", 80),
            ],
        );
        // Pods of one version listen on 5353, the newer ones on 6363.
        let old = slice(
            "default",
            "dns",
            "dns-old",
            "IPv4",
            &[
                slice_port(Some("dns-tcp"), "TCP", 5353),
                slice_port(Some("dns"), "UDP", 5353),
                slice_port(Some("sctp"), "SCTP", 5353),
                // Same name as a TCP port, other protocol: no match.
                slice_port(Some("web"), "UDP", 8080),
            ],
            vec![endpoint("10.1.0.1"), endpoint("10.1.0.2")],
        );
        let new = slice(
            "default",
            "dns",
            "dns-new",
            "IPv4",
            &[
                // Protocol left out: TCP.
                slice_port_default_protocol(Some("dns-tcp"), 6363),
                slice_port(Some("dns"), "UDP", 6363),
                slice_port(Some("web"), "TCP", 8080),
            ],
            vec![endpoint("10.1.0.3")],
        );
        let services = translate(&svc, [&old, &new], &NODE).unwrap();
        assert_eq!(
            frontends(&services),
            owned(&[
                (
                    "default/dns:53/tcp/ipv4",
                    &["10.1.0.1:5353", "10.1.0.2:5353", "10.1.0.3:6363"]
                ),
                (
                    "default/dns:53/udp/ipv4",
                    &["10.1.0.1:5353", "10.1.0.2:5353", "10.1.0.3:6363"]
                ),
                // No slice names this port: a frontend without backends.
                ("default/dns:9153/tcp/ipv4", &[]),
                ("default/dns:80/tcp/ipv4", &["10.1.0.3:8080"]),
            ])
        );
        assert_eq!(services[1].protocol, Protocol::Udp);
    }

    /// An unnamed service port matches an unnamed slice port, whether the
    /// name is left out or empty.
    #[test]
    fn unnamed_ports_match_unnamed_slice_ports() {
        let svc = service("default", "web", &["10.96.0.10"], &[port(None, "TCP", 80)]);
        let a = slice(
            "default",
            "web",
            "web-a",
            "IPv4",
            &[slice_port(Some(""), "TCP", 8080)],
            vec![endpoint("10.1.0.1")],
        );
        let b = slice(
            "default",
            "web",
            "web-b",
            "IPv4",
            &[
                slice_port(None, "TCP", 8081),
                slice_port(Some("x"), "TCP", 9),
            ],
            vec![endpoint("10.1.0.2")],
        );
        let services = translate(&svc, [&a, &b], &NODE).unwrap();
        assert_eq!(
            frontends(&services),
            owned(&[(
                "default/web:80/tcp/ipv4",
                &["10.1.0.1:8080", "10.1.0.2:8081"]
            )])
        );
    }

    #[test]
    fn dual_stack_gives_one_frontend_per_family_and_port() {
        let svc = service(
            "default",
            "web",
            &["10.96.0.10", "fd00:96::10"],
            &[
                port(Some("http"), "TCP", 80),
                port(Some("https"), "TCP", 443),
            ],
        );
        let ports = [
            slice_port(Some("http"), "TCP", 8080),
            slice_port(Some("https"), "TCP", 8443),
        ];
        let v4 = slice(
            "default",
            "web",
            "web-v4",
            "IPv4",
            &ports,
            // An IPv6 address in an IPv4 slice is not an IPv4 endpoint.
            vec![endpoint("10.1.0.1"), endpoint("fd00:1::9")],
        );
        let v6 = slice(
            "default",
            "web",
            "web-v6",
            "IPv6",
            &ports,
            vec![endpoint("fd00:1::1"), endpoint("10.1.0.9")],
        );
        let fqdn = slice(
            "default",
            "web",
            "web-fqdn",
            "FQDN",
            &ports,
            vec![endpoint("web.example.com")],
        );
        let services = translate(&svc, [&v6, &fqdn, &v4], &NODE).unwrap();
        assert_eq!(
            frontends(&services),
            owned(&[
                ("default/web:80/tcp/ipv4", &["10.1.0.1:8080"]),
                ("default/web:443/tcp/ipv4", &["10.1.0.1:8443"]),
                ("default/web:80/tcp/ipv6", &["[fd00:1::1]:8080"]),
                ("default/web:443/tcp/ipv6", &["[fd00:1::1]:8443"]),
            ])
        );
        let vips: Vec<String> = services.iter().map(|s| s.frontend().to_string()).collect();
        assert_eq!(
            vips,
            [
                "10.96.0.10:80",
                "10.96.0.10:443",
                "[fd00:96::10]:80",
                "[fd00:96::10]:443"
            ]
        );
        // Single-stack IPv6: only `clusterIP`, no `clusterIPs`.
        let mut v6_only = service("default", "web", &[], &[port(Some("http"), "TCP", 80)]);
        if let Some(spec) = v6_only.spec.as_mut() {
            spec.cluster_ip = Some("fd00:96::10".into());
        }
        let services = translate(&v6_only, [&v4, &v6], &NODE).unwrap();
        assert_eq!(
            frontends(&services),
            owned(&[("default/web:80/tcp/ipv6", &["[fd00:1::1]:8080"])])
        );
    }

    #[test]
    fn skipped_services_give_no_frontends() {
        let web = || service("default", "web", &["10.96.0.10"], &[port(None, "TCP", 80)]);
        let slice = slice(
            "default",
            "web",
            "web-1",
            "IPv4",
            &[slice_port(None, "TCP", 80)],
            vec![endpoint("10.1.0.1")],
        );
        assert_eq!(skip_reason(&web()), None);

        let mut headless = web();
        if let Some(spec) = headless.spec.as_mut() {
            spec.cluster_ip = Some("None".into());
            spec.cluster_ips = Some(vec!["None".into()]);
        }
        let mut external = web();
        if let Some(spec) = external.spec.as_mut() {
            spec.type_ = Some("ExternalName".into());
            spec.external_name = Some("db.example.com".into());
            spec.cluster_ip = None;
            spec.cluster_ips = None;
        }
        let mut other_proxy = web();
        other_proxy.metadata.labels = Some(
            [(
                SERVICE_PROXY_NAME_LABEL.to_owned(),
                "other-proxy".to_owned(),
            )]
            .into_iter()
            .collect(),
        );
        let mut pending = web();
        if let Some(spec) = pending.spec.as_mut() {
            spec.cluster_ip = Some(String::new());
            spec.cluster_ips = None;
        }
        let mut no_spec = web();
        no_spec.spec = None;
        for (svc, skip) in [
            (headless, Skip::Headless),
            (external, Skip::ExternalName),
            (other_proxy, Skip::ProxyName("other-proxy".into())),
            (pending, Skip::NoClusterIp),
            (no_spec, Skip::NoClusterIp),
        ] {
            assert_eq!(skip_reason(&svc), Some(skip.clone()));
            assert_eq!(translate(&svc, [&slice], &NODE).unwrap(), [], "{skip}");
        }
    }

    /// A Service's backends are the union of its slices; an endpoint seen
    /// in two slices (moving between them) is one backend with the better
    /// of its two conditions; slices of other Services do not count.
    #[test]
    fn backends_are_the_union_of_the_services_slices() {
        let svc = service("shop", "web", &["10.96.0.10"], &[port(None, "TCP", 80)]);
        let ports = [slice_port(None, "TCP", 8080)];
        let one = slice(
            "shop",
            "web",
            "web-1",
            "IPv4",
            &ports,
            vec![
                endpoint("10.1.0.1"),
                // Not ready yet in this slice ...
                conditions(endpoint("10.1.0.5"), Some(false), Some(false), Some(false)),
                terminating_serving(endpoint("10.1.0.6")),
            ],
        );
        let two = slice(
            "shop",
            "web",
            "web-2",
            "IPv4",
            &ports,
            // ... and ready in this one.
            vec![endpoint("10.1.0.2"), endpoint("10.1.0.5")],
        );
        let three = slice(
            "shop",
            "web",
            "web-3",
            "IPv4",
            &ports,
            vec![
                endpoint("10.1.0.3"),
                conditions(endpoint("10.1.0.6"), Some(false), Some(false), Some(false)),
            ],
        );
        let other_service = slice(
            "shop",
            "api",
            "api-1",
            "IPv4",
            &ports,
            vec![endpoint("10.1.0.7")],
        );
        let other_namespace = slice(
            "dev",
            "web",
            "web-1",
            "IPv4",
            &ports,
            vec![endpoint("10.1.0.8")],
        );
        let mut unlabelled = slice(
            "shop",
            "web",
            "web-x",
            "IPv4",
            &ports,
            vec![endpoint("10.1.0.9")],
        );
        unlabelled.metadata.labels = None;

        let all = [
            &one,
            &two,
            &three,
            &other_service,
            &other_namespace,
            &unlabelled,
        ];
        let services = translate(&svc, all, &NODE).unwrap();
        let backends: Vec<(String, BackendState, u8)> = services[0]
            .backends
            .iter()
            .map(|b| (b.socket_addr().to_string(), b.state, b.priority))
            .collect();
        let active = BackendState::Active;
        assert_eq!(
            backends,
            [
                ("10.1.0.1:8080".into(), active, PRIORITY_PREFERRED),
                ("10.1.0.2:8080".into(), active, PRIORITY_PREFERRED),
                ("10.1.0.3:8080".into(), active, PRIORITY_PREFERRED),
                ("10.1.0.5:8080".into(), active, PRIORITY_PREFERRED),
                // Terminating and serving beats not ready.
                ("10.1.0.6:8080".into(), active, PRIORITY_TERMINATING),
            ]
        );
        // The slices' order changes nothing.
        for order in [
            [&three, &two, &one],
            [&two, &three, &one],
            [&one, &three, &two],
        ] {
            assert_eq!(translate(&svc, order, &NODE).unwrap(), services);
        }
    }

    /// Backends sorted by address then port, whatever the slices' order;
    /// identical input, identical output.
    #[test]
    fn identical_input_gives_identical_output() {
        let svc = service(
            "shop",
            "web",
            &["10.96.0.10", "fd00:96::10"],
            &[port(Some("http"), "TCP", 80), port(Some("dns"), "UDP", 53)],
        );
        let ports = [
            slice_port(Some("http"), "TCP", 8080),
            slice_port(Some("dns"), "UDP", 5353),
        ];
        let a = slice(
            "shop",
            "web",
            "web-a",
            "IPv4",
            &ports,
            vec![
                endpoint("10.1.0.30"),
                endpoint("10.1.0.4"),
                endpoint("10.1.0.200"),
            ],
        );
        let b = slice(
            "shop",
            "web",
            "web-b",
            "IPv4",
            &ports,
            vec![endpoint("10.1.0.100"), endpoint("10.1.0.5")],
        );
        let c = slice(
            "shop",
            "web",
            "web-c",
            "IPv6",
            &ports,
            vec![endpoint("fd00:1::b"), endpoint("fd00:1::a")],
        );
        let first = translate(&svc, [&a, &b, &c], &NODE).unwrap();
        let again = translate(&svc.clone(), [&c.clone(), &b.clone(), &a.clone()], &NODE).unwrap();
        assert_eq!(first, again);
        let addresses: Vec<String> = first[0]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(
            addresses,
            [
                "10.1.0.4",
                "10.1.0.5",
                "10.1.0.30",
                "10.1.0.100",
                "10.1.0.200"
            ]
        );
        let v6: Vec<String> = first[2]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(v6, ["fd00:1::a", "fd00:1::b"]);
    }

    #[test]
    fn session_affinity() {
        let with = |affinity: Option<&str>, timeout: Option<i32>| {
            let mut svc = service("shop", "web", &["10.96.0.10"], &[port(None, "TCP", 80)]);
            if let Some(spec) = svc.spec.as_mut() {
                spec.session_affinity = affinity.map(str::to_owned);
                spec.session_affinity_config =
                    timeout.map(
                        |seconds| k8s_openapi::api::core::v1::SessionAffinityConfig {
                            client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig {
                                timeout_seconds: Some(seconds),
                            }),
                        },
                    );
            }
            translate(&svc, [], &NODE).map(|services| services[0].affinity_timeout_s)
        };
        assert_eq!(with(None, None).unwrap(), None);
        assert_eq!(with(Some("None"), None).unwrap(), None);
        assert_eq!(with(Some("ClientIP"), None).unwrap(), Some(10_800));
        assert_eq!(with(Some("ClientIP"), Some(60)).unwrap(), Some(60));
        assert_eq!(with(Some("ClientIP"), Some(1)).unwrap(), Some(1));
        assert_eq!(with(Some("ClientIP"), Some(86_400)).unwrap(), Some(86_400));
        for bad in [0, -5, 86_401] {
            let err = with(Some("ClientIP"), Some(bad)).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "Service shop/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds is \
                     {bad}; accepted: 1 to 86400 seconds"
                )
            );
        }
    }

    #[test]
    fn strict_mtls_refuses_udp_ports() {
        let mut svc = service(
            "kube-system",
            "dns",
            &["10.96.0.53"],
            &[port(Some("tcp"), "TCP", 53), port(Some("udp"), "UDP", 53)],
        );
        svc.metadata.annotations = Some(
            [("mesh.dev/mtls".to_owned(), "strict".to_owned())]
                .into_iter()
                .collect(),
        );
        let err = translate(&svc, [], &NODE).unwrap_err().to_string();
        assert_eq!(
            err,
            "Service kube-system/dns: annotation mesh.dev/mtls is strict, but port 53/UDP is \
             UDP; the mTLS tunnel (HBONE) carries TCP only, so set it to permissive (UDP then \
             goes directly) or remove the UDP port"
        );
        if let Some(ports) = svc.spec.as_mut().and_then(|s| s.ports.as_mut()) {
            ports.pop();
        }
        let services = translate(&svc, [], &NODE).unwrap();
        assert_eq!(services[0].mtls, Some(MtlsMode::Strict));
    }

    #[test]
    fn malformed_specs_are_errors_naming_the_field() {
        let web = || service("shop", "web", &["10.96.0.10"], &[port(None, "TCP", 80)]);
        let check = |svc: KubeService, expected: &str| {
            let err = translate(&svc, [], &NODE).unwrap_err().to_string();
            assert_eq!(err, expected);
        };
        let mut bad_ip = web();
        if let Some(spec) = bad_ip.spec.as_mut() {
            spec.cluster_ips = Some(vec!["10.96.0.300".into()]);
        }
        check(
            bad_ip,
            "Service shop/web: spec.clusterIPs is \"10.96.0.300\", which is not an IP address; \
             expected the ClusterIP the API server allocated",
        );
        let mut two_v4 = web();
        if let Some(spec) = two_v4.spec.as_mut() {
            spec.cluster_ips = Some(vec!["10.96.0.10".into(), "10.96.0.11".into()]);
        }
        check(
            two_v4,
            "Service shop/web: spec.clusterIPs has two ipv4 addresses (10.96.0.10 and \
             10.96.0.11); accepted: at most one per family",
        );
        for (value, index) in [(0, 1), (65_536, 1)] {
            let svc = service(
                "shop",
                "web",
                &["10.96.0.10"],
                &[port(None, "TCP", 80), port(None, "TCP", value)],
            );
            check(
                svc,
                &format!(
                    "Service shop/web: spec.ports[{index}].port is {value}; accepted: a port \
                     from 1 to 65535"
                ),
            );
        }
        let svc = service("shop", "web", &["10.96.0.10"], &[port(None, "ICMP", 80)]);
        check(
            svc,
            "Service shop/web: spec.ports[0].protocol is \"ICMP\"; accepted: TCP, UDP, SCTP",
        );
        let svc = service(
            "shop",
            "web",
            &["10.96.0.10"],
            &[port(Some("a"), "TCP", 80), port(Some("b"), "TCP", 80)],
        );
        check(
            svc,
            "Service shop/web: spec.ports[1] is port 80/tcp again; accepted: each port and \
             protocol once",
        );
        let mut nameless = web();
        nameless.metadata.name = Some("we\nb".into());
        check(
            nameless,
            "Service shop/we\\nb: metadata.name is \"we\\nb\"; a Service needs a name and a \
             namespace without control characters",
        );
    }

    #[test]
    fn a_backend_that_is_the_frontend_itself_is_left_out() {
        let svc = service("shop", "web", &["10.96.0.10"], &[port(None, "TCP", 80)]);
        let slice = slice(
            "shop",
            "web",
            "web-1",
            "IPv4",
            &[slice_port(None, "TCP", 80)],
            vec![endpoint("10.96.0.10"), endpoint("10.1.0.1")],
        );
        let services = translate(&svc, [&slice], &NODE).unwrap();
        assert_eq!(
            frontends(&services),
            owned(&[("shop/web:80/tcp/ipv4", &["10.1.0.1:80"])])
        );
    }
}
