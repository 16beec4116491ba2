//! mesh-probe: a client the end-to-end tests run inside a test cgroup.
//!
//! mesh-probe connect --target IP:PORT --count N [--timeout-ms T] [--mark M]
//!
//! Non-loopback targets are refused unless the probe runs in a network
//! namespace other than the host's. Prints one JSON object (mesh_tests::ProbeResult) on stdout.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use mesh_tests::probe::{connect_loop, total_budget};

const USAGE: &str =
    "usage: mesh-probe connect --target IP:PORT --count N [--timeout-ms T] [--mark M]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-probe: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("connect") {
        return Err("expected subcommand `connect`".into());
    }
    let (mut target, mut count, mut timeout_ms) = (None::<SocketAddr>, None::<u32>, 2000u64);
    let mut mark = None::<u32>;
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--target" => target = Some(value.parse().map_err(|e| bad(&e))?),
            "--count" => count = Some(value.parse().map_err(|e| bad(&e))?),
            "--timeout-ms" => timeout_ms = value.parse().map_err(|e| bad(&e))?,
            "--mark" => mark = Some(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let target = target.ok_or("--target is required")?;
    // Network safety: outside loopback, only inside a namespace a test made.
    if !target.ip().is_loopback() && !in_own_netns() {
        return Err(format!(
            "{target} is not loopback and we are in the host's network namespace"
        ));
    }
    let count = count.ok_or("--count is required")?;
    if timeout_ms == 0 {
        return Err("--timeout-ms must be > 0".into());
    }
    let result = connect_loop(
        target,
        count,
        Duration::from_millis(timeout_ms),
        total_budget(count, timeout_ms),
        mark,
    );
    println!(
        "{}",
        serde_json::to_string(&result).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// True when this process's network namespace is not the host's (PID 1's).
fn in_own_netns() -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (ino("/proc/self/ns/net"), ino("/proc/1/ns/net")) {
        (Some(me), Some(host)) => me != host,
        _ => false,
    }
}
