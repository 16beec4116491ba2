//! This node's Pods → their cgroups and mesh identities.
//!
//! A client workload is known to the kernel by its cgroup: `MESH_WORKLOADS`
//! maps a cgroup id to an identity, and a connecting socket is matched by
//! its cgroup or the nearest registered ancestor. In Kubernetes mode each
//! pod of this node becomes one [`Workload`]: its pod-level cgroup (every
//! container of the pod is below it), found from the pod's UID and QoS
//! class in either kubelet driver's spelling ([`layout`]), and the identity
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Everything taken from the API is checked before it becomes a path or an
//! identity ([`names`]): a value that could name another directory or a
//! malformed SPIFFE ID is an error naming the pod and the field.
//!
//! Static pods are skipped: the kubelet names their cgroups by its own hash
//! of the manifest, which the API shows only in the mirror pod's
//! `kubernetes.io/config.mirror` annotation, and that annotation is
//! anyone's to write who may create a pod, so it could point a pod's
//! identity at another pod's cgroup.

mod layout;
mod names;
#[cfg(test)]
mod testdir;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;

use crate::identity::{IdentityError, SpiffeId};
use crate::state::Workload;

pub use layout::{
    Driver, Layout, PodCgroup, QosClass, container_cgroup, pod_cgroup, pod_cgroup_candidates,
};
pub use names::{ContainerId, PodUid, Rejected, Runtime};

/// The annotation the kubelet puts on a static pod's mirror in the API.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "pod {pod}: {field} {value} is not valid: {why}; the pod gets no mesh identity until the object is fixed"
    )]
    InvalidField {
        /// `<namespace>/<name>`, escaped.
        pod: String,
        /// Where in the object, e.g. `metadata.uid`.
        field: String,
        /// The value, quoted and escaped.
        value: String,
        why: Rejected,
    },
    #[error("pod {pod}: cannot form its SPIFFE ID: {source}; check the agent's trust domain")]
    Identity {
        pod: String,
        #[source]
        source: IdentityError,
    },
    #[error(
        "kubelet cgroup root {value}: {why}; give it as the kubelet's --cgroup-root, such as / (the default) or /kubelet (kind)"
    )]
    KubeletRoot { value: String, why: &'static str },
}

/// Why a pod yields no workload here: not an error, the pod is just not
/// (or not yet, or no longer) running on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// No `spec.nodeName` yet.
    Unscheduled,
    /// Scheduled to another node.
    OtherNode(String),
    /// `status.phase` Succeeded or Failed: its processes are gone.
    Finished(String),
    /// No `metadata.uid`.
    NoUid,
    /// A static pod's mirror (see the module's comment).
    StaticPod,
    /// No `status.qosClass` yet (the API server sets it at creation).
    NoQosClass,
    /// Its cgroup does not exist (yet): the kubelet makes it before the
    /// pod's first container starts, and a status update follows.
    NoCgroup { looked_in: Vec<PathBuf> },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Unscheduled => f.write_str("not scheduled to a node yet"),
            Skip::OtherNode(node) => write!(f, "runs on node {}", names::quoted(node)),
            Skip::Finished(phase) => write!(f, "has finished (phase {})", names::quoted(phase)),
            Skip::NoUid => f.write_str("has no metadata.uid"),
            Skip::StaticPod => {
                f.write_str("is a static pod's mirror, whose cgroup the API cannot name safely")
            }
            Skip::NoQosClass => f.write_str("has no status.qosClass yet"),
            Skip::NoCgroup { looked_in } => {
                f.write_str("has no cgroup yet (looked in")?;
                for (i, path) in looked_in.iter().enumerate() {
                    let sep = if i == 0 { " " } else { ", " };
                    write!(f, "{sep}{}", path.display())?;
                }
                f.write_str(")")
            }
        }
    }
}

/// What a pod is to this node's agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodWorkload {
    Found(Workload),
    Skipped(Skip),
}

/// This node's pod → the mesh workload: name `<namespace>/<pod>`, its pod
/// cgroup, identity `spiffe://<trust_domain>/ns/<ns>/sa/<serviceAccountName
/// or "default">`, node `Some(node)`. `None` for pods that are not running
/// here ([`pod_workload`] says why).
pub fn workload_of(
    pod: &Pod,
    layout: &Layout,
    trust_domain: &str,
    node: &str,
) -> Result<Option<Workload>, CgroupError> {
    Ok(match pod_workload(pod, layout, trust_domain, node)? {
        PodWorkload::Found(workload) => Some(workload),
        PodWorkload::Skipped(_) => None,
    })
}

/// [`workload_of`], with the reason when a pod is skipped.
pub fn pod_workload(
    pod: &Pod,
    layout: &Layout,
    trust_domain: &str,
    node: &str,
) -> Result<PodWorkload, CgroupError> {
    let skip = |why| Ok(PodWorkload::Skipped(why));
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    match spec.and_then(|s| s.node_name.as_deref()) {
        None | Some("") => return skip(Skip::Unscheduled),
        Some(other) if other != node => return skip(Skip::OtherNode(other.to_owned())),
        Some(_) => {}
    }
    if let Some(phase @ ("Succeeded" | "Failed")) = status.and_then(|s| s.phase.as_deref()) {
        return skip(Skip::Finished(phase.to_owned()));
    }
    let Some(uid) = pod.metadata.uid.as_deref().filter(|u| !u.is_empty()) else {
        return skip(Skip::NoUid);
    };
    let meta = &pod.metadata;
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or_default();
    let check = |field: &str, value: &str, result: Result<(), Rejected>| {
        result.map_err(|why| invalid(pod, field, value, why))
    };
    check("metadata.namespace", namespace, names::dns_label(namespace))?;
    check("metadata.name", name, names::dns_subdomain(name))?;
    let uid = PodUid::parse(uid).map_err(|why| invalid(pod, "metadata.uid", uid, why))?;
    let service_account = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default");
    check(
        "spec.serviceAccountName",
        service_account,
        names::dns_subdomain(service_account),
    )?;
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
    {
        return skip(Skip::StaticPod);
    }
    let qos = match status.and_then(|s| s.qos_class.as_deref()) {
        None | Some("") => return skip(Skip::NoQosClass),
        Some(qos) => QosClass::from_api(qos).ok_or_else(|| {
            invalid(
                pod,
                "status.qosClass",
                qos,
                Rejected("it is not Guaranteed, Burstable or BestEffort"),
            )
        })?,
    };
    let identity =
        SpiffeId::workload(trust_domain, namespace, service_account).map_err(|source| {
            CgroupError::Identity {
                pod: pod_label(pod),
                source,
            }
        })?;
    let Some(cgroup) = pod_cgroup(layout, &uid, qos) else {
        return skip(Skip::NoCgroup {
            looked_in: pod_cgroup_candidates(layout, &uid, qos),
        });
    };
    Ok(PodWorkload::Found(Workload {
        name: format!("{namespace}/{name}"),
        cgroup: cgroup.path,
        identity: identity.to_string(),
        node: Some(node.to_owned()),
        addresses: pod_addresses(pod),
    }))
}

/// The pod's IPs (`status.podIPs`, or `status.podIP` where that list is
/// absent), which same-node redirect treats as node-local: pass only this
/// node's pods. Empty for hostNetwork pods (their IPs are the node's,
/// known already) and finished ones (their IPs may already be another
/// pod's). An address that does not parse is left out with a warning.
pub fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    if host_network || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let listed: Vec<&str> = match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    let mut addresses = Vec::with_capacity(listed.len());
    for text in listed {
        match text.parse::<IpAddr>() {
            Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
            Ok(_) => {}
            Err(_) => tracing::warn!(
                pod = %pod_label(pod),
                ip = %names::quoted(text),
                "pod IP in status.podIPs is not an IP address; left out of the node-local addresses"
            ),
        }
    }
    addresses
}

/// The ids of the pod's started containers (regular, init and ephemeral),
/// with their names, for finding their cgroups ([`container_cgroup`]).
/// Containers not started yet have no id and are left out.
pub fn container_ids(pod: &Pod) -> Result<Vec<(String, ContainerId)>, CgroupError> {
    let Some(status) = pod.status.as_ref() else {
        return Ok(Vec::new());
    };
    let lists = [
        ("containerStatuses", &status.container_statuses),
        ("initContainerStatuses", &status.init_container_statuses),
        (
            "ephemeralContainerStatuses",
            &status.ephemeral_container_statuses,
        ),
    ];
    let mut ids = Vec::new();
    for (list, statuses) in lists {
        for (i, container) in statuses.iter().flatten().enumerate() {
            let Some(text) = container.container_id.as_deref().filter(|t| !t.is_empty()) else {
                continue;
            };
            let id = ContainerId::parse(text).map_err(|why| {
                invalid(pod, &format!("status.{list}[{i}].containerID"), text, why)
            })?;
            ids.push((container.name.clone(), id));
        }
    }
    Ok(ids)
}

fn invalid(pod: &Pod, field: &str, value: &str, why: Rejected) -> CgroupError {
    CgroupError::InvalidField {
        pod: pod_label(pod),
        field: field.to_owned(),
        value: names::quoted(value),
        why,
    }
}

/// `<namespace>/<name>` for messages, escaped: both may be hostile.
fn pod_label(pod: &Pod) -> String {
    let meta = &pod.metadata;
    names::escaped(&format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("<no namespace>"),
        meta.name.as_deref().unwrap_or("<no name>")
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::testdir::CgroupTree;
    use super::*;

    const NODE: &str = "node-a";
    const TD: &str = "cluster.local";
    const UID: &str = "9ac48755-3968-48e4-b9dc-6d4b69f3bb42";
    const HEX: &str = "3baf66ee56a52a8765c3deb2444315411a888fa3e2f8f7ddd75e9ded3c34425e";

    /// An edit of a pod's JSON, for tables of cases.
    type Change = Box<dyn FnOnce(&mut Value)>;

    /// A running pod of node-a as the API serves it; `change` edits the
    /// JSON before it is read, as another object would differ.
    fn pod_with(change: impl FnOnce(&mut Value)) -> Pod {
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "cart-7d9f8b6c4-x2x9q",
                "namespace": "shop",
                "uid": UID,
                "resourceVersion": "1234",
            },
            "spec": {
                "nodeName": NODE,
                "serviceAccountName": "cart",
                "containers": [{"name": "cart", "image": "shop/cart:1"}],
            },
            "status": {
                "phase": "Running",
                "qosClass": "Burstable",
                "podIP": "10.244.1.7",
                "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}],
                "containerStatuses": [{
                    "name": "cart",
                    "image": "shop/cart:1",
                    "imageID": "",
                    "ready": true,
                    "restartCount": 0,
                    "containerID": format!("containerd://{HEX}"),
                }],
            },
        });
        change(&mut pod);
        serde_json::from_value(pod).expect("a valid Pod")
    }

    fn pod() -> Pod {
        pod_with(|_| {})
    }

    fn workload(pod: &Pod, tree: &CgroupTree) -> Result<PodWorkload, CgroupError> {
        pod_workload(pod, &Layout::new(tree.path()), TD, NODE)
    }

    #[test]
    fn a_running_pod_is_its_pod_cgroup_with_its_service_accounts_identity() {
        let cases = [
            (
                "Guaranteed",
                "kubepods/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            ),
            (
                "Burstable",
                "kubepods/burstable/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            ),
            (
                "BestEffort",
                "kubepods/besteffort/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            ),
            (
                "Guaranteed",
                "kubepods.slice/kubepods-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice",
            ),
            (
                "Burstable",
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice",
            ),
            (
                "BestEffort",
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice",
            ),
        ];
        for (qos, path) in cases {
            let tree = CgroupTree::new();
            let dir = tree.mkdir(path);
            // A container below it, as the runtime makes one: the pod's
            // cgroup is still the workload.
            tree.mkdir(&format!("{path}/{HEX}"));
            let pod = pod_with(|p| p["status"]["qosClass"] = json!(qos));
            let expected = Workload {
                name: "shop/cart-7d9f8b6c4-x2x9q".into(),
                cgroup: dir.clone(),
                identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
                node: Some(NODE.into()),
                addresses: pod_addresses(&pod),
            };
            assert_eq!(
                workload(&pod, &tree).unwrap(),
                PodWorkload::Found(expected.clone()),
                "{qos} at {path}"
            );
            assert_eq!(
                workload_of(&pod, &Layout::new(tree.path()), TD, NODE).unwrap(),
                Some(expected)
            );
            // The reconciler takes the cgroup id from this path's inode.
            use std::os::unix::fs::MetadataExt;
            assert_ne!(std::fs::metadata(&dir).unwrap().ino(), 0);
        }
    }

    #[test]
    fn the_wrong_qos_class_finds_nothing() {
        let tree = CgroupTree::new();
        tree.mkdir("kubepods/burstable/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42");
        for qos in ["Guaranteed", "BestEffort"] {
            let pod = pod_with(|p| p["status"]["qosClass"] = json!(qos));
            assert!(
                matches!(
                    workload(&pod, &tree).unwrap(),
                    PodWorkload::Skipped(Skip::NoCgroup { .. })
                ),
                "{qos}"
            );
        }
    }

    #[test]
    fn a_pod_without_a_cgroup_says_where_the_agent_looked() {
        let tree = CgroupTree::new();
        let PodWorkload::Skipped(skip) = workload(&pod(), &tree).unwrap() else {
            panic!("a pod without a cgroup was found");
        };
        let looked_in = vec![
            tree.path().join("kubepods/burstable/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42"),
            tree.path().join(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice",
            ),
        ];
        let message = skip.to_string();
        assert_eq!(
            skip,
            Skip::NoCgroup {
                looked_in: looked_in.clone()
            }
        );
        for path in &looked_in {
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
    }

    #[test]
    fn the_kubelet_root_applies_to_workloads() {
        let tree = CgroupTree::new();
        let dir = tree.mkdir(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice",
        );
        let layout = Layout::with_kubelet_root(tree.path(), "/kubelet").unwrap();
        let found = workload_of(&pod(), &layout, TD, NODE).unwrap();
        assert_eq!(found.map(|w| w.cgroup), Some(dir));
    }

    #[test]
    fn pods_not_running_here_are_skipped() {
        let tree = CgroupTree::new();
        // The cgroup exists: only the pod's own state decides.
        tree.mkdir("kubepods/burstable/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42");
        let cases: [(Change, Skip); 8] = [
            (
                Box::new(|p| p["spec"]["nodeName"] = json!("node-b")),
                Skip::OtherNode("node-b".into()),
            ),
            (
                Box::new(|p| {
                    p["spec"]
                        .as_object_mut()
                        .unwrap()
                        .retain(|k, _| k != "nodeName")
                }),
                Skip::Unscheduled,
            ),
            (
                Box::new(|p| p["status"]["phase"] = json!("Succeeded")),
                Skip::Finished("Succeeded".into()),
            ),
            (
                Box::new(|p| p["status"]["phase"] = json!("Failed")),
                Skip::Finished("Failed".into()),
            ),
            (
                Box::new(|p| {
                    p["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .retain(|k, _| k != "uid")
                }),
                Skip::NoUid,
            ),
            (Box::new(|p| p["metadata"]["uid"] = json!("")), Skip::NoUid),
            (
                Box::new(|p| {
                    p["status"]
                        .as_object_mut()
                        .unwrap()
                        .retain(|k, _| k != "qosClass")
                }),
                Skip::NoQosClass,
            ),
            (
                Box::new(|p| {
                    p["metadata"]["annotations"] =
                        json!({MIRROR_ANNOTATION: "8c8e3a2c4e1f0a7b9d6c5e4f3a2b1c0d"})
                }),
                Skip::StaticPod,
            ),
        ];
        for (change, why) in cases {
            let pod = pod_with(change);
            assert_eq!(
                workload(&pod, &tree).unwrap(),
                PodWorkload::Skipped(why.clone()),
                "{why}"
            );
            assert_eq!(
                workload_of(&pod, &Layout::new(tree.path()), TD, NODE).unwrap(),
                None
            );
        }
        // Pending with its cgroup made: its init containers may already run.
        let pending = pod_with(|p| p["status"]["phase"] = json!("Pending"));
        assert!(matches!(
            workload(&pending, &tree).unwrap(),
            PodWorkload::Found(_)
        ));
    }

    #[test]
    fn the_service_account_defaults_to_default() {
        let tree = CgroupTree::new();
        tree.mkdir("kubepods/burstable/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42");
        for change in [
            Box::new(|p: &mut Value| {
                p["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("serviceAccountName");
            }) as Change,
            Box::new(|p: &mut Value| p["spec"]["serviceAccountName"] = json!("")),
        ] {
            let found =
                workload_of(&pod_with(change), &Layout::new(tree.path()), TD, NODE).unwrap();
            assert_eq!(
                found.map(|w| w.identity).as_deref(),
                Some("spiffe://cluster.local/ns/shop/sa/default")
            );
        }
    }

    fn rejected(pod: &Pod, tree: &CgroupTree) -> (String, String) {
        match workload(pod, tree) {
            Err(CgroupError::InvalidField { field, .. }) => {
                let message = workload(pod, tree).unwrap_err().to_string();
                (field, message)
            }
            other => panic!("accepted or wrong error: {other:?}"),
        }
    }

    #[test]
    fn a_uid_that_could_leave_the_pods_directory_is_refused() {
        let tree = CgroupTree::new();
        // "ab/.." would resolve to kubepods/burstable itself, which exists.
        tree.mkdir("kubepods/burstable/podab");
        for uid in ["ab/..", "../../..", "ab\0", "ab\n", "ab_cd", "pod-ab.slice"] {
            let pod = pod_with(|p| p["metadata"]["uid"] = json!(uid));
            let (field, message) = rejected(&pod, &tree);
            assert_eq!(field, "metadata.uid", "{uid:?}");
            assert!(
                message.contains("shop/cart-7d9f8b6c4-x2x9q") && !message.contains('\0'),
                "{message}"
            );
        }
    }

    #[test]
    fn names_that_are_not_what_kubernetes_allows_are_refused() {
        let tree = CgroupTree::new();
        tree.mkdir("kubepods/burstable/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42");
        let cases: [(&str, Change); 6] = [
            (
                "metadata.namespace",
                Box::new(|p| p["metadata"]["namespace"] = json!("Shop")),
            ),
            (
                "metadata.namespace",
                Box::new(|p| p["metadata"]["namespace"] = json!("shop/sa/admin")),
            ),
            (
                "metadata.namespace",
                Box::new(|p| p["metadata"]["namespace"] = json!("..")),
            ),
            (
                "metadata.name",
                Box::new(|p| p["metadata"]["name"] = json!("cart\n")),
            ),
            (
                "spec.serviceAccountName",
                Box::new(|p| p["spec"]["serviceAccountName"] = json!("a/b")),
            ),
            (
                "status.qosClass",
                Box::new(|p| p["status"]["qosClass"] = json!("burstable")),
            ),
        ];
        for (expected, change) in cases {
            let (field, message) = rejected(&pod_with(change), &tree);
            assert_eq!(field, expected, "{message}");
        }
    }

    #[test]
    fn a_bad_trust_domain_is_an_identity_error() {
        let tree = CgroupTree::new();
        tree.mkdir("kubepods/burstable/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42");
        let err =
            pod_workload(&pod(), &Layout::new(tree.path()), "Cluster.Local", NODE).unwrap_err();
        assert!(matches!(err, CgroupError::Identity { .. }), "{err}");
    }

    #[test]
    fn container_ids_come_from_every_status_list() {
        let pod = pod_with(|p| {
            p["status"]["initContainerStatuses"] = json!([{
                "name": "init", "image": "", "imageID": "", "ready": false, "restartCount": 0,
                "containerID": format!("cri-o://{HEX}"),
            }, {
                "name": "not-started", "image": "", "imageID": "", "ready": false, "restartCount": 0,
            }]);
        });
        let ids = container_ids(&pod).unwrap();
        let names: Vec<_> = ids
            .iter()
            .map(|(n, id)| (n.as_str(), id.to_string()))
            .collect();
        assert_eq!(
            names,
            [
                ("cart", format!("containerd://{HEX}")),
                ("init", format!("cri-o://{HEX}"))
            ]
        );
        let bad = pod_with(|p| {
            p["status"]["containerStatuses"][0]["containerID"] = json!("containerd://../../x")
        });
        match container_ids(&bad) {
            Err(CgroupError::InvalidField { field, .. }) => {
                assert_eq!(field, "status.containerStatuses[0].containerID")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn container_ids_lead_to_container_cgroups_below_the_pods() {
        let tree = CgroupTree::new();
        let pod_dir = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice";
        let container = tree.mkdir(&format!("{pod_dir}/cri-containerd-{HEX}.scope"));
        let layout = Layout::new(tree.path());
        let found = pod_cgroup(&layout, &PodUid::parse(UID).unwrap(), QosClass::Burstable).unwrap();
        let (_, id) = container_ids(&pod()).unwrap().remove(0);
        assert_eq!(container_cgroup(&found, &id), Some(container));
    }

    #[test]
    fn pod_addresses_are_its_ips_except_on_the_host_network() {
        assert_eq!(
            pod_addresses(&pod()),
            [
                "10.244.1.7".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::7".parse().unwrap()
            ]
        );
        let only_pod_ip = pod_with(|p| {
            p["status"].as_object_mut().unwrap().remove("podIPs");
        });
        assert_eq!(
            pod_addresses(&only_pod_ip),
            ["10.244.1.7".parse::<IpAddr>().unwrap()]
        );
        let garbage = pod_with(|p| {
            p["status"]["podIPs"] =
                json!([{"ip": "10.244.1.7"}, {"ip": "not-an-ip"}, {"ip": "10.244.1.7"}])
        });
        assert_eq!(
            pod_addresses(&garbage),
            ["10.244.1.7".parse::<IpAddr>().unwrap()]
        );
        let host = pod_with(|p| p["spec"]["hostNetwork"] = json!(true));
        assert_eq!(pod_addresses(&host), Vec::<IpAddr>::new());
        let done = pod_with(|p| p["status"]["phase"] = json!("Succeeded"));
        assert_eq!(pod_addresses(&done), Vec::<IpAddr>::new());
        let new = pod_with(|p| {
            p.as_object_mut().unwrap().remove("status");
        });
        assert_eq!(pod_addresses(&new), Vec::<IpAddr>::new());
    }
}
