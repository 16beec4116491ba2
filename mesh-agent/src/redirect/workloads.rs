//! The addresses of the network namespaces this agent's workloads live in:
//! every namespace a process of the agent's cgroup (or below) is in, read
//! with getifaddrs from a thread that entered it. A pod's address is on this
//! node exactly when some process of this node lives in its namespace.
//!
//! Only addresses that name one socket endpoint on the whole node are kept:
//! loopback and link-local ones repeat in every namespace, and an address
//! found in two namespaces (or in a namespace and on the node itself) is
//! ambiguous, so redirect never guesses between them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use tracing::debug;

use super::interface_addresses;
use crate::destroy::{enter_netns, one_pid_per_netns};

/// What a scan found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Addresses unique to one workload namespace.
    pub addresses: BTreeSet<IpAddr>,
    /// Addresses seen in more than one namespace: left out.
    pub ambiguous: BTreeSet<IpAddr>,
    /// Namespaces read (the agent's own not counted).
    pub namespaces: usize,
}

/// Scans the namespaces of `cgroup`'s processes other than the agent's own;
/// `node` (the agent's own addresses) counts as one more namespace when
/// deciding what is ambiguous. A process that exits mid-scan is skipped.
pub fn scan(cgroup: &Path, node: &BTreeSet<IpAddr>) -> Scan {
    let own = std::fs::metadata("/proc/self/ns/net")
        .map(|m| (m.dev(), m.ino()))
        .ok();
    let mut seen: BTreeMap<IpAddr, usize> = node.iter().map(|a| (*a, 1)).collect();
    let mut namespaces = 0;
    for pid in one_pid_per_netns(cgroup) {
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| (m.dev(), m.ino()))
            .ok();
        if ns.is_none() || ns == own {
            continue;
        }
        // setns changes only the calling thread: a thread of its own keeps
        // the agent's other threads in its namespace.
        let found = std::thread::spawn(move || -> Option<Vec<IpAddr>> {
            enter_netns(pid).ok()?;
            interface_addresses().ok()
        })
        .join()
        .ok()
        .flatten();
        let Some(found) = found else {
            debug!(pid, "workload namespace vanished during the scan");
            continue;
        };
        namespaces += 1;
        let unique: BTreeSet<IpAddr> = found.into_iter().filter(|a| routable(*a)).collect();
        for a in unique {
            *seen.entry(a).or_default() += 1;
        }
    }
    let mut scan = Scan {
        namespaces,
        ..Scan::default()
    };
    for (addr, count) in seen {
        if count > 1 {
            scan.ambiguous.insert(addr);
        } else if !node.contains(&addr) {
            scan.addresses.insert(addr);
        }
    }
    scan
}

/// Addresses that can name one endpoint on the node: not loopback, not
/// link-local, not unspecified.
fn routable(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_unique_to_one_endpoint_count() {
        for a in ["127.0.0.1", "169.254.1.1", "::1", "fe80::1", "0.0.0.0"] {
            assert!(!routable(a.parse().unwrap()), "{a}");
        }
        for a in ["10.1.2.3", "fd00::5", "192.168.1.1"] {
            assert!(routable(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn a_cgroup_with_no_processes_has_no_workload_namespaces() {
        let dir = std::env::temp_dir().join(format!("mesh-wl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = scan(&dir, &BTreeSet::new());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s, Scan::default());
    }
}
