//! The JSON documents of the admin API, shared by the agent and meshctl.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusResponse {
    pub ready: bool,
    pub version: String,
    pub config_path: String,
    /// Incremented by every configuration that reached the kernel.
    pub config_generation: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Why the last reload was refused, while the previous state serves.
    pub last_reload_error: Option<String>,
    pub last_reload_unix_ms: u64,
    pub cgroup: String,
    pub bpffs: String,
    pub programs: Vec<String>,
    pub services: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicesResponse {
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub algorithm: String,
    /// Connections the kernel balanced for this service.
    pub connections: u64,
    /// Connects refused because no backend was usable.
    pub no_backend: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// Slots this backend holds in the service's selection table.
    pub slots: u32,
    /// Connections the kernel sent here.
    pub connections: u64,
}
