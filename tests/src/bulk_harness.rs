//! Running `mesh-bulk` from tests: inside a test cgroup, optionally inside a
//! test network namespace too (so the interface counters read are that
//! namespace's own), interface byte counters, and veth pairs between two
//! test namespaces. Only loopback and addresses inside test namespaces.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bulk::BulkReport;
use crate::{TestCgroup, TestNetns, run_ok, run_with_timeout};

const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// `mesh-bulk <args>` as a child joining `cgroup`, inside `netns` if given.
pub fn bulk_command(cgroup: &TestCgroup, netns: Option<&TestNetns>) -> Result<Command> {
    let bin = crate::require_bin("mesh-bulk")?;
    Ok(match netns {
        None => cgroup.command(bin),
        Some(ns) => {
            let mut cmd = cgroup.command("ip");
            cmd.args(["netns", "exec", ns.name()]).arg(bin);
            cmd
        }
    })
}

/// Runs `mesh-bulk local|client …` to completion (bounded by `limit`) and
/// parses its report.
pub fn run_bulk(
    cgroup: &TestCgroup,
    netns: Option<&TestNetns>,
    args: &[&str],
    limit: Duration,
) -> Result<BulkReport> {
    let mut cmd = bulk_command(cgroup, netns)?;
    cmd.args(args);
    let out = run_with_timeout(&mut cmd, limit)?;
    if !out.status.success() {
        bail!(
            "mesh-bulk {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("mesh-bulk output: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A `mesh-bulk serve` child; killed (it is ours, by its PID) on drop.
pub struct BulkServer {
    child: Child,
    pub addr: String,
}

impl BulkServer {
    /// Starts the server and waits (≤ 10 s) for its "listening" line.
    pub fn start(
        cgroup: &TestCgroup,
        netns: Option<&TestNetns>,
        args: &[&str],
    ) -> Result<BulkServer> {
        let mut cmd = bulk_command(cgroup, netns)?;
        cmd.arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning mesh-bulk serve")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut server = BulkServer {
            child,
            addr: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening ") {
                        server.addr = addr.trim().to_string();
                        return Ok(server);
                    }
                }
                Err(_) => bail!("mesh-bulk serve did not start listening within 10 s"),
            }
        }
    }

    /// Waits (≤ `limit`) for the server's report.
    pub fn finish(mut self, limit: Duration) -> Result<BulkReport> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let mut out = String::new();
                if let Some(mut stdout) = self.child.stdout.take() {
                    std::io::Read::read_to_string(&mut stdout, &mut out)?;
                }
                if !status.success() {
                    bail!("mesh-bulk serve failed ({status})");
                }
                return serde_json::from_str(&out)
                    .with_context(|| format!("mesh-bulk serve output: {out}"));
            }
            if Instant::now() >= deadline {
                bail!("mesh-bulk serve did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// (rx_bytes, tx_bytes) of interface `dev` in `netns` (host's if None).
pub fn link_bytes(netns: Option<&TestNetns>, dev: &str) -> Result<(u64, u64)> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns.name()]);
    }
    cmd.args(["-s", "-j", "link", "show", dev]);
    let out = run_ok(&mut cmd, IP_TIMEOUT)?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let stats = &v[0]["stats64"];
    match (stats["rx"]["bytes"].as_u64(), stats["tx"]["bytes"].as_u64()) {
        (Some(rx), Some(tx)) => Ok((rx, tx)),
        _ => bail!("no byte counters for {dev}: {v}"),
    }
}

/// Joins two test namespaces with a veth pair: `dev_a` with `addr_a`/24 in
/// `a`, `dev_b` with `addr_b`/24 in `b`. The pair lives only in those
/// namespaces and goes when they are deleted.
pub fn veth_pair(
    a: &TestNetns,
    dev_a: &str,
    addr_a: &str,
    b: &TestNetns,
    dev_b: &str,
    addr_b: &str,
) -> Result<()> {
    let ip = |args: &[&str]| run_ok(Command::new("ip").args(args), IP_TIMEOUT).map(|_| ());
    ip(&[
        "-n",
        a.name(),
        "link",
        "add",
        dev_a,
        "type",
        "veth",
        "peer",
        "name",
        dev_b,
        "netns",
        b.name(),
    ])?;
    ip(&[
        "-n",
        a.name(),
        "addr",
        "add",
        &format!("{addr_a}/24"),
        "dev",
        dev_a,
    ])?;
    ip(&[
        "-n",
        b.name(),
        "addr",
        "add",
        &format!("{addr_b}/24"),
        "dev",
        dev_b,
    ])?;
    ip(&["-n", a.name(), "link", "set", dev_a, "up"])?;
    ip(&["-n", b.name(), "link", "set", dev_b, "up"])?;
    Ok(())
}
