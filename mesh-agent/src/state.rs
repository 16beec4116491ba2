//! The desired model of what this node should do, independent of where it
//! came from (config file today, Kubernetes later). Sources produce a
//! `DesiredState`; `reconcile` turns it into map writes.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// Everything the node should serve. Services are kept sorted by name so two
/// equal configurations compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: Vec<Service>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
    /// May be empty only when the source allows it: connects then fail fast.
    pub backends: Vec<Backend>,
}

impl Service {
    pub fn frontend(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    /// Relative share of new connections; zero means none.
    pub weight: u32,
}

impl Backend {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Weighted random over a slot table.
    Weighted,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Weighted => "weighted",
        })
    }
}
