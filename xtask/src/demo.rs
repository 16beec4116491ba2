//! `cargo xtask demo`: runs the agent on a config (examples/mesh.yaml by
//! default) against a cgroup made for the demo, starts the sample backends,
//! sends connections to the service's VIP from inside that cgroup, and shows
//! where they went, as the client saw it and as the kernel counted it (act
//! 1). Act 2 (`cross_node`) builds two network-namespace nodes and shows a
//! connection between them crossing the wire only as TLS records.
//!
//! Everything the demo creates is recorded in one `Cleanup`, which a guard's
//! Drop and the Ctrl-C handler both run, so no path leaves anything behind.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;

use crate::util::{self, step};

mod capture;
mod cross_node;

#[derive(Args)]
pub struct DemoArgs {
    /// The agent's config [default: examples/mesh.yaml in the workspace].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The service to send connections to [default: the first one].
    #[arg(long)]
    service: Option<String>,
    /// How many connections to make.
    #[arg(long, default_value_t = 1000)]
    connections: u32,
    /// Skip act 2 (two network-namespace nodes and the mTLS tunnel).
    #[arg(long)]
    no_nodes: bool,
}

#[derive(Args)]
pub struct ClientArgs {
    /// Where to connect (the service's VIP and port).
    #[arg(long)]
    target: SocketAddr,
    /// How many connections to make.
    #[arg(long)]
    count: u32,
    /// A backend and its weight, for the "expected" column; repeatable.
    #[arg(long, value_name = "ADDR:PORT=WEIGHT")]
    expect: Vec<String>,
}

// Just the parts of the agent's config the demo needs; the rest is ignored.
#[derive(Deserialize)]
struct Config {
    services: Vec<Service>,
}

#[derive(Deserialize)]
struct Service {
    name: String,
    vip: IpAddr,
    port: u16,
    #[serde(default)]
    backends: Vec<Backend>,
}

#[derive(Deserialize)]
struct Backend {
    address: IpAddr,
    port: u16,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl Backend {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

pub fn run(args: DemoArgs) -> Result<()> {
    if !util::is_root() {
        bail!(
            "the demo loads eBPF programs and makes a cgroup, so it needs root; run as root, \
             e.g. `sudo -E env PATH=\"$PATH\" cargo xtask demo`"
        );
    }
    let root = util::workspace_root();
    let config_path = std::path::absolute(
        args.config
            .unwrap_or_else(|| root.join("examples/mesh.yaml")),
    )?;
    let config = load_config(&config_path)?;
    let service = match &args.service {
        Some(name) => config
            .services
            .iter()
            .find(|s| &s.name == name)
            .with_context(|| format!("{}: no service named {name:?}", config_path.display()))?,
        None => config
            .services
            .first()
            .with_context(|| format!("{}: no services", config_path.display()))?,
    };
    check_loopback(service, &config_path)?;

    // a. tools and binaries
    crate::setup::run()?;
    util::build_kernel_programs()?;
    step("demo: building mesh-agent and meshctl");
    util::run(util::cargo_build().args(["build", "-p", "mesh-agent", "--bins"]))?;
    let bin_dir = util::target_dir()?.join("debug");
    let agent_bin = bin_dir.join("mesh-agent");
    let meshctl_bin = bin_dir.join("meshctl");

    let cleanup = Arc::new(Mutex::new(Cleanup::new(agent_bin.clone())));
    let _guard = Guard(cleanup.clone());
    {
        let cleanup = cleanup.clone();
        ctrlc::set_handler(move || {
            eprintln!("\n==> demo: interrupted, cleaning up");
            lock(&cleanup).run();
            std::process::exit(130);
        })
        .context("could not install the Ctrl-C handler")?;
    }

    // b. the demo's own cgroup: the agent steers only sockets made in it
    let pid = std::process::id();
    let mount = util::cgroup2_mount()?;
    let cgroup = mount.join(format!("mesh-demo-{pid}"));
    let tmp = std::env::temp_dir().join(format!("mesh-demo-{pid}"));
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/mesh-demo-{pid}"));
    let socket = tmp.join("admin.sock");
    step(format!("demo: act 1: creating cgroup {}", cgroup.display()));
    register(&cleanup, |c| {
        fs::create_dir_all(&tmp).with_context(|| format!("could not create {}", tmp.display()))?;
        c.tmp = Some(tmp.clone());
        Ok(())
    })?;
    make_cgroup(&cleanup, &cgroup)?;

    // c. sample backends, as threads of this process (outside the cgroup)
    let addrs: Vec<String> = service
        .backends
        .iter()
        .map(|b| b.addr().to_string())
        .collect();
    step(format!("demo: starting backends {}", addrs.join(", ")));
    for backend in &service.backends {
        start_backend(backend.addr())?;
    }

    // d. the agent
    let log_path = tmp.join("agent.log");
    let mut agent_cmd = Command::new(&agent_bin);
    agent_cmd
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .arg("--cgroup")
        .arg(&cgroup)
        .arg("--bpffs")
        .arg(&bpffs)
        .arg("--admin-socket")
        .arg(&socket);
    step(format!(
        "demo: starting the agent (log: {})\n    $ {}",
        log_path.display(),
        util::display(&agent_cmd)
    ));
    let agent = spawn_agent(&cleanup, "mesh-agent", agent_cmd, &bpffs, &log_path)?;
    wait_ready(&cleanup, agent, &meshctl_bin, &socket, &log_path)?;

    // e. the client, moved into the cgroup before it runs
    let target = SocketAddr::new(service.vip, service.port);
    step(format!(
        "demo: {} connections to {} ({target}) from inside the demo cgroup",
        args.connections, service.name
    ));
    let mut client_cmd = Command::new(std::env::current_exe()?);
    client_cmd
        .arg("demo-client")
        .arg("--target")
        .arg(target.to_string())
        .arg("--count")
        .arg(args.connections.to_string());
    for b in &service.backends {
        client_cmd
            .arg("--expect")
            .arg(format!("{}={}", b.addr(), b.weight));
    }
    join_cgroup_on_exec(&mut client_cmd, &cgroup)?;
    let client = spawn(&cleanup, "demo client", client_cmd)?;
    let (_, status) = wait_exit(&cleanup, client, Duration::from_secs(600))?;

    // f. what the kernel counted
    step("demo: meshctl services (the kernel's per-backend counts)");
    let services = util::run(
        Command::new(&meshctl_bin)
            .arg("--admin-socket")
            .arg(&socket)
            .arg("services"),
    );
    if !status.success() {
        // The temp dir goes with the cleanup, so show the agent's log now.
        bail!(
            "the demo client failed ({status}); the agent's output:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    services?;

    if !args.no_nodes {
        cross_node::run(&cross_node::Demo {
            cleanup: &cleanup,
            agent_bin: &agent_bin,
            meshctl_bin: &meshctl_bin,
            cgroup_mount: &mount,
            tmp: &tmp,
            pid,
        })?;
    }
    Ok(())
}

fn load_config(path: &Path) -> Result<Config> {
    let text =
        fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
}

/// The demo connects to the VIP from the host: only loopback addresses, so a
/// failed rewrite can never send a packet off the machine.
fn check_loopback(service: &Service, path: &Path) -> Result<()> {
    if !service.vip.is_loopback() {
        bail!(
            "{}: service {:?} has VIP {}, but the demo only connects to loopback VIPs (127.x)",
            path.display(),
            service.name,
            service.vip
        );
    }
    if let Some(b) = service.backends.iter().find(|b| !b.address.is_loopback()) {
        bail!(
            "{}: service {:?} has backend {}, but the demo runs its backends on loopback only",
            path.display(),
            service.name,
            b.addr()
        );
    }
    Ok(())
}

/// A backend answers every connection with one line naming itself, then
/// closes, so the client can tell where the kernel sent it.
fn start_backend(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| {
        format!("could not listen on {addr} for the demo backend (is it in use?)")
    })?;
    let reply = format!("backend {addr}\n");
    thread::spawn(move || {
        // A failed accept or a client that went away is not the backend's problem.
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    Ok(())
}

/// Waits until `meshctl status` answers, failing early if the agent dies.
/// One progress line, finished in place.
fn wait_ready(
    cleanup: &Mutex<Cleanup>,
    agent: u32,
    meshctl: &Path,
    socket: &Path,
    log: &Path,
) -> Result<()> {
    print!("==> demo: waiting for the agent (meshctl status) ... ");
    let _ = io::stdout().flush();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = exited(cleanup, agent)? {
            println!("failed");
            bail!(
                "mesh-agent exited ({status}) before it was ready; its output:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if meshctl_status(meshctl, socket)? {
            println!("ready");
            return Ok(());
        }
        if Instant::now() > deadline {
            println!("failed");
            bail!(
                "mesh-agent was not ready after 20 s (`meshctl status` kept failing); its output:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// True once the agent behind `socket` answers `meshctl status`.
fn meshctl_status(meshctl: &Path, socket: &Path) -> Result<bool> {
    Ok(Command::new(meshctl)
        .arg("--admin-socket")
        .arg(socket)
        .arg("status")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("could not run {}", meshctl.display()))?
        .success())
}

/// Makes the child write itself into the cgroup between fork and exec, so
/// every socket it ever makes belongs to the demo cgroup.
fn join_cgroup_on_exec(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    // SAFETY: the closure only calls async-signal-safe functions (open,
    // write, close) and allocates nothing, as required after fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n == 1 { Ok(()) } else { Err(err) }
        });
    }
    Ok(())
}

/// The hidden `demo-client` subcommand: connects `count` times, reads which
/// backend answered, and prints the distribution against the weights.
pub fn client(args: ClientArgs) -> Result<()> {
    let mut expected: BTreeMap<String, u32> = BTreeMap::new();
    for e in &args.expect {
        let (addr, weight) = e
            .split_once('=')
            .with_context(|| format!("--expect {e:?}: want ADDR:PORT=WEIGHT"))?;
        expected.insert(
            addr.to_string(),
            weight.parse().with_context(|| format!("--expect {e:?}"))?,
        );
    }
    let mut seen: BTreeMap<String, u32> = expected.keys().map(|k| (k.clone(), 0)).collect();
    let mut errors: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..args.count {
        match connect_once(args.target) {
            Ok(backend) => *seen.entry(backend).or_default() += 1,
            Err(e) => *errors.entry(e.to_string()).or_default() += 1,
        }
    }

    let total_weight: u32 = expected.values().sum();
    let pct = |n: u32, of: u32| {
        if of == 0 {
            0.0
        } else {
            100.0 * f64::from(n) / f64::from(of)
        }
    };
    println!(
        "    {:<22} {:>6} {:>8} {:>9}",
        "backend", "count", "percent", "expected"
    );
    for (backend, n) in &seen {
        let exp = expected.get(backend).map_or("-".to_string(), |w| {
            format!("{:.1}%", pct(*w, total_weight))
        });
        println!(
            "    {backend:<22} {n:>6} {:>7.1}% {exp:>9}",
            pct(*n, args.count)
        );
    }
    let failed: u32 = errors.values().sum();
    for (err, n) in &errors {
        println!(
            "    {:<22} {n:>6} {:>7.1}%   ({err})",
            "failed",
            pct(*n, args.count)
        );
    }
    if failed > 0 {
        bail!(
            "{failed} of {} connections to {} failed",
            args.count,
            args.target
        );
    }
    Ok(())
}

fn connect_once(target: SocketAddr) -> io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    let reply = reply.trim();
    Ok(reply.strip_prefix("backend ").unwrap_or(reply).to_string())
}

/// Everything the demo started or made, undone in reverse order.
struct Cleanup {
    agent_bin: PathBuf,
    /// Running children and what to call them; stopped newest first.
    children: Vec<(String, Child)>,
    /// Agents' bpffs pin directories, for `mesh-agent cleanup`.
    pins: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
    /// Network namespaces (`ip netns add`), deleted newest first.
    netns: Vec<String>,
    tmp: Option<PathBuf>,
    /// Set once cleanup has run: nothing new may be made after that.
    done: bool,
}

/// Runs the cleanup when the demo returns, errors or panics.
struct Guard(Arc<Mutex<Cleanup>>);

impl Drop for Guard {
    fn drop(&mut self) {
        lock(&self.0).run();
    }
}

fn lock(c: &Mutex<Cleanup>) -> MutexGuard<'_, Cleanup> {
    // A panic elsewhere must not stop the cleanup.
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes something under the lock, so Ctrl-C cannot clean up in between
/// and miss it.
fn register<T>(c: &Mutex<Cleanup>, make: impl FnOnce(&mut Cleanup) -> Result<T>) -> Result<T> {
    let mut c = lock(c);
    if c.done {
        bail!("interrupted");
    }
    make(&mut c)
}

/// Starts `cmd` as one of the demo's children; its PID names it from then on.
fn spawn(c: &Mutex<Cleanup>, name: &str, mut cmd: Command) -> Result<u32> {
    register(c, |c| {
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start the {name} (`{}`)", util::display(&cmd)))?;
        let pid = child.id();
        c.children.push((name.to_owned(), child));
        Ok(pid)
    })
}

/// Starts an agent with its output in `log`; its pins are cleaned up after it.
fn spawn_agent(
    c: &Mutex<Cleanup>,
    name: &str,
    mut cmd: Command,
    bpffs: &Path,
    log: &Path,
) -> Result<u32> {
    let out =
        fs::File::create(log).with_context(|| format!("could not create {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    register(c, |c| {
        c.pins.push(bpffs.to_owned());
        Ok(())
    })?;
    spawn(c, name, cmd)
}

/// Creates a cgroup the cleanup removes.
fn make_cgroup(c: &Mutex<Cleanup>, cgroup: &Path) -> Result<()> {
    register(c, |c| {
        fs::create_dir(cgroup)
            .with_context(|| format!("could not create cgroup {}", cgroup.display()))?;
        c.cgroups.push(cgroup.to_owned());
        Ok(())
    })
}

/// The child's exit status if it has exited (it stays registered).
fn exited(c: &Mutex<Cleanup>, pid: u32) -> Result<Option<std::process::ExitStatus>> {
    let mut c = lock(c);
    match c.children.iter_mut().find(|(_, ch)| ch.id() == pid) {
        Some((_, child)) => Ok(child.try_wait()?),
        None => bail!("interrupted"),
    }
}

/// Waits (at most `limit`) for the child to exit and hands it back. Polls
/// rather than blocks, so the Ctrl-C handler can take the child meanwhile.
fn wait_exit(
    c: &Mutex<Cleanup>,
    pid: u32,
    limit: Duration,
) -> Result<(Child, std::process::ExitStatus)> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = exited(c, pid)? {
            let mut c = lock(c);
            let at = c
                .children
                .iter()
                .position(|(_, ch)| ch.id() == pid)
                .context("interrupted")?;
            return Ok((c.children.remove(at).1, status));
        }
        if Instant::now() > deadline {
            let name = lock(c)
                .children
                .iter()
                .find(|(_, ch)| ch.id() == pid)
                .map_or(String::new(), |(n, _)| n.clone());
            bail!("the {name} (pid {pid}) did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Stops one child now (SIGTERM, SIGKILL after 3 s), under the lock so the
/// Ctrl-C handler never sees it half-stopped.
fn stop_now(c: &Mutex<Cleanup>, pid: u32) {
    let mut c = lock(c);
    if let Some(at) = c.children.iter().position(|(_, ch)| ch.id() == pid) {
        let (name, child) = c.children.remove(at);
        util::stop_child(&name, child);
    }
}

impl Cleanup {
    fn new(agent_bin: PathBuf) -> Self {
        Cleanup {
            agent_bin,
            children: Vec::new(),
            pins: Vec::new(),
            cgroups: Vec::new(),
            netns: Vec::new(),
            tmp: None,
            done: false,
        }
    }

    /// Undoes everything, saying so in at most three lines; what fails is
    /// a warning and the rest still goes.
    fn run(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if !self.children.is_empty() {
            let names: Vec<String> = self
                .children
                .iter()
                .rev()
                .map(|(name, child)| format!("{name} ({})", child.id()))
                .collect();
            step(format!("demo: cleanup: stopping {}", names.join(", ")));
            while let Some((name, child)) = self.children.pop() {
                util::stop_child(&name, child);
            }
        }
        if !self.pins.is_empty() {
            let dirs: Vec<String> = self.pins.iter().map(|p| p.display().to_string()).collect();
            step(format!(
                "demo: cleanup: mesh-agent cleanup --bpffs {} (programs detached, maps released)",
                dirs.join(", ")
            ));
            for bpffs in self.pins.drain(..) {
                let out = Command::new(&self.agent_bin)
                    .arg("cleanup")
                    .arg("--bpffs")
                    .arg(&bpffs)
                    .stdin(Stdio::null())
                    .output();
                match out {
                    Ok(out) if out.status.success() => {}
                    Ok(out) => eprintln!(
                        "warning: `mesh-agent cleanup --bpffs {}` failed ({}): {}",
                        bpffs.display(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    Err(e) => eprintln!("warning: could not run mesh-agent cleanup: {e}"),
                }
            }
        }
        let (mut cgroups, mut netns) = (Vec::new(), Vec::new());
        for cgroup in self.cgroups.drain(..).rev() {
            match remove_cgroup(&cgroup) {
                Ok(()) => cgroups.push(cgroup.display().to_string()),
                Err(e) => eprintln!("warning: could not remove cgroup {}: {e}", cgroup.display()),
            }
        }
        for ns in self.netns.drain(..).rev() {
            match Command::new("ip").args(["netns", "del", &ns]).output() {
                Ok(out) if out.status.success() => netns.push(ns),
                Ok(out) => eprintln!(
                    "warning: `ip netns del {ns}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("warning: could not run `ip netns del {ns}`: {e}"),
            }
        }
        let mut gone = Vec::new();
        for (one, many, names) in [
            ("cgroup", "cgroups", cgroups),
            ("network namespace", "network namespaces", netns),
        ] {
            match names.len() {
                0 => {}
                1 => gone.push(format!("{one} {}", names[0])),
                _ => gone.push(format!("{many} {}", names.join(", "))),
            }
        }
        if let Some(tmp) = self.tmp.take() {
            match fs::remove_dir_all(&tmp) {
                Ok(()) => gone.push(tmp.display().to_string()),
                Err(e) => eprintln!("warning: could not remove {}: {e}", tmp.display()),
            }
        }
        if !gone.is_empty() {
            step(format!("demo: cleanup: removed {}", gone.join("; ")));
        }
    }
}

/// A cgroup can only be removed once its processes have exited; they may
/// take a moment after being reaped, so retry for a while.
fn remove_cgroup(cgroup: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}
