//! The probe client: `mesh-probe connect` runs inside a test cgroup (so the
//! mesh's cgroup programs see its connect()s) and reports what its sockets saw.
//! The connect loop lives here so it can be unit-tested in process; the
//! binary (src/bin/probe.rs) only parses arguments and prints the JSON.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::TestCgroup;

/// At most this many per-attempt durations are reported.
pub const MAX_CONNECT_NS: usize = 1000;

/// What `mesh-probe connect` prints: one JSON object.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Attempts that connected and read an id line.
    pub ok: u64,
    /// Failed attempts by errno name ("ECONNREFUSED", "EPERM", "ETIMEDOUT",
    /// "errno <n>"); a failure after connecting is prefixed "read "; attempts
    /// skipped because the overall deadline passed count as "DEADLINE".
    pub errors: BTreeMap<String, u64>,
    /// Id lines read from servers (see `TestBackend`), by id.
    pub ids: BTreeMap<String, u64>,
    /// getpeername() of each connected socket, "ip:port".
    pub peers: BTreeMap<String, u64>,
    /// Duration of connect() per attempt, in order, first 1000 only.
    pub connect_ns: Vec<u64>,
    /// UDP: the source address of each reply, "ip:port".
    #[serde(default)]
    pub sources: BTreeMap<String, u64>,
    /// UDP: sockets whose replies all came from one backend.
    #[serde(default)]
    pub sticky_sockets: u64,
    /// hold --watch-ms: when (unix ms) each held socket saw its error or EOF.
    #[serde(default)]
    pub event_unix_ms: Vec<u64>,
}

impl ProbeResult {
    /// Count for one backend id (0 if never seen).
    pub fn id_count(&self, id: u32) -> u64 {
        self.ids.get(&id.to_string()).copied().unwrap_or(0)
    }

    /// Total failed attempts.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// errno name for the error kinds tests assert on.
pub fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => "ETIMEDOUT".into(),
        Some(n) => format!("errno {n}"),
        None if matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ) =>
        {
            "ETIMEDOUT".into()
        }
        None => format!("{:?}", e.kind()),
    }
}

/// `count` sequential connections to `target`, each bounded by `timeout`
/// for connect and again for reading the id; the whole run by `total`.
pub fn connect_loop(
    target: SocketAddr,
    count: u32,
    timeout: Duration,
    total: Duration,
    mark: Option<u32>,
) -> ProbeResult {
    let mut r = ProbeResult::default();
    let deadline = Instant::now() + total;
    for i in 0..count {
        if Instant::now() >= deadline {
            *r.errors.entry("DEADLINE".into()).or_default() += u64::from(count - i);
            break;
        }
        let start = Instant::now();
        let conn = connect(target, timeout, mark);
        if r.connect_ns.len() < MAX_CONNECT_NS {
            r.connect_ns.push(start.elapsed().as_nanos() as u64);
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                *r.errors.entry(errno_name(&e)).or_default() += 1;
                continue;
            }
        };
        if let Ok(peer) = stream.peer_addr() {
            *r.peers.entry(peer.to_string()).or_default() += 1;
        }
        match read_id(&mut stream, timeout) {
            Ok(id) => {
                r.ok += 1;
                *r.ids.entry(id).or_default() += 1;
            }
            Err(e) => {
                *r.errors
                    .entry(format!("read {}", errno_name(&e)))
                    .or_default() += 1
            }
        }
    }
    r
}

/// A TCP connect, with `SO_MARK` set first when asked (as the agent marks
/// its own sockets).
fn connect(target: SocketAddr, timeout: Duration, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

/// `count` UDP sockets, each sending `per_socket` datagrams to `target` and
/// reading the replies; `connected` sockets connect() first, the others name
/// the target on every send (sendmsg) and read with recvfrom.
pub fn udp_loop(
    target: SocketAddr,
    count: u32,
    per_socket: u32,
    connected: bool,
    timeout: Duration,
) -> ProbeResult {
    let mut r = ProbeResult::default();
    let deadline = Instant::now() + timeout * count.max(1) * per_socket.max(1);
    for _ in 0..count {
        if Instant::now() >= deadline {
            *r.errors.entry("DEADLINE".into()).or_default() += 1;
            continue;
        }
        match udp_socket_round(target, per_socket, connected, timeout, &mut r) {
            Ok(ids) => {
                if !ids.is_empty() && ids.iter().all(|id| *id == ids[0]) {
                    r.sticky_sockets += 1;
                }
            }
            Err(e) => *r.errors.entry(errno_name(&e)).or_default() += 1,
        }
    }
    r
}

fn udp_socket_round(
    target: SocketAddr,
    per_socket: u32,
    connected: bool,
    timeout: Duration,
    r: &mut ProbeResult,
) -> io::Result<Vec<String>> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    if connected {
        socket.connect(target)?;
        if let Ok(peer) = socket.peer_addr() {
            *r.peers.entry(peer.to_string()).or_default() += 1;
        }
    }
    let mut ids = Vec::new();
    let mut buf = [0u8; 64];
    for _ in 0..per_socket {
        if connected {
            socket.send(b"ping")?;
        } else {
            socket.send_to(b"ping", target)?;
        }
        let (n, from) = socket.recv_from(&mut buf)?;
        let id = String::from_utf8_lossy(&buf[..n]).trim().to_string();
        *r.sources.entry(from.to_string()).or_default() += 1;
        *r.ids.entry(id.clone()).or_default() += 1;
        r.ok += 1;
        ids.push(id);
    }
    Ok(ids)
}

/// Reads the server's line up to its close (bounded: 64 bytes, `timeout`).
fn read_id(stream: &mut TcpStream, timeout: Duration) -> io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = Vec::new();
    stream.take(64).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).trim().to_string())
}

/// Runs `mesh-probe connect` inside `cgroup` with a 2 s per-attempt timeout.
pub fn run_probe(cgroup: &TestCgroup, target: SocketAddr, count: u32) -> Result<ProbeResult> {
    run_probe_with(cgroup, target, count, 2000)
}

/// [`run_probe`] with a chosen per-attempt timeout in milliseconds.
pub fn run_probe_with(
    cgroup: &TestCgroup,
    target: SocketAddr,
    count: u32,
    timeout_ms: u64,
) -> Result<ProbeResult> {
    run_probe_args(cgroup, target, count, timeout_ms, &[])
}

/// [`run_probe`] from sockets carrying `SO_MARK` = `mark`.
pub fn run_probe_marked(
    cgroup: &TestCgroup,
    target: SocketAddr,
    count: u32,
    mark: u32,
) -> Result<ProbeResult> {
    run_probe_args(cgroup, target, count, 2000, &["--mark", &mark.to_string()])
}

/// UDP to `target` from `sockets` fresh sockets, `per_socket` datagrams each.
pub fn run_udp_probe(
    cgroup: &TestCgroup,
    target: SocketAddr,
    sockets: u32,
    per_socket: u32,
    connected: bool,
) -> Result<ProbeResult> {
    let per = per_socket.to_string();
    let mut extra = vec!["--per-socket", per.as_str()];
    if connected {
        extra.extend(["--connected", "1"]);
    }
    run_probe_mode("udp", cgroup, target, sockets, 2000, &extra)
}

/// A `mesh-probe connect` run going on in the background.
pub struct RunningProbe {
    child: Option<std::process::Child>,
}

impl RunningProbe {
    /// Waits for the run to end and returns what it saw.
    pub fn finish(mut self) -> Result<ProbeResult> {
        let child = self.child.take().context("probe already finished")?;
        let out = child.wait_with_output().context("waiting for mesh-probe")?;
        if !out.status.success() {
            bail!(
                "mesh-probe failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing mesh-probe output")
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        // Our own unreaped child: its PID cannot have been reused.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `count` sequential connections to `target` from `cgroup` in the
/// background (bounded by the probe's own time budget).
pub fn spawn_probe(cgroup: &TestCgroup, target: SocketAddr, count: u32) -> Result<RunningProbe> {
    let probe = crate::require_bin("mesh-probe")?;
    let child = cgroup
        .command(&probe)
        .args(["connect", "--target", &target.to_string()])
        .args(["--count", &count.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("spawning mesh-probe")?;
    Ok(RunningProbe { child: Some(child) })
}

/// Connections a probe holds open until dropped.
pub struct HeldConnections {
    child: std::process::Child,
    /// What opening the connections gave.
    pub result: ProbeResult,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    stdin: std::process::ChildStdin,
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        // Our own child, not yet reaped: its PID cannot have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `count` connections to `target` from `cgroup` and keeps them open
/// (for at most 60 s) until the returned value is dropped.
pub fn hold_connections(
    cgroup: &TestCgroup,
    target: SocketAddr,
    count: u32,
) -> Result<HeldConnections> {
    spawn_hold(cgroup, target, count, &[])
}

/// Like `hold_connections`, and then watches the sockets for `watch_ms`:
/// `HeldConnections::watch_report` tells which saw an error or EOF, and when.
/// `udp` holds connected UDP sockets (each exchanged one datagram) instead.
pub fn hold_and_watch(
    cgroup: &TestCgroup,
    target: SocketAddr,
    count: u32,
    udp: bool,
    watch_ms: u64,
) -> Result<HeldConnections> {
    let watch = watch_ms.to_string();
    let mut extra = vec!["--watch-ms", watch.as_str()];
    if udp {
        extra.extend(["--udp", "1"]);
    }
    spawn_hold(cgroup, target, count, &extra)
}

fn spawn_hold(
    cgroup: &TestCgroup,
    target: SocketAddr,
    count: u32,
    extra: &[&str],
) -> Result<HeldConnections> {
    let probe = crate::require_bin("mesh-probe")?;
    let mut child = cgroup
        .command(&probe)
        .args(["hold", "--target", &target.to_string()])
        .args(["--count", &count.to_string()])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawning mesh-probe hold")?;
    let stdout = child.stdout.take().context("probe stdout")?;
    let stdin = child.stdin.take().context("probe stdin")?;
    let mut held = HeldConnections {
        child,
        result: ProbeResult::default(),
        stdout: std::io::BufReader::new(stdout),
        stdin,
    };
    held.result = held.next_report()?;
    Ok(held)
}

impl HeldConnections {
    fn next_report(&mut self) -> Result<ProbeResult> {
        use std::io::BufRead as _;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("reading mesh-probe hold output")?;
        serde_json::from_str(&line)
            .with_context(|| format!("parsing mesh-probe hold output: {line:?}"))
    }

    /// Waits for the watch to end (its `--watch-ms`) and returns what the
    /// held sockets saw: `errors` by kind and `event_unix_ms`.
    pub fn watch_report(&mut self) -> Result<ProbeResult> {
        self.next_report()
    }

    /// What getpeername() says now on each held socket (`peers`; an error
    /// is counted under its errno name). Not with a watch.
    pub fn peers_now(&mut self) -> Result<ProbeResult> {
        use std::io::Write as _;
        self.stdin
            .write_all(b"peers\n")
            .and_then(|()| self.stdin.flush())
            .context("asking mesh-probe hold for its peers")?;
        self.next_report()
    }
}

fn run_probe_args(
    cgroup: &TestCgroup,
    target: SocketAddr,
    count: u32,
    timeout_ms: u64,
    extra: &[&str],
) -> Result<ProbeResult> {
    run_probe_mode("connect", cgroup, target, count, timeout_ms, extra)
}

fn run_probe_mode(
    mode: &str,
    cgroup: &TestCgroup,
    target: SocketAddr,
    count: u32,
    timeout_ms: u64,
    extra: &[&str],
) -> Result<ProbeResult> {
    let probe = crate::require_bin("mesh-probe")?;
    let mut cmd = cgroup.command(&probe);
    cmd.args([mode, "--target", &target.to_string()])
        .args([
            "--count",
            &count.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
        ])
        .args(extra);
    // The probe bounds itself (see total_budget); this is a backstop.
    let limit = total_budget(count, timeout_ms) + Duration::from_secs(10);
    let out = crate::run_with_timeout(&mut cmd, limit)?;
    if !out.status.success() {
        bail!(
            "mesh-probe failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parsing mesh-probe output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Overall time budget for a probe run: two timeouts per attempt, at most 120 s.
pub fn total_budget(count: u32, timeout_ms: u64) -> Duration {
    Duration::from_millis((u64::from(count) * 2 * timeout_ms).min(120_000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use std::net::TcpListener;

    #[test]
    fn loop_against_backend() {
        let b = TestBackend::new(3).unwrap();
        let r = connect_loop(
            b.addr(),
            5,
            Duration::from_secs(2),
            Duration::from_secs(20),
            None,
        );
        assert_eq!(r.ok, 5, "{r:?}");
        assert_eq!(r.id_count(3), 5);
        assert_eq!(r.peers.get(&b.addr().to_string()), Some(&5));
        assert_eq!(r.connect_ns.len(), 5);
        assert_eq!(r.error_count(), 0);
    }

    #[test]
    fn refused_is_named() {
        // A port that was just free: nothing listens there now.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let r = connect_loop(
            target,
            3,
            Duration::from_secs(2),
            Duration::from_secs(20),
            None,
        );
        assert_eq!(r.ok, 0);
        assert_eq!(r.errors.get("ECONNREFUSED"), Some(&3), "{r:?}");
    }

    #[test]
    fn deadline_counts_skipped() {
        let b = TestBackend::new(1).unwrap();
        let r = connect_loop(b.addr(), 4, Duration::from_secs(1), Duration::ZERO, None);
        assert_eq!(r.errors.get("DEADLINE"), Some(&4));
    }

    #[test]
    fn json_round_trip() {
        let json = r#"{"ok":2,"errors":{"EPERM":1},"ids":{"1":2},"peers":{"127.0.0.1:9":2},"connect_ns":[1,2,3]}"#;
        let r: ProbeResult = serde_json::from_str(json).unwrap();
        assert_eq!((r.ok, r.id_count(1), r.error_count()), (2, 2, 1));
    }

    /// The real binary, inside a cgroup (needs `cargo build -p mesh-tests --bins`).
    #[test]
    fn binary_in_cgroup() {
        if crate::require_bin("mesh-probe").is_err() {
            eprintln!("skipping: mesh-probe not built");
            return;
        }
        let cg = TestCgroup::new("unit-probe").unwrap();
        let b = TestBackend::new(9).unwrap();
        let r = run_probe(&cg, b.addr(), 10).unwrap();
        assert_eq!((r.ok, r.id_count(9)), (10, 10), "{r:?}");
        assert_eq!(b.accepted(), 10);
    }
}
