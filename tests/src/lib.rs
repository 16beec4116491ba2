//! Harness for mesh's end-to-end tests: test-owned cgroups and network
//! namespaces, the agent as a child process, loopback backends, a probe
//! client run inside a cgroup, and the statistics used to judge balancing.
//!
//! Network safety: everything here connects only to loopback or to
//! addresses inside namespaces a test made, every loop is bounded, and only
//! processes we started are ever killed (by PID, or through a cgroup that
//! only holds our own children). Drop guards clean up on every path.

pub mod agent;
pub mod backends;
pub mod bpffs;
pub mod bulk;
pub mod bulk_harness;
pub mod cgroup;
pub mod cluster;
pub mod kube_api;
pub mod netns;
pub mod probe;
pub mod python;
pub mod stats;

pub use agent::Agent;
pub use backends::{HttpBackend, KeepAlive, TestBackend, UdpBackend, listener_on};
pub use bpffs::{bpffs_dir, ensure_bpffs};

pub use bulk::BulkReport;
pub use bulk_harness::{BulkServer, link_bytes, run_bulk, veth_pair};
pub use cgroup::{TestCgroup, cgroup2_mount};
pub use cluster::Cluster;
pub use netns::TestNetns;
pub use probe::{
    HeldConnections, ProbeResult, RunningProbe, hold_and_watch, hold_connections, run_probe,
    run_probe_marked, run_probe_with, run_udp_probe, spawn_probe,
};
pub use python::PyProcess;
pub use stats::{chi_square, chi_square_p_value};

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A number unique within this process; with the PID it makes names unique
/// across tests that share a process (`cargo test`) and across processes.
pub fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A loopback service VIP for this test process:
/// `127.<block>.<from the PID>.<last>:<port>`. Each test file keeps its own
/// `block`, so tests running side by side seldom pick the same address (and
/// sharing one is harmless: each agent balances only its own cgroup).
pub fn loopback_vip(block: u8, last: u8, port: u16) -> std::net::SocketAddr {
    let third = (std::process::id() % 250 + 1) as u8;
    std::net::SocketAddr::from(([127, block, third, last], port))
}

/// A config with one TCP service "web" at `vip` over `backends`; `extra`
/// holds more keys of the service, each line indented by four spaces.
pub fn one_service_yaml(
    vip: std::net::SocketAddr,
    extra: &str,
    backends: &[std::net::SocketAddr],
) -> String {
    let mut yaml = format!(
        "services:\n  - name: web\n    vip: {}\n    port: {}\n{extra}    backends:\n",
        vip.ip(),
        vip.port()
    );
    for b in backends {
        yaml += &format!("      - {{address: {}, port: {}}}\n", b.ip(), b.port());
    }
    yaml
}

/// Keeps a caller's hint usable inside cgroup, netns and file names.
pub(crate) fn sanitize(hint: &str) -> String {
    let s: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if s.is_empty() { "x".into() } else { s }
}

/// Where `mesh-agent`, `meshctl` and `mesh-probe` live: `$MESH_BIN_DIR`, or
/// cargo's target dir for the running test (the test binary sits in `deps/`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let parent = exe.parent().context("test executable has no parent dir")?;
    Ok(match parent.file_name() {
        Some(n) if n == "deps" => parent.parent().unwrap_or(parent).to_path_buf(),
        _ => parent.to_path_buf(),
    })
}

/// Path of one of the workspace's binaries, or an error saying how to build it.
pub fn require_bin(name: &str) -> Result<PathBuf> {
    require_bin_in(&bin_dir()?, name)
}

pub(crate) fn require_bin_in(dir: &std::path::Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found; run `cargo build --workspace --bins` first (cargo xtask test does this), \
             or set MESH_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `cmd` to completion like `Command::output`, but kills it (by its
/// PID, it is our child) if it takes longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    // Drain both pipes in threads so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Like [`run_with_timeout`] but fails, with stderr, unless the exit code is 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = run_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_with_timeout_kills_slow_child() {
        let start = Instant::now();
        let err = run_with_timeout(Command::new("sleep").arg("10"), Duration::from_millis(200));
        assert!(err.is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
        let out = run_ok(Command::new("echo").arg("hi"), Duration::from_secs(5)).unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }

    #[test]
    fn sanitize_hints() {
        assert_eq!(sanitize("a/b c"), "a-b-c");
        assert_eq!(sanitize(""), "x");
    }
}
