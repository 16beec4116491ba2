//! mesh-probe: a client the end-to-end tests run inside a test cgroup.
//!
//! mesh-probe connect --target IP:PORT --count N [--timeout-ms T] [--mark M]
//!
//! Non-loopback targets are refused unless the probe runs in a network
//! namespace other than the host's. Prints one JSON object (mesh_tests::ProbeResult) on stdout.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use mesh_tests::probe::{ProbeResult, connect_loop, total_budget, udp_loop};

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
    let mode = args.next().unwrap_or_default();
    if !["connect", "udp", "hold"].contains(&mode.as_str()) {
        return Err("expected subcommand `connect`, `udp` or `hold`".into());
    }
    let (mut target, mut count, mut timeout_ms) = (None::<SocketAddr>, None::<u32>, 2000u64);
    let (mut mark, mut per_socket, mut connected) = (None::<u32>, 1u32, false);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--target" => target = Some(value.parse().map_err(|e| bad(&e))?),
            "--count" => count = Some(value.parse().map_err(|e| bad(&e))?),
            "--timeout-ms" => timeout_ms = value.parse().map_err(|e| bad(&e))?,
            "--mark" => mark = Some(value.parse().map_err(|e| bad(&e))?),
            "--per-socket" => per_socket = value.parse().map_err(|e| bad(&e))?,
            "--connected" => connected = value == "1",
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let target: SocketAddr = target.ok_or("--target is required")?;
    // Network safety: outside loopback (IPv4-mapped loopback included), only
    // inside a namespace a test made.
    if !target.ip().to_canonical().is_loopback() && !in_own_netns() {
        return Err(format!(
            "{target} is not loopback and we are in the host's network namespace"
        ));
    }
    let count = count.ok_or("--count is required")?;
    if timeout_ms == 0 {
        return Err("--timeout-ms must be > 0".into());
    }
    let timeout = Duration::from_millis(timeout_ms);
    let result = match mode.as_str() {
        "udp" => udp_loop(target, count, per_socket.clamp(1, 100), connected, timeout),
        "hold" => return hold(target, count, timeout),
        _ => connect_loop(
            target,
            count,
            timeout,
            total_budget(count, timeout_ms),
            mark,
        ),
    };
    print_result(&result)
}

fn print_result(result: &ProbeResult) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string(result).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// Opens `count` connections, reports them, and keeps them open until killed
/// (60 s at most).
fn hold(target: SocketAddr, count: u32, timeout: Duration) -> Result<(), String> {
    let mut result = ProbeResult::default();
    let mut open = Vec::new();
    for _ in 0..count {
        match std::net::TcpStream::connect_timeout(&target, timeout) {
            Ok(stream) => {
                if let Ok(peer) = stream.peer_addr() {
                    *result.peers.entry(peer.to_string()).or_default() += 1;
                }
                let mut line = String::new();
                let mut reader = std::io::BufReader::new(&stream);
                if std::io::BufRead::read_line(&mut reader, &mut line).is_ok() {
                    *result.ids.entry(line.trim().to_string()).or_default() += 1;
                    result.ok += 1;
                }
                open.push(stream);
            }
            Err(e) => {
                *result
                    .errors
                    .entry(mesh_tests::probe::errno_name(&e))
                    .or_default() += 1
            }
        }
    }
    print_result(&result)?;
    std::thread::sleep(Duration::from_secs(60));
    drop(open);
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
