//! Real k8s-openapi objects for the translation tests, built as the API
//! server would send them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service as KubeService, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::SERVICE_NAME_LABEL;

/// A ClusterIP Service; `cluster_ips` becomes both `clusterIP` (the first)
/// and `clusterIPs`, as the API server fills them.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ips: &[&str],
    ports: &[ServicePort],
) -> KubeService {
    KubeService {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: cluster_ips.first().map(|ip| ip.to_string()),
            cluster_ips: (!cluster_ips.is_empty())
                .then(|| cluster_ips.iter().map(|ip| ip.to_string()).collect()),
            ports: Some(ports.to_vec()),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// A service port whose target port is its name (a named target port).
pub fn port(name: Option<&str>, protocol: &str, port: i32) -> ServicePort {
    ServicePort {
        name: name.map(str::to_owned),
        protocol: Some(protocol.into()),
        port,
        target_port: Some(match name {
            Some(name) => IntOrString::String(name.into()),
            None => IntOrString::Int(port),
        }),
        ..ServicePort::default()
    }
}

/// An EndpointSlice of Service `namespace/service`, labelled as the
/// EndpointSlice controller labels it.
pub fn slice(
    namespace: &str,
    service: &str,
    name: &str,
    address_type: &str,
    ports: &[EndpointPort],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_owned(), service.to_owned()),
                (
                    "endpointslice.kubernetes.io/managed-by".to_owned(),
                    "endpointslice-controller.k8s.io".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints,
        ports: Some(ports.to_vec()),
    }
}

pub fn slice_port(name: Option<&str>, protocol: &str, port: i32) -> EndpointPort {
    EndpointPort {
        name: name.map(str::to_owned),
        protocol: Some(protocol.into()),
        port: Some(port),
        app_protocol: None,
    }
}

/// A slice port without `protocol` (the API's default is TCP).
pub fn slice_port_default_protocol(name: Option<&str>, port: i32) -> EndpointPort {
    EndpointPort {
        protocol: None,
        ..slice_port(name, "TCP", port)
    }
}

/// An endpoint with one address and no conditions (nil: ready).
pub fn endpoint(address: &str) -> Endpoint {
    Endpoint {
        addresses: vec![address.into()],
        ..Endpoint::default()
    }
}

pub fn conditions(
    endpoint: Endpoint,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Endpoint {
    Endpoint {
        conditions: Some(EndpointConditions {
            ready,
            serving,
            terminating,
        }),
        ..endpoint
    }
}

/// As the EndpointSlice controller marks a pod that is shutting down but
/// still passes its readiness probe.
pub fn terminating_serving(endpoint: Endpoint) -> Endpoint {
    conditions(endpoint, Some(false), Some(true), Some(true))
}

pub fn on_node(endpoint: Endpoint, node: &str) -> Endpoint {
    Endpoint {
        node_name: Some(node.into()),
        ..endpoint
    }
}

pub fn zone_hints(mut endpoint: Endpoint, zones: &[&str]) -> Endpoint {
    endpoint
        .hints
        .get_or_insert_with(EndpointHints::default)
        .for_zones = Some(
        zones
            .iter()
            .map(|zone| ForZone {
                name: zone.to_string(),
            })
            .collect(),
    );
    endpoint
}

pub fn node_hints(mut endpoint: Endpoint, nodes: &[&str]) -> Endpoint {
    endpoint
        .hints
        .get_or_insert_with(EndpointHints::default)
        .for_nodes = Some(
        nodes
            .iter()
            .map(|node| ForNode {
                name: node.to_string(),
            })
            .collect(),
    );
    endpoint
}
