//! `--config` naming a directory: every `*.yaml` file in it contributes
//! services, a change to one file reaches the kernel without a signal
//! (inotify), and a bad file is refused with its name while the last good
//! state keeps serving.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use mesh_tests::{Agent, TestBackend, TestCgroup, run_probe};

const WAIT: Duration = Duration::from_secs(10);

fn vip(last: u8) -> SocketAddr {
    mesh_tests::loopback_vip(16, last, 80)
}

fn service(name: &str, vip: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "services:\n  - name: {name}\n    vip: {}\n    port: {}\n    backends:\n      - {{address: {}, port: {}}}\n",
        vip.ip(),
        vip.port(),
        backend.ip(),
        backend.port()
    )
}

#[test]
fn a_directory_serves_its_files_applies_changes_and_refuses_bad_files() -> Result<()> {
    let (one, two, three) = (
        TestBackend::new(1)?,
        TestBackend::new(2)?,
        TestBackend::new(3)?,
    );
    let cgroup = TestCgroup::new("confd")?;
    let (vip_a, vip_b) = (vip(1), vip(2));
    let agent = Agent::start_dir(
        &[
            ("a.yaml", &service("web-a", vip_a, one.addr())),
            ("b.yaml", &service("web-b", vip_b, two.addr())),
            ("README.txt", "not part of the configuration"),
        ],
        &cgroup,
        &[],
    )?;
    // Services from both files.
    assert_eq!(run_probe(&cgroup, vip_a, 4)?.id_count(1), 4);
    assert_eq!(run_probe(&cgroup, vip_b, 4)?.id_count(2), 4);
    let status = agent.status()?;
    assert_eq!(status["services"], 2, "{status}");

    // A change to one file applies by itself: no SIGHUP, inotify tells.
    agent.write_file("b.yaml", &service("web-b", vip_b, three.addr()))?;
    agent.wait_for_generation(2, WAIT)?;
    assert_eq!(run_probe(&cgroup, vip_b, 4)?.id_count(3), 4);
    assert_eq!(run_probe(&cgroup, vip_a, 4)?.id_count(1), 4);
    assert!(
        agent.log().contains("changed=1"),
        "only the changed service was written: {}",
        agent.log()
    );

    // A broken file is refused, named, and the last good state serves on.
    agent.write_file("c.yaml", "services:\n  - name: 'web-c\n")?;
    let status = agent.wait_for_reload_failures(1, WAIT)?;
    let error = status["last_reload_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let c = agent.config_path().join("c.yaml").display().to_string();
    assert!(error.starts_with(&format!("{c}:2:")), "{error}");
    assert_eq!(run_probe(&cgroup, vip_a, 4)?.id_count(1), 4);
    assert_eq!(run_probe(&cgroup, vip_b, 4)?.id_count(3), 4);

    // A name another file already uses is refused naming both files.
    agent.write_file("c.yaml", &service("web-a", vip(3), two.addr()))?;
    let status = agent.wait_for_reload_failures(2, WAIT)?;
    let error = status["last_reload_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let a = agent.config_path().join("a.yaml").display().to_string();
    assert!(
        error.starts_with(&format!(
            "{c}:2:11: service name 'web-a' is already used in {a} on line 2"
        )),
        "{error}"
    );

    // Fixed, and a file removed: both apply; SIGHUP still reloads.
    agent.write_file("c.yaml", &service("web-c", vip(3), two.addr()))?;
    agent.remove_file("a.yaml")?;
    agent.sighup()?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = agent.status()?;
        if status["services"] == 2 && status["last_reload_error"].is_null() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(run_probe(&cgroup, vip(3), 4)?.id_count(2), 4);
    Ok(())
}
