//! What can be wrong with a config file, worded for the person who wrote it:
//! what is wrong, then what to do.

use std::net::{IpAddr, SocketAddr};

use crate::state::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}{}: {problem}", position(.at))]
    Invalid {
        file: String,
        /// 1-based line and column; `None` only when the YAML parser had none.
        at: Option<(usize, usize)>,
        /// Boxed to keep `Result<_, ConfigError>` small.
        problem: Box<Problem>,
    },
}

impl ConfigError {
    /// The 1-based line and column the error points at, if any.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { at, .. } => *at,
        }
    }
}

fn family(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

fn position(at: &Option<(usize, usize)>) -> String {
    at.map(|(line, column)| format!(":{line}:{column}"))
        .unwrap_or_default()
}

/// One problem in the file. User-written text in here is already escaped to a
/// single line. Kept small (numbers as text, some text boxed): every check
/// returns it.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("{message}; fix the YAML here (the expected layout is in examples/mesh.yaml)")]
    Yaml { message: String },
    #[error("unknown field `{field}`; remove it or fix its spelling (known fields here: {known})")]
    UnknownField { field: String, known: String },
    #[error("`{key}` is set twice in the same mapping; keep only one")]
    DuplicateKey { key: String },
    #[error("{what} has no `{field}`; add it (see examples/mesh.yaml)")]
    Missing { what: String, field: &'static str },
    #[error(
        "{what} '{name}' is not valid; use 1 to 63 lowercase letters, digits, '-' or '.', \
         starting and ending with a letter or digit (like a DNS label)"
    )]
    BadName { what: &'static str, name: String },
    #[error(
        "service name '{name}' is already used on line {first_line}; give each service its own name"
    )]
    DuplicateName { name: String, first_line: usize },
    #[error(
        "service name '{name}' is already used in {first_file} on line {first_line}; give each \
         service its own name (names are unique across the directory)"
    )]
    DuplicateNameInFile {
        name: String,
        first_file: String,
        first_line: usize,
    },
    #[error(
        "workload name '{name}' is already used in {first_file} on line {first_line}; give each \
         workload its own name (names are unique across the directory)"
    )]
    DuplicateWorkloadInFile {
        name: String,
        first_file: String,
        first_line: usize,
    },
    #[error("{field} {text} is not an IP address; write an address such as 127.10.0.1 or fd00::10")]
    BadIp { field: &'static str, text: String },
    #[error(
        "backend {backend} of service '{service}' is {} but the VIP is {}; a service's \
         backends share its VIP's address family",
        family(backend.is_ipv6()),
        family(!backend.is_ipv6())
    )]
    FamilyMismatch {
        service: String,
        backend: SocketAddr,
    },
    #[error("unknown backend state {value}; accepted: {accepted}")]
    UnknownState { value: String, accepted: String },
    #[error("unknown policy default {value}; accepted: {accepted}")]
    UnknownPolicyDefault { value: String, accepted: String },
    #[error("affinity_timeout_seconds {value} is out of range; use 1 to 86400 seconds")]
    AffinityTimeout { value: String },
    #[error("drain_timeout_seconds {value} is out of range; use 0 to 3600 seconds")]
    DrainTimeout { value: String },
    #[error("{field} {value} is out of range; use {range}")]
    OutOfRange {
        field: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("unknown health check type {value}; accepted: {accepted}")]
    UnknownCheckType { value: String, accepted: String },
    #[error("unknown panic_mode {value}; accepted: {accepted}")]
    UnknownPanicMode { value: String, accepted: String },
    #[error("health check path {path} must start with '/'")]
    BadCheckPath { path: String },
    #[error(
        "health check timeout_ms {timeout} is longer than interval_ms {interval}; \
         a check must end before the next one starts"
    )]
    TimeoutOverInterval { timeout: u32, interval: u32 },
    #[error(
        "service '{service}' sets affinity_timeout_seconds without `affinity: true`; \
         add `affinity: true` or remove the timeout"
    )]
    TimeoutWithoutAffinity { service: String },
    #[error(
        "identity '{identity}' in the policy of service '{service}' is not the identity of any \
         workload; declare it under `workloads:` or fix its spelling"
    )]
    UnknownIdentity { service: String, identity: String },
    #[error(
        "identity '{identity}' is both allowed and denied in the policy of service \
         '{service}'; keep it in one list"
    )]
    AllowedAndDenied { service: String, identity: String },
    #[error(
        "workload '{name}': cgroup {path} is not an absolute path; write the cgroup's directory \
         such as /sys/fs/cgroup/pods/frontend"
    )]
    RelativeCgroup { name: String, path: String },
    #[error(
        "workload name '{name}' is already used on line {first_line}; give each workload its own name"
    )]
    DuplicateWorkload { name: String, first_line: usize },
    #[error(
        "workload '{workload}' names node '{node}', which is not in `nodes:` (known nodes: \
         {known}); fix the name or add the node to `nodes:`"
    )]
    WorkloadUnknownNode {
        workload: String,
        node: String,
        known: String,
    },
    #[error(
        "identity '{id}' is not a workload SPIFFE ID: {why}; write a short name (it stands for \
         spiffe://<trust-domain>/ns/default/sa/<name>) or spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadWorkloadSpiffeId { id: String, why: String },
    #[error("port 0 is not a usable port; use a port from 1 to 65535")]
    PortZero,
    #[error("port {value} is out of range; use a port from 1 to 65535")]
    PortOutOfRange { value: String },
    #[error("{field} must be a whole number, got {got}; use {range}")]
    NotAnInteger {
        field: &'static str,
        got: String,
        range: &'static str,
    },
    #[error("weight {value} is negative; use a weight from 0 to 65535 (0 = gets no traffic)")]
    NegativeWeight { value: String },
    #[error(
        "weight {value} is above the maximum 65535; scale the weights down (only their ratios matter)"
    )]
    WeightTooLarge { value: String },
    #[error("unknown protocol {value}; accepted: {accepted}")]
    UnknownProtocol { value: String, accepted: String },
    #[error("unknown algorithm {value}; accepted: {accepted}")]
    UnknownAlgorithm { value: String, accepted: String },
    #[error(
        "service '{service}' uses {frontend}, which service '{first}' already uses; \
         give one of them another VIP or port"
    )]
    DuplicateFrontend {
        service: String,
        frontend: String,
        first: String,
    },
    #[error(
        "service '{service}' has no backends; list at least one, or set `allow_empty: true` \
         to keep the VIP and refuse its connections at once"
    )]
    NoBackends { service: String },
    #[error(
        "every backend of service '{service}' has weight 0; at least one backend needs a \
         weight above 0 (to serve nothing, remove them and set `allow_empty: true`)"
    )]
    AllWeightsZero { service: String },
    #[error(
        "backend {backend} is listed twice in service '{service}' (first on line {first_line}); \
         remove one, or raise its weight instead"
    )]
    DuplicateBackend {
        service: String,
        backend: SocketAddr,
        first_line: usize,
    },
    #[error(
        "backend {backend} is the VIP and port of service '{service}' itself, so connections \
         would loop; point it at a real server"
    )]
    BackendLoop {
        service: String,
        backend: SocketAddr,
    },
    #[error("unknown mtls mode {value}; accepted: {accepted}")]
    UnknownMtls { value: String, accepted: String },
    #[error("node name '{name}' is already used on line {first_line}; give each node its own name")]
    DuplicateNode { name: String, first_line: usize },
    #[error(
        "node '{node}' has address {address}, which is {kind}; write the unicast address the \
         node's agent listens on for the tunnel"
    )]
    NodeAddressNotUnicast {
        node: String,
        address: IpAddr,
        kind: &'static str,
    },
    #[error(
        "node '{node}' has address {address}, which node '{first}' on line {first_line} already \
         has; give each node the address of its own agent"
    )]
    DuplicateNodeAddress {
        node: String,
        address: IpAddr,
        first: String,
        first_line: usize,
    },
    #[error(
        "backend {backend} of service '{service}' names node '{node}', which is not in \
         `nodes:` (known nodes: {known}); fix the name or add the node to `nodes:`"
    )]
    UnknownNode {
        service: Box<str>,
        backend: SocketAddr,
        node: Box<str>,
        known: Box<str>,
    },
    #[error(
        "backend {backend} of service '{service}' names node '{node}', but there is no \
         `nodes:` list; add one giving each node's name and address (see \
         examples/mesh-nodes.yaml), or remove `node:`"
    )]
    NoNodes {
        service: String,
        backend: SocketAddr,
        node: String,
    },
    #[error(
        "service '{service}' is mtls strict{}, but backend {backend} names no node; name its \
         node ({}) or set mtls: permissive",
        mode_source(*.by_default),
        node_hint(.known)
    )]
    StrictWithoutNode {
        service: String,
        backend: SocketAddr,
        by_default: bool,
        /// The mesh's node names, listed for the message; empty: none.
        known: Box<str>,
    },
    #[error(
        "service '{service}' is mtls strict{}, but its protocol is {protocol}; the mTLS tunnel \
         (HBONE) carries TCP only, so use protocol: tcp, or set mtls: permissive (UDP then goes \
         directly)",
        mode_source(*.by_default)
    )]
    StrictUdp {
        service: String,
        protocol: Protocol,
        by_default: bool,
    },
    #[error(
        "`{section}:` is also set in {first_file}; set it in one file of the directory only \
         (it holds the whole mesh's {what})"
    )]
    SectionInTwoFiles {
        section: &'static str,
        what: &'static str,
        first_file: String,
    },
}

/// Where a service's strict mode came from, for the message.
fn mode_source(by_default: bool) -> &'static str {
    if by_default {
        " (the mesh default, `mesh: mtls:`)"
    } else {
        ""
    }
}

fn node_hint(known: &str) -> String {
    if known.is_empty() {
        "add a `nodes:` list and `node: <name>`".to_owned()
    } else {
        format!("node: <name>, one of {known}")
    }
}
