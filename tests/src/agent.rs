//! `mesh-agent` as a child process, driven like a user would: a config
//! file, flags, signals, and `meshctl` over the admin socket.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{TestCgroup, require_bin_in, run_with_timeout};

const START_TIMEOUT: Duration = Duration::from_secs(20);
const MESHCTL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// What `--config` names.
#[derive(Clone, Copy)]
enum Config<'a> {
    File(&'a str),
    Dir(&'a [(&'a str, &'a str)]),
}

pub struct Agent {
    child: Child,
    /// Our own temp dir: config, admin socket, log.
    dir: PathBuf,
    config: PathBuf,
    admin_socket: PathBuf,
    bpffs: PathBuf,
    agent_bin: PathBuf,
    meshctl_bin: PathBuf,
    /// The `mesh-agent run` arguments, to start it again the same way.
    args: Vec<std::ffi::OsString>,
    /// The test network namespace it runs in (a node of a test cluster).
    netns: Option<String>,
}

impl Agent {
    /// Starts the agent for `cgroup` and waits (≤ 20 s) until
    /// `meshctl status` answers.
    pub fn start(config_yaml: &str, cgroup: &TestCgroup) -> Result<Agent> {
        Self::start_with(config_yaml, cgroup, &[])
    }

    /// Like `start`, with extra `mesh-agent run` flags.
    pub fn start_with(config_yaml: &str, cgroup: &TestCgroup, extra: &[&str]) -> Result<Agent> {
        Self::start_from(&crate::bin_dir()?, config_yaml, cgroup, extra)
    }

    /// Like `start_with`, with the agent inside the test namespace `netns`
    /// (one node of a test cluster).
    pub fn start_in(
        netns: &crate::TestNetns,
        config_yaml: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut agent = Self::spawn_as(
            &crate::bin_dir()?,
            Config::File(config_yaml),
            cgroup,
            extra,
            Some(netns.name()),
        )?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// `mesh-agent` itself, or through `nsenter --net` (which execs it in
    /// place: the child's PID is the agent's). Not `ip netns exec`: that
    /// mounts a sysfs of the namespace's own, hiding the cgroup and bpffs
    /// mounts under /sys the agent needs.
    fn agent_command(agent_bin: &Path, netns: Option<&str>) -> Command {
        match netns {
            None => Command::new(agent_bin),
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(agent_bin);
                cmd
            }
        }
    }

    /// Starts the agent with `--config` a directory holding `files`
    /// (name, YAML); `write_file` and `remove_file` change it.
    pub fn start_dir(files: &[(&str, &str)], cgroup: &TestCgroup, extra: &[&str]) -> Result<Agent> {
        let mut agent =
            Self::spawn_as(&crate::bin_dir()?, Config::Dir(files), cgroup, extra, None)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    fn start_from(
        bin_dir: &Path,
        config_yaml: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut agent = Self::spawn(bin_dir, config_yaml, cgroup, extra)?;
        // On error `agent` drops on return: killed and cleaned up.
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Waits (≤ 20 s) until `meshctl status` answers.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "mesh-agent exited during startup ({status}); log:\n{}",
                    self.log()
                );
            }
            let last = match self.meshctl(&["status", "-o", "json"]) {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "mesh-agent not ready within {START_TIMEOUT:?} (last meshctl error: {last}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills the agent with SIGKILL; its pins (and so the programs) stay.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Kills the agent with SIGKILL (it gets no chance to clean up) and starts
    /// it again with the same flags plus `extra`; waits until it is ready.
    pub fn kill_and_restart(&mut self, extra: &[&str]) -> Result<()> {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill()?;
        }
        self.args.extend(extra.iter().map(Into::into));
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("agent.log"))?;
        self.child = Self::agent_command(&self.agent_bin, self.netns.as_deref())
            .args(&self.args)
            .env("MESH_METRICS_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", self.agent_bin.display()))?;
        self.wait_ready()
    }

    /// Starts the agent with a config that must be rejected; waits (≤ 20 s)
    /// for it to exit and returns its exit code (128+signal if killed) and log.
    pub fn start_expect_failure(config_yaml: &str, cgroup: &TestCgroup) -> Result<(i32, String)> {
        Self::start_expect_failure_with(config_yaml, cgroup, &[])
    }

    /// Like `start_expect_failure`, with extra `mesh-agent run` flags.
    pub fn start_expect_failure_with(
        config_yaml: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
    ) -> Result<(i32, String)> {
        Self::start_expect_failure_from(&crate::bin_dir()?, config_yaml, cgroup, extra)
    }

    fn start_expect_failure_from(
        bin_dir: &Path,
        config_yaml: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
    ) -> Result<(i32, String)> {
        let mut agent = Self::spawn(bin_dir, config_yaml, cgroup, extra)?;
        let status = agent.wait_exit(START_TIMEOUT)?.ok_or_else(|| {
            anyhow!(
                "mesh-agent still running after {START_TIMEOUT:?}; log:\n{}",
                agent.log()
            )
        })?;
        let code = status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        });
        Ok((code, agent.log()))
    }

    fn spawn(
        bin_dir: &Path,
        config_yaml: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
    ) -> Result<Agent> {
        Self::spawn_as(bin_dir, Config::File(config_yaml), cgroup, extra, None)
    }

    fn spawn_as(
        bin_dir: &Path,
        config_source: Config<'_>,
        cgroup: &TestCgroup,
        extra: &[&str],
        netns: Option<&str>,
    ) -> Result<Agent> {
        let agent_bin = require_bin_in(bin_dir, "mesh-agent")?;
        let meshctl_bin = require_bin_in(bin_dir, "meshctl")?;
        let (pid, n) = (std::process::id(), crate::next_id());
        let bpffs = crate::bpffs_dir(&format!("mesh-test-{pid}-{n}"))?;
        let dir = std::env::temp_dir().join(format!("mesh-test-agent-{pid}-{n}"));
        // A leftover from an earlier process with the same PID is stale.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = match config_source {
            Config::File(_) => dir.join("mesh.yaml"),
            Config::Dir(_) => dir.join("conf.d"),
        };
        let admin_socket = dir.join("admin.sock");
        let log_path = dir.join("agent.log");
        let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--config".into()];
        args.push(config.clone().into());
        args.extend(["--cgroup".into(), cgroup.path().into()]);
        args.extend(["--bpffs".into(), bpffs.clone().into()]);
        args.extend(["--admin-socket".into(), admin_socket.clone().into()]);
        args.extend(["--watch-interval-ms".into(), "100".into()]);
        args.extend(extra.iter().map(Into::into));
        let setup = || -> Result<Child> {
            match config_source {
                Config::File(yaml) => std::fs::write(&config, yaml)?,
                Config::Dir(files) => {
                    std::fs::create_dir_all(&config)?;
                    for (name, yaml) in files {
                        std::fs::write(config.join(name), yaml)?;
                    }
                }
            }
            let log = File::create(&log_path)?;
            Self::agent_command(&agent_bin, netns)
                .args(&args)
                // Parallel agents must not all bind the default metrics
                // port; a `--metrics-addr` in the args still wins.
                .env("MESH_METRICS_ADDR", "127.0.0.1:0")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawning {}", agent_bin.display()))
        };
        match setup() {
            Ok(child) => Ok(Agent {
                child,
                dir,
                config,
                admin_socket,
                bpffs,
                agent_bin,
                meshctl_bin,
                args,
                netns: netns.map(str::to_owned),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Replaces the config file atomically (write a temp file, rename), so
    /// the agent's watcher never reads a half-written file.
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.join(".mesh.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Replaces (or adds) one file of a directory config atomically.
    pub fn write_file(&self, name: &str, yaml: &str) -> Result<()> {
        let tmp = self.config.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.config.join(name))?;
        Ok(())
    }

    /// Removes one file of a directory config.
    pub fn remove_file(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.config.join(name))?;
        Ok(())
    }

    pub fn sighup(&self) -> Result<()> {
        self.signal(libc::SIGHUP)
    }

    /// Signals the agent, only while it is still our unreaped child (so its
    /// PID cannot have been reused).
    fn signal(&self, sig: i32) -> Result<()> {
        // SAFETY: plain syscall on our own child's PID.
        if unsafe { libc::kill(self.child.id() as i32, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling mesh-agent");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the agent to exit; None if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `meshctl --admin-socket <sock> <args...>`, bounded to 10 s.
    pub fn meshctl(&self, args: &[&str]) -> Result<Output> {
        run_with_timeout(
            Command::new(&self.meshctl_bin)
                .arg("--admin-socket")
                .arg(&self.admin_socket)
                .arg("--bpffs")
                .arg(&self.bpffs)
                .args(args),
            MESHCTL_TIMEOUT,
        )
    }

    /// `meshctl ... -o json`, parsed; fails with meshctl's stderr on a non-zero exit.
    pub fn meshctl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.meshctl(&all)?;
        if !out.status.success() {
            bail!(
                "meshctl {} failed ({}): {}",
                all.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "meshctl {}: not JSON: {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn status(&self) -> Result<Value> {
        self.meshctl_json(&["status"])
    }

    /// Polls status until `config_generation` ≥ `min`; returns that status.
    pub fn wait_for_generation(&self, min: u64, timeout: Duration) -> Result<Value> {
        self.wait_for_counter("config_generation", min, timeout)
    }

    /// Polls status until `reloads_failed` ≥ `min`; returns that status.
    pub fn wait_for_reload_failures(&self, min: u64, timeout: Duration) -> Result<Value> {
        self.wait_for_counter("reloads_failed", min, timeout)
    }

    fn wait_for_counter(&self, field: &str, min: u64, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status() {
                Ok(s) if s[field].as_u64().is_some_and(|v| v >= min) => return Ok(s),
                Ok(s) => s.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{field} did not reach {min} within {timeout:?}; last status: {last}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM, ≤ 3 s grace, then SIGKILL; only if not already reaped.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.signal(libc::SIGTERM);
            if !matches!(self.wait_exit(Duration::from_secs(3)), Ok(Some(_))) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // The agent's own cleanup detaches programs and unpins maps.
        let cleanup = run_with_timeout(
            Command::new(&self.agent_bin)
                .arg("cleanup")
                .arg("--bpffs")
                .arg(&self.bpffs),
            Duration::from_secs(10),
        );
        match cleanup {
            Ok(out) if !out.status.success() => eprintln!(
                "mesh-tests: mesh-agent cleanup --bpffs {} failed: {}",
                self.bpffs.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("mesh-tests: {e:#}"),
            Ok(_) => {}
        }
        if self.bpffs.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.bpffs)
        {
            eprintln!("mesh-tests: removing {}: {e}", self.bpffs.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    //! The harness against stand-in shell scripts with the real binaries'
    //! command lines, so it is checked before (and apart from) the agent.
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    // Stand-in agent: `run` checks its flags, makes the bpffs root and a
    // "ready" file beside the socket, counts SIGHUPs as generations, fails
    // on a config containing "bad"; `cleanup` leaves a marker beside itself
    // (bpffs holds no regular files).
    const FAKE_AGENT: &str = r#"#!/bin/sh
cmd=$1; shift
while [ $# -gt 0 ]; do
  case $1 in
    --config) cfg=$2;; --cgroup) cg=$2;; --bpffs) bpffs=$2;;
    --admin-socket) sock=$2;; --watch-interval-ms) ;; *) echo "bad flag $1" >&2; exit 64;;
  esac; shift 2
done
if [ "$cmd" = cleanup ]; then touch "$(dirname "$0")/cleaned-$(basename "$bpffs")"; exit 0; fi
[ -d "$cg" ] || { echo "no cgroup $cg" >&2; exit 65; }
if grep -q bad "$cfg"; then echo "error: $cfg:1: bad config" >&2; exit 3; fi
mkdir -p "$bpffs/v1"
gen=1; echo $gen > "$sock.gen"
trap 'gen=$((gen+1)); echo $gen > "$sock.gen"' HUP
trap 'echo stopping >&2; exit 0' TERM
echo started >&2
while :; do sleep 0.05; done
"#;
    const FAKE_MESHCTL: &str = r#"#!/bin/sh
[ "$1" = --admin-socket ] || exit 64
sock=$2
[ "$3" = --bpffs ] || exit 64
[ -f "$sock.gen" ] || { echo "connect $sock: no such file" >&2; exit 1; }
echo "{\"config_generation\": $(cat "$sock.gen"), \"reloads_failed\": 0, \"args\": \"$5 $6 $7\"}"
"#;

    /// The stand-ins' directory, removed on every path.
    struct FakeBins(PathBuf);
    impl Drop for FakeBins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake_bins() -> FakeBins {
        let dir = std::env::temp_dir().join(format!(
            "mesh-test-fakebin-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in [("mesh-agent", FAKE_AGENT), ("meshctl", FAKE_MESHCTL)] {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        FakeBins(dir)
    }

    #[test]
    fn lifecycle_with_stand_in_binaries() {
        let fake = fake_bins();
        let bins = &fake.0;
        let cg = TestCgroup::new("unit-agent").unwrap();
        let agent = Agent::start_from(bins, "services: []\n", &cg, &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(agent.config_path()).unwrap(),
            "services: []\n"
        );
        assert!(agent.bpffs().join("v1").is_dir());
        let status = agent.status().unwrap();
        assert_eq!(status["config_generation"], 1);
        assert_eq!(status["args"], "status -o json");

        agent.write_config("services: [x]\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(agent.config_path()).unwrap(),
            "services: [x]\n"
        );
        agent.sighup().unwrap();
        agent
            .wait_for_generation(2, Duration::from_secs(5))
            .unwrap();
        agent
            .wait_for_reload_failures(0, Duration::from_secs(1))
            .unwrap();
        let err = agent
            .wait_for_generation(9, Duration::from_millis(300))
            .unwrap_err();
        assert!(format!("{err:#}").contains("did not reach 9"), "{err:#}");
        assert!(agent.log().contains("started"));

        let (pid, bpffs, sock) = (
            agent.pid(),
            agent.bpffs().to_path_buf(),
            agent.admin_socket().to_path_buf(),
        );
        drop(agent);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "agent reaped");
        assert!(!bpffs.exists(), "bpffs root removed");
        assert!(!sock.parent().unwrap().exists(), "temp dir removed");
        let marker = bins.join(format!("cleaned-{}", bpffs.file_name().unwrap().display()));
        assert!(marker.exists(), "mesh-agent cleanup ran");

        let (code, log) = Agent::start_expect_failure_from(bins, "bad: 1\n", &cg, &[]).unwrap();
        assert_eq!(code, 3);
        assert!(log.contains("bad config"), "{log}");

        let missing = Agent::start_from(Path::new("/nonexistent"), "", &cg, &[])
            .err()
            .unwrap();
        assert!(format!("{missing:#}").contains("cargo build --workspace --bins"));
    }
}
