//! Authorization of tunnel streams at the destination node.
//!
//! A stream arrives on a connection whose peer proved, by its certificate,
//! that it is node N. The stream may claim a workload identity (a SPIFFE ID
//! in `x-mesh-source-identity`). The claim is believed only if the
//! configuration says N hosts a workload of that identity: a node can never
//! speak for a workload it does not host. The believed identity (or none)
//! is then checked against the policy of every service this node serves the
//! requested backend for.
//!
//! [`Authorization`] is a snapshot built from one desired state; the tunnel
//! swaps it when the state changes and re-checks the streams already open.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::SpiffeId;
use crate::state::{Policy, Service, Workload, spiffe_id_of};

/// Why a stream is refused (answered 401, or closed if already open).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the claimed identity {claim:?} is not a workload SPIFFE ID of trust domain {trust_domain}: {why}"
    )]
    InvalidClaim {
        claim: String,
        trust_domain: String,
        why: String,
    },
    #[error("node '{node}' claims {identity}, but no workload of that identity is on that node")]
    NotHosted { node: String, identity: String },
    #[error("{} may not reach {backend}: {why}", identity.as_deref().unwrap_or("a client without a workload identity"))]
    Denied {
        identity: Option<String>,
        backend: SocketAddr,
        why: String,
    },
}

impl Refusal {
    /// A short stable label, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::InvalidClaim { .. } => "invalid_claim",
            Refusal::NotHosted { .. } => "not_hosted",
            Refusal::Denied { .. } => "denied",
        }
    }
}

/// Which rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    DenyList,
    AllowList,
    /// Not on an allow list that exists.
    NotAllowed,
    DefaultAllow,
    DefaultDeny,
}

impl Rule {
    pub fn allows(self) -> bool {
        matches!(self, Rule::AllowList | Rule::DefaultAllow)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Rule::DenyList => "denied: on the service's deny list",
            Rule::AllowList => "allowed: on the service's allow list",
            Rule::NotAllowed => "denied: not on the service's allow list",
            Rule::DefaultAllow => "allowed: on no list, and the service's default is allow",
            Rule::DefaultDeny => "denied: on no list, and the service's default is deny",
        }
    }
}

/// One service's policy with its identities as SPIFFE IDs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedPolicy {
    default_deny: bool,
    allow: HashSet<String>,
    deny: HashSet<String>,
}

impl ResolvedPolicy {
    pub fn of(policy: &Policy, trust_domain: &str) -> Self {
        let ids = |names: &[String]| {
            names
                .iter()
                .map(|n| spiffe_id_of(n, trust_domain))
                .collect()
        };
        Self {
            default_deny: policy.default_deny,
            allow: ids(&policy.allow),
            deny: ids(&policy.deny),
        }
    }

    /// The rule that decides for `identity` (a SPIFFE ID; `None`: a client
    /// without a workload identity, which no list can name). A deny list
    /// wins over everything; an allow list, when there is one, admits only
    /// those on it; else the default.
    pub fn rule_for(&self, identity: Option<&str>) -> Rule {
        if identity.is_some_and(|id| self.deny.contains(id)) {
            return Rule::DenyList;
        }
        if identity.is_some_and(|id| self.allow.contains(id)) {
            return Rule::AllowList;
        }
        if !self.allow.is_empty() {
            return Rule::NotAllowed;
        }
        if self.default_deny {
            Rule::DefaultDeny
        } else {
            Rule::DefaultAllow
        }
    }
}

/// What a stream was allowed as: the identity believed and the service
/// whose policy let it through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub identity: Option<SpiffeId>,
    pub service: String,
}

/// The destination's view for authorizing streams, from one desired state.
#[derive(Clone, Debug, Default)]
pub struct Authorization {
    trust_domain: String,
    /// Peer node → the workload identities (SPIFFE IDs) it hosts.
    hosted: HashMap<String, HashSet<String>>,
    /// This node's backends → (service name, policy) of each service that
    /// has it, in name order.
    backends: HashMap<SocketAddr, Vec<(String, ResolvedPolicy)>>,
}

impl Authorization {
    /// The view of node `node`: its own backends (those naming it) and who
    /// hosts what, as `workloads` say.
    pub fn of<'a>(
        node: &str,
        trust_domain: &str,
        services: impl Iterator<Item = &'a Service>,
        workloads: &[Workload],
    ) -> Self {
        let mut hosted: HashMap<String, HashSet<String>> = HashMap::new();
        for w in workloads {
            if let Some(host) = &w.node {
                hosted
                    .entry(host.clone())
                    .or_default()
                    .insert(spiffe_id_of(&w.identity, trust_domain));
            }
        }
        let mut backends: HashMap<SocketAddr, Vec<(String, ResolvedPolicy)>> = HashMap::new();
        for svc in services {
            let mut policy = None;
            for b in svc
                .backends
                .iter()
                .filter(|b| b.node.as_deref() == Some(node))
            {
                let policy =
                    policy.get_or_insert_with(|| ResolvedPolicy::of(&svc.policy, trust_domain));
                let entry = backends.entry(b.socket_addr()).or_default();
                if !entry.iter().any(|(name, _)| name == &svc.name) {
                    entry.push((svc.name.clone(), policy.clone()));
                }
            }
        }
        Self {
            trust_domain: trust_domain.to_owned(),
            hosted,
            backends,
        }
    }

    pub fn is_local_backend(&self, backend: SocketAddr) -> bool {
        self.backends.contains_key(&backend)
    }

    /// The identity a stream from `peer_node` proves with `claim`.
    pub fn believe(
        &self,
        peer_node: &str,
        claim: Option<&str>,
    ) -> Result<Option<SpiffeId>, Refusal> {
        let Some(claim) = claim else {
            return Ok(None);
        };
        let invalid = |why: String| Refusal::InvalidClaim {
            claim: claim.to_owned(),
            trust_domain: self.trust_domain.clone(),
            why,
        };
        let id: SpiffeId = claim
            .parse()
            .map_err(|e: super::IdentityError| invalid(e.to_string()))?;
        if id.workload_parts().is_none() {
            return Err(invalid(
                "not of the form spiffe://<td>/ns/<ns>/sa/<sa>".into(),
            ));
        }
        if id.trust_domain() != self.trust_domain {
            return Err(invalid(format!(
                "its trust domain is {}",
                id.trust_domain()
            )));
        }
        let hosts = self
            .hosted
            .get(peer_node)
            .is_some_and(|ids| ids.contains(id.as_str()));
        if !hosts {
            return Err(Refusal::NotHosted {
                node: peer_node.to_owned(),
                identity: id.to_string(),
            });
        }
        Ok(Some(id))
    }

    /// Whether a stream from `peer_node` claiming `claim` may reach
    /// `backend`: the claim must be believable, and some service of this
    /// backend must allow the identity (each path the source could have
    /// taken to this backend is one of those services).
    pub fn authorize(
        &self,
        peer_node: &str,
        claim: Option<&str>,
        backend: SocketAddr,
    ) -> Result<Admitted, Refusal> {
        let identity = self.believe(peer_node, claim)?;
        let services = self
            .backends
            .get(&backend)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let id = identity.as_ref().map(SpiffeId::as_str);
        let mut why = Vec::new();
        for (name, policy) in services {
            let rule = policy.rule_for(id);
            if rule.allows() {
                return Ok(Admitted {
                    identity,
                    service: name.clone(),
                });
            }
            why.push(format!("service '{name}': {}", rule.describe()));
        }
        if why.is_empty() {
            why.push("no service of this node has that backend".into());
        }
        Err(Refusal::Denied {
            identity: identity.map(|i| i.to_string()),
            backend,
            why: why.join("; "),
        })
    }

    /// Identities each peer node may speak for, for `meshctl`.
    pub fn hosted(&self) -> BTreeMap<String, Vec<String>> {
        self.hosted
            .iter()
            .map(|(node, ids)| {
                let mut ids: Vec<String> = ids.iter().cloned().collect();
                ids.sort();
                (node.clone(), ids)
            })
            .collect()
    }
}

/// `meshctl authz check`: what a service's policy says of one identity, and
/// which nodes a stream claiming it is believed from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzCheck {
    pub service: String,
    /// The SPIFFE ID checked; `None`: a client without a workload identity.
    pub from: Option<String>,
    pub rule: Rule,
    pub allowed: bool,
    pub reason: String,
    /// The nodes the configuration says host a workload of this identity:
    /// only streams from these nodes may claim it.
    pub hosted_by: Vec<String>,
    /// With a node named: whether a stream from it claiming `from` would
    /// be believed at all (when not, it is refused before the policy).
    pub claim_from_node: Option<ClaimCheck>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimCheck {
    pub node: String,
    pub believed: bool,
    pub reason: String,
}

/// Evaluates `service`'s policy for `from` (a SPIFFE ID or a short name;
/// `None` for no identity) as a destination of trust domain `td` does.
pub fn check(
    service: &Service,
    workloads: &[Workload],
    td: &str,
    from: Option<&str>,
    node: Option<&str>,
) -> AuthzCheck {
    let from = from.map(|f| spiffe_id_of(f, td));
    let rule = ResolvedPolicy::of(&service.policy, td).rule_for(from.as_deref());
    let mut hosted_by: Vec<String> = workloads
        .iter()
        .filter(|w| from.as_deref() == Some(spiffe_id_of(&w.identity, td).as_str()))
        .filter_map(|w| w.node.clone())
        .collect();
    hosted_by.sort();
    hosted_by.dedup();
    let claim_from_node = node.map(|node| {
        let authz = Authorization::of(node, td, std::iter::empty(), workloads);
        match authz.believe(node, from.as_deref()) {
            Ok(_) => ClaimCheck {
                node: node.to_owned(),
                believed: true,
                reason: match &from {
                    Some(id) => format!("node '{node}' hosts a workload of {id}"),
                    None => "a stream that claims no identity is taken as such".into(),
                },
            },
            Err(refusal) => ClaimCheck {
                node: node.to_owned(),
                believed: false,
                reason: format!("refused as {}: {refusal}", refusal.reason()),
            },
        }
    });
    AuthzCheck {
        service: service.name.clone(),
        from,
        rule,
        allowed: rule.allows() && claim_from_node.as_ref().is_none_or(|c| c.believed),
        reason: rule.describe().to_owned(),
        hosted_by,
        claim_from_node,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DesiredState;

    const TD: &str = "mesh.test";
    const FRONTEND: &str = "spiffe://mesh.test/ns/default/sa/frontend";
    const BATCH: &str = "spiffe://mesh.test/ns/jobs/sa/batch";

    /// Node b's view of a three-node mesh: frontend runs on a, batch on c,
    /// `local` names no node.
    fn authz(services: &str) -> Authorization {
        let yaml = format!(
            "nodes:\n\
             - {{ name: a, address: 10.0.0.1 }}\n\
             - {{ name: b, address: 10.0.0.2 }}\n\
             - {{ name: c, address: 10.0.0.3 }}\n\
             workloads:\n\
             - {{ name: frontend, cgroup: /sys/fs/cgroup/f, node: a }}\n\
             - {{ name: batch, cgroup: /sys/fs/cgroup/b, node: c, identity: '{BATCH}' }}\n\
             - {{ name: local, cgroup: /sys/fs/cgroup/l }}\n\
             services:\n{services}"
        );
        let state: DesiredState = crate::config::parse_str(&yaml, "test.yaml").unwrap();
        Authorization::of("b", TD, state.services.iter(), &state.workloads)
    }

    #[test]
    fn a_claim_is_believed_only_from_the_node_that_hosts_it() {
        let a = authz("  []\n");
        assert_eq!(
            a.believe("a", Some(FRONTEND)).unwrap().unwrap().as_str(),
            FRONTEND
        );
        assert_eq!(
            a.believe("c", Some(BATCH)).unwrap().unwrap().as_str(),
            BATCH
        );
        assert_eq!(a.believe("c", None), Ok(None));
        for (node, claim) in [("c", FRONTEND), ("a", BATCH), ("b", FRONTEND)] {
            assert_eq!(
                a.believe(node, Some(claim)).unwrap_err().reason(),
                "not_hosted"
            );
        }
        // A workload that names no node is no peer's to claim.
        let local = "spiffe://mesh.test/ns/default/sa/local";
        assert_eq!(
            a.believe("a", Some(local)).unwrap_err().reason(),
            "not_hosted"
        );
    }

    #[test]
    fn malformed_foreign_and_node_claims_are_invalid() {
        let a = authz("  []\n");
        for claim in [
            "spiffe://other.test/ns/default/sa/frontend",
            "spiffe://mesh.test/node/a",
            "spiffe://mesh.test/ns/default",
            "frontend",
            "",
        ] {
            let err = a.believe("a", Some(claim)).unwrap_err();
            assert_eq!(err.reason(), "invalid_claim", "{claim}: {err}");
        }
    }

    #[test]
    fn policy_rules_deny_list_first_then_allow_list_then_default() {
        let policy = |default_deny, allow: &[&str], deny: &[&str]| {
            ResolvedPolicy::of(
                &Policy {
                    default_deny,
                    allow: allow.iter().map(|s| s.to_string()).collect(),
                    deny: deny.iter().map(|s| s.to_string()).collect(),
                },
                TD,
            )
        };
        let p = policy(false, &[], &["frontend"]);
        assert_eq!(p.rule_for(Some(FRONTEND)), Rule::DenyList);
        assert_eq!(p.rule_for(Some(BATCH)), Rule::DefaultAllow);
        assert_eq!(p.rule_for(None), Rule::DefaultAllow);
        let p = policy(false, &[BATCH], &[]);
        assert_eq!(p.rule_for(Some(BATCH)), Rule::AllowList);
        assert_eq!(p.rule_for(Some(FRONTEND)), Rule::NotAllowed);
        assert_eq!(p.rule_for(None), Rule::NotAllowed);
        let p = policy(true, &[], &[]);
        assert_eq!(p.rule_for(Some(FRONTEND)), Rule::DefaultDeny);
    }

    #[test]
    fn a_backend_is_reachable_when_some_service_of_it_allows() {
        let a = authz(&format!(
            "- name: web\n  vip: 127.77.0.1\n  port: 80\n  policy: {{ deny: [frontend] }}\n  \
             backends: [{{ address: 10.0.0.2, port: 9000, node: b }}]\n\
             - name: jobs\n  vip: 127.77.0.2\n  port: 80\n  policy: {{ allow: ['{BATCH}'] }}\n  \
             backends: [{{ address: 10.0.0.2, port: 9001, node: b }}]\n\
             - name: elsewhere\n  vip: 127.77.0.3\n  port: 80\n  \
             backends: [{{ address: 10.0.0.3, port: 9000, node: c }}]\n"
        ));
        let web: SocketAddr = "10.0.0.2:9000".parse().unwrap();
        let jobs: SocketAddr = "10.0.0.2:9001".parse().unwrap();
        assert!(a.is_local_backend(web) && a.is_local_backend(jobs));
        assert!(!a.is_local_backend("10.0.0.3:9000".parse().unwrap()));
        assert_eq!(
            a.authorize("a", Some(FRONTEND), web).unwrap_err().reason(),
            "denied"
        );
        assert_eq!(a.authorize("c", Some(BATCH), web).unwrap().service, "web");
        assert_eq!(a.authorize("c", None, web).unwrap().identity, None);
        assert_eq!(a.authorize("c", Some(BATCH), jobs).unwrap().service, "jobs");
        assert_eq!(
            a.authorize("a", Some(FRONTEND), jobs).unwrap_err().reason(),
            "denied"
        );
        assert_eq!(a.authorize("a", None, jobs).unwrap_err().reason(), "denied");
        // The claim is checked before the policy.
        assert_eq!(
            a.authorize("c", Some(FRONTEND), web).unwrap_err().reason(),
            "not_hosted"
        );
    }

    #[test]
    fn check_names_the_rule_and_the_nodes_a_claim_is_believed_from() {
        let yaml = "nodes:\n- { name: a, address: 10.0.0.1 }\n- { name: c, address: 10.0.0.3 }\n\
             workloads:\n- { name: frontend, cgroup: /sys/fs/cgroup/f, node: a }\n\
             services:\n- name: web\n  vip: 127.77.0.1\n  port: 80\n  policy: { deny: [frontend] }\n  \
             backends: [{ address: 10.0.0.3, port: 9000, node: c }]\n";
        let state: DesiredState = crate::config::parse_str(yaml, "test.yaml").unwrap();
        let web = &state.services[0];
        let denied = check(web, &state.workloads, TD, Some("frontend"), None);
        assert_eq!(denied.from.as_deref(), Some(FRONTEND));
        assert_eq!((denied.rule, denied.allowed), (Rule::DenyList, false));
        assert_eq!(denied.hosted_by, ["a"]);
        let other = check(web, &state.workloads, TD, Some(BATCH), Some("c"));
        assert_eq!(other.rule, Rule::DefaultAllow);
        // Allowed by the policy, but node c hosts no batch workload.
        assert!(!other.allowed);
        let claim = other.claim_from_node.unwrap();
        assert!(
            !claim.believed && claim.reason.contains("not_hosted"),
            "{claim:?}"
        );
        let anonymous = check(web, &state.workloads, TD, None, Some("c"));
        assert!(anonymous.allowed);
    }
}
