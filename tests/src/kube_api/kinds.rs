//! The kinds the test API server serves, and the discovery documents that
//! describe them (kubectl maps `services` to a path only through these).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, APIVersions, GroupVersionForDiscovery,
    ServerAddressByClientCIDR,
};
use k8s_openapi::apimachinery::pkg::version::Info;
use serde_json::Value;

/// One served kind, as the API's discovery documents name it.
#[derive(Debug)]
pub(crate) struct Kind {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// The URL segment: `services`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Field labels a field selector may use besides `metadata.name` (and
    /// `metadata.namespace` when namespaced), with where each is read from.
    pub fields: &'static [Field],
}

/// A selectable field: its label and how its value is read from the object.
#[derive(Debug)]
pub(crate) struct Field {
    pub label: &'static str,
    pub pointer: &'static str,
    /// Booleans select as "true"/"false", an absent one as "false".
    pub boolean: bool,
}

const fn text(label: &'static str, pointer: &'static str) -> Field {
    Field {
        label,
        pointer,
        boolean: false,
    }
}

const fn flag(label: &'static str, pointer: &'static str) -> Field {
    Field {
        label,
        pointer,
        boolean: true,
    }
}

/// What the server knows. The field labels are those the real registry
/// strategies make selectable (pkg/registry/*/strategy.go).
pub(crate) static KINDS: [Kind; 4] = [
    Kind {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        fields: &[
            text("spec.clusterIP", "/spec/clusterIP"),
            text("spec.type", "/spec/type"),
        ],
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        fields: &[],
    },
    Kind {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        fields: &[
            text("spec.nodeName", "/spec/nodeName"),
            text("spec.restartPolicy", "/spec/restartPolicy"),
            text("spec.schedulerName", "/spec/schedulerName"),
            text("spec.serviceAccountName", "/spec/serviceAccountName"),
            flag("spec.hostNetwork", "/spec/hostNetwork"),
            text("status.phase", "/status/phase"),
            text("status.podIP", "/status/podIP"),
            text("status.nominatedNodeName", "/status/nominatedNodeName"),
        ],
    },
    Kind {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        fields: &[flag("spec.unschedulable", "/spec/unschedulable")],
    },
];

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// `services` or `endpointslices.discovery.k8s.io`, as error messages
    /// name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The field labels a field selector may use on this kind.
    pub fn field_labels(&self) -> Vec<&'static str> {
        let mut labels = vec!["metadata.name"];
        if self.namespaced {
            labels.push("metadata.namespace");
        }
        labels.extend(self.fields.iter().map(|f| f.label));
        labels
    }

    /// The field labels this kind can be selected by, each with its value
    /// (`object`, the JSON form, is read for those beyond metadata; absent
    /// text fields select as "").
    pub fn field_values(
        &self,
        namespace: &str,
        name: &str,
        object: Option<&Value>,
    ) -> Vec<(&'static str, String)> {
        let mut values = vec![("metadata.name", name.to_owned())];
        if self.namespaced {
            values.push(("metadata.namespace", namespace.to_owned()));
        }
        for field in self.fields {
            let value = object.and_then(|o| o.pointer(field.pointer));
            let value = if field.boolean {
                value.and_then(Value::as_bool).unwrap_or(false).to_string()
            } else {
                value.and_then(Value::as_str).unwrap_or_default().to_owned()
            };
            values.push((field.label, value));
        }
        values
    }
}

/// The served kind with this apiVersion and kind, by index into [`KINDS`].
pub(crate) fn by_type(api_version: &str, kind: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| k.kind == kind && k.api_version() == api_version)
}

/// The served kind at `/api/{version}/...` (group "") or
/// `/apis/{group}/{version}/...`.
pub(crate) fn by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)
}

/// The groups other than core, each with its one version.
fn groups() -> Vec<(&'static str, &'static str)> {
    let mut groups: Vec<_> = KINDS
        .iter()
        .filter(|k| !k.group.is_empty())
        .map(|k| (k.group, k.version))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

fn group_version(group: &str, version: &str) -> GroupVersionForDiscovery {
    GroupVersionForDiscovery {
        group_version: format!("{group}/{version}"),
        version: version.to_owned(),
    }
}

/// `GET /version`: a v1.35 server, the version k8s-openapi's types are for.
pub(crate) fn version() -> Info {
    Info {
        major: "1".into(),
        minor: "35".into(),
        emulation_major: Some("1".into()),
        emulation_minor: Some("35".into()),
        min_compatibility_major: Some("1".into()),
        min_compatibility_minor: Some("34".into()),
        git_version: "v1.35.0".into(),
        git_commit: "0000000000000000000000000000000000000000".into(),
        git_tree_state: "clean".into(),
        build_date: "2025-12-17T00:00:00Z".into(),
        go_version: "go1.25.5".into(),
        compiler: "gc".into(),
        platform: "linux/amd64".into(),
    }
}

/// `GET /api`: the core group's versions.
pub(crate) fn core_versions(server_address: &str) -> APIVersions {
    APIVersions {
        versions: vec!["v1".into()],
        server_address_by_client_cidrs: vec![ServerAddressByClientCIDR {
            client_cidr: "0.0.0.0/0".into(),
            server_address: server_address.to_owned(),
        }],
    }
}

/// `GET /apis/{group}`.
pub(crate) fn group(name: &str) -> Option<APIGroup> {
    let (_, version) = groups().into_iter().find(|(g, _)| *g == name)?;
    Some(APIGroup {
        name: name.to_owned(),
        versions: vec![group_version(name, version)],
        preferred_version: Some(group_version(name, version)),
        server_address_by_client_cidrs: None,
    })
}

/// `GET /apis`: every group but core.
pub(crate) fn group_list() -> APIGroupList {
    APIGroupList {
        groups: groups()
            .into_iter()
            .filter_map(|(name, _)| group(name))
            .collect(),
    }
}

/// `GET /api/v1` or `/apis/{group}/{version}`: the resources served
/// there, or None when nothing is.
pub(crate) fn resource_list(group: &str, version: &str) -> Option<APIResourceList> {
    let resources: Vec<APIResource> = KINDS
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .map(|k| APIResource {
            name: k.plural.into(),
            singular_name: k.singular.into(),
            namespaced: k.namespaced,
            kind: k.kind.into(),
            // Only what this server does: no writes through the API.
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            short_names: (!k.short_names.is_empty())
                .then(|| k.short_names.iter().map(|s| (*s).to_owned()).collect()),
            ..APIResource::default()
        })
        .collect();
    if resources.is_empty() {
        return None;
    }
    Some(APIResourceList {
        group_version: KINDS
            .iter()
            .find(|k| k.group == group && k.version == version)
            .map(Kind::api_version)?,
        resources,
    })
}
