//! The agent's end of the kernel's tunnel capture: for a connection its
//! outbound listener accepted, what `connect()` chose (`MESH_TUN_ORIG`,
//! filed by sock_ops under the 4-tuple before the SYN left).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use mesh_common::{TunnelKey, TunnelValue, map_names};

use super::maps::{MapsError, taken_from, typed};
use crate::reconcile::{ip_from_words, ip_to_words};

/// What the kernel recorded for one tunnelled connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Captured {
    /// The backend chosen at connect(), on another node.
    pub backend: SocketAddr,
    pub service_id: u32,
    pub backend_id: u32,
    /// The client's cgroup, and its identity id (0: none registered).
    pub cgroup_id: u64,
    pub identity: u32,
}

/// `MESH_TUN_ORIG`, shared by the tunnel's accept loops.
pub struct TunnelOrigins {
    map: Mutex<HashMap<MapData, TunnelKey, TunnelValue>>,
}

impl TunnelOrigins {
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let mut open = taken_from(ebpf);
        Ok(Self {
            map: Mutex::new(typed(&mut open, map_names::TUNNEL_ORIG)?),
        })
    }

    /// The capture of the connection from `client` accepted on `listener`,
    /// removed from the map (each is claimed once). None: the kernel sent
    /// no such connection here (a client that dialled the listener itself,
    /// or an entry the LRU already evicted).
    pub fn claim(&self, client: SocketAddr, listener: SocketAddr) -> Option<Captured> {
        let key = tunnel_key(client, listener);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let value = map.get(&key, 0).ok()?;
        // Gone already if the LRU took it; either way it is claimed.
        let _ = map.remove(&key);
        Some(Captured {
            backend: SocketAddr::new(
                ip_from_words(value.family, value.backend_addr),
                u16::from_be(value.backend_port),
            ),
            service_id: value.service_id,
            backend_id: value.backend_id,
            cgroup_id: value.cgroup_id,
            identity: value.identity,
        })
    }
}

/// The key sock_ops filed the connection under: IPv4-mapped addresses in
/// IPv4 form, ports in network order.
fn tunnel_key(client: SocketAddr, listener: SocketAddr) -> TunnelKey {
    let canonical = |ip: IpAddr| ip.to_canonical();
    let (client_addr, family) = ip_to_words(canonical(client.ip()));
    let (listener_addr, _) = ip_to_words(canonical(listener.ip()));
    TunnelKey {
        client_addr,
        listener_addr,
        client_port: client.port().to_be(),
        listener_port: listener.port().to_be(),
        family,
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::FAMILY_V4;

    #[test]
    fn mapped_addresses_are_keyed_as_ipv4() {
        let v4 = tunnel_key(
            "127.0.0.5:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        let mapped = tunnel_key(
            "[::ffff:127.0.0.5]:40000".parse().unwrap(),
            "[::ffff:127.0.0.1]:15001".parse().unwrap(),
        );
        assert_eq!(v4, mapped);
        assert_eq!(v4.family, FAMILY_V4);
        assert_eq!(v4.client_port, 40000u16.to_be());
        assert_eq!(v4.client_addr[0], u32::from_ne_bytes([127, 0, 0, 5]));
    }
}
