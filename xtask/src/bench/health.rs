//! Scenario 6, health-check cost: the agent's CPU time while it actively
//! checks 1,000 backends (100 services × 10) once a second, with TCP and
//! with HTTP checks, against the same agent with no checks. The backends
//! are real listeners on loopback addresses, answered by one epoll thread
//! of this process, which also counts the checks that arrive: a row's
//! check rate is what the backends saw, not what the agent claims.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::env::Cgroup;
use super::peers::MeshAgent;
use super::results::{Row, ScenarioResult, Status};
use super::{Ctx, Scenario};
use crate::util::step;

const SERVICES: u32 = 100;
const BACKENDS_PER_SERVICE: u32 = 10;
const BACKENDS: u32 = SERVICES * BACKENDS_PER_SERVICE;
const INTERVAL_MS: u32 = 1_000;
/// Backend j of service i listens on 127.0.78.(j+1):(FIRST_PORT+i).
const FIRST_PORT: u16 = 22_000;

/// The kinds of check the backends tell apart.
#[derive(Copy, Clone, PartialEq, Eq)]
#[repr(u8)]
enum Checks {
    None,
    Tcp,
    Http,
}

impl Checks {
    fn yaml(self) -> &'static str {
        match self {
            Checks::None => "{type: none}",
            Checks::Tcp => "{type: tcp, interval_ms: 1000}",
            Checks::Http => "{type: http, path: /healthz, interval_ms: 1000}",
        }
    }
}

/// Who checks the same 1,000 backends, and how; interleaved in this order.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Checker {
    Mesh(Checks),
    /// HAProxy's own health checks (`check inter 1s`, TCP or `option
    /// httpchk`), the same backends and interval: the userspace proxy's
    /// cost for the same job.
    Haproxy(Checks),
}

impl Checker {
    const ALL: [Checker; 5] = [
        Checker::Mesh(Checks::None),
        Checker::Mesh(Checks::Tcp),
        Checker::Mesh(Checks::Http),
        Checker::Haproxy(Checks::Tcp),
        Checker::Haproxy(Checks::Http),
    ];

    fn peer(self) -> &'static str {
        let at = Self::ALL.iter().position(|c| *c == self).expect("listed");
        PEERS[at]
    }

    fn checks(self) -> Checks {
        match self {
            Checker::Mesh(c) | Checker::Haproxy(c) => c,
        }
    }

    /// TCP checks (the agent's and HAProxy's) never reach the backends'
    /// accept: quick-ack off, the handshake's last ACK is not sent before
    /// the RST, and the backend's kernel drops the half-open connection.
    /// They are counted by the kernel instead (`embryonic_rsts`).
    fn seen_by_backends(self) -> bool {
        self.checks() != Checks::Tcp
    }
}

/// The peers this scenario reports, in `Checker::ALL` order (also for the
/// results' completeness check).
pub const PEERS: [&str; 5] = [
    "mesh-no-checks",
    "mesh-tcp-checks",
    "mesh-http-checks",
    "haproxy-tcp-checks",
    "haproxy-http-checks",
];

pub struct HealthChecks;

impl Scenario for HealthChecks {
    fn id(&self) -> &'static str {
        "health-checks"
    }

    fn run(&self, ctx: &Ctx) -> Result<Vec<ScenarioResult>> {
        let window = Duration::from_millis(if ctx.quick { 3_000 } else { 10_000 });
        let rows = match measure(ctx, window) {
            Ok(rows) => rows,
            Err(e) => Checker::ALL
                .iter()
                .map(|c| {
                    Row::without(
                        c.peer(),
                        Some(u64::from(BACKENDS)),
                        Status::Failed(format!("{e:#}")),
                    )
                })
                .collect(),
        };
        Ok(vec![ScenarioResult {
            id: "health-checks".into(),
            title: "Health checks: agent CPU for 1,000 actively checked backends".into(),
            method: format!(
                "One agent, {SERVICES} services × {BACKENDS_PER_SERVICE} backends on loopback \
                 listeners, checked every {INTERVAL_MS} ms (10% jitter) by TCP connect or HTTP \
                 GET, or not at all; then HAProxy checks the same backends the same way \
                 (`check inter 1s`, `spread-checks 10`, `option httpchk` for HTTP, which \
                 opens a connection per check), with the agent's checks off (left out of \
                 --quick runs). The configurations are interleaved, {} trials of {} s each, \
                 once the checks have settled. CPU is the checker's utime + stime from /proc \
                 (all threads, including the kernel work of its check sockets; on loopback \
                 that includes the backends' side of each handshake) over the window. An \
                 HTTP check is counted at the backends (a request; the agent keeps its \
                 connection open, HAProxy opens one per check), and the steady rate is each \
                 backend's mean interval between checks. A TCP check (the agent's and \
                 HAProxy's alike) ends half-open: quick-ack off, RST before the handshake's \
                 last ACK, so the backends never accept it (the agent resets one kept \
                 socket per backend with connect(AF_UNSPEC), HAProxy opens one per check); \
                 it is counted by the kernel \
                 (TcpExt EmbryonicRsts over the window), and its rate is that count over \
                 the window. The checker's CPU is the idle agent's (0 for HAProxy) plus the \
                 CPU per check seen in the window times the rate (median trials); the \
                 agent's checks start in phase at a reload, so a window holds whole rounds.",
                ctx.trials,
                window.as_secs()
            ),
            rows,
        }])
    }
}

fn measure(ctx: &Ctx, window: Duration) -> Result<Vec<Row>> {
    let backends = Backends::start()?;
    let cg = Cgroup::new("health")?;
    let agent = MeshAgent::start(&ctx.bins, &cg, SERVICES, &[])?;
    let dir = super::env::TempDir::new("health-haproxy")?;
    // HAProxy adds a minute to a run; --quick runs stay under five.
    let checkers: Vec<Checker> = Checker::ALL
        .into_iter()
        .filter(|c| !ctx.quick || matches!(c, Checker::Mesh(_)))
        .collect();
    let reload = |checks: Checks| {
        agent.reload(&config(checks), ctx.setup_timeout, |a| {
            a.meshctl_json(&ctx.bins, &["services"]).is_ok_and(|v| {
                v["services"]
                    .as_array()
                    .is_some_and(|s| s.len() == SERVICES as usize)
            })
        })
    };
    let mut trials: BTreeMap<&str, Vec<Trial>> = BTreeMap::new();
    for trial in 0..ctx.trials {
        for &checker in &checkers {
            let checks = checker.checks();
            let haproxy = match checker {
                Checker::Mesh(checks) => {
                    reload(checks)?;
                    None
                }
                Checker::Haproxy(checks) => {
                    // Only HAProxy's checks reach the backends.
                    reload(Checks::None)?;
                    Some(start_haproxy(dir.path(), checks)?)
                }
            };
            let pid = haproxy.as_ref().map_or(agent.pid(), |h| h.pid());
            let alive = || match &haproxy {
                Some(h) => h.try_wait().is_ok_and(|status| status.is_none()),
                None => true,
            };
            settle(&backends, checks, alive, ctx.setup_timeout).with_context(|| {
                format!(
                    "{}: agent log: {}; HAProxy log: {}",
                    checker.peer(),
                    agent.log(),
                    std::fs::read_to_string(dir.path().join("haproxy.log")).unwrap_or_default()
                )
            })?;
            backends.start_window();
            let rsts_before = embryonic_rsts()?;
            let cpu_before = cpu_ticks(pid)?;
            let start = Instant::now();
            thread::sleep(window);
            let cpu_after = cpu_ticks(pid)?;
            let secs = start.elapsed().as_secs_f64();
            let rsts = embryonic_rsts()? - rsts_before;
            let window_stats = if checker.seen_by_backends() {
                backends.end_window()
            } else {
                WindowStats {
                    checks: rsts,
                    rate: rsts as f64 / secs,
                }
            };
            drop(haproxy);
            let percent = (cpu_after - cpu_before) as f64 / clock_ticks() / secs * 100.0;
            step(format!(
                "bench: health-checks: trial {}: {:<19} CPU {percent:5.2}% of a core over {} checks; steady rate {:6.0} checks/s",
                trial + 1,
                checker.peer(),
                window_stats.checks,
                window_stats.rate
            ));
            if checks == Checks::None && window_stats.checks > 0 {
                bail!(
                    "the backends saw {} checks with checks off",
                    window_stats.checks
                );
            }
            trials.entry(checker.peer()).or_default().push(Trial {
                percent,
                secs,
                window: window_stats,
            });
        }
    }
    drop(agent);
    let idle = median(
        trials[Checker::Mesh(Checks::None).peer()]
            .iter()
            .map(|t| t.percent),
    );
    Ok(Checker::ALL
        .iter()
        .map(|c| {
            let Some(ts) = trials.get(c.peer()) else {
                return Row::without(
                    c.peer(),
                    Some(u64::from(BACKENDS)),
                    Status::Skipped("left out of --quick runs".into()),
                );
            };
            let mut m = BTreeMap::from([
                (
                    "cpu_percent_measured".into(),
                    median(ts.iter().map(|t| t.percent)),
                ),
                (
                    "checks_per_s".into(),
                    median(ts.iter().map(|t| t.window.rate)),
                ),
            ]);
            // HAProxy idles at no measurable CPU; the agent's idle share is
            // measured (its no-checks row).
            let base = match c {
                Checker::Mesh(_) => idle,
                Checker::Haproxy(_) => 0.0,
            };
            if c.checks() == Checks::None {
                m.insert("cpu_percent".into(), idle);
            } else {
                // CPU above idle per check the backends saw in the window;
                // at the steady rate that is the checks' share of a core.
                // (The agent's checks start at a reload, in phase, so a
                // short window holds a whole number of rounds, not the mean
                // rate.)
                let per_check = median(ts.iter().map(|t| {
                    (t.percent - base) / 100.0 * t.secs / t.window.checks.max(1) as f64 * 1e6
                }));
                let rate = m["checks_per_s"];
                m.insert("cpu_us_per_check".into(), per_check);
                m.insert("cpu_percent".into(), base + per_check * rate / 1e4);
            }
            Row::ok(c.peer(), Some(u64::from(BACKENDS)), m)
        })
        .collect())
}

/// One measured window of one configuration.
struct Trial {
    /// The agent's CPU over the window, % of one core.
    percent: f64,
    secs: f64,
    window: WindowStats,
}

/// Waits until the checks settle: with HTTP checks, every backend saw one
/// after this call; otherwise (checks off, or TCP checks the backends never
/// see) no check arrives for longer than an interval with its jitter.
fn settle(
    backends: &Backends,
    checks: Checks,
    checker_alive: impl Fn() -> bool,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let quiet = Duration::from_millis(u64::from(INTERVAL_MS) * 3 / 2);
    backends.forget_checked();
    let mut last = (backends.checks(), Instant::now());
    loop {
        let done = if checks == Checks::Http {
            backends.checked() == BACKENDS
        } else {
            let now = backends.checks();
            if now != last.0 {
                last = (now, Instant::now());
            }
            last.1.elapsed() > quiet
        };
        if done {
            return Ok(());
        }
        if !checker_alive() {
            bail!("the checker exited");
        }
        if Instant::now() > deadline {
            bail!(
                "the backends did not settle within {timeout:?}: {} of {BACKENDS} saw a check",
                backends.checked()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn backend_addr(service: u32, backend: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(127, 0, 78, backend as u8 + 1),
        FIRST_PORT + service as u16,
    )
}

/// HAProxy checking every backend `checks`' way once a second, in the
/// foreground (the PID held is HAProxy's); stopped when dropped.
fn start_haproxy(dir: &std::path::Path, checks: Checks) -> Result<super::env::Proc> {
    let mut cfg = String::from(
        "global\n    spread-checks 10\n    maxconn 256\n\
         defaults\n    mode tcp\n    timeout connect 1s\n    timeout check 1s\n    \
         timeout client 5s\n    timeout server 5s\n    \
         default-server inter 1s fall 3 rise 2\n\
         # HAProxy will not start without a listener; nothing connects to it.\n\
         frontend idle\n    bind 127.0.78.250:21999\n    default_backend hc000\n",
    );
    for i in 0..SERVICES {
        let _ = writeln!(cfg, "backend hc{i:03}");
        if checks == Checks::Http {
            cfg.push_str("    option httpchk GET /healthz\n    http-check expect status 200\n");
        }
        for j in 0..BACKENDS_PER_SERVICE {
            let _ = writeln!(cfg, "    server b{j} {} check", backend_addr(i, j));
        }
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let log = std::fs::File::create(dir.join("haproxy.log"))?;
    let mut cmd = std::process::Command::new("haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    super::env::Proc::spawn("haproxy", &mut cmd)
}

/// The agent's config: VIPs are loopback addresses too (nothing connects to
/// them; the agent's cgroup is empty).
fn config(checks: Checks) -> String {
    let mut y = String::from("services:\n");
    for i in 0..SERVICES {
        let _ = write!(
            y,
            "  - name: hc{i:03}\n    vip: 127.0.79.{}\n    port: 80\n    health_check: {}\n    backends: [",
            i + 1,
            checks.yaml()
        );
        for j in 0..BACKENDS_PER_SERVICE {
            let a = backend_addr(i, j);
            let sep = if j + 1 < BACKENDS_PER_SERVICE {
                ", "
            } else {
                ""
            };
            let _ = write!(y, "{{address: {}, port: {}}}{sep}", a.ip(), a.port());
        }
        y.push_str("]\n");
    }
    y
}

/// Resets the kernel received for connections still in SYN-RECV (TcpExt
/// EmbryonicRsts of this network namespace): one per half-open TCP check.
fn embryonic_rsts() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat")?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next(), lines.next());
    names
        .zip(values)
        .and_then(|(names, values)| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == "EmbryonicRsts")
                .and_then(|(_, v)| v.parse().ok())
        })
        .context("/proc/net/netstat has no TcpExt EmbryonicRsts")
}

/// utime + stime of all of a process's threads, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based).
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .context("malformed /proc/<pid>/stat")
    };
    Ok(field(14)? + field(15)?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// 1,000 listeners served by one epoll thread: every HTTP request gets
/// `200 OK` and the connection stays open for the next (keep-alive), each
/// request counting as a check. (TCP checks end half-open and never get
/// here: see `embryonic_rsts`.)
struct Backends {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

/// What the backends saw, shared with their thread.
struct Counters {
    checks: AtomicU64,
    /// Whether each backend saw a check since `forget_checked`.
    checked: Vec<AtomicBool>,
    /// Checks each backend saw since `start_window`.
    window: Mutex<Vec<Tally>>,
}

#[derive(Clone, Default)]
struct Tally {
    checks: u32,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// Checks in a window, and the steady rate: each backend's own mean
/// interval between the checks it saw, summed over backends.
struct WindowStats {
    checks: u64,
    rate: f64,
}

impl Backends {
    fn start() -> Result<Self> {
        let mut listeners = Vec::new();
        for i in 0..SERVICES {
            for j in 0..BACKENDS_PER_SERVICE {
                let addr = backend_addr(i, j);
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                s.bind(&SockAddr::from(addr))
                    .with_context(|| format!("health backends: cannot bind {addr}"))?;
                s.listen(1024)?;
                s.set_nonblocking(true)?;
                listeners.push(TcpListener::from(s));
            }
        }
        // SAFETY: plain syscall; the fd is closed by `Epoll`'s drop.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        let epoll = Epoll(epfd);
        for (i, l) in listeners.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: valid epoll fd and listener fd; `ev` outlives the call.
            if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, l.as_raw_fd(), &mut ev) } != 0 {
                return Err(io::Error::last_os_error()).context("epoll_ctl");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters {
            checks: AtomicU64::new(0),
            checked: (0..listeners.len())
                .map(|_| AtomicBool::new(false))
                .collect(),
            window: Mutex::new(vec![Tally::default(); listeners.len()]),
        });
        let thread = {
            let (stop, counters) = (stop.clone(), counters.clone());
            thread::spawn(move || serve(epoll, &listeners, &stop, &counters))
        };
        Ok(Self {
            stop,
            counters,
            thread: Some(thread),
        })
    }

    fn checks(&self) -> u64 {
        self.counters.checks.load(Ordering::Relaxed)
    }

    /// Backends that saw a check since `forget_checked`.
    fn checked(&self) -> u32 {
        self.counters
            .checked
            .iter()
            .filter(|c| c.load(Ordering::Relaxed))
            .count() as u32
    }

    fn forget_checked(&self) {
        for c in &self.counters.checked {
            c.store(false, Ordering::Relaxed);
        }
    }

    fn start_window(&self) {
        self.counters.window().fill(Tally::default());
    }

    fn end_window(&self) -> WindowStats {
        let window = self.counters.window();
        let checks = window.iter().map(|t| u64::from(t.checks)).sum();
        let rate = window
            .iter()
            .filter_map(|t| {
                let span = t.last?.duration_since(t.first?).as_secs_f64();
                (t.checks > 1 && span > 0.0).then(|| f64::from(t.checks - 1) / span)
            })
            // Not `sum()`: an empty f64 sum is -0.0.
            .fold(0.0, |a, b| a + b);
        WindowStats { checks, rate }
    }
}

impl Counters {
    fn window(&self) -> std::sync::MutexGuard<'_, Vec<Tally>> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, backend: usize) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        self.checked[backend].store(true, Ordering::Relaxed);
        let now = Instant::now();
        let tally = &mut self.window()[backend];
        tally.checks += 1;
        tally.first.get_or_insert(now);
        tally.last = Some(now);
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Epoll(libc::c_int);

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// epoll tokens at and above this are connections; below, listeners.
const CONN_TOKEN: u64 = 1 << 32;
/// A request head longer than this closes the connection.
const MAX_REQUEST: usize = 4096;
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// An accepted connection: its backend, and the request bytes so far.
struct Conn {
    stream: std::net::TcpStream,
    backend: usize,
    buf: Vec<u8>,
}

fn serve(epoll: Epoll, listeners: &[TcpListener], stop: &AtomicBool, counters: &Counters) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_token = CONN_TOKEN;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` has room for the count passed.
        let n = unsafe { libc::epoll_wait(epoll.0, events.as_mut_ptr(), 256, 100) };
        for ev in events.iter().take(n.max(0) as usize) {
            let token = ev.u64;
            if token < CONN_TOKEN {
                let i = token as usize;
                while let Ok((stream, _)) = listeners[i].accept() {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let mut ev = libc::epoll_event {
                        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                        u64: next_token,
                    };
                    // SAFETY: valid epoll fd and stream fd; `ev` outlives the call.
                    let added = unsafe {
                        libc::epoll_ctl(epoll.0, libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut ev)
                    };
                    if added == 0 {
                        let conn = Conn {
                            stream,
                            backend: i,
                            buf: Vec::new(),
                        };
                        conns.insert(next_token, conn);
                        next_token += 1;
                    }
                }
            } else if let Some(conn) = conns.get_mut(&token)
                && !answer(conn, counters)
            {
                // Closing the fd takes it out of the epoll set.
                conns.remove(&token);
            }
        }
    }
}

/// Reads what a connection has and answers (and counts) every complete
/// request head. False when the connection is done.
fn answer(conn: &mut Conn, counters: &Counters) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => conn.buf.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        while let Some(end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            conn.buf.drain(..end + 4);
            // 38 bytes into an idle socket's empty send buffer: all or error.
            if conn.stream.write_all(RESPONSE).is_err() {
                return false;
            }
            counters.record(conn.backend);
        }
        if conn.buf.len() > MAX_REQUEST {
            return false;
        }
    }
    false
}
