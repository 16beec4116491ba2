//! The config-file source: a YAML file turned into a `DesiredState`.
//!
//! Two steps: `raw` mirrors the file with serde (unknown fields rejected,
//! spans kept), then `validate` checks it and builds the model, pointing every
//! problem at the line and column it came from.

mod error;
mod fast;
mod raw;
mod source;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_saphyr::{Location, MessageFormatter, Spanned};

pub use self::error::{ConfigError, Problem};
use self::raw::{
    Int, RawBackend, RawConfig, RawHealthCheck, RawMesh, RawNode, RawOutlier, RawPolicy,
    RawService, RawWorkload,
};
pub use self::source::{ConfigSource, Scope, Update};
use crate::state::{
    Algorithm, Backend, BackendState, CheckKind, DEFAULT_TUNNEL_PORT, DesiredState, HealthCheck,
    Mesh, MtlsMode, Node, OutlierDetection, PanicMode, Policy, Protocol, Service, Workload,
};

/// Accepted spellings; the error for anything else lists them.
const PROTOCOLS: &[(&str, Protocol)] = &[
    ("tcp", Protocol::Tcp),
    ("udp", Protocol::Udp),
    ("both", Protocol::Both),
];
const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("weighted", Algorithm::Weighted),
    ("maglev", Algorithm::Maglev),
    ("least-conn", Algorithm::LeastConn),
];
const BACKEND_STATES: &[(&str, BackendState)] = &[
    ("active", BackendState::Active),
    ("draining", BackendState::Draining),
];
const POLICY_DEFAULTS: &[(&str, bool)] = &[("allow", false), ("deny", true)];
/// Health check types; `none` turns checking off.
const CHECK_TYPES: &[(&str, Option<bool>)] =
    &[("tcp", Some(false)), ("http", Some(true)), ("none", None)];
const PANIC_MODES: &[(&str, PanicMode)] = &[("all", PanicMode::All), ("none", PanicMode::None)];
const MTLS_MODES: &[(&str, MtlsMode)] = &[
    ("strict", MtlsMode::Strict),
    ("permissive", MtlsMode::Permissive),
    ("disabled", MtlsMode::Disabled),
];

/// Kubernetes' default session affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

pub fn load_file(path: &Path) -> Result<DesiredState, ConfigError> {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_str(&text, &origin),
        Err(source) => Err(ConfigError::Read {
            file: origin,
            source,
        }),
    }
}

/// The YAML library's limits, raised for node-sized configs: a node may hold
/// 100,000 services of 10 backends (about 10 million YAML nodes). Depth,
/// alias and anchor limits stay at their defaults, which is what guards
/// against hostile input.
fn parse_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 50_000_000;
    budget.max_events = 100_000_000;
    budget.max_total_scalar_bytes = 1 << 30;
    budget.max_reader_input_bytes = Some(1 << 30);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// `origin` names the text in messages, usually its file name.
pub fn parse_str(text: &str, origin: &str) -> Result<DesiredState, ConfigError> {
    if let Some(state) = parse_plain(text) {
        return Ok(state);
    }
    parse_yaml(text, origin)
}

/// A valid file in the plain layout (see `fast`), read without the YAML
/// library; None for anything else, including every invalid file, which
/// the library then reads for its exact error.
fn parse_plain(text: &str) -> Option<DesiredState> {
    let split = source::split(text)?;
    // The other sections are small: the YAML library reads them, on their
    // own (each is a top-level key and its indented body).
    let (workloads, mesh) = if split.sections.is_empty() {
        (Vec::new(), Mesh::default())
    } else {
        let mut sections = String::new();
        for range in &split.sections {
            sections.push_str(&text[range.clone()]);
            if !sections.ends_with('\n') {
                sections.push('\n');
            }
        }
        let raw: RawConfig =
            serde_saphyr::from_str_with_options(&sections, parse_options()).ok()?;
        if raw.services.is_some() {
            return None;
        }
        let mesh = mesh_part(raw.mesh, raw.nodes).ok()?.to_mesh();
        let workloads = self::workloads(raw.workloads.unwrap_or_default(), Some(&mesh)).ok()?;
        (workloads, mesh)
    };
    let identities: HashSet<&str> = workloads.iter().map(|w| w.identity.as_str()).collect();
    let mut services = Vec::with_capacity(split.items.len());
    let mut names: HashSet<String> = HashSet::with_capacity(split.items.len());
    let mut frontends: HashSet<(SocketAddr, u8)> = HashSet::with_capacity(split.items.len());
    for range in split.items {
        let (service, _, _) = service(fast::item(&text[range])?, &identities, &mesh).ok()?;
        if !names.insert(service.name.clone()) {
            return None;
        }
        for &proto in service.protocol.ip_protocols() {
            if !frontends.insert((service.frontend(), proto)) {
                return None;
            }
        }
        services.push(service);
    }
    services.sort_by(|a, b| a.name.cmp(&b.name));
    drop(identities);
    Some(DesiredState {
        services,
        workloads,
        mesh,
    })
}

/// `parse_str` through the YAML library, with every message and position.
fn parse_yaml(text: &str, origin: &str) -> Result<DesiredState, ConfigError> {
    let invalid = |(location, problem): (Location, Problem)| ConfigError::Invalid {
        file: origin.to_owned(),
        at: (location.line() > 0).then(|| (location.line() as usize, location.column() as usize)),
        problem: Box::new(problem),
    };
    let raw: RawConfig = serde_saphyr::from_str_with_options(text, parse_options())
        .map_err(|e| invalid(yaml_problem(&e)))?;
    validate(raw).map_err(invalid)
}

/// A problem and where it is.
type Check<T> = Result<T, (Location, Problem)>;

fn yaml_problem(err: &serde_saphyr::Error) -> (Location, Problem) {
    let location = err.location().unwrap_or(Location::UNKNOWN);
    // Classify by the underlying error, but keep the outer location: for an
    // alias, that is where it is used.
    let mut err = err.without_snippet();
    while let serde_saphyr::Error::AliasError { error, .. } = err {
        err = error.without_snippet();
    }
    let problem = match err {
        serde_saphyr::Error::SerdeUnknownField {
            field, expected, ..
        } => Problem::UnknownField {
            field: field.escape_debug().to_string(),
            known: expected.join(", "),
        },
        serde_saphyr::Error::DuplicateMappingKey { key: Some(key), .. } => Problem::DuplicateKey {
            key: key.escape_debug().to_string(),
        },
        // Syntax and type errors: the parser's own words (they omit the
        // location, which we print in front).
        _ => Problem::Yaml {
            message: serde_saphyr::DefaultMessageFormatter
                .format_message(err)
                .escape_debug()
                .to_string(),
        },
    };
    (location, problem)
}

fn validate(raw: RawConfig) -> Check<DesiredState> {
    let part = validate_located(raw, None)?;
    let mut services: Vec<Service> = part.services.into_iter().map(|l| l.service).collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DesiredState {
        services,
        workloads: part.workloads,
        mesh: part.mesh.to_mesh(),
    })
}

/// What one file says of the mesh: each section, when the file has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MeshPart {
    /// `mesh:`'s mode (permissive when `mesh:` names none).
    pub default_mtls: Option<MtlsMode>,
    /// `nodes:`, sorted by name.
    pub nodes: Option<Vec<Node>>,
}

impl MeshPart {
    pub fn is_empty(&self) -> bool {
        self.default_mtls.is_none() && self.nodes.is_none()
    }

    /// The mesh of a file that is the whole configuration.
    pub fn to_mesh(&self) -> Mesh {
        Mesh {
            default_mtls: self.default_mtls.unwrap_or_default(),
            nodes: self.nodes.clone().unwrap_or_default(),
        }
    }
}

/// One file, checked within itself.
pub(crate) struct Part {
    /// Sorted by name.
    pub workloads: Vec<Workload>,
    pub mesh: MeshPart,
    /// In file order.
    pub services: Vec<Located>,
}

/// A service with where its name and VIP are, for checks across files.
pub(crate) struct Located {
    pub service: Service,
    pub name_at: Location,
    pub vip_at: Location,
}

/// Workloads, mesh sections and services of one file, checked within the
/// file. With `others` (a file of a directory), policies may also name
/// those identities (workloads of other files), and services are checked
/// against that mesh (the directory's) instead of the file's own.
fn validate_located(raw: RawConfig, others: Option<(&HashSet<String>, &Mesh)>) -> Check<Part> {
    let mesh_part = mesh_part(raw.mesh, raw.nodes)?;
    let own_mesh;
    let mesh = match others {
        Some((_, mesh)) => mesh,
        None => {
            own_mesh = mesh_part.to_mesh();
            &own_mesh
        }
    };
    let workloads = workloads(raw.workloads.unwrap_or_default(), Some(mesh))?;
    let mut identities: HashSet<&str> = workloads.iter().map(|w| w.identity.as_str()).collect();
    if let Some((more, _)) = others {
        identities.extend(more.iter().map(String::as_str));
    }
    let mut services: Vec<Located> = Vec::new();
    // Where each name was first seen and which service owns each frontend,
    // so a clash can name the earlier one.
    let mut names: HashMap<String, Location> = HashMap::new();
    let mut frontends: HashMap<(SocketAddr, u8), String> = HashMap::new();
    for raw_service in raw.services.unwrap_or_default() {
        let (service, name_at, vip_at) = service(raw_service, &identities, mesh)?;
        if let Some(first) = names.get(&service.name) {
            return Err((
                name_at,
                Problem::DuplicateName {
                    name: service.name,
                    first_line: first.line() as usize,
                },
            ));
        }
        // `both` clashes with a tcp or a udp service on the same VIP:port.
        for &proto in service.protocol.ip_protocols() {
            if let Some(first) = frontends.get(&(service.frontend(), proto)) {
                return Err((
                    vip_at,
                    Problem::DuplicateFrontend {
                        frontend: format!("{}/{}", service.frontend(), service.protocol),
                        service: service.name,
                        first: first.clone(),
                    },
                ));
            }
        }
        names.insert(service.name.clone(), name_at);
        for &proto in service.protocol.ip_protocols() {
            frontends.insert((service.frontend(), proto), service.name.clone());
        }
        services.push(Located {
            service,
            name_at,
            vip_at,
        });
    }
    drop(identities);
    Ok(Part {
        workloads,
        mesh: mesh_part,
        services,
    })
}

/// One file of a config directory: its workloads, mesh sections and
/// services (with positions), the services checked against the directory's
/// `mesh`; errors name `origin`.
pub(crate) fn parse_part(
    text: &str,
    origin: &str,
    more_identities: &HashSet<String>,
    mesh: &Mesh,
) -> Result<Part, ConfigError> {
    let invalid = |(location, problem): (Location, Problem)| invalid(origin, location, problem);
    let raw: RawConfig = serde_saphyr::from_str_with_options(text, parse_options())
        .map_err(|e| invalid(yaml_problem(&e)))?;
    validate_located(raw, Some((more_identities, mesh))).map_err(invalid)
}

/// What a file of a directory says for the whole directory, with where,
/// for checks across files.
pub(crate) struct Sections {
    /// Each workload with where its name is.
    pub workloads: Vec<(Workload, Location)>,
    pub mesh: MeshPart,
    /// Where the `mesh:` and `nodes:` sections are, when present.
    pub mesh_at: Option<Location>,
    pub nodes_at: Option<Location>,
}

/// The workloads and mesh sections of one file (the file's own checks of
/// them included).
pub(crate) fn sections_located(text: &str, origin: &str) -> Result<Sections, ConfigError> {
    let invalid = |(location, problem): (Location, Problem)| invalid(origin, location, problem);
    let raw: RawConfig = serde_saphyr::from_str_with_options(text, parse_options())
        .map_err(|e| invalid(yaml_problem(&e)))?;
    let mesh_at = raw.mesh.as_ref().map(|m| m.referenced);
    let nodes_at = raw.nodes.as_ref().map(|n| n.referenced);
    let mesh = mesh_part(raw.mesh, raw.nodes).map_err(invalid)?;
    let raw = raw.workloads.unwrap_or_default();
    let at: HashMap<String, Location> = raw
        .iter()
        .filter_map(|w| w.value.name.as_ref())
        .map(|n| (n.value.clone(), n.referenced))
        .collect();
    let workloads = workloads(raw, None).map_err(invalid)?;
    let workloads = workloads
        .into_iter()
        .map(|w| {
            let location = at.get(&w.name).copied().unwrap_or(Location::UNKNOWN);
            (w, location)
        })
        .collect();
    Ok(Sections {
        workloads,
        mesh,
        mesh_at,
        nodes_at,
    })
}

/// One item of a file's `services:` list (as written, indentation and
/// all), checked on its own; None when it is not exactly one valid service
/// (the caller then reads the whole file, for the error and its position).
/// `mesh` is the mesh the item is checked against (its nodes and default).
pub(crate) fn parse_item(text: &str, identities: &HashSet<&str>, mesh: &Mesh) -> Option<Service> {
    let raw = match fast::item(text) {
        Some(raw) => raw,
        None => {
            let raw: Vec<Spanned<RawService>> =
                serde_saphyr::from_str_with_options(text, parse_options()).ok()?;
            let [raw] = <[_; 1]>::try_from(raw).ok()?;
            raw
        }
    };
    service(raw, identities, mesh)
        .ok()
        .map(|(service, _, _)| service)
}

fn invalid(origin: &str, location: Location, problem: Problem) -> ConfigError {
    ConfigError::Invalid {
        file: origin.to_owned(),
        at: (location.line() > 0).then(|| (location.line() as usize, location.column() as usize)),
        problem: Box::new(problem),
    }
}

fn workloads(raw: Vec<Spanned<RawWorkload>>, mesh: Option<&Mesh>) -> Check<Vec<Workload>> {
    let mut workloads = Vec::new();
    let mut names: HashMap<String, Location> = HashMap::new();
    for raw in raw {
        let at = raw.referenced;
        let raw = raw.value;
        let name = required(raw.name, at, "a workload", "name")?;
        valid_name(&name, "workload name")?;
        if let Some(first) = names.insert(name.value.clone(), name.referenced) {
            return Err((
                name.referenced,
                Problem::DuplicateWorkload {
                    name: name.value,
                    first_line: first.line() as usize,
                },
            ));
        }
        let what = format!("workload '{}'", name.value);
        let cgroup = required(raw.cgroup, at, &what, "cgroup")?;
        let path = PathBuf::from(&cgroup.value);
        if !path.is_absolute() {
            return Err((
                cgroup.referenced,
                Problem::RelativeCgroup {
                    name: name.value,
                    path: quote(&cgroup.value),
                },
            ));
        }
        let identity = match raw.identity {
            Some(identity) => {
                valid_identity(&identity)?;
                identity.value
            }
            None => name.value.clone(),
        };
        let node = match (raw.node, mesh) {
            (None, _) => None,
            // A file of a directory: its nodes may be in another file;
            // `validate_located` checks it against the directory's.
            (Some(node), None) => Some(node.value),
            (Some(node), Some(mesh)) if mesh.node(&node.value).is_some() => Some(node.value),
            (Some(node), Some(mesh)) => {
                return Err((
                    node.referenced,
                    Problem::WorkloadUnknownNode {
                        workload: name.value,
                        node: node.value.escape_debug().to_string(),
                        known: node_names(mesh),
                    },
                ));
            }
        };
        workloads.push(Workload {
            name: name.value,
            cgroup: path,
            identity,
            node,
            addresses: Vec::new(),
        });
    }
    workloads.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(workloads)
}

/// A workload's identity: a short name, or a workload SPIFFE ID
/// (`spiffe://<td>/ns/<ns>/sa/<sa>`).
fn valid_identity(identity: &Spanned<String>) -> Check<()> {
    if !identity.value.starts_with("spiffe://") {
        return valid_name(identity, "identity");
    }
    match identity.value.parse::<crate::identity::SpiffeId>() {
        Ok(id) if id.workload_parts().is_some() => Ok(()),
        Ok(_) => Err((
            identity.referenced,
            Problem::BadWorkloadSpiffeId {
                id: identity.value.escape_debug().to_string(),
                why: "it is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>".into(),
            },
        )),
        Err(e) => Err((
            identity.referenced,
            Problem::BadWorkloadSpiffeId {
                id: identity.value.escape_debug().to_string(),
                why: e.to_string(),
            },
        )),
    }
}

/// One service, with where its name and VIP are for the cross-service
/// checks. `mesh` gives the nodes its backends may name and the default
/// mTLS mode.
fn service(
    raw: Spanned<RawService>,
    identities: &HashSet<&str>,
    mesh: &Mesh,
) -> Check<(Service, Location, Location)> {
    let at = raw.referenced;
    let raw = raw.value;
    let name = required(raw.name, at, "a service", "name")?;
    valid_name(&name, "service name")?;
    let what = format!("service '{}'", name.value);
    let vip = required(raw.vip, at, &what, "vip")?;
    let vip_address = ip(&vip, "vip")?;
    let port = port(required(raw.port, at, &what, "port")?)?;
    let protocol_at = raw.protocol.as_ref().map(|p| p.referenced);
    let protocol = one_of(raw.protocol, PROTOCOLS, Protocol::Tcp, |value, accepted| {
        Problem::UnknownProtocol { value, accepted }
    })?;
    let algorithm = one_of(
        raw.algorithm,
        ALGORITHMS,
        Algorithm::Weighted,
        |value, accepted| Problem::UnknownAlgorithm { value, accepted },
    )?;
    let affinity_timeout_s = affinity(raw.affinity, raw.affinity_timeout_seconds, &name.value)?;
    let policy = match raw.policy {
        Some(policy) => self::policy(policy.value, &name.value, identities)?,
        None => Policy::default(),
    };
    let drain_timeout_s = match raw.drain_timeout_seconds {
        None => 0,
        Some(timeout) => match timeout.value {
            Int::Value(n @ 0..=3_600) => n as u32,
            Int::Value(n) => {
                let value = n.to_string();
                return Err((timeout.referenced, Problem::DrainTimeout { value }));
            }
            Int::Other(value) => {
                return Err((timeout.referenced, Problem::DrainTimeout { value }));
            }
        },
    };
    let health_check = match raw.health_check {
        Some(check) => health_check(check.value)?,
        None => None,
    };
    let outlier_detection = match raw.outlier_detection {
        Some(outlier) => Some(outlier_detection(outlier.value)?),
        None => None,
    };
    let panic_mode = one_of(
        raw.panic_mode,
        PANIC_MODES,
        PanicMode::All,
        |value, accepted| Problem::UnknownPanicMode { value, accepted },
    )?;
    let mtls = match raw.mtls {
        Some(mode) => Some(one_of(
            Some(mode),
            MTLS_MODES,
            MtlsMode::default(),
            |value, accepted| Problem::UnknownMtls { value, accepted },
        )?),
        None => None,
    };
    let strict = mtls.unwrap_or(mesh.default_mtls) == MtlsMode::Strict;
    if strict && protocol != Protocol::Tcp {
        // HBONE tunnels TCP streams; a strict service has no other path.
        return Err((
            protocol_at.unwrap_or(at),
            Problem::StrictUdp {
                service: name.value,
                protocol,
                by_default: mtls.is_none(),
            },
        ));
    }
    let raw_backends = required(raw.backends, at, &what, "backends")?;
    let own_frontend = SocketAddr::new(vip_address, port);

    // Exact capacity: the agent keeps every service's backends for as long as
    // it runs, and growth by doubling would leave up to half of it unused.
    let mut backends = Vec::with_capacity(raw_backends.value.len());
    let mut seen: HashMap<SocketAddr, Location> = HashMap::new();
    for raw_backend in raw_backends.value {
        let (backend, address_at) = backend(raw_backend, &name.value, mesh)?;
        let address = backend.socket_addr();
        if address.is_ipv4() != own_frontend.is_ipv4() {
            return Err((
                address_at,
                Problem::FamilyMismatch {
                    service: name.value,
                    backend: address,
                },
            ));
        }
        if address == own_frontend {
            return Err((
                address_at,
                Problem::BackendLoop {
                    service: name.value,
                    backend: address,
                },
            ));
        }
        if let Some(first) = seen.insert(address, address_at) {
            return Err((
                address_at,
                Problem::DuplicateBackend {
                    service: name.value,
                    backend: address,
                    first_line: first.line() as usize,
                },
            ));
        }
        // Strict has no plaintext path: without its node, a backend could
        // only be reached in plaintext.
        if strict && backend.node.is_none() {
            return Err((
                address_at,
                Problem::StrictWithoutNode {
                    service: name.value,
                    backend: address,
                    by_default: mtls.is_none(),
                    known: node_names(mesh).into(),
                },
            ));
        }
        backends.push(backend);
    }
    // An empty service refuses its connections; make sure that was meant.
    if backends.is_empty() && !raw.allow_empty.unwrap_or(false) {
        return Err((
            raw_backends.referenced,
            Problem::NoBackends {
                service: name.value,
            },
        ));
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        return Err((
            raw_backends.referenced,
            Problem::AllWeightsZero {
                service: name.value,
            },
        ));
    }

    let service = Service {
        name: name.value,
        vip: vip_address,
        port,
        protocol,
        algorithm,
        affinity_timeout_s,
        policy,
        drain_timeout_s,
        destroy_on_removal: raw.destroy_on_removal,
        same_node_redirect: raw.same_node_redirect.unwrap_or(true),
        health_check,
        outlier_detection,
        panic_mode,
        mtls,
        backends,
        origin: None,
    };
    Ok((service, name.referenced, vip.referenced))
}

/// An optional integer field within `range`.
fn bounded(
    value: Option<Spanned<Int>>,
    field: &'static str,
    range: std::ops::RangeInclusive<u32>,
    words: &'static str,
    default: u32,
) -> Check<u32> {
    let Some(value) = value else {
        return Ok(default);
    };
    let text = match value.value {
        Int::Value(n) => match u32::try_from(n) {
            Ok(n) if range.contains(&n) => return Ok(n),
            _ => n.to_string(),
        },
        Int::Other(got) => got,
    };
    Err((
        value.referenced,
        Problem::OutOfRange {
            field,
            value: text,
            range: words,
        },
    ))
}

fn health_check(raw: RawHealthCheck) -> Check<Option<HealthCheck>> {
    let http = one_of(raw.kind, CHECK_TYPES, Some(false), |value, accepted| {
        Problem::UnknownCheckType { value, accepted }
    })?;
    let Some(http) = http else {
        return Ok(None);
    };
    let interval_ms = bounded(
        raw.interval_ms,
        "interval_ms",
        10..=3_600_000,
        "10 to 3600000 ms",
        5_000,
    )?;
    let timeout_at = raw.timeout_ms.as_ref().map(|t| t.referenced);
    let timeout_ms = bounded(
        raw.timeout_ms,
        "timeout_ms",
        1..=60_000,
        "1 to 60000 ms",
        interval_ms.min(1_000),
    )?;
    if timeout_ms > interval_ms {
        return Err((
            timeout_at.unwrap_or(Location::UNKNOWN),
            Problem::TimeoutOverInterval {
                timeout: timeout_ms,
                interval: interval_ms,
            },
        ));
    }
    let kind = if http {
        let path = match raw.path {
            Some(path) if !path.value.starts_with('/') => {
                return Err((
                    path.referenced,
                    Problem::BadCheckPath {
                        path: quote(&path.value),
                    },
                ));
            }
            Some(path) => path.value,
            None => "/".to_owned(),
        };
        let expected_status = bounded(
            raw.expected_status,
            "expected_status",
            100..=599,
            "an HTTP status from 100 to 599",
            200,
        )?;
        CheckKind::Http {
            path,
            expected_status: expected_status as u16,
        }
    } else {
        CheckKind::Tcp
    };
    Ok(Some(HealthCheck {
        kind,
        interval_ms,
        timeout_ms,
        healthy_threshold: bounded(
            raw.healthy_threshold,
            "healthy_threshold",
            1..=100,
            "1 to 100",
            2,
        )?,
        unhealthy_threshold: bounded(
            raw.unhealthy_threshold,
            "unhealthy_threshold",
            1..=100,
            "1 to 100",
            3,
        )?,
        jitter_percent: bounded(
            raw.jitter_percent,
            "jitter_percent",
            0..=100,
            "0 to 100",
            10,
        )?,
    }))
}

fn outlier_detection(raw: RawOutlier) -> Check<OutlierDetection> {
    Ok(OutlierDetection {
        consecutive_failures: bounded(
            raw.consecutive_failures,
            "consecutive_failures",
            1..=1_000,
            "1 to 1000",
            5,
        )?,
        ejection_ms: bounded(
            raw.ejection_ms,
            "ejection_ms",
            100..=3_600_000,
            "100 to 3600000 ms",
            30_000,
        )?,
    })
}

/// `affinity: true` with an optional `affinity_timeout_seconds`.
fn affinity(
    enabled: Option<bool>,
    timeout: Option<Spanned<Int>>,
    service: &str,
) -> Check<Option<u32>> {
    let enabled = enabled.unwrap_or(false);
    let Some(timeout) = timeout else {
        return Ok(enabled.then_some(DEFAULT_AFFINITY_TIMEOUT_S));
    };
    if !enabled {
        return Err((
            timeout.referenced,
            Problem::TimeoutWithoutAffinity {
                service: service.to_owned(),
            },
        ));
    }
    match timeout.value {
        Int::Value(n @ 1..=86_400) => Ok(Some(n as u32)),
        Int::Value(n) => Err((
            timeout.referenced,
            Problem::AffinityTimeout {
                value: n.to_string(),
            },
        )),
        Int::Other(got) => Err((timeout.referenced, Problem::AffinityTimeout { value: got })),
    }
}

fn policy(raw: RawPolicy, service: &str, identities: &HashSet<&str>) -> Check<Policy> {
    let default_deny = one_of(raw.default, POLICY_DEFAULTS, false, |value, accepted| {
        Problem::UnknownPolicyDefault { value, accepted }
    })?;
    let known = |list: Option<Vec<Spanned<String>>>| -> Check<Vec<Spanned<String>>> {
        let list = list.unwrap_or_default();
        for identity in &list {
            if !identities.contains(identity.value.as_str()) {
                return Err((
                    identity.referenced,
                    Problem::UnknownIdentity {
                        service: service.to_owned(),
                        identity: identity.value.escape_debug().to_string(),
                    },
                ));
            }
        }
        Ok(list)
    };
    let allow = known(raw.allow)?;
    let deny = known(raw.deny)?;
    if let Some(both) = deny
        .iter()
        .find(|d| allow.iter().any(|a| a.value == d.value))
    {
        return Err((
            both.referenced,
            Problem::AllowedAndDenied {
                service: service.to_owned(),
                identity: both.value.clone(),
            },
        ));
    }
    let names = |list: Vec<Spanned<String>>| list.into_iter().map(|s| s.value).collect();
    Ok(Policy {
        default_deny,
        allow: names(allow),
        deny: names(deny),
    })
}

/// One backend, with where its address is for the per-service checks; its
/// `node:` must be one of `mesh`'s nodes.
fn backend(raw: Spanned<RawBackend>, service: &str, mesh: &Mesh) -> Check<(Backend, Location)> {
    let at = raw.referenced;
    let raw = raw.value;
    let what = format!("a backend of service '{service}'");
    let address_text = required(raw.address, at, &what, "address")?;
    let address = ip(&address_text, "address")?;
    let port = port(required(raw.port, at, &what, "port")?)?;
    let node = match raw.node {
        None => None,
        Some(node) if mesh.node(&node.value).is_some() => Some(node.value),
        Some(node) => {
            let service = service.to_owned();
            let backend = SocketAddr::new(address, port);
            let name = node.value.escape_debug().to_string();
            let problem = if mesh.nodes.is_empty() {
                Problem::NoNodes {
                    service,
                    backend,
                    node: name,
                }
            } else {
                Problem::UnknownNode {
                    service: service.into(),
                    backend,
                    node: name.into(),
                    known: node_names(mesh).into(),
                }
            };
            return Err((node.referenced, problem));
        }
    };
    let backend = Backend {
        address,
        port,
        weight: match raw.weight {
            Some(weight) => self::weight(weight)?,
            None => 1,
        },
        state: one_of(
            raw.state,
            BACKEND_STATES,
            BackendState::Active,
            |value, accepted| Problem::UnknownState { value, accepted },
        )?,
        node,
        tunnel: false,
        priority: crate::state::PRIORITY_PREFERRED,
    };
    Ok((backend, address_text.referenced))
}

/// The mesh's node names for a message, the first few of a long list.
fn node_names(mesh: &Mesh) -> String {
    const SHOWN: usize = 8;
    let mut names: Vec<&str> = mesh
        .nodes
        .iter()
        .take(SHOWN)
        .map(|n| n.name.as_str())
        .collect();
    let more = mesh.nodes.len().saturating_sub(SHOWN);
    let more = format!("and {more} more");
    if mesh.nodes.len() > SHOWN {
        names.push(&more);
    }
    names.join(", ")
}

/// The `mesh:` and `nodes:` sections of one file, each checked.
fn mesh_part(
    mesh: Option<Spanned<RawMesh>>,
    nodes: Option<Spanned<Vec<Spanned<RawNode>>>>,
) -> Check<MeshPart> {
    let default_mtls = match mesh {
        Some(mesh) => Some(one_of(
            mesh.value.mtls,
            MTLS_MODES,
            MtlsMode::default(),
            |value, accepted| Problem::UnknownMtls { value, accepted },
        )?),
        None => None,
    };
    let nodes = match nodes {
        Some(nodes) => Some(self::nodes(nodes.value)?),
        None => None,
    };
    Ok(MeshPart {
        default_mtls,
        nodes,
    })
}

fn nodes(raw: Vec<Spanned<RawNode>>) -> Check<Vec<Node>> {
    let mut nodes = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, Location> = HashMap::new();
    let mut addresses: HashMap<IpAddr, (String, Location)> = HashMap::new();
    for raw in raw {
        let at = raw.referenced;
        let raw = raw.value;
        let name = required(raw.name, at, "a node", "name")?;
        valid_name(&name, "node name")?;
        if let Some(first) = names.get(&name.value) {
            return Err((
                name.referenced,
                Problem::DuplicateNode {
                    name: name.value,
                    first_line: first.line() as usize,
                },
            ));
        }
        let what = format!("node '{}'", name.value);
        let address_text = required(raw.address, at, &what, "address")?;
        let address = ip(&address_text, "address")?;
        if let Some(kind) = not_unicast(address) {
            return Err((
                address_text.referenced,
                Problem::NodeAddressNotUnicast {
                    node: name.value,
                    address,
                    kind,
                },
            ));
        }
        if let Some((first, first_at)) = addresses.get(&address) {
            return Err((
                address_text.referenced,
                Problem::DuplicateNodeAddress {
                    node: name.value,
                    address,
                    first: first.clone(),
                    first_line: first_at.line() as usize,
                },
            ));
        }
        let tunnel_port = match raw.tunnel_port {
            Some(value) => tunnel_port(value)?,
            None => DEFAULT_TUNNEL_PORT,
        };
        names.insert(name.value.clone(), name.referenced);
        addresses.insert(address, (name.value.clone(), name.referenced));
        nodes.push(Node {
            name: name.value,
            address,
            tunnel_port,
        });
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

/// Why `address` cannot be a node's (one peer's) address, if it cannot.
fn not_unicast(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        _ => None,
    }
}

fn tunnel_port(value: Spanned<Int>) -> Check<u16> {
    const RANGE: &str = "a port from 1 to 65535";
    let problem = match value.value {
        Int::Value(n) => match u16::try_from(n) {
            Ok(port @ 1..) => return Ok(port),
            _ => Problem::OutOfRange {
                field: "tunnel_port",
                value: n.to_string(),
                range: RANGE,
            },
        },
        Int::Other(got) => Problem::NotAnInteger {
            field: "tunnel_port",
            got,
            range: RANGE,
        },
    };
    Err((value.referenced, problem))
}

/// `what` names the mapping (for the message), `at` is where it starts.
fn required<T>(
    value: Option<Spanned<T>>,
    at: Location,
    what: &str,
    field: &'static str,
) -> Check<Spanned<T>> {
    value.ok_or_else(|| {
        (
            at,
            Problem::Missing {
                what: what.to_owned(),
                field,
            },
        )
    })
}

/// DNS-label-like, so names can later double as Kubernetes names.
fn valid_name(name: &Spanned<String>, what: &'static str) -> Check<()> {
    let bytes = name.value.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid = (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|b| alnum(b) || *b == b'-' || *b == b'.');
    if valid {
        return Ok(());
    }
    Err((
        name.referenced,
        Problem::BadName {
            what,
            name: name.value.escape_debug().to_string(),
        },
    ))
}

fn ip(text: &Spanned<String>, field: &'static str) -> Check<IpAddr> {
    match text.value.parse::<IpAddr>() {
        Ok(address) => Ok(address),
        Err(_) => Err((
            text.referenced,
            Problem::BadIp {
                field,
                text: quote(&text.value),
            },
        )),
    }
}

fn port(value: Spanned<Int>) -> Check<u16> {
    let problem = match value.value {
        Int::Value(0) => Problem::PortZero,
        Int::Value(n) => match u16::try_from(n) {
            Ok(port) => return Ok(port),
            Err(_) => Problem::PortOutOfRange {
                value: n.to_string(),
            },
        },
        Int::Other(got) => Problem::NotAnInteger {
            field: "port",
            got,
            range: "a port from 1 to 65535",
        },
    };
    Err((value.referenced, problem))
}

fn weight(value: Spanned<Int>) -> Check<u32> {
    let problem = match value.value {
        Int::Value(n) if n < 0 => Problem::NegativeWeight {
            value: n.to_string(),
        },
        Int::Value(n) => match u16::try_from(n) {
            Ok(weight) => return Ok(weight.into()),
            Err(_) => Problem::WeightTooLarge {
                value: n.to_string(),
            },
        },
        Int::Other(got) => Problem::NotAnInteger {
            field: "weight",
            got,
            range: "a weight from 0 to 65535",
        },
    };
    Err((value.referenced, problem))
}

/// An optional keyword field: `default` when absent, else one of `accepted`.
fn one_of<T: Copy>(
    value: Option<Spanned<String>>,
    accepted: &[(&str, T)],
    default: T,
    problem: impl FnOnce(String, String) -> Problem,
) -> Check<T> {
    let Some(value) = value else {
        return Ok(default);
    };
    match accepted.iter().find(|(word, _)| *word == value.value) {
        Some((_, parsed)) => Ok(*parsed),
        None => {
            let words: Vec<&str> = accepted.iter().map(|(word, _)| *word).collect();
            Err((
                value.referenced,
                problem(quote(&value.value), words.join(", ")),
            ))
        }
    }
}

/// User text for a message: quoted and kept on one line.
fn quote(text: &str) -> String {
    format!("'{}'", text.escape_debug())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// A valid one-service file; tests swap single lines of it.
    /// Line 2 `name` value at column 11, line 3 `vip` at 10, line 4 `port`
    /// at 11, line 6 backend `address` at 18, line 7 its `port` at 15.
    const BASE: &str = "\
services:
  - name: web
    vip: 127.10.0.1
    port: 80
    backends:
      - address: 127.0.0.1
        port: 18081
";

    fn with(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from:?} is not in BASE");
        BASE.replacen(from, to, 1)
    }

    /// Asserts the error's message and position, and that it reads as
    /// `t.yaml:LINE:COL: ...` on one line.
    #[track_caller]
    fn check(yaml: &str, needle: &str, line: usize, column: usize) {
        let err = parse_str(yaml, "t.yaml").expect_err("config should be rejected");
        let message = err.to_string();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        assert_eq!(err.location(), Some((line, column)), "{message}");
        assert!(
            message.starts_with(&format!("t.yaml:{line}:{column}: ")),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message:?}");
        // `mesh-agent check` (and every reload) reads through the source:
        // the same message and position, naming the file.
        let dir = std::env::temp_dir().join(format!(
            "mesh-config-check-{}-{}",
            std::process::id(),
            CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, yaml).unwrap();
        let via_source = ConfigSource::new(&path)
            .load(&Scope::All)
            .expect_err("the source should refuse it too")
            .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            via_source.strip_prefix(&path.display().to_string()),
            message.strip_prefix("t.yaml"),
            "{via_source}"
        );
    }

    /// Numbers the temporary files of `check`, which tests run at once.
    static CHECKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn example_file_parses() {
        let state = parse_str(include_str!("../../examples/mesh.yaml"), "mesh.yaml").unwrap();
        let backend = |port, weight| Backend {
            address: ip(127, 0, 0, 1),
            port,
            weight,
            state: BackendState::Active,
            node: None,
            tunnel: false,
            priority: crate::state::PRIORITY_PREFERRED,
        };
        let web = Service {
            name: "web".into(),
            vip: ip(127, 10, 0, 1),
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
            backends: vec![backend(18081, 1), backend(18082, 2), backend(18083, 7)],
            origin: None,
        };
        assert_eq!(
            state,
            DesiredState {
                services: vec![web],
                workloads: vec![],
                mesh: Mesh::default(),
            }
        );
    }

    #[test]
    fn defaults_order_and_weight_zero() {
        let yaml = "\
services:
  - name: web
    vip: 127.10.0.2
    port: 80
    backends:
      - address: 127.0.0.1
        port: 1
        weight: 0
      - address: 127.0.0.1
        port: 2
  - name: api
    vip: 127.10.0.1
    port: 80
    backends:
      - address: 127.0.0.1
        port: 3
";
        let state = parse_str(yaml, "t.yaml").unwrap();
        let names: Vec<_> = state.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
        let web = &state.services[1];
        assert_eq!(
            (web.protocol, web.algorithm),
            (Protocol::Tcp, Algorithm::Weighted)
        );
        let weights: Vec<_> = web.backends.iter().map(|b| (b.port, b.weight)).collect();
        assert_eq!(weights, [(1, 0), (2, 1)]);
    }

    #[test]
    fn no_services_is_valid() {
        for yaml in ["", "services:\n", "services: []\n", "# nothing yet\n"] {
            assert_eq!(parse_str(yaml, "t.yaml").unwrap(), DesiredState::default());
        }
    }

    #[test]
    fn unreadable_file() {
        let err = load_file(Path::new("/nonexistent/mesh.yaml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/mesh.yaml: cannot read: "),
            "{err}"
        );
        assert_eq!(err.location(), None);
    }

    // 1
    #[test]
    fn bad_yaml_syntax() {
        check(&with("name: web", "name: 'web"), "unclosed quote", 2, 11);
        check(&with("name: web", "name: [web"), "fix the YAML here", 2, 11);
    }

    // 2
    #[test]
    fn unknown_fields() {
        check(
            &with("    port: 80\n", "    port: 80\n    colour: red\n"),
            "unknown field `colour`; remove it or fix its spelling (known fields here: name, vip, \
             port, protocol, algorithm, allow_empty, drain_timeout_seconds, destroy_on_removal, \
             health_check, outlier_detection, panic_mode, affinity, affinity_timeout_seconds, \
             policy, same_node_redirect, mtls, backends)",
            5,
            5,
        );
        check(
            &with(
                "        port: 18081\n",
                "        port: 18081\n        wieght: 2\n",
            ),
            "unknown field `wieght`; remove it or fix its spelling (known fields here: address, \
             port, weight, state, node)",
            8,
            9,
        );
        check(
            &format!("{BASE}version: 2\n"),
            "unknown field `version`; remove it or fix its spelling (known fields here: services, workloads, mesh, nodes)",
            8,
            1,
        );
    }

    #[test]
    fn duplicate_key() {
        check(
            &with("    port: 80\n", "    port: 80\n    port: 81\n"),
            "`port` is set twice in the same mapping",
            5,
            5,
        );
    }

    // 3
    #[test]
    fn bad_ip_addresses() {
        check(
            &with("127.10.0.1", "127.10.0.300"),
            "vip '127.10.0.300' is not an IP address; write an address such as",
            3,
            10,
        );
        check(
            &with("127.0.0.1", "localhost"),
            "address 'localhost' is not an IP address",
            6,
            18,
        );
    }

    #[test]
    fn backends_share_the_vip_family() {
        check(
            &with("127.0.0.1", "fd00::2"),
            "backend [fd00::2]:18081 of service 'web' is IPv6 but the VIP is IPv4",
            6,
            18,
        );
    }

    // 4
    #[test]
    fn bad_ports() {
        check(
            &with("port: 80", "port: 0"),
            "port 0 is not a usable port",
            4,
            11,
        );
        check(
            &with("port: 80", "port: 65536"),
            "port 65536 is out of range; use a port from 1 to 65535",
            4,
            11,
        );
        check(
            &with("port: 80", "port: http"),
            "port must be a whole number, got 'http'",
            4,
            11,
        );
        check(
            &with("port: 18081", "port: 0"),
            "port 0 is not a usable port",
            7,
            15,
        );
        check(
            &with("port: 18081", "port: 99999999999999999999999"),
            "is out of range",
            7,
            15,
        );
    }

    // 5
    #[test]
    fn duplicate_frontend() {
        let second = BASE.replace("services:\n", "").replace("web", "www");
        check(
            &format!("{BASE}{second}"),
            "service 'www' uses 127.10.0.1:80/tcp, which service 'web' already uses; give one \
             of them another VIP or port",
            9,
            10,
        );
        // Same VIP on another port is a different service.
        let other_port = format!("{BASE}{}", second.replace("port: 80", "port: 81"));
        assert_eq!(parse_str(&other_port, "t.yaml").unwrap().services.len(), 2);
    }

    // 6
    #[test]
    fn duplicate_name() {
        let second = BASE
            .replace("services:\n", "")
            .replace("port: 80", "port: 81");
        check(
            &format!("{BASE}{second}"),
            "service name 'web' is already used on line 2; give each service its own name",
            8,
            11,
        );
    }

    #[test]
    fn bad_names() {
        let rule = "use 1 to 63 lowercase letters, digits, '-' or '.'";
        check(&with("name: web", "name: Web"), rule, 2, 11);
        check(&with("name: web", "name: web-"), rule, 2, 11);
        check(
            &with("name: web", "name: ''"),
            "service name '' is not valid",
            2,
            11,
        );
        check(
            &with("name: web", &format!("name: {}", "a".repeat(64))),
            "like a DNS label",
            2,
            11,
        );
        let longest = with("name: web", &format!("name: {}", "a".repeat(63)));
        assert!(parse_str(&longest, "t.yaml").is_ok());
        assert!(parse_str(&with("name: web", "name: web.v2-a"), "t.yaml").is_ok());
    }

    // 7
    #[test]
    fn bad_weights() {
        let weighted = |w: &str| {
            with(
                "port: 18081\n",
                &format!("port: 18081\n        weight: {w}\n"),
            )
        };
        check(
            &weighted("-1"),
            "weight -1 is negative; use a weight from 0 to 65535",
            8,
            17,
        );
        check(
            &weighted("65536"),
            "weight 65536 is above the maximum 65535",
            8,
            17,
        );
        check(
            &weighted("1.5"),
            "weight must be a whole number, got 1.5",
            8,
            17,
        );
        let max = parse_str(&weighted("65535"), "t.yaml").unwrap();
        assert_eq!(max.services[0].backends[0].weight, 65535);
    }

    // 8
    #[test]
    fn all_weights_zero() {
        check(
            &with("port: 18081\n", "port: 18081\n        weight: 0\n"),
            "every backend of service 'web' has weight 0; at least one backend needs a weight above 0",
            6,
            7,
        );
    }

    // 9
    #[test]
    fn empty_backends() {
        let empty = BASE.replace(
            "\n      - address: 127.0.0.1\n        port: 18081\n",
            " []\n",
        );
        check(
            &empty,
            "service 'web' has no backends; list at least one, or set `allow_empty: true` to \
             keep the VIP and refuse its connections at once",
            5,
            15,
        );
        let allowed = empty.replace("    backends:", "    allow_empty: true\n    backends:");
        let state = parse_str(&allowed, "t.yaml").unwrap();
        assert!(state.services[0].backends.is_empty());
    }

    // 10
    #[test]
    fn unknown_protocol_and_algorithm() {
        check(
            &with("    port: 80\n", "    port: 80\n    protocol: sctp\n"),
            "unknown protocol 'sctp'; accepted: tcp, udp, both",
            5,
            15,
        );
        check(
            &with(
                "    port: 80\n",
                "    port: 80\n    algorithm: round-robin\n",
            ),
            "unknown algorithm 'round-robin'; accepted: weighted, maglev, least-conn",
            5,
            16,
        );
    }

    // 11
    #[test]
    fn duplicate_backend() {
        check(
            &format!("{BASE}      - address: 127.0.0.1\n        port: 18081\n        weight: 3\n"),
            "backend 127.0.0.1:18081 is listed twice in service 'web' (first on line 6)",
            8,
            18,
        );
    }

    // 12
    #[test]
    fn missing_fields() {
        check(
            &with("  - name: web\n", "  -\n"),
            "a service has no `name`; add it",
            3,
            5,
        );
        check(
            &with("    vip: 127.10.0.1\n", ""),
            "service 'web' has no `vip`",
            2,
            5,
        );
        check(
            &with("    port: 80\n", ""),
            "service 'web' has no `port`",
            2,
            5,
        );
        let no_backends = BASE.replace(
            "    backends:\n      - address: 127.0.0.1\n        port: 18081\n",
            "",
        );
        check(&no_backends, "service 'web' has no `backends`", 2, 5);
        check(
            &with("      - address: 127.0.0.1\n        port", "      - port"),
            "a backend of service 'web' has no `address`",
            6,
            9,
        );
        check(
            &with("\n        port: 18081", " "),
            "a backend of service 'web' has no `port`",
            6,
            9,
        );
    }

    // 13
    #[test]
    fn backend_loop() {
        check(
            &format!("{BASE}      - address: 127.10.0.1\n        port: 80\n"),
            "backend 127.10.0.1:80 is the VIP and port of service 'web' itself",
            8,
            18,
        );
    }

    #[test]
    fn every_feature_parses_into_the_model() {
        let yaml = "\
workloads:
  - name: frontend
    cgroup: /sys/fs/cgroup/pods/frontend
  - name: batch
    cgroup: /sys/fs/cgroup/pods/batch
    identity: jobs
services:
  - name: dns
    vip: fd00::10
    port: 53
    protocol: both
    algorithm: maglev
    affinity: true
    affinity_timeout_seconds: 60
    policy:
      default: deny
      allow: [frontend]
      deny: [jobs]
    backends:
      - {address: 'fd00::1', port: 5353, state: draining}
      - {address: 'fd00::2', port: 5353, weight: 3}
";
        let state = parse_str(yaml, "t.yaml").unwrap();
        let dns = &state.services[0];
        assert_eq!(dns.vip, "fd00::10".parse::<IpAddr>().unwrap());
        assert_eq!(dns.protocol, Protocol::Both);
        assert_eq!(dns.algorithm, Algorithm::Maglev);
        assert_eq!(dns.affinity_timeout_s, Some(60));
        assert_eq!(
            dns.policy,
            Policy {
                default_deny: true,
                allow: vec!["frontend".into()],
                deny: vec!["jobs".into()],
            }
        );
        assert_eq!(dns.backends[0].state, BackendState::Draining);
        assert_eq!(dns.backends[0].effective_weight(), 0);
        assert_eq!(dns.backends[1].weight, 3);
        let identities: Vec<&str> = state
            .workloads
            .iter()
            .map(|w| w.identity.as_str())
            .collect();
        assert_eq!(identities, ["jobs", "frontend"], "sorted by workload name");
    }

    #[test]
    fn affinity_defaults_to_three_hours() {
        let state = parse_str(
            &with("    backends:", "    affinity: true\n    backends:"),
            "t.yaml",
        )
        .unwrap();
        assert_eq!(
            state.services[0].affinity_timeout_s,
            Some(DEFAULT_AFFINITY_TIMEOUT_S)
        );
    }

    #[test]
    fn bad_affinity_settings() {
        check(
            &with(
                "    backends:",
                "    affinity_timeout_seconds: 5\n    backends:",
            ),
            "sets affinity_timeout_seconds without `affinity: true`",
            5,
            31,
        );
        check(
            &with(
                "    backends:",
                "    affinity: true\n    affinity_timeout_seconds: 0\n    backends:",
            ),
            "affinity_timeout_seconds 0 is out of range",
            6,
            31,
        );
    }

    #[test]
    fn drain_timeout_and_socket_destruction() {
        let yaml = with(
            "    backends:",
            "    drain_timeout_seconds: 30\n    destroy_on_removal: true\n    backends:",
        );
        let web = &parse_str(&yaml, "t.yaml").unwrap().services[0];
        assert_eq!(web.drain_timeout_s, 30);
        assert!(web.destroys_sockets(mesh_common::PROTO_TCP));
        let default = &parse_str(BASE, "t.yaml").unwrap().services[0];
        assert!(!default.destroys_sockets(mesh_common::PROTO_TCP));
        assert!(default.destroys_sockets(mesh_common::PROTO_UDP));
        check(
            &with(
                "    backends:",
                "    drain_timeout_seconds: 7200\n    backends:",
            ),
            "drain_timeout_seconds 7200 is out of range; use 0 to 3600 seconds",
            5,
            28,
        );
    }

    #[test]
    fn health_checks_and_outlier_detection() {
        let yaml = with(
            "    backends:",
            "    health_check: {type: http, path: /ready, interval_ms: 200, unhealthy_threshold: 2}\n    \
             outlier_detection: {consecutive_failures: 3}\n    panic_mode: none\n    backends:",
        );
        let web = &parse_str(&yaml, "t.yaml").unwrap().services[0];
        let hc = web.health_check.as_ref().unwrap();
        assert_eq!(
            hc.kind,
            CheckKind::Http {
                path: "/ready".into(),
                expected_status: 200
            }
        );
        assert_eq!((hc.interval_ms, hc.timeout_ms), (200, 200));
        assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (2, 2));
        assert_eq!(
            web.outlier_detection.as_ref().unwrap().consecutive_failures,
            3
        );
        assert_eq!(web.panic_mode, PanicMode::None);

        let none = with(
            "    backends:",
            "    health_check: {type: none}\n    backends:",
        );
        assert!(
            parse_str(&none, "t.yaml").unwrap().services[0]
                .health_check
                .is_none()
        );
        check(
            &with(
                "    backends:",
                "    health_check: {type: icmp}\n    backends:",
            ),
            "unknown health check type 'icmp'; accepted: tcp, http, none",
            5,
            26,
        );
        check(
            &with(
                "    backends:",
                "    health_check: {interval_ms: 5}\n    backends:",
            ),
            "interval_ms 5 is out of range; use 10 to 3600000 ms",
            5,
            33,
        );
        check(
            &with(
                "    backends:",
                "    health_check: {interval_ms: 100, timeout_ms: 500}\n    backends:",
            ),
            "timeout_ms 500 is longer than interval_ms 100",
            5,
            50,
        );
        check(
            &with(
                "    backends:",
                "    health_check: {type: http, path: ready}\n    backends:",
            ),
            "health check path 'ready' must start with '/'",
            5,
            38,
        );
    }

    #[test]
    fn large_configs_parse() {
        let mut yaml = String::from("services:\n");
        for i in 0..5_000u32 {
            yaml += &format!(
                "  - {{name: s{i}, vip: 127.{}.{}.{}, port: 80, backends: [",
                20 + i / 65_536,
                (i / 256) % 256,
                i % 256
            );
            for b in 0..10 {
                yaml += &format!("{{address: 127.0.0.1, port: {}}},", 1000 + b);
            }
            yaml += "]}\n";
        }
        let state = parse_str(&yaml, "big.yaml").expect("5,000 services of 10 backends");
        assert_eq!(state.services.len(), 5_000);
    }

    #[test]
    fn unknown_backend_state() {
        check(
            &with(
                "        port: 18081",
                "        port: 18081\n        state: paused",
            ),
            "unknown backend state 'paused'; accepted: active, draining",
            8,
            16,
        );
    }

    #[test]
    fn both_clashes_with_tcp_on_the_same_frontend() {
        let yaml = format!(
            "{BASE}  - name: dns\n    vip: 127.10.0.1\n    port: 80\n    protocol: both\n    backends:\n      - address: 127.0.0.1\n        port: 9\n"
        );
        check(
            &yaml,
            "127.10.0.1:80/both, which service 'web' already uses",
            9,
            10,
        );
    }

    #[test]
    fn policy_problems() {
        let workload = "workloads:\n  - name: frontend\n    cgroup: /sys/fs/cgroup/frontend\n";
        let policy = |body: &str| {
            format!(
                "{workload}{}",
                with(
                    "    backends:",
                    &format!("    policy:\n{body}    backends:")
                )
            )
        };
        check(
            &policy("      allow: [frontnd]\n"),
            "identity 'frontnd' in the policy of service 'web' is not the identity of any workload",
            9,
            15,
        );
        check(
            &policy("      allow: [frontend]\n      deny: [frontend]\n"),
            "identity 'frontend' is both allowed and denied",
            10,
            14,
        );
        check(
            &policy("      default: maybe\n"),
            "unknown policy default 'maybe'; accepted: allow, deny",
            9,
            16,
        );
    }

    #[test]
    fn workload_problems() {
        check(
            &format!("workloads:\n  - name: a\n    cgroup: pods/a\n{BASE}"),
            "workload 'a': cgroup 'pods/a' is not an absolute path",
            3,
            13,
        );
        check(
            &format!(
                "workloads:\n  - {{name: a, cgroup: /a}}\n  - {{name: a, cgroup: /b}}\n{BASE}"
            ),
            "workload name 'a' is already used on line 2",
            3,
            12,
        );
        check(
            &format!(
                "workloads:\n  - {{name: a, cgroup: /a, identity: 'spiffe://td/node/n'}}\n{BASE}"
            ),
            "identity 'spiffe://td/node/n' is not a workload SPIFFE ID",
            2,
            37,
        );
        check(
            &format!("workloads:\n  - {{name: a, cgroup: /a, identity: 'spiffe://'}}\n{BASE}"),
            "is not a workload SPIFFE ID",
            2,
            37,
        );
        check(
            &format!(
                "{}workloads:\n  - {{name: a, cgroup: /a, node: node-c}}\n",
                MESH_BASE
            ),
            "workload 'a' names node 'node-c', which is not in `nodes:` (known nodes: node-a, node-b)",
            17,
            33,
        );
    }

    #[test]
    fn workloads_name_their_node_and_may_carry_a_spiffe_id() {
        let yaml = format!(
            "{MESH_BASE}workloads:\n  - {{name: a, cgroup: /a, node: node-a, \
             identity: 'spiffe://mesh.test/ns/shop/sa/cart'}}\n  - {{name: b, cgroup: /b}}\n"
        );
        let state = parse_str(&yaml, "t.yaml").unwrap();
        let (a, b) = (&state.workloads[0], &state.workloads[1]);
        assert_eq!(a.node.as_deref(), Some("node-a"));
        assert!(a.is_on("node-a") && a.is_hosted_by("node-a"));
        assert!(!a.is_on("node-b") && !a.is_hosted_by("node-b"));
        assert_eq!(
            crate::state::spiffe_id_of(&a.identity, "other"),
            "spiffe://mesh.test/ns/shop/sa/cart"
        );
        // No node: every reader's own, and no peer's to claim.
        assert!(b.is_on("node-a") && b.is_on("node-b") && !b.is_hosted_by("node-a"));
        assert_eq!(
            crate::state::spiffe_id_of(&b.identity, "mesh.test"),
            "spiffe://mesh.test/ns/default/sa/b"
        );
    }

    /// A valid file with nodes and a strict service; tests swap lines.
    /// Line 2 first node's `name` value at column 11, line 3 its `address`
    /// at 14; line 4 second node's `name` at 11, line 5 `address` at 14,
    /// line 6 `tunnel_port` at 18; line 11 the service's `mtls` at 11,
    /// line 13 backend `address` at 18, line 15 its `node` at 15.
    const MESH_BASE: &str = "\
nodes:
  - name: node-b
    address: 10.0.0.2
  - name: node-a
    address: 10.0.0.1
    tunnel_port: 15100
services:
  - name: web
    vip: 127.10.0.1
    port: 80
    mtls: strict
    backends:
      - address: 127.0.0.1
        port: 18081
        node: node-a
";

    fn mesh_with(from: &str, to: &str) -> String {
        assert!(MESH_BASE.contains(from), "{from:?} is not in MESH_BASE");
        MESH_BASE.replacen(from, to, 1)
    }

    fn node(name: &str, address: IpAddr, tunnel_port: u16) -> Node {
        Node {
            name: name.into(),
            address,
            tunnel_port,
        }
    }

    #[test]
    fn nodes_and_mtls_parse_into_the_model() {
        let yaml = format!(
            "mesh:\n  mtls: disabled\n{MESH_BASE}  - name: api\n    vip: 127.10.0.2\n    port: 80\n    backends:\n      - address: 127.0.0.1\n        port: 18082\n      - address: 127.0.0.1\n        port: 18083\n        node: node-b\n"
        );
        let state = parse_str(&yaml, "t.yaml").unwrap();
        assert_eq!(
            state.mesh,
            Mesh {
                default_mtls: MtlsMode::Disabled,
                // Sorted by name; the default tunnel port where none is set.
                nodes: vec![
                    node("node-a", ip(10, 0, 0, 1), 15100),
                    node("node-b", ip(10, 0, 0, 2), DEFAULT_TUNNEL_PORT),
                ],
            }
        );
        assert_eq!(state.mesh.node("node-b").unwrap().tunnel_port, 15008);
        let [api, web] = &state.services[..] else {
            panic!("two services: {:?}", state.services);
        };
        assert_eq!(web.mtls, Some(MtlsMode::Strict));
        assert_eq!(web.mtls_mode(&state.mesh), MtlsMode::Strict);
        assert_eq!(
            web.backends,
            [Backend {
                address: ip(127, 0, 0, 1),
                port: 18081,
                weight: 1,
                state: BackendState::Active,
                node: Some("node-a".into()),
                tunnel: false,
                priority: crate::state::PRIORITY_PREFERRED,
            }]
        );
        assert_eq!(api.mtls, None, "the mesh default, not a copy of it");
        assert_eq!(api.mtls_mode(&state.mesh), MtlsMode::Disabled);
        let nodes: Vec<_> = api.backends.iter().map(|b| b.node.as_deref()).collect();
        assert_eq!(nodes, [None, Some("node-b")]);
        assert!(api.backends.iter().all(|b| !b.tunnel));
        // No `mesh:`: permissive; no `nodes:`: none, and files without
        // either parse as they always did.
        let plain = parse_str(BASE, "t.yaml").unwrap();
        assert_eq!(plain.mesh, Mesh::default());
        assert_eq!(plain.mesh.default_mtls, MtlsMode::Permissive);
        let empty = parse_str("mesh:\n  mtls: permissive\nnodes: []\n", "t.yaml").unwrap();
        assert_eq!(empty, DesiredState::default());
    }

    #[test]
    fn mesh_nodes_example_parses() {
        let state = parse_str(
            include_str!("../../examples/mesh-nodes.yaml"),
            "mesh-nodes.yaml",
        )
        .unwrap();
        assert_eq!(state.mesh.default_mtls, MtlsMode::Permissive);
        let nodes: Vec<_> = state
            .mesh
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.tunnel_addr().to_string()))
            .collect();
        assert_eq!(
            nodes,
            [
                ("node-a", "10.0.0.1:15008".into()),
                ("node-b", "10.0.0.2:15008".into())
            ]
        );
        let modes: Vec<_> = state
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.mtls_mode(&state.mesh)))
            .collect();
        assert_eq!(
            modes,
            [
                ("api", MtlsMode::Permissive),
                ("dns", MtlsMode::Permissive),
                ("metrics", MtlsMode::Disabled),
                ("web", MtlsMode::Strict),
            ]
        );
        let api = &state.services[0];
        assert_eq!(api.backends[0].node.as_deref(), Some("node-b"));
        assert_eq!(api.backends[1].node, None);
        assert!(
            state
                .services
                .iter()
                .flat_map(|s| &s.backends)
                .all(|b| !b.tunnel)
        );
    }

    #[test]
    fn node_problems() {
        check(
            &mesh_with("name: node-b", "name: Node-B"),
            "node name 'Node-B' is not valid; use 1 to 63 lowercase letters",
            2,
            11,
        );
        check(
            &mesh_with("name: node-a", "name: node-b"),
            "node name 'node-b' is already used on line 2; give each node its own name",
            4,
            11,
        );
        check(
            &mesh_with(
                "  - name: node-b\n    address: 10.0.0.2\n",
                "  - address: 10.0.0.2\n",
            ),
            "a node has no `name`; add it",
            2,
            5,
        );
        check(
            &mesh_with("    address: 10.0.0.2\n", ""),
            "node 'node-b' has no `address`; add it",
            2,
            5,
        );
        check(
            &mesh_with("10.0.0.2", "10.0.0.300"),
            "address '10.0.0.300' is not an IP address",
            3,
            14,
        );
        for (address, kind) in [
            ("0.0.0.0", "0.0.0.0, which is the unspecified address"),
            (
                "255.255.255.255",
                "255.255.255.255, which is the broadcast address",
            ),
            ("224.0.0.1", "224.0.0.1, which is a multicast address"),
            ("'::'", ":: which is the unspecified address"),
            ("'ff02::1'", "ff02::1, which is a multicast address"),
        ] {
            let kind = kind.replace(":: which", "::, which");
            check(
                &mesh_with("10.0.0.2", address),
                &format!(
                    "node 'node-b' has address {kind}; write the unicast address the node's \
                     agent listens on for the tunnel"
                ),
                3,
                14,
            );
        }
        // Loopback and IPv6 unicast are fine (nodes in test namespaces).
        for address in ["127.0.0.2", "'fd00::2'"] {
            assert!(parse_str(&mesh_with("10.0.0.2", address), "t.yaml").is_ok());
        }
        check(
            &mesh_with("10.0.0.1", "10.0.0.2"),
            "node 'node-a' has address 10.0.0.2, which node 'node-b' on line 2 already has; \
             give each node the address of its own agent",
            5,
            14,
        );
        for (port, problem) in [
            (
                "0",
                "tunnel_port 0 is out of range; use a port from 1 to 65535",
            ),
            (
                "65536",
                "tunnel_port 65536 is out of range; use a port from 1 to 65535",
            ),
            ("-1", "tunnel_port -1 is out of range"),
            (
                "tls",
                "tunnel_port must be a whole number, got 'tls'; use a port from 1 to 65535",
            ),
        ] {
            check(&mesh_with("15100", port), problem, 6, 18);
        }
        for port in ["1", "65535"] {
            let state = parse_str(&mesh_with("15100", port), "t.yaml").unwrap();
            assert_eq!(state.mesh.nodes[0].tunnel_port.to_string(), port);
        }
        check(
            &mesh_with("tunnel_port", "port"),
            "unknown field `port`; remove it or fix its spelling (known fields here: name, \
             address, tunnel_port)",
            6,
            5,
        );
    }

    #[test]
    fn backend_node_problems() {
        check(
            &mesh_with("node: node-a", "node: node-c"),
            "backend 127.0.0.1:18081 of service 'web' names node 'node-c', which is not in \
             `nodes:` (known nodes: node-a, node-b); fix the name or add the node to `nodes:`",
            15,
            15,
        );
        check(
            &with(
                "        port: 18081\n",
                "        port: 18081\n        node: node-a\n",
            ),
            "backend 127.0.0.1:18081 of service 'web' names node 'node-a', but there is no \
             `nodes:` list; add one giving each node's name and address (see \
             examples/mesh-nodes.yaml), or remove `node:`",
            8,
            15,
        );
        // A long list is cut short in the message.
        let many: String = (0..10)
            .map(|i| format!("  - name: n{i}\n    address: 10.0.1.{i}\n"))
            .collect();
        check(
            &format!(
                "nodes:\n{many}{}",
                with(
                    "        port: 18081\n",
                    "        port: 18081\n        node: n10\n"
                )
            ),
            "(known nodes: n0, n1, n2, n3, n4, n5, n6, n7, and 2 more)",
            29,
            15,
        );
    }

    #[test]
    fn strict_services_need_nodes_and_tcp() {
        check(
            &mesh_with("        node: node-a\n", ""),
            "service 'web' is mtls strict, but backend 127.0.0.1:18081 names no node; name its \
             node (node: <name>, one of node-a, node-b) or set mtls: permissive",
            13,
            18,
        );
        // Strict by the mesh's default, with no nodes at all.
        let strict_default = format!("mesh:\n  mtls: strict\n{BASE}");
        check(
            &strict_default,
            "service 'web' is mtls strict (the mesh default, `mesh: mtls:`), but backend \
             127.0.0.1:18081 names no node; name its node (add a `nodes:` list and \
             `node: <name>`) or set mtls: permissive",
            8,
            18,
        );
        // A service's own mode wins over the default.
        for mode in ["permissive", "disabled"] {
            let own = strict_default
                .replace("    backends:", &format!("    mtls: {mode}\n    backends:"));
            assert!(parse_str(&own, "t.yaml").is_ok(), "{mode}");
            // And a backend without a node is reached directly, as before.
            let state = parse_str(
                &mesh_with("mtls: strict", &format!("mtls: {mode}")),
                "t.yaml",
            );
            assert!(state.is_ok());
        }
        for protocol in ["udp", "both"] {
            check(
                &mesh_with(
                    "    port: 80\n",
                    &format!("    port: 80\n    protocol: {protocol}\n"),
                ),
                &format!(
                    "service 'web' is mtls strict, but its protocol is {protocol}; the mTLS \
                     tunnel (HBONE) carries TCP only, so use protocol: tcp, or set mtls: \
                     permissive (UDP then goes directly)"
                ),
                11,
                15,
            );
            check(
                &format!(
                    "mesh:\n  mtls: strict\n{}",
                    mesh_with(
                        "    port: 80\n    mtls: strict\n",
                        &format!("    port: 80\n    protocol: {protocol}\n")
                    )
                ),
                &format!(
                    "service 'web' is mtls strict (the mesh default, `mesh: mtls:`), but its protocol is {protocol}"
                ),
                13,
                15,
            );
            // Permissive UDP goes directly, named node or not.
            let permissive = mesh_with(
                "    port: 80\n    mtls: strict\n",
                &format!("    port: 80\n    protocol: {protocol}\n    mtls: permissive\n"),
            );
            assert!(parse_str(&permissive, "t.yaml").is_ok(), "{protocol}");
        }
        // Strict with no backends at all refuses its connections: allowed.
        let empty = format!(
            "mesh:\n  mtls: strict\n{}",
            BASE.replace(
                "    backends:\n      - address: 127.0.0.1\n        port: 18081\n",
                "    allow_empty: true\n    backends: []\n"
            )
        );
        assert!(parse_str(&empty, "t.yaml").is_ok());
    }

    #[test]
    fn unknown_mtls_modes_and_mesh_fields() {
        check(
            &mesh_with("mtls: strict", "mtls: tls"),
            "unknown mtls mode 'tls'; accepted: strict, permissive, disabled",
            11,
            11,
        );
        check(
            &format!("mesh:\n  mtls: mutual\n{BASE}"),
            "unknown mtls mode 'mutual'; accepted: strict, permissive, disabled",
            2,
            9,
        );
        check(
            &format!("mesh:\n  mtsl: strict\n{BASE}"),
            "unknown field `mtsl`; remove it or fix its spelling (known fields here: mtls)",
            2,
            3,
        );
    }

    /// The plain layout reads mesh sections (through the library) and
    /// items (without it) to the same state as the library alone.
    #[test]
    fn plain_layout_with_mesh_sections_agrees_with_the_library() {
        let yaml = "\
mesh:
  mtls: strict
workloads:
  - name: frontend
    cgroup: /sys/fs/cgroup/frontend
nodes:
  - name: b
    address: 10.0.0.2
  - name: a
    address: 10.0.0.1
services:
  - name: web
    vip: 10.96.0.1
    port: 80
    backends: [{address: 10.1.0.1, port: 80, node: a}, {address: 10.1.0.2, port: 80, node: b}]
  - name: dns
    vip: 10.96.0.2
    port: 53
    protocol: udp
    mtls: permissive
    backends: [{address: 10.1.0.3, port: 53}]
";
        let plain = parse_plain(yaml).expect("plain layout");
        assert_eq!(plain, parse_yaml(yaml, "t.yaml").unwrap());
        assert_eq!(plain.mesh.nodes[0].name, "a");
        assert_eq!(plain.workloads.len(), 1);
        // Invalid under its mesh: the plain reader declines, the library
        // says why.
        let bad = yaml.replace(", node: b}", "}");
        assert_eq!(parse_plain(&bad), None);
        check(
            &bad,
            "service 'web' is mtls strict (the mesh default",
            15,
            66,
        );
    }
}
