//! mesh-probe: a client the end-to-end tests run inside a test cgroup.
//!
//! mesh-probe connect --target IP:PORT --count N [--timeout-ms T] [--mark M]
//!
//! Non-loopback targets are refused unless the probe runs in a network
//! namespace other than the host's. Prints one JSON object (mesh_tests::ProbeResult) on stdout.

use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
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
    let (mut watch_ms, mut udp) = (None::<u64>, false);
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
            "--watch-ms" => watch_ms = Some(value.parse().map_err(|e| bad(&e))?),
            "--udp" => udp = value == "1",
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
        "hold" if udp => return hold_udp(target, count, timeout, watch_ms),
        "hold" => return hold(target, count, timeout, watch_ms),
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
/// (60 s at most), or watches them for `watch_ms` and reports what they saw.
fn hold(
    target: SocketAddr,
    count: u32,
    timeout: Duration,
    watch_ms: Option<u64>,
) -> Result<(), String> {
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
    let fds: Vec<i32> = open.iter().map(|s| s.as_raw_fd()).collect();
    finish_hold(&fds, watch_ms)
}

/// Connected UDP sockets that each exchanged one datagram, held like `hold`.
fn hold_udp(
    target: SocketAddr,
    count: u32,
    timeout: Duration,
    watch_ms: Option<u64>,
) -> Result<(), String> {
    let mut result = ProbeResult::default();
    let mut open = Vec::new();
    for _ in 0..count {
        let bind = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let exchange = || -> std::io::Result<(std::net::UdpSocket, String)> {
            let socket = std::net::UdpSocket::bind(bind)?;
            socket.set_read_timeout(Some(timeout))?;
            socket.connect(target)?;
            socket.send(b"ping")?;
            let mut buf = [0u8; 64];
            let n = socket.recv(&mut buf)?;
            Ok((
                socket,
                String::from_utf8_lossy(&buf[..n]).trim().to_string(),
            ))
        };
        match exchange() {
            Ok((socket, id)) => {
                *result.ids.entry(id).or_default() += 1;
                result.ok += 1;
                open.push(socket);
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
    let fds: Vec<i32> = open.iter().map(|s| s.as_raw_fd()).collect();
    finish_hold(&fds, watch_ms)
}

/// Without a watch, keeps the sockets until killed (60 s at most) and
/// answers each `peers` line on stdin with a report of their getpeername()
/// now. With one, waits up to `watch_ms` for each socket's first error or
/// EOF and prints a second report: `errors` by kind ("EOF" for an orderly
/// close) and when each came.
fn finish_hold(fds: &[i32], watch_ms: Option<u64>) -> Result<(), String> {
    let Some(watch_ms) = watch_ms else {
        return answer_until_killed(fds, std::time::Instant::now() + Duration::from_secs(60));
    };
    let deadline = std::time::Instant::now() + Duration::from_millis(watch_ms.min(60_000));
    let mut report = ProbeResult::default();
    let mut pending: Vec<i32> = fds.to_vec();
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let mut polls: Vec<libc::pollfd> = pending
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: valid pollfds for sockets this process owns.
        let n = unsafe {
            libc::poll(
                polls.as_mut_ptr(),
                polls.len() as libc::nfds_t,
                left.as_millis() as i32,
            )
        };
        if n <= 0 {
            continue;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for p in polls.iter().filter(|p| p.revents != 0) {
            let mut buf = [0u8; 64];
            // SAFETY: reads into a local buffer from an fd we own.
            let got =
                unsafe { libc::recv(p.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            let kind = match got {
                0 => "EOF".to_string(),
                n if n > 0 => "DATA".to_string(),
                _ => mesh_tests::probe::errno_name(&std::io::Error::last_os_error()),
            };
            *report.errors.entry(kind).or_default() += 1;
            report.event_unix_ms.push(now_ms);
            pending.retain(|fd| *fd != p.fd);
        }
    }
    print_result(&report)
}

fn answer_until_killed(fds: &[i32], deadline: std::time::Instant) -> Result<(), String> {
    let mut stdin = std::io::stdin().lines();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let mut poll = libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for our own stdin.
        if unsafe { libc::poll(&mut poll, 1, left.as_millis() as i32) } <= 0 {
            continue;
        }
        match stdin.next() {
            Some(Ok(line)) if line.trim() == "peers" => {
                let mut report = ProbeResult::default();
                for &fd in fds {
                    let key = match peer_of(fd) {
                        Ok(peer) => peer.to_string(),
                        Err(e) => mesh_tests::probe::errno_name(&e),
                    };
                    *report.peers.entry(key).or_default() += 1;
                }
                print_result(&report)?;
            }
            Some(Ok(_)) => {}
            // stdin closed: keep the sockets until killed, as before.
            _ => {
                std::thread::sleep(left);
                return Ok(());
            }
        }
    }
}

/// getpeername() of a socket this process holds.
fn peer_of(fd: i32) -> std::io::Result<SocketAddr> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `fd` is an open socket we own; ManuallyDrop keeps it open.
    let stream = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    stream.peer_addr()
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
