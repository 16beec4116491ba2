//! `cargo xtask demo`: runs the agent on a config (examples/mesh.yaml by
//! default) against a cgroup made for the demo, starts the sample backends,
//! sends connections to the service's VIP from inside that cgroup, and shows
//! where they went, as the client saw it and as the kernel counted it.
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
    step(format!("demo: creating cgroup {}", cgroup.display()));
    register(&cleanup, |c| {
        fs::create_dir(&cgroup)
            .with_context(|| format!("could not create cgroup {}", cgroup.display()))?;
        c.cgroup = Some(cgroup.clone());
        fs::create_dir_all(&tmp).with_context(|| format!("could not create {}", tmp.display()))?;
        c.tmp = Some(tmp.clone());
        Ok(())
    })?;

    // c. sample backends, as threads of this process (outside the cgroup)
    for backend in &service.backends {
        step(format!("demo: starting backend {}", backend.addr()));
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
    let log = fs::File::create(&log_path)
        .with_context(|| format!("could not create {}", log_path.display()))?;
    agent_cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    register(&cleanup, |c| {
        let child = agent_cmd
            .spawn()
            .with_context(|| format!("could not start {}", agent_bin.display()))?;
        c.agent = Some(child);
        c.bpffs = Some(bpffs.clone());
        Ok(())
    })?;
    wait_ready(&cleanup, &meshctl_bin, &socket, &log_path)?;

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
    register(&cleanup, |c| {
        c.client = Some(
            client_cmd
                .spawn()
                .context("could not start the demo client")?,
        );
        Ok(())
    })?;
    // Poll rather than block, so the Ctrl-C handler can take the child.
    let status = loop {
        if let Some(status) = lock(&cleanup)
            .client
            .as_mut()
            .and_then(|c| c.try_wait().transpose())
        {
            break status?;
        }
        thread::sleep(Duration::from_millis(50));
    };
    lock(&cleanup).client = None;
    let client_ok = status.success();

    // f. what the kernel counted
    step("demo: meshctl services (the kernel's per-backend counts)");
    let services = util::run(
        Command::new(&meshctl_bin)
            .arg("--admin-socket")
            .arg(&socket)
            .arg("services"),
    );

    if !client_ok {
        // The temp dir goes with the cleanup, so show the agent's log now.
        bail!(
            "the demo client failed ({status}); the agent's output:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    services
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
fn wait_ready(
    cleanup: &Arc<Mutex<Cleanup>>,
    meshctl: &Path,
    socket: &Path,
    log: &Path,
) -> Result<()> {
    step("demo: waiting for the agent (meshctl status)");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(agent) = lock(cleanup).agent.as_mut()
            && let Some(status) = agent.try_wait()?
        {
            bail!(
                "mesh-agent exited ({status}) before it was ready; its output:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        let ready = Command::new(meshctl)
            .arg("--admin-socket")
            .arg(socket)
            .arg("status")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("could not run {}", meshctl.display()))?
            .success();
        if ready {
            step("demo: agent is ready");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "mesh-agent was not ready after 20 s (`meshctl status` kept failing); its output:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
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
    client: Option<Child>,
    agent: Option<Child>,
    bpffs: Option<PathBuf>,
    cgroup: Option<PathBuf>,
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

impl Cleanup {
    fn new(agent_bin: PathBuf) -> Self {
        Cleanup {
            agent_bin,
            client: None,
            agent: None,
            bpffs: None,
            cgroup: None,
            tmp: None,
            done: false,
        }
    }

    fn run(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(child) = self.client.take() {
            stop("demo client", child);
        }
        if let Some(child) = self.agent.take() {
            stop("mesh-agent", child);
        }
        if let Some(bpffs) = self.bpffs.take() {
            let mut cmd = Command::new(&self.agent_bin);
            cmd.arg("cleanup").arg("--bpffs").arg(&bpffs);
            step("demo: cleanup: removing the agent's pinned maps and links");
            if let Err(e) = util::run(&mut cmd) {
                eprintln!("warning: {e:#}");
            }
        }
        if let Some(cgroup) = self.cgroup.take() {
            step(format!(
                "demo: cleanup: removing cgroup {}",
                cgroup.display()
            ));
            if let Err(e) = remove_cgroup(&cgroup) {
                eprintln!("warning: could not remove cgroup {}: {e}", cgroup.display());
            }
        }
        if let Some(tmp) = self.tmp.take()
            && let Err(e) = fs::remove_dir_all(&tmp)
        {
            eprintln!("warning: could not remove {}: {e}", tmp.display());
        }
    }
}

/// Says what it stops, then stops it gracefully (see `util::stop_child`).
fn stop(name: &str, child: Child) {
    step(format!(
        "demo: cleanup: stopping {name} (pid {})",
        child.id()
    ));
    util::stop_child(name, child);
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
