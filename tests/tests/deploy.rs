//! `daemonset.yaml` and the `Containerfile` against the agent they deploy.
//!
//! - Every document is read as its k8s-openapi type, and nothing the file
//!   says may be lost on the way (those types skip unknown fields, so a
//!   misspelt `mountPropogation` would otherwise pass unseen).
//! - One test per property the deployment promises: RBAC, capabilities,
//!   mounts, host namespaces, the node name, probes, resources,
//!   tolerations, the update strategy and the grace period.
//! - The promises are also checked where they can be run here: the agent
//!   runs with only the manifest's capabilities (and without any one of
//!   them fails at what that one is for), the init container's command
//!   mounts a bpffs exactly where none is, the pods' processes are
//!   invisible without the host's PID namespace, and a second agent with
//!   the manifest's flags starts beside a first one as a rolling update's
//!   surge pod does.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, ServiceAccount, VolumeMount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_tests::{
    TestBackend, TestCgroup, hold_and_watch, one_service_yaml, require_bin, run_ok,
    run_with_timeout,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Reading the manifest
// ---------------------------------------------------------------------------

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

fn read_repo_file(name: &str) -> Result<String> {
    let path = repo_file(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// daemonset.yaml, every document as its Kubernetes type.
struct Manifest {
    /// The file itself, for what only its text shows (comments).
    text: String,
    namespace: Namespace,
    service_account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    daemon_set: DaemonSet,
}

fn manifest() -> Result<Manifest> {
    parse_manifest(read_repo_file("daemonset.yaml")?)
}

fn parse_manifest(text: String) -> Result<Manifest> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).context("daemonset.yaml does not parse as YAML")?;
    let (mut namespace, mut service_account, mut role, mut binding, mut daemon_set) =
        (None, None, None, None, None);
    for (index, doc) in docs.iter().enumerate() {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let what = format!(
            "document {} ({kind} {})",
            index + 1,
            doc["metadata"]["name"]
        );
        match kind {
            "Namespace" => once(&mut namespace, strict(doc), &what)?,
            "ServiceAccount" => once(&mut service_account, strict(doc), &what)?,
            "ClusterRole" => once(&mut role, strict(doc), &what)?,
            "ClusterRoleBinding" => once(&mut binding, strict(doc), &what)?,
            "DaemonSet" => once(&mut daemon_set, strict(doc), &what)?,
            _ => bail!(
                "daemonset.yaml {what}: a kind this test does not check; add it to tests/tests/deploy.rs"
            ),
        }
    }
    let missing = |kind: &str| format!("daemonset.yaml has no {kind}");
    Ok(Manifest {
        text,
        namespace: namespace.with_context(|| missing("Namespace"))?,
        service_account: service_account.with_context(|| missing("ServiceAccount"))?,
        role: role.with_context(|| missing("ClusterRole"))?,
        binding: binding.with_context(|| missing("ClusterRoleBinding"))?,
        daemon_set: daemon_set.with_context(|| missing("DaemonSet"))?,
    })
}

fn once<T>(slot: &mut Option<T>, typed: Result<T>, what: &str) -> Result<()> {
    let typed = typed.with_context(|| format!("daemonset.yaml {what}"))?;
    ensure!(
        slot.replace(typed).is_none(),
        "daemonset.yaml {what}: a second document of this kind"
    );
    Ok(())
}

/// `doc` as `T`, refusing any field that `T` does not carry: k8s-openapi's
/// deserializers skip unknown fields, so the typed object is serialized
/// back and must say exactly what the file says.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T> {
    let typed: T = serde_json::from_value(doc.clone())
        .with_context(|| format!("not a valid {}", std::any::type_name::<T>()))?;
    let back = serde_json::to_value(&typed)?;
    let differences = differences(doc, &back);
    ensure!(
        differences.is_empty(),
        "{} does not say what the file says (misspelt or misplaced fields?):\n  {}",
        std::any::type_name::<T>(),
        differences.join("\n  ")
    );
    Ok(typed)
}

/// Where `typed` (the round trip) differs from `file`, as paths such as
/// `spec.template.spec.containers[0].volumeMounts[1].mountPropogation`.
fn differences(file: &Value, typed: &Value) -> Vec<String> {
    let mut out = Vec::new();
    compare("", file, typed, &mut out);
    out
}

fn compare(path: &str, file: &Value, typed: &Value, out: &mut Vec<String>) {
    let field = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (file, typed) {
        (Value::Object(file), Value::Object(typed)) => {
            for (key, value) in file {
                match typed.get(key) {
                    Some(kept) => compare(&field(key), value, kept, out),
                    None => out.push(format!("{}: not a field of this type, dropped", field(key))),
                }
            }
            for key in typed.keys().filter(|k| !file.contains_key(*k)) {
                out.push(format!("{}: added by the type", field(key)));
            }
        }
        (Value::Array(file), Value::Array(typed)) if file.len() == typed.len() => {
            for (i, (value, kept)) in file.iter().zip(typed).enumerate() {
                compare(&format!("{path}[{i}]"), value, kept, out);
            }
        }
        _ if file == typed => {}
        _ => out.push(format!("{path}: {file} became {typed}")),
    }
}

impl Manifest {
    fn pod(&self) -> Result<&PodSpec> {
        self.daemon_set
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("the DaemonSet has no pod template spec")
    }

    fn agent(&self) -> Result<&Container> {
        self.pod()?
            .containers
            .iter()
            .find(|c| c.name == "mesh-agent")
            .context("the DaemonSet has no mesh-agent container")
    }

    fn init_containers(&self) -> Result<&[Container]> {
        Ok(self.pod()?.init_containers.as_deref().unwrap_or_default())
    }

    /// The agent's `--flag=value` arguments after `run`.
    fn flags(&self) -> Result<Vec<(String, String)>> {
        let args = self.agent()?.args.as_deref().unwrap_or_default();
        let Some((run, rest)) = args.split_first() else {
            bail!("the agent container has no args");
        };
        ensure!(
            run == "run",
            "the first argument must be `run`, got {run:?}"
        );
        rest.iter()
            .map(|a| {
                let (k, v) = a
                    .split_once('=')
                    .with_context(|| format!("write flags as --flag=value, got {a}"))?;
                Ok((k.to_owned(), v.to_owned()))
            })
            .collect()
    }

    fn flag(&self, name: &str) -> Result<String> {
        self.flags()?
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .with_context(|| format!("the agent is not given {name}"))
    }

    fn metrics_port(&self) -> Result<i32> {
        let addr = self.flag("--metrics-addr")?;
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .with_context(|| format!("--metrics-addr={addr} has no port"))
    }

    /// The capabilities the agent container adds.
    fn capabilities(&self) -> Result<Vec<String>> {
        self.agent()?
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.clone())
            .context("the agent container adds no capabilities")
    }
}

fn mount<'a>(container: &'a Container, path: &str) -> Result<&'a VolumeMount> {
    container
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| m.mount_path == path)
        .with_context(|| format!("{} does not mount {path}", container.name))
}

/// The host path of the volume `name`.
fn host_path(pod: &PodSpec, name: &str) -> Result<String> {
    pod.volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.host_path.as_ref())
        .map(|h| h.path.clone())
        .with_context(|| format!("no hostPath volume {name}"))
}

// ---------------------------------------------------------------------------
// The documents and their types
// ---------------------------------------------------------------------------

#[test]
fn every_document_is_its_kubernetes_type_and_loses_no_field() -> Result<()> {
    manifest()?;
    Ok(())
}

#[test]
fn a_misspelt_or_misplaced_field_is_reported_with_its_path() -> Result<()> {
    let text = read_repo_file("daemonset.yaml")?;
    let cases = [
        (
            "mountPropagation: HostToContainer",
            "mountPropogation: HostToContainer",
            "spec.template.spec.containers[0].volumeMounts[0].mountPropogation: not a field",
        ),
        // Valid Kubernetes, one level too deep: the pod's, not the container's.
        (
            "          imagePullPolicy: IfNotPresent\n          command: [\"/usr/local/bin/mesh-agent\"]",
            "          imagePullPolicy: IfNotPresent\n          hostPID: true\n          command: [\"/usr/local/bin/mesh-agent\"]",
            "spec.template.spec.containers[0].hostPID: not a field",
        ),
    ];
    for (good, bad, expected) in cases {
        ensure!(
            text.matches(good).count() == 1,
            "daemonset.yaml no longer has exactly one `{good}`: update this test"
        );
        let Err(e) = parse_manifest(text.replace(good, bad)) else {
            bail!("`{bad}` was accepted");
        };
        let message = format!("{e:#}");
        ensure!(
            message.contains(expected),
            "the error does not name `{expected}`:\n{message}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// RBAC
// ---------------------------------------------------------------------------

#[test]
fn the_role_grants_list_and_watch_on_services_endpointslices_pods_and_get_on_nodes_only()
-> Result<()> {
    let m = manifest()?;
    ensure!(
        m.role.aggregation_rule.is_none(),
        "an aggregated role grants more"
    );
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in m.role.rules.as_deref().unwrap_or_default() {
        ensure!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "unexpected rule {rule:?}"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let expected: BTreeMap<(String, String), BTreeSet<String>> = [
        ("", "services", &["list", "watch"][..]),
        ("", "pods", &["list", "watch"]),
        ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
        ("", "nodes", &["get"]),
    ]
    .into_iter()
    .map(|(group, resource, verbs)| {
        (
            (group.to_owned(), resource.to_owned()),
            verbs.iter().map(|v| (*v).to_owned()).collect(),
        )
    })
    .collect();
    assert_eq!(granted, expected);
    Ok(())
}

#[test]
fn the_role_is_bound_to_the_daemonsets_service_account() -> Result<()> {
    let m = manifest()?;
    let sa_name = m.service_account.metadata.name.as_deref();
    let sa_namespace = m.service_account.metadata.namespace.as_deref();
    assert_eq!(sa_namespace, m.namespace.metadata.name.as_deref());
    assert_eq!(m.daemon_set.metadata.namespace.as_deref(), sa_namespace);
    assert_eq!(m.pod()?.service_account_name.as_deref(), sa_name);
    // The in-cluster config is the ServiceAccount's mounted token.
    assert_ne!(
        m.service_account.automount_service_account_token,
        Some(false)
    );
    assert_ne!(m.pod()?.automount_service_account_token, Some(false));

    let role_ref = &m.binding.role_ref;
    assert_eq!(
        (
            role_ref.api_group.as_str(),
            role_ref.kind.as_str(),
            Some(role_ref.name.as_str())
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            m.role.metadata.name.as_deref()
        )
    );
    let subjects: Vec<_> = m
        .binding
        .subjects
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            (
                s.kind.as_str(),
                Some(s.name.as_str()),
                s.namespace.as_deref(),
            )
        })
        .collect();
    assert_eq!(subjects, [("ServiceAccount", sa_name, sa_namespace)]);
    Ok(())
}

// ---------------------------------------------------------------------------
// Privilege
// ---------------------------------------------------------------------------

/// What the agent needs and why, each said in a comment above it in the
/// file: NET_ADMIN (SO_MARK, SOCK_DESTROY), SYS_ADMIN (setns into the pods'
/// network namespaces; BPF and PERFMON are within it), SYS_PTRACE (other
/// processes' /proc/<pid>/ns/net). The tests below show each is needed.
const AGENT_CAPABILITIES: [&str; 3] = ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

#[test]
fn the_agent_drops_all_capabilities_and_adds_only_the_named_ones() -> Result<()> {
    let m = manifest()?;
    let agent = m.agent()?;
    let security = agent
        .security_context
        .as_ref()
        .context("the agent has no securityContext")?;
    assert_ne!(security.privileged, Some(true), "the agent is privileged");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let capabilities = security.capabilities.as_ref().context("no capabilities")?;
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added = m.capabilities()?;
    let unique: BTreeSet<&str> = added.iter().map(String::as_str).collect();
    assert_eq!(
        unique.len(),
        added.len(),
        "a capability listed twice: {added:?}"
    );
    assert_eq!(unique, BTreeSet::from(AGENT_CAPABILITIES));
    // Each one says why, in the comment right above it.
    let lines: Vec<&str> = m.text.lines().map(str::trim).collect();
    for capability in &added {
        let at = lines
            .iter()
            .position(|l| *l == format!("- {capability}"))
            .with_context(|| format!("`- {capability}` is not on a line of its own"))?;
        ensure!(
            at > 0 && lines[at - 1].starts_with('#'),
            "{capability} has no comment above it saying why the agent needs it"
        );
    }
    Ok(())
}

#[test]
fn only_the_bpffs_init_container_is_privileged_and_it_only_mounts_bpffs() -> Result<()> {
    let m = manifest()?;
    let privileged: Vec<&str> = m
        .init_containers()?
        .iter()
        .chain(&m.pod()?.containers)
        .filter(|c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false)
        })
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(privileged, ["mount-bpffs"]);
    let init = &m.init_containers()?[0];
    assert_eq!(init.name, "mount-bpffs");
    let command = init.command.as_deref().unwrap_or_default();
    ensure!(
        command.len() == 3
            && command[..2] == ["/bin/sh", "-c"]
            && command[2].ends_with("mount -t bpf bpf /sys/fs/bpf"),
        "the init container runs more than the bpffs mount: {command:?}"
    );
    assert_eq!(init.args, None);
    let mounts: Vec<&str> = init
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|v| v.mount_path.as_str())
        .collect();
    assert_eq!(
        mounts,
        ["/sys/fs/bpf"],
        "the init container mounts only bpffs"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Mounts and host namespaces
// ---------------------------------------------------------------------------

#[test]
fn bpffs_is_the_hosts_mounted_by_the_init_container_and_seen_by_the_agent() -> Result<()> {
    let m = manifest()?;
    let pod = m.pod()?;
    let init = mount(&m.init_containers()?[0], "/sys/fs/bpf")?;
    let agent = mount(m.agent()?, "/sys/fs/bpf")?;
    // The init container's mount reaches the host; the agent sees the
    // host's mounts (Bidirectional would make it privileged).
    assert_eq!(init.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(agent.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(init.name, agent.name);
    assert_eq!(host_path(pod, &agent.name)?, "/sys/fs/bpf");
    let bpffs = m.flag("--bpffs")?;
    ensure!(
        Path::new(&bpffs).starts_with(&agent.mount_path),
        "--bpffs={bpffs} is not in the host's bpffs"
    );
    Ok(())
}

#[test]
fn the_cgroup_v2_root_is_mounted_read_only_where_the_agent_attaches() -> Result<()> {
    let m = manifest()?;
    let cgroup = m.flag("--cgroup")?;
    let mount = mount(m.agent()?, &cgroup)?;
    assert_eq!(host_path(m.pod()?, &mount.name)?, "/sys/fs/cgroup");
    assert_eq!(mount.read_only, Some(true));
    Ok(())
}

/// Pins, the admin socket, the identity: each on a volume, so none lives
/// and dies with the container's own filesystem (read-only besides).
#[test]
fn every_path_the_agent_is_given_is_on_a_volume() -> Result<()> {
    let m = manifest()?;
    let agent = m.agent()?;
    let mounts: Vec<&str> = agent
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|v| v.mount_path.as_str())
        .collect();
    for name in ["--cgroup", "--bpffs", "--admin-socket", "--identity-dir"] {
        let value = m.flag(name)?;
        ensure!(
            mounts.iter().any(|mp| Path::new(&value).starts_with(mp)),
            "{name}={value} is on no volume mount ({mounts:?})"
        );
    }
    ensure!(
        m.flag("--kubeconfig").is_err(),
        "in a cluster the agent uses its ServiceAccount, not a kubeconfig"
    );
    Ok(())
}

#[test]
fn the_agent_uses_the_hosts_network_and_pids() -> Result<()> {
    let m = manifest()?;
    assert_eq!(m.pod()?.host_network, Some(true));
    assert_eq!(m.pod()?.host_pid, Some(true));
    Ok(())
}

/// Why hostPID: the agent finds the pods' network namespaces through the
/// PIDs in their cgroups' `cgroup.procs`, which a reader in another PID
/// namespace sees as 0.
#[test]
fn without_the_hosts_pid_namespace_a_pods_processes_are_pid_zero() -> Result<()> {
    let cgroup = TestCgroup::new("deploy-pidns")?;
    let sleeper = Reaped(cgroup.command("sleep").arg("30").spawn()?);
    let procs = cgroup.path().join("cgroup.procs");
    let host_view = std::fs::read_to_string(&procs)?;
    assert_eq!(host_view.trim(), sleeper.0.id().to_string());
    let out = run_ok(
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "cat"])
            .arg(&procs),
        Duration::from_secs(10),
    )?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    Ok(())
}

/// Kills and reaps a child of ours when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// The node name, probes, resources, scheduling, updates
// ---------------------------------------------------------------------------

#[test]
fn the_node_name_comes_from_the_downward_api_into_the_agents_variable() -> Result<()> {
    let m = manifest()?;
    let env = m.agent()?.env.as_deref().unwrap_or_default();
    let node = env
        .iter()
        .find(|e| e.name == "MESH_NODE_NAME")
        .context("no MESH_NODE_NAME")?;
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .context("MESH_NODE_NAME is not from a fieldRef")?;
    assert_eq!(field.field_path, "spec.nodeName");
    // The variable the agent's --node-name reads.
    let help = agent_help()?;
    ensure!(
        help.contains("[env: MESH_NODE_NAME="),
        "mesh-agent run --help shows no MESH_NODE_NAME:\n{help}"
    );
    Ok(())
}

/// Kubernetes leaves an undefined `$(VAR)` in the args as it is.
#[test]
fn every_variable_the_args_use_is_set_in_the_container() -> Result<()> {
    let m = manifest()?;
    let agent = m.agent()?;
    let defined: BTreeSet<&str> = agent
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    for arg in agent.args.as_deref().unwrap_or_default() {
        let mut rest = arg.as_str();
        while let Some((_, after)) = rest.split_once("$(") {
            let (name, tail) = after
                .split_once(')')
                .with_context(|| format!("unclosed $( in {arg}"))?;
            ensure!(
                defined.contains(name),
                "{arg} uses $({name}), which no env sets"
            );
            rest = tail;
        }
    }
    Ok(())
}

#[test]
fn every_flag_the_manifest_passes_is_one_the_agent_knows() -> Result<()> {
    let m = manifest()?;
    let help = agent_help()?;
    let known: BTreeSet<&str> = help
        .split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .filter(|w| w.starts_with("--"))
        .collect();
    let unknown: Vec<String> = m
        .flags()?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    ensure!(
        unknown.is_empty(),
        "mesh-agent run does not know {unknown:?}:\n{help}"
    );
    Ok(())
}

fn agent_help() -> Result<String> {
    let out = run_ok(
        Command::new(require_bin("mesh-agent")?).args(["run", "--help"]),
        Duration::from_secs(10),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn probes_and_scrape_annotations_use_the_metrics_port() -> Result<()> {
    let m = manifest()?;
    let port = m.metrics_port()?;
    let agent = m.agent()?;
    for (probe, path) in [
        (&agent.liveness_probe, "/healthz"),
        (&agent.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .with_context(|| format!("no httpGet probe on {path}"))?;
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(port));
    }
    let annotations = m
        .daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|meta| meta.annotations.clone())
        .context("the pod template has no annotations")?;
    let scrape: BTreeMap<&str, &str> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with("prometheus.io/"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let port = port.to_string();
    assert_eq!(
        scrape,
        BTreeMap::from([
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", port.as_str()),
            ("prometheus.io/path", "/metrics"),
        ])
    );
    Ok(())
}

/// Requests ≤ limits, and both cover the agent's measured memory
/// (bench/results/latest.json, the control-plane scenario) with the room
/// the manifest's comment promises: twice the 10,000-service figure for the
/// request, twice the 100,000-service figure for the limit.
#[test]
fn resources_cover_the_benchmarks_memory_figures() -> Result<()> {
    let m = manifest()?;
    let resources = m.agent()?.resources.as_ref().context("no resources")?;
    let get = |map: &Option<BTreeMap<String, Quantity>>, key: &str| -> Result<f64> {
        let q = map
            .as_ref()
            .and_then(|m| m.get(key))
            .with_context(|| format!("no {key} in {map:?}"))?;
        quantity(&q.0)
    };
    let (request, limit) = (
        get(&resources.requests, "memory")?,
        get(&resources.limits, "memory")?,
    );
    ensure!(get(&resources.requests, "cpu")? > 0.0, "no CPU request");
    ensure!(
        request <= limit,
        "memory request {request} above the limit {limit}"
    );

    let bench: Value = serde_json::from_str(&read_repo_file("bench/results/latest.json")?)?;
    let rss_at = |scale: u64| -> Result<f64> {
        let rows = bench["scenarios"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["id"] == "control-plane"))
            .and_then(|s| s["rows"].as_array())
            .context("bench/results/latest.json has no control-plane rows")?;
        rows.iter()
            .filter(|r| r["scale"] == scale)
            .flat_map(|r| ["rss_mib", "rss_after_changes_mib"].map(|k| r["metrics"][k].as_f64()))
            .flatten()
            .reduce(f64::max)
            .map(|mib| mib * MIB)
            .with_context(|| format!("no RSS figure at {scale} services"))
    };
    let (at_10k, at_100k) = (rss_at(10_000)?, rss_at(100_000)?);
    ensure!(
        request >= 2.0 * at_10k,
        "memory request {:.0} MiB is under twice the {:.1} MiB measured at 10,000 services",
        request / MIB,
        at_10k / MIB
    );
    ensure!(
        limit >= 2.0 * at_100k,
        "memory limit {:.0} MiB is under twice the {:.1} MiB measured at 100,000 services",
        limit / MIB,
        at_100k / MIB
    );
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

/// A Kubernetes quantity ("64Mi", "100m", "1G", "2") as a number.
fn quantity(text: &str) -> Result<f64> {
    const SUFFIXES: [(&str, f64); 10] = [
        ("Ki", 1024.0),
        ("Mi", MIB),
        ("Gi", MIB * 1024.0),
        ("Ti", MIB * MIB),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("", 1.0),
    ];
    SUFFIXES
        .iter()
        .find_map(|(suffix, factor)| {
            let number = text.strip_suffix(suffix)?;
            number.parse::<f64>().ok().map(|n| n * factor)
        })
        .with_context(|| format!("{text:?} is not a quantity this test reads"))
}

#[test]
fn quantities_are_read_with_their_suffixes() -> Result<()> {
    assert_eq!(quantity("64Mi")?, 64.0 * MIB);
    assert_eq!(quantity("100m")?, 0.1);
    assert_eq!(quantity("2")?, 2.0);
    assert_eq!(quantity("1G")?, 1e9);
    ensure!(quantity("64MB").is_err());
    Ok(())
}

#[test]
fn it_tolerates_every_taint_with_node_critical_priority() -> Result<()> {
    let m = manifest()?;
    let pod = m.pod()?;
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    ensure!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()
                && t.toleration_seconds.is_none()),
        "no toleration of every taint (operator: Exists, no key, no effect): {tolerations:?}"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    Ok(())
}

#[test]
fn a_rolling_update_starts_the_new_agent_before_stopping_the_old() -> Result<()> {
    let m = manifest()?;
    let strategy = m
        .daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .context("no updateStrategy")?;
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy
        .rolling_update
        .as_ref()
        .context("no rollingUpdate")?;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    // In the host network a container port is a host port, and the
    // scheduler would keep the surge pod off the node the old one holds.
    for container in m.init_containers()?.iter().chain(&m.pod()?.containers) {
        ensure!(
            container.ports.as_deref().unwrap_or_default().is_empty(),
            "{} declares ports: with hostNetwork they block the surge pod",
            container.name
        );
    }
    Ok(())
}

#[test]
fn the_grace_period_outlasts_the_tunnel_drain() -> Result<()> {
    let m = manifest()?;
    let drain: i64 = m
        .flag("--tunnel-drain-seconds")?
        .parse()
        .context("--tunnel-drain-seconds is not a number")?;
    let grace = m
        .pod()?
        .termination_grace_period_seconds
        .context("no terminationGracePeriodSeconds (the default, 30 s, is the drain's)")?;
    ensure!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} must exceed --tunnel-drain-seconds {drain}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The init container's command, run
// ---------------------------------------------------------------------------

/// The init container's own command, run twice in a mount namespace of the
/// test's (private propagation: nothing reaches the host) in which every
/// bpffs at /sys/fs/bpf was unmounted first, as on a node without one: the
/// first run mounts one, the second leaves it alone (a second mount stacked
/// on the first would hide the pins in it).
#[test]
fn the_init_containers_command_mounts_a_bpffs_only_where_none_is() -> Result<()> {
    let m = manifest()?;
    let command = m.init_containers()?[0]
        .command
        .clone()
        .context("the init container has no command")?;
    const SCRIPT: &str = r#"
        count() { grep -c ' /sys/fs/bpf bpf ' /proc/self/mounts; }
        n=0
        while [ "$(count)" -gt 0 ]; do
            n=$((n + 1)); [ "$n" -le 20 ] || exit 3
            umount -l /sys/fs/bpf || exit 4
        done
        echo "before $(count)"
        "$@" || exit 5
        echo "first $(count)"
        "$@" || exit 6
        echo "second $(count)"
    "#;
    let out = run_ok(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", SCRIPT, "sh"])
            .args(&command),
        Duration::from_secs(20),
    )?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "before 0\nfirst 1\nsecond 1"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The agent with the manifest's capabilities, run
// ---------------------------------------------------------------------------

const VIP_BLOCK: u8 = 30;
const START_TIMEOUT: Duration = Duration::from_secs(20);
const WAIT: Duration = Duration::from_secs(10);
/// Connections held through a backend's removal.
const HELD: u32 = 3;
/// How long the held connections are watched for their destruction.
const WATCH_MS: u64 = 3_000;

/// An agent run as the DaemonSet runs it, as far as one machine can: root
/// holding only `capabilities` (its bounding set, so exec gives it no
/// others), in a mount namespace of its own where the cgroup it balances is
/// a read-only bind mount (the manifest's `readOnly: true`). Its pins are
/// removed on drop when it made them.
struct ContainedAgent {
    child: Child,
    dir: PathBuf,
    config: PathBuf,
    admin_socket: PathBuf,
    bpffs: PathBuf,
    owns_pins: bool,
}

/// How to start a [`ContainedAgent`].
struct Launch<'a> {
    capabilities: &'a [&'a str],
    cgroup: &'a TestCgroup,
    /// The file source's configuration; None: `flags` name the source.
    config: Option<&'a str>,
    /// Another agent's pins to share (a surge pod on the same node); None:
    /// pins of its own.
    pins: Option<&'a Path>,
    /// More `mesh-agent run` flags.
    flags: Vec<String>,
    /// The container's environment (the downward API's variables).
    env: Vec<(&'a str, String)>,
}

impl<'a> Launch<'a> {
    fn new(capabilities: &'a [&'a str], cgroup: &'a TestCgroup) -> Self {
        Self {
            capabilities,
            cgroup,
            config: None,
            pins: None,
            flags: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl ContainedAgent {
    /// Starts it and waits until its admin socket answers.
    fn start(launch: Launch<'_>) -> Result<Self> {
        let (pid, n) = (std::process::id(), mesh_tests::next_id());
        let dir = std::env::temp_dir().join(format!("mesh-test-deploy-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        let bpffs = match launch.pins {
            Some(shared) => shared.to_owned(),
            None => mesh_tests::bpffs_dir(&format!("mesh-test-{pid}-{n}"))?,
        };
        let (config, admin_socket) = (dir.join("mesh.yaml"), dir.join("admin.sock"));
        let bounding: String = launch
            .capabilities
            .iter()
            .map(|c| format!(",+{}", c.to_lowercase()))
            .collect();
        let spawn = || -> Result<Child> {
            std::fs::create_dir_all(dir.join("cgroup"))?;
            let log = std::fs::File::create(dir.join("agent.log"))?;
            let mut command = Command::new("unshare");
            // unshare and sh exec in place: the child's PID is the agent's.
            command
                .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
                .arg(r#"mount --bind -o ro "$1" "$2" && shift 2 && exec "$@""#)
                .arg("sh")
                .arg(launch.cgroup.path())
                .arg(dir.join("cgroup"))
                .arg("setpriv")
                .arg(format!("--bounding-set=-all{bounding}"))
                .args(["--inh-caps=-all", "--"])
                .arg(require_bin("mesh-agent")?)
                .arg("run")
                .arg("--cgroup")
                .arg(dir.join("cgroup"))
                .arg("--bpffs")
                .arg(&bpffs)
                .arg("--admin-socket")
                .arg(&admin_socket);
            if let Some(yaml) = launch.config {
                std::fs::write(&config, yaml)?;
                command
                    .arg("--config")
                    .arg(&config)
                    .args(["--watch-interval-ms", "100"]);
            }
            command
                .args(&launch.flags)
                .env("MESH_METRICS_ADDR", "127.0.0.1:0")
                .envs(launch.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawning the agent")
        };
        let child = match spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on Drop stops it and cleans up.
        let mut agent = Self {
            child,
            dir,
            config,
            admin_socket,
            bpffs,
            owns_pins: launch.pins.is_none(),
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited at start ({status}); log:\n{}", self.log());
            }
            let last = match self.status() {
                Ok(_) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "the agent was not ready in {START_TIMEOUT:?} ({last}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn status(&self) -> Result<Value> {
        let out = run_with_timeout(
            Command::new(require_bin("meshctl")?)
                .arg("--admin-socket")
                .arg(&self.admin_socket)
                .args(["status", "-o", "json"]),
            Duration::from_secs(10),
        )?;
        ensure!(
            out.status.success(),
            "meshctl status: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn wait_for_generation(&self, min: u64) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.status()?;
            if status["config_generation"]
                .as_u64()
                .is_some_and(|g| g >= min)
            {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "generation {min} not reached in {WAIT:?}: {status}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Replaces the configuration (write beside, rename over) and signals.
    fn reconfigure(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.join(".mesh.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.config)?;
        self.signal(libc::SIGHUP)
    }

    fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: a plain syscall on our own, unreaped child.
        if unsafe { libc::kill(self.child.id() as i32, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling the agent");
        }
        Ok(())
    }

    /// The capability sets the kernel gave the running agent.
    fn effective_capabilities(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .context("no CapEff")?;
        Ok(u64::from_str_radix(hex.trim(), 16)?)
    }

    /// SIGTERM and wait (bounded) for the exit.
    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.signal(libc::SIGTERM)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.child.try_wait()?.is_none() {
                if Instant::now() >= deadline {
                    self.child.kill()?;
                    self.child.wait()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for ContainedAgent {
    fn drop(&mut self) {
        if self.stop().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.owns_pins {
            let cleanup = require_bin("mesh-agent").and_then(|bin| {
                run_ok(
                    Command::new(bin)
                        .arg("cleanup")
                        .arg("--bpffs")
                        .arg(&self.bpffs),
                    Duration::from_secs(10),
                )
            });
            if let Err(e) = cleanup {
                eprintln!("mesh-tests: {e:#}");
            }
            let _ = std::fs::remove_dir_all(&self.bpffs);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Capability numbers (linux/capability.h) of the names these tests use.
fn capability_mask(names: &[&str]) -> Result<u64> {
    names.iter().try_fold(0, |mask, name| {
        let bit = match *name {
            "NET_ADMIN" => 12,
            "SYS_PTRACE" => 19,
            "SYS_ADMIN" => 21,
            "PERFMON" => 38,
            "BPF" => 39,
            other => bail!("capability {other}: add its number here"),
        };
        Ok(mask | 1u64 << bit)
    })
}

/// What happened when a backend holding connections from the agent's
/// cgroup was removed with `destroy_on_removal`.
struct Removal {
    aborted: u64,
    destroyed: u64,
    capabilities: u64,
    log: String,
}

/// The agent with `capabilities` balances connections to a backend, which
/// is then removed from the configuration with `destroy_on_removal`: the
/// agent must find the client's network namespace through /proc, enter it
/// and destroy the sockets there. The client (mesh-probe, root with every
/// capability, as a pod's process may have more than the agent holds) runs
/// in a cgroup of its own.
fn remove_a_backend_with(capabilities: &[&str], vip_last: u8) -> Result<Removal> {
    let old = TestBackend::holding(1)?;
    let new = TestBackend::new(2)?;
    let cgroup = TestCgroup::new("deploy-caps")?;
    let vip = mesh_tests::loopback_vip(VIP_BLOCK, vip_last, 80);
    let destroy = "    destroy_on_removal: true\n";
    let config = one_service_yaml(vip, destroy, &[old.addr()]);
    let agent = ContainedAgent::start(Launch {
        config: Some(&config),
        ..Launch::new(capabilities, &cgroup)
    })?;
    let mut held = hold_and_watch(&cgroup, vip, HELD, false, WATCH_MS)?;
    ensure!(
        held.result.id_count(1) == u64::from(HELD),
        "connections through the VIP: {:?}; log:\n{}",
        held.result,
        agent.log()
    );
    agent.reconfigure(&one_service_yaml(vip, destroy, &[new.addr()]))?;
    let status = agent.wait_for_generation(2)?;
    let report = held.watch_report()?;
    Ok(Removal {
        aborted: report.errors.get("ECONNABORTED").copied().unwrap_or(0),
        destroyed: status["sockets_destroyed"].as_u64().unwrap_or(0),
        capabilities: agent.effective_capabilities()?,
        log: agent.log(),
    })
}

const NO_MARK: &str = "cannot set SO_MARK";

#[test]
fn with_only_the_manifests_capabilities_the_agent_does_its_whole_job() -> Result<()> {
    let m = manifest()?;
    let added = m.capabilities()?;
    let capabilities: Vec<&str> = added.iter().map(String::as_str).collect();
    let run = remove_a_backend_with(&capabilities, 1)?;
    assert_eq!(run.capabilities, capability_mask(&capabilities)?);
    // Programs loaded and attached, its sockets marked, the client's
    // namespace entered and its sockets destroyed.
    ensure!(!run.log.contains(NO_MARK), "log:\n{}", run.log);
    assert_eq!(
        (run.aborted, run.destroyed),
        (u64::from(HELD), u64::from(HELD)),
        "log:\n{}",
        run.log
    );
    Ok(())
}

#[test]
fn without_net_admin_the_agents_sockets_are_unmarked_and_none_is_destroyed() -> Result<()> {
    let run = remove_a_backend_with(&["SYS_ADMIN", "SYS_PTRACE"], 2)?;
    ensure!(run.log.contains(NO_MARK), "log:\n{}", run.log);
    assert_eq!((run.aborted, run.destroyed), (0, 0), "log:\n{}", run.log);
    Ok(())
}

#[test]
fn without_sys_ptrace_the_agent_cannot_find_a_clients_network_namespace() -> Result<()> {
    let run = remove_a_backend_with(&["NET_ADMIN", "SYS_ADMIN"], 3)?;
    assert_eq!((run.aborted, run.destroyed), (0, 0), "log:\n{}", run.log);
    Ok(())
}

/// BPF and PERFMON, the narrower alternative for bpf() on kernels ≥ 5.8,
/// load and attach everything, but setns() needs SYS_ADMIN.
#[test]
fn bpf_and_perfmon_instead_of_sys_admin_cannot_enter_a_clients_network_namespace() -> Result<()> {
    let run = remove_a_backend_with(&["NET_ADMIN", "SYS_PTRACE", "BPF", "PERFMON"], 4)?;
    ensure!(
        run.log.contains("cannot enter network namespace"),
        "log:\n{}",
        run.log
    );
    assert_eq!((run.aborted, run.destroyed), (0, 0), "log:\n{}", run.log);
    Ok(())
}

// ---------------------------------------------------------------------------
// A rolling update's surge pod, run
// ---------------------------------------------------------------------------

/// What maxSurge does on each node: the new agent starts with the
/// manifest's flags (so on the same metrics address and pins) while the
/// old one runs, is ready beside it, and serves the probes once the old one
/// is gone. Each keeps its own admin socket (an emptyDir per pod).
#[test]
fn a_surge_agent_with_the_manifests_flags_starts_beside_the_running_one() -> Result<()> {
    let m = manifest()?;
    let added = m.capabilities()?;
    let capabilities: Vec<&str> = added.iter().map(String::as_str).collect();
    let cgroup = TestCgroup::new("deploy-surge")?;
    let vip = mesh_tests::loopback_vip(VIP_BLOCK, 10, 80);
    let backend = TestBackend::new(1)?;
    let config = one_service_yaml(vip, "", &[backend.addr()]);
    // The node's address is loopback here, the port any free one: what
    // matters is that both agents are given the same.
    let metrics = free_loopback_addr()?;
    let launch = |pins| Launch {
        config: Some(&config),
        pins,
        flags: vec![format!("--metrics-addr={metrics}")],
        ..Launch::new(&capabilities, &cgroup)
    };
    let mut old = ContainedAgent::start(launch(None))?;
    assert_eq!(http_status(metrics, "/readyz")?, 200);
    let new = ContainedAgent::start(launch(Some(&old.bpffs)))
        .context("the surge agent did not start beside the running one")?;
    old.stop()?;
    assert_eq!(http_status(metrics, "/readyz")?, 200, "log:\n{}", new.log());
    assert_eq!(http_status(metrics, "/healthz")?, 200);
    assert_eq!(new.status()?["ready"], true);
    Ok(())
}

/// 127.0.0.1 with a port free now (the manifest's fixed port would clash
/// between tests running side by side).
fn free_loopback_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?)
}

/// The status code of `GET path` (HTTP/1.1, one request, bounded).
fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path}: not an HTTP response: {response:?}"))
}

// ---------------------------------------------------------------------------
// The Containerfile
// ---------------------------------------------------------------------------

/// One `FROM` stage of the Containerfile: its base and instructions, each
/// with its continuation lines joined.
struct Stage {
    from: String,
    instructions: Vec<String>,
}

fn containerfile() -> Result<Vec<Stage>> {
    let text = read_repo_file("Containerfile")?;
    let mut stages: Vec<Stage> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        let instruction = std::mem::take(&mut pending) + line;
        if let Some(from) = instruction.strip_prefix("FROM ") {
            stages.push(Stage {
                from: from.to_owned(),
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .context("the Containerfile has an instruction before its first FROM")?
                .instructions
                .push(instruction);
        }
    }
    ensure!(
        stages.len() >= 2,
        "the Containerfile is not a multi-stage build"
    );
    Ok(stages)
}

/// `[[bin]]` names of mesh-agent/Cargo.toml.
fn agent_bins() -> Result<Vec<String>> {
    let text = read_repo_file("mesh-agent/Cargo.toml")?;
    let mut bins = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(name) = line.strip_prefix("name = ") {
            bins.push(name.trim_matches('"').to_owned());
        }
    }
    ensure!(
        !bins.is_empty(),
        "mesh-agent/Cargo.toml declares no [[bin]]"
    );
    Ok(bins)
}

#[test]
fn the_image_holds_the_binaries_the_daemonset_runs() -> Result<()> {
    let stages = containerfile()?;
    let runtime = stages.last().context("no stage")?;
    assert_eq!(runtime.from, "docker.io/library/debian:12-slim");
    let build_name = stages[0]
        .from
        .rsplit_once(" AS ")
        .map(|(_, name)| name.to_owned())
        .context("the first stage has no name")?;

    // Both binaries built and copied into /usr/local/bin.
    let build = stages[..stages.len() - 1]
        .iter()
        .flat_map(|s| &s.instructions)
        .find(|i| i.starts_with("RUN cargo build"))
        .context("no `RUN cargo build`")?;
    ensure!(
        build.contains("--release")
            && build.contains("--package mesh-agent")
            && build.contains("--bins"),
        "{build}"
    );
    let copy = runtime
        .instructions
        .iter()
        .find(|i| i.starts_with(&format!("COPY --from={build_name} ")))
        .context("the runtime stage copies nothing from the build")?;
    let mut words: Vec<&str> = copy.split_whitespace().skip(2).collect();
    let destination = words.pop().context("COPY without destination")?;
    assert_eq!(destination, "/usr/local/bin/");
    let copied: BTreeSet<&str> = words
        .iter()
        .map(|w| w.strip_prefix("/src/target/release/").unwrap_or(w))
        .collect();
    let bins = agent_bins()?;
    assert_eq!(copied, bins.iter().map(String::as_str).collect());

    // The entrypoint is what the DaemonSet runs; the init container runs
    // the same image's shell.
    let entrypoint = runtime
        .instructions
        .iter()
        .find_map(|i| i.strip_prefix("ENTRYPOINT "))
        .context("no ENTRYPOINT")?;
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint)?;
    let m = manifest()?;
    let agent = m.agent()?;
    assert_eq!(agent.command.as_ref(), Some(&entrypoint));
    assert_eq!(entrypoint, ["/usr/local/bin/mesh-agent"]);
    let init = &m.init_containers()?[0];
    assert_eq!(init.image, agent.image);
    assert_eq!(
        init.command
            .as_ref()
            .and_then(|c| c.first())
            .map(String::as_str),
        Some("/bin/sh")
    );
    // The image tag is the workspace's version.
    let version = read_repo_file("Cargo.toml")?
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .context("no workspace version")?;
    assert_eq!(
        agent.image.as_deref(),
        Some(format!("mesh-agent:{version}").as_str())
    );
    Ok(())
}

/// The toolchain versions xtask installs (xtask/src/setup.rs) and the
/// workspace's rust-version are the Containerfile's.
#[test]
fn the_image_builds_with_the_toolchain_xtask_installs() -> Result<()> {
    let text = read_repo_file("Containerfile")?;
    let setup = read_repo_file("xtask/src/setup.rs")?;
    let quoted_after = |haystack: &str, marker: &str| -> Result<String> {
        let (_, rest) = haystack
            .split_once(marker)
            .with_context(|| format!("no {marker}"))?;
        Ok(rest
            .split('"')
            .nth(1)
            .context("no quoted value")?
            .to_owned())
    };
    let linker = quoted_after(&setup, "BPF_LINKER_VERSION: &str =")?;
    let llvm = quoted_after(&setup, "\"LLVM_PREFIX\",")?;
    let major = llvm
        .rsplit_once("llvm-")
        .map(|(_, m)| m.to_owned())
        .with_context(|| format!("{llvm} names no LLVM major"))?;
    let rust = quoted_after(&read_repo_file("Cargo.toml")?, "rust-version =")?;
    for expected in [
        format!("FROM docker.io/library/rust:{rust}-slim-bookworm AS"),
        format!("llvm-{major}-dev libpolly-{major}-dev"),
        format!("LLVM_PREFIX={llvm} cargo install bpf-linker --version {linker}"),
        format!("--features llvm-{major}"),
        "--component rust-src".to_owned(),
        "rustup toolchain link nightly".to_owned(),
    ] {
        ensure!(
            text.contains(&expected),
            "the Containerfile does not say `{expected}` (xtask/src/setup.rs, Cargo.toml)"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The manifest's flags, run against an API server
// ---------------------------------------------------------------------------

/// The flags the launcher sets itself (test paths for the container's).
const LAUNCHER_FLAGS: [&str; 3] = ["--cgroup", "--bpffs", "--admin-socket"];

/// The agent as the DaemonSet starts it: every flag of the manifest (the
/// container's paths replaced by the test's, the node's address by
/// loopback), its capabilities, the node name from the environment, an
/// identity directory with nothing in it (no identity issued yet), and the
/// API server of the test (`--kubeconfig`, where a pod uses its
/// ServiceAccount). It becomes ready, its probes answer on the metrics
/// port, and a Service of the API reaches the kernel.
#[test]
fn the_agent_runs_with_the_manifests_flags_against_an_api_server() -> Result<()> {
    use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint, EndpointConditions, EndpointPort, EndpointSlice,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use mesh_tests::kube_api::KubeApi;

    let m = manifest()?;
    let added = m.capabilities()?;
    let capabilities: Vec<&str> = added.iter().map(String::as_str).collect();
    let node = format!("deploy-node-{}", std::process::id());
    let backend = TestBackend::new(7)?;
    let vip = mesh_tests::loopback_vip(VIP_BLOCK, 20, 80);
    let meta = |namespace: Option<&str>, name: &str, labels: &[(&str, &str)]| ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..ObjectMeta::default()
    };
    let api = KubeApi::start()?;
    api.apply(&Node {
        metadata: meta(None, &node, &[]),
        ..Node::default()
    });
    api.apply(&Service {
        metadata: meta(Some("shop"), "web", &[]),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(vip.ip().to_string()),
            cluster_ips: Some(vec![vip.ip().to_string()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(vip.port()),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    });
    api.apply(&EndpointSlice {
        metadata: meta(
            Some("shop"),
            "web-1",
            &[("kubernetes.io/service-name", "web")],
        ),
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec![backend.addr().ip().to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                ..EndpointConditions::default()
            }),
            node_name: Some(node.clone()),
            ..Endpoint::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(backend.port())),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    });

    let dir = TempDir::new("deploy-flags")?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let identity = dir.path().join("identity");
    std::fs::create_dir(&identity)?;
    let metrics = free_loopback_addr()?;
    let mut flags: Vec<String> = m
        .flags()?
        .into_iter()
        .filter(|(k, _)| !LAUNCHER_FLAGS.contains(&k.as_str()))
        .map(|(k, v)| match k.as_str() {
            "--metrics-addr" => format!("{k}={metrics}"),
            "--identity-dir" => format!("{k}={}", identity.display()),
            _ => format!("{k}={v}"),
        })
        .collect();
    flags.push(format!("--kubeconfig={}", kubeconfig.display()));
    let cgroup = TestCgroup::new("deploy-flags")?;
    let agent = ContainedAgent::start(Launch {
        flags,
        env: vec![("MESH_NODE_NAME", node.clone())],
        ..Launch::new(&capabilities, &cgroup)
    })?;

    let deadline = Instant::now() + WAIT;
    while http_status(metrics, "/readyz")? != 200 {
        ensure!(
            Instant::now() < deadline,
            "/readyz did not turn 200 in {WAIT:?}; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_status(metrics, "/healthz")?, 200);
    let probe = mesh_tests::run_probe(&cgroup, vip, 5)?;
    assert_eq!(probe.id_count(7), 5, "{probe:?}; log:\n{}", agent.log());
    Ok(())
}

/// A directory of the test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(hint: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "mesh-test-{hint}-{}-{}",
            std::process::id(),
            mesh_tests::next_id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
