//! `/v1/redirect`: same-node redirect's switch, node-local addresses and
//! counters. `GET` shows them; `POST {"enabled": true|false}` flips the
//! switch at runtime (the programs stay attached).

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde::{Deserialize, Serialize};

use crate::agent::Shared;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RedirectResponse {
    /// The switch as the kernel reads it (`MESH_CONFIG` flags).
    pub enabled: bool,
    /// Sockets in the `MESH_SOCKS` sockhash now (two per accelerated connection).
    pub sockets_in_map: u64,
    /// Addresses the kernel treats as node-local besides loopback.
    pub local_addresses: Vec<IpAddr>,
    /// Network namespaces of the agent's workloads whose addresses were read.
    #[serde(default)]
    pub workload_namespaces: u64,
    /// Addresses found in more than one namespace, so not treated as local.
    #[serde(default)]
    pub ambiguous_addresses: Vec<IpAddr>,
    /// Ports whose connections are never redirected (`--redirect-exclude-port`).
    #[serde(default)]
    pub exclude_ports: Vec<u16>,
    /// Backends of services with `same_node_redirect: false`: connections
    /// with either end here are never redirected.
    #[serde(default)]
    pub excluded_endpoints: Vec<SocketAddr>,
    pub counters: RedirectCounters,
}

/// The kernel's per-CPU counters, summed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RedirectCounters {
    pub sockets_added: u64,
    pub sockets_failed: u64,
    pub sockets_skipped: u64,
    pub msgs_redirected: u64,
    pub bytes_redirected: u64,
    pub msgs_fallback: u64,
    pub bytes_fallback: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SetRedirectRequest {
    pub enabled: bool,
}

/// Handles `/v1/redirect` for any method.
pub async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    match *req.method() {
        Method::GET => super::server::json(&shared.redirect().lock().view()),
        Method::POST => {
            let enabled = match super::server::read_switch(req).await {
                Ok(enabled) => enabled,
                Err(response) => return response,
            };
            let mut redirect = shared.redirect().lock();
            match redirect.set_enabled(enabled) {
                Ok(()) => super::server::json(&redirect.view()),
                Err(e) => super::server::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        _ => super::server::error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only"),
    }
}
