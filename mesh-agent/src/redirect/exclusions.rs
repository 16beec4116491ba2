//! Services that opt out of same-node redirect (`same_node_redirect: false`):
//! their backend endpoints go in `MESH_EXCL_EP`, which the redirect
//! sock_ops checks for both ends of a connection, so neither the client's
//! nor the backend's socket enters the sockhash and the workload reads its
//! socket exactly as with redirect off.
//!
//! Kept in step with each apply's changed services only (a walk of every
//! service would cost the endpoint-change latency at 100k services).
//! Services may share a backend, so each endpoint counts the opted-out
//! services that list it and leaves the map when the last one goes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use mesh_common::PROTO_TCP;

use crate::state::Service;

/// What `MESH_EXCL_EP` holds, as this agent wrote it.
#[derive(Debug, Default)]
pub struct Exclusions {
    /// Endpoint → how many opted-out services list it.
    counts: BTreeMap<SocketAddr, u32>,
    /// In the map but no longer wanted: an earlier agent's entries, or a
    /// delete that failed. The next commit removes them.
    stale: BTreeSet<SocketAddr>,
}

/// What a set of service changes does to the exclusions, computed without
/// touching the map: per endpoint, how its count moves (work in proportion
/// to the change, not to the endpoints excluded).
#[derive(Debug, Default)]
pub struct Plan {
    delta: BTreeMap<SocketAddr, i64>,
    /// Endpoints to write before the services' own maps change, so no
    /// connection to a new opted-out backend is redirected.
    pub added: Vec<SocketAddr>,
    /// Endpoints whose last opted-out service goes.
    dropped: Vec<SocketAddr>,
}

/// The endpoints `svc` keeps off the redirect path (TCP only: redirect
/// never sees UDP). IPv4-mapped IPv6 addresses in their IPv4 form, as the
/// map stores them, so an endpoint read back from the map compares equal.
fn endpoints(svc: Option<&Service>) -> BTreeSet<SocketAddr> {
    match svc {
        Some(s) if !s.same_node_redirect && s.protocol.ip_protocols().contains(&PROTO_TCP) => s
            .backends
            .iter()
            .map(|b| SocketAddr::new(b.address.to_canonical(), b.port))
            .collect(),
        _ => BTreeSet::new(),
    }
}

impl Exclusions {
    /// Starts from what an earlier agent left in the map: all of it stale
    /// until the first apply says what is wanted.
    pub fn recovered(in_map: impl IntoIterator<Item = SocketAddr>) -> Self {
        Exclusions {
            counts: BTreeMap::new(),
            stale: in_map.into_iter().collect(),
        }
    }

    /// `changes`: (old, new) of each changed service.
    pub fn plan<'a>(
        &self,
        changes: impl IntoIterator<Item = (Option<&'a Service>, Option<&'a Service>)>,
    ) -> Plan {
        let mut delta: BTreeMap<SocketAddr, i64> = BTreeMap::new();
        for (old, new) in changes {
            for ep in endpoints(old) {
                *delta.entry(ep).or_default() -= 1;
            }
            for ep in endpoints(new) {
                *delta.entry(ep).or_default() += 1;
            }
        }
        delta.retain(|_, d| *d != 0);
        let mut plan = Plan::default();
        for (&ep, &d) in &delta {
            let now = i64::from(self.counts.get(&ep).copied().unwrap_or(0));
            match (now > 0, now + d > 0) {
                (false, true) => plan.added.push(ep),
                (true, false) => plan.dropped.push(ep),
                _ => {}
            }
        }
        plan.delta = delta;
        plan
    }

    /// Takes the plan as the new state; returns every endpoint the map
    /// should now lose (the ones no longer wanted, and earlier stale ones).
    pub fn commit(&mut self, plan: Plan) -> Vec<SocketAddr> {
        for (ep, d) in plan.delta {
            let n = i64::from(self.counts.get(&ep).copied().unwrap_or(0)) + d;
            if n > 0 {
                self.counts.insert(ep, n as u32);
                self.stale.remove(&ep);
            } else {
                self.counts.remove(&ep);
            }
        }
        self.stale.extend(plan.dropped);
        self.stale.iter().copied().collect()
    }

    /// An endpoint the map lost (or that was not there).
    pub fn removed(&mut self, ep: &SocketAddr) {
        self.stale.remove(ep);
    }

    /// How many endpoints the plan excludes.
    pub fn planned(&self, plan: &Plan) -> usize {
        self.counts.len() + plan.added.len() - plan.dropped.len()
    }

    /// The endpoints now excluded, in order.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.counts.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    fn service(yaml_extra: &str, backends: &[&str]) -> Service {
        let mut yaml = format!(
            "services:\n  - name: web\n    vip: 127.0.0.5\n    port: 80\n{yaml_extra}    backends:\n"
        );
        for b in backends {
            let (addr, port) = b.rsplit_once(':').unwrap();
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            yaml += &format!("      - {{address: '{addr}', port: {port}}}\n");
        }
        let state = parse_str(&yaml, "test").unwrap();
        state.services[0].clone()
    }

    fn opted_out(backends: &[&str]) -> Service {
        service("    same_node_redirect: false\n", backends)
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn apply(ex: &mut Exclusions, changes: &[(Option<&Service>, Option<&Service>)]) -> Vec<String> {
        let plan = ex.plan(changes.iter().copied());
        let removed = ex.commit(plan);
        for r in &removed {
            ex.removed(r);
        }
        removed.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn only_opted_out_tcp_services_exclude_their_backends() {
        let ex = Exclusions::default();
        let on = service("", &["127.0.0.1:81"]);
        let off = opted_out(&["127.0.0.1:82", "127.0.0.2:82"]);
        let udp = service(
            "    protocol: udp\n    same_node_redirect: false\n",
            &["127.0.0.1:83"],
        );
        let plan = ex.plan([(None, Some(&on)), (None, Some(&off)), (None, Some(&udp))]);
        assert_eq!(plan.added, vec![ep("127.0.0.1:82"), ep("127.0.0.2:82")]);
        let none = ex.plan([(None, Some(&on)), (Some(&on), None)]);
        assert!(none.added.is_empty() && none.delta.is_empty());
    }

    #[test]
    fn a_shared_backend_stays_excluded_until_its_last_service_goes() {
        let mut ex = Exclusions::default();
        let a = opted_out(&["127.0.0.1:90"]);
        let b = opted_out(&["127.0.0.1:90", "127.0.0.1:91"]);
        let b_on = service("", &["127.0.0.1:90", "127.0.0.1:91"]);
        assert!(apply(&mut ex, &[(None, Some(&a)), (None, Some(&b))]).is_empty());
        assert_eq!(ex.endpoints(), vec![ep("127.0.0.1:90"), ep("127.0.0.1:91")]);
        // b switches redirect back on: 91 goes, 90 stays for a.
        assert_eq!(apply(&mut ex, &[(Some(&b), Some(&b_on))]), ["127.0.0.1:91"]);
        assert_eq!(ex.endpoints(), vec![ep("127.0.0.1:90")]);
        assert_eq!(apply(&mut ex, &[(Some(&a), None)]), ["127.0.0.1:90"]);
        assert!(ex.endpoints().is_empty());
    }

    #[test]
    fn an_earlier_agents_entries_go_unless_wanted_again() {
        let mut ex = Exclusions::recovered([ep("127.0.0.1:90"), ep("127.0.0.1:99")]);
        let a = opted_out(&["127.0.0.1:90"]);
        let plan = ex.plan([(None, Some(&a))]);
        // Rewritten (harmless), so it is surely there before the services.
        assert_eq!(plan.added, vec![ep("127.0.0.1:90")]);
        let removed = ex.commit(plan);
        assert_eq!(removed, vec![ep("127.0.0.1:99")]);
        // A delete that failed is tried again by the next commit.
        let retry = ex.commit(ex.plan([]));
        assert_eq!(retry, vec![ep("127.0.0.1:99")]);
        ex.removed(&ep("127.0.0.1:99"));
        assert!(ex.commit(ex.plan([])).is_empty());
    }

    #[test]
    fn a_mapped_backend_recovered_from_the_map_is_the_same_endpoint() {
        // The map holds IPv4 keys for ::ffff:a.b.c.d; recovery reads them
        // back as IPv4, and the first apply must not then delete its own.
        let mut ex = Exclusions::recovered([ep("127.0.0.9:90")]);
        let yaml = "services:\n  - name: web\n    vip: 'fd00::5'\n    port: 80\n    \
                    same_node_redirect: false\n    backends:\n      - {address: '::ffff:127.0.0.9', port: 90}\n";
        let state = parse_str(yaml, "test").unwrap();
        let removed = ex.commit(ex.plan([(None, Some(&state.services[0]))]));
        assert!(removed.is_empty(), "{removed:?}");
        assert_eq!(ex.endpoints(), vec![ep("127.0.0.9:90")]);
    }

    #[test]
    fn a_plan_adds_only_what_is_new() {
        let mut ex = Exclusions::default();
        let a = opted_out(&["127.0.0.1:90"]);
        let b = opted_out(&["127.0.0.1:90", "127.0.0.1:91"]);
        apply(&mut ex, &[(None, Some(&a))]);
        let plan = ex.plan([(Some(&a), Some(&b))]);
        // Undoing a refused apply removes `added`: 90 must not be in it.
        assert_eq!(plan.added, vec![ep("127.0.0.1:91")]);
        assert_eq!(ex.planned(&plan), 2);
    }
}
