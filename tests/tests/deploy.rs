//! `daemonset.yaml` against the agent it deploys: every flag it passes is
//! one the agent accepts (the agent really runs with them), every path it
//! names is on a mounted volume, the probes reach the metrics port, and the
//! ConfigMap's configuration is valid and served.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mesh_tests::{Agent, TestCgroup};
use serde_json::Value;

/// Flags whose values are paths inside the container; the test gives the
/// agent its own paths for these and checks the manifest mounts them.
const PATH_FLAGS: [&str; 4] = ["--config", "--cgroup", "--bpffs", "--admin-socket"];

fn manifest() -> Result<Vec<Value>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    serde_saphyr::from_multiple(&text).with_context(|| format!("{} does not parse", path.display()))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("daemonset.yaml has no {kind}"))
}

fn agent_container(docs: &[Value]) -> Result<&Value> {
    let ds = of_kind(docs, "DaemonSet")?;
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "mesh-agent"))
        .context("DaemonSet has no mesh-agent container")
}

/// The container's `--flag=value` arguments after `run`.
fn flags(container: &Value) -> Result<Vec<(String, String)>> {
    let args: Vec<&str> = container["args"]
        .as_array()
        .context("container has no args")?
        .iter()
        .map(|a| a.as_str().context("non-string arg"))
        .collect::<Result<_>>()?;
    let Some((&"run", rest)) = args.split_first() else {
        bail!("the first argument must be the `run` subcommand, got {args:?}");
    };
    rest.iter()
        .map(|a| {
            let (k, v) = a
                .split_once('=')
                .with_context(|| format!("write flags as --flag=value, got {a}"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

#[test]
fn every_path_the_agent_is_given_is_mounted_from_the_host_or_the_configmap() -> Result<()> {
    let docs = manifest()?;
    let container = agent_container(&docs)?;
    let mounts: Vec<PathBuf> = container["volumeMounts"]
        .as_array()
        .context("no volumeMounts")?
        .iter()
        .map(|m| PathBuf::from(m["mountPath"].as_str().unwrap_or_default()))
        .collect();
    let flags = flags(container)?;
    for name in PATH_FLAGS {
        let (_, value) = flags
            .iter()
            .find(|(k, _)| k == name)
            .with_context(|| format!("the DaemonSet does not pass {name}"))?;
        assert!(
            mounts.iter().any(|m| Path::new(value).starts_with(m)),
            "{name}={value} is on no volume mount ({mounts:?}): it would live and die with the container"
        );
    }
    // The bpffs pins must outlive the container.
    let bpffs = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/sys/fs/bpf")
        .context("/sys/fs/bpf is not mounted")?;
    assert_eq!(bpffs["mountPropagation"], "Bidirectional");
    assert_eq!(container["securityContext"]["privileged"], true);
    Ok(())
}

#[test]
fn probes_and_scrape_annotation_use_the_metrics_port() -> Result<()> {
    let docs = manifest()?;
    let container = agent_container(&docs)?;
    let (_, addr) = flags(container)?
        .into_iter()
        .find(|(k, _)| k == "--metrics-addr")
        .context("no --metrics-addr")?;
    let port: u64 = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("--metrics-addr={addr} has no port"))?;
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], port);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], port);
    let ds = of_kind(&docs, "DaemonSet")?;
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    Ok(())
}

/// The agent runs with every non-path flag of the manifest and the
/// ConfigMap's configuration, and serves that configuration's services.
#[test]
fn the_agent_runs_with_the_manifest_flags_and_serves_the_configmap() -> Result<()> {
    let docs = manifest()?;
    let config = of_kind(&docs, "ConfigMap")?["data"]["mesh.yaml"]
        .as_str()
        .context("ConfigMap has no mesh.yaml")?
        .to_owned();
    let flags = flags(agent_container(&docs)?)?;
    let extra: Vec<String> = flags
        .iter()
        .filter(|(k, _)| !PATH_FLAGS.contains(&k.as_str()))
        .map(|(k, v)| {
            // The node's address is loopback here; port 0 lets parallel
            // tests coexist.
            let v = if k == "--metrics-addr" {
                "127.0.0.1:0".to_owned()
            } else {
                v.clone()
            };
            format!("{k}={v}")
        })
        .collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let cgroup = TestCgroup::new("deploy")?;
    let agent = Agent::start_with(&config, &cgroup, &extra)?;
    agent.wait_for_generation(1, Duration::from_secs(10))?;
    let services = agent.meshctl_json(&["services"])?;
    let names: Vec<&str> = services["services"]
        .as_array()
        .context("no services array")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["web"], "{services}");
    Ok(())
}
