//! Every meshctl command against a running agent, its JSON/YAML output, and
//! what it does when the agent is down.

use std::net::SocketAddr;

use anyhow::Result;
use mesh_agent::admin::{EventsResponse, ServicesResponse, StatusResponse};
use mesh_tests::{Agent, TestBackend, TestCgroup, run_probe, spawn_probe};
use serde_json::Value;

fn vip(last: u8) -> SocketAddr {
    mesh_tests::loopback_vip(17, last, 80)
}

fn config(vip: SocketAddr, extra: &str, backends: &[&TestBackend]) -> String {
    let mut yaml = format!(
        "services:\n  - name: web\n    vip: {}\n    port: {}\n{extra}    backends:\n",
        vip.ip(),
        vip.port()
    );
    for b in backends {
        yaml += &format!("      - {{address: 127.0.0.1, port: {}}}\n", b.port());
    }
    yaml
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON a command prints decodes into the API's own type and encodes
/// back to the same document.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    agent: &Agent,
    args: &[&str],
) -> Result<T> {
    let json = agent.meshctl_json(args)?;
    let typed: T = serde_json::from_value(json.clone())?;
    assert_eq!(serde_json::to_value(&typed)?, json, "{args:?} round-trips");
    Ok(typed)
}

#[test]
fn read_commands_print_tables_json_and_yaml() -> Result<()> {
    let (a, b) = (TestBackend::new(1)?, TestBackend::new(2)?);
    let cgroup = TestCgroup::new("ctlread")?;
    let vip = vip(1);
    let agent = Agent::start(&config(vip, "", &[&a, &b]), &cgroup)?;
    assert_eq!(run_probe(&cgroup, vip, 40)?.ok, 40);

    let status: StatusResponse = round_trip(&agent, &["status"])?;
    assert!(status.ready);
    assert!(
        status
            .maps
            .iter()
            .any(|m| m.name == "MESH_SERVICES" && m.entries == 1)
    );
    let services: ServicesResponse = round_trip(&agent, &["services"])?;
    assert_eq!(services.services[0].connections, 40);
    let backends: ServicesResponse = round_trip(&agent, &["backends", "web"])?;
    assert_eq!(backends.services[0].backends.len(), 2);
    let events: EventsResponse = round_trip(&agent, &["events", "--limit", "10"])?;
    assert_eq!(events.events.len(), 10);
    let stats = agent.meshctl_json(&["stats"])?;
    assert_eq!(stats["connections"], Value::from(40u64));
    agent.meshctl_json(&["redirect"])?;

    for (args, header) in [
        (vec!["status"], "config generation"),
        (vec!["services"], "FRONTEND"),
        (vec!["backends"], "HEALTH"),
        (vec!["events"], "VERDICT"),
        (vec!["stats"], "connections balanced"),
    ] {
        let out = agent.meshctl(&args)?;
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).contains(header), "{args:?}: {}", stdout(&out));
        assert!(
            !stdout(&out).contains('\x1b'),
            "no colour when not on a terminal"
        );
    }
    let yaml = agent.meshctl(&["services", "-o", "yaml"])?;
    assert!(stdout(&yaml).contains("name: web"), "{}", stdout(&yaml));

    let missing = agent.meshctl(&["backends", "nope"])?;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("no service named 'nope'"),
        "{}",
        stderr(&missing)
    );

    let completion = agent.meshctl(&["completion", "bash"])?;
    assert!(
        stdout(&completion).contains("meshctl"),
        "a bash completion script"
    );
    Ok(())
}

#[test]
fn drain_undrain_and_weight_are_runtime_overrides() -> Result<()> {
    let (a, b) = (TestBackend::new(1)?, TestBackend::new(2)?);
    let cgroup = TestCgroup::new("ctloverride")?;
    let vip = vip(2);
    let agent = Agent::start(&config(vip, "", &[&a, &b]), &cgroup)?;
    let a_addr = a.addr().to_string();

    let drained = agent.meshctl(&["drain", &a_addr])?;
    assert!(drained.status.success(), "{}", stderr(&drained));
    let view = agent.meshctl_json(&["backends"])?;
    let a_view = &view["services"][0]["backends"][0];
    assert_eq!(a_view["state"], "draining");
    assert_eq!(a_view["overridden"], "drained by meshctl");
    assert_eq!(run_probe(&cgroup, vip, 30)?.id_count(2), 30);

    agent.meshctl(&["undrain", &a_addr])?;
    agent.meshctl(&["weight", &b.addr().to_string(), "0"])?;
    let view = agent.meshctl_json(&["backends"])?;
    assert_eq!(
        view["services"][0]["backends"][1]["overridden"],
        "weight 0 by meshctl"
    );
    assert_eq!(
        run_probe(&cgroup, vip, 30)?.id_count(1),
        30,
        "B's weight is 0"
    );

    agent.meshctl(&["weight", &b.addr().to_string(), "--clear"])?;
    let view = agent.meshctl_json(&["backends"])?;
    assert_eq!(
        view["services"][0]["backends"][1]["overridden"],
        Value::Null
    );
    let result = run_probe(&cgroup, vip, 100)?;
    assert!(
        result.id_count(1) > 0 && result.id_count(2) > 0,
        "{result:?}"
    );

    let unknown = agent.meshctl(&["drain", "127.0.0.1:1"])?;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("meshctl backends"),
        "{}",
        stderr(&unknown)
    );
    Ok(())
}

#[test]
fn explain_names_the_backend_the_kernel_picks() -> Result<()> {
    let backends: Vec<TestBackend> = (1..=5).map(TestBackend::new).collect::<Result<_>>()?;
    let parent = TestCgroup::new("ctlexplain")?;
    let client = parent.child("client")?;
    let vip = vip(3);
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let agent = Agent::start(&config(vip, "    algorithm: maglev\n", &refs), &parent)?;

    let cgroup = client.path().display().to_string();
    let explained = agent.meshctl_json(&["explain", "web", "--client", &cgroup])?;
    let chosen = explained["chosen"].as_str().unwrap().to_owned();
    let result = run_probe(&client, vip, 5)?;
    let id = result.ids.keys().next().unwrap().parse::<usize>()?;
    assert_eq!(chosen, backends[id - 1].addr().to_string(), "{explained}");
    assert_eq!(explained["verdict"], "forward");
    assert_eq!(explained["client"]["client_id"], Value::from(client.id()));

    let table = agent.meshctl(&["explain", "web", "--client", &cgroup])?;
    assert!(
        stdout(&table).contains("maglev: hash(client"),
        "{}",
        stdout(&table)
    );
    Ok(())
}

#[test]
fn watch_follows_decisions_as_they_happen() -> Result<()> {
    let a = TestBackend::new(1)?;
    let cgroup = TestCgroup::new("ctlwatch")?;
    let vip = vip(4);
    let agent = Agent::start(&config(vip, "", &[&a]), &cgroup)?;
    let load = spawn_probe(&cgroup, vip, 3_000)?;
    let out = agent.meshctl(&["watch", "--count", "5", "--seconds", "8", "-o", "json"])?;
    load.finish()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 5, "{}", stdout(&out));
    assert!(
        lines
            .iter()
            .all(|e| e["service"] == "web" && e["verdict"] == "forwarded")
    );
    Ok(())
}

#[test]
fn with_the_agent_down_meshctl_says_so_and_reads_the_pins() -> Result<()> {
    let a = TestBackend::new(1)?;
    let cgroup = TestCgroup::new("ctldown")?;
    let vip = vip(5);
    let mut agent = Agent::start(&config(vip, "", &[&a]), &cgroup)?;
    run_probe(&cgroup, vip, 7)?;
    agent.kill()?;

    let out = agent.meshctl(&["services"])?;
    assert_eq!(out.status.code(), Some(3), "exit code 3: no agent");
    assert!(
        stderr(&out).contains("Is mesh-agent running?"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    assert!(stdout(&out).contains(&vip.to_string()), "{}", stdout(&out));
    let json = agent.meshctl(&["services", "-o", "json"])?;
    let view: Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(view[0]["connections"], Value::from(7u64), "{view}");

    let status = agent.meshctl(&["status"])?;
    assert_eq!(status.status.code(), Some(3));
    assert!(
        stdout(&status).contains("mesh_connect4"),
        "{}",
        stdout(&status)
    );
    // Traffic still flows: the programs stay attached without the agent.
    assert_eq!(run_probe(&cgroup, vip, 5)?.id_count(1), 5);

    let drain = agent.meshctl(&["drain", &a.addr().to_string()])?;
    assert_eq!(drain.status.code(), Some(3), "changes need the agent");
    Ok(())
}
