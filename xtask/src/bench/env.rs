//! Everything a benchmark makes on the machine (network namespaces, cgroups,
//! processes, agent pins, temp dirs) is a handle registered in one global
//! registry. Dropping a handle undoes it; the Ctrl-C handler undoes whatever
//! is still registered, so no path leaves anything behind.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Prefix of every namespace and cgroup the benchmark makes.
pub const PREFIX: &str = "mesh-bench";

enum Item {
    Child { name: String, child: Child },
    Netns(String),
    Cgroup(PathBuf),
    Pins { agent_bin: PathBuf, bpffs: PathBuf },
    Dir(PathBuf),
}

#[derive(Default)]
struct Registry {
    next: u64,
    items: BTreeMap<u64, Item>,
    /// Set by Ctrl-C: nothing new may be made after that.
    closed: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    items: BTreeMap::new(),
    closed: false,
});

fn registry() -> MutexGuard<'static, Registry> {
    // A panic elsewhere must not stop the cleanup.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// After Ctrl-C the handler thread cleans up and exits the process; the
/// main thread must neither make anything new nor return (which would end
/// the process half-way through the cleanup), so it waits here.
fn halt_if_interrupted(r: MutexGuard<'_, Registry>) -> MutexGuard<'_, Registry> {
    if r.closed {
        drop(r);
        loop {
            thread::sleep(Duration::from_secs(1));
        }
    }
    r
}

/// Registers an item made by `make`, under the lock, so Ctrl-C cannot run
/// in between and miss it.
fn register(make: impl FnOnce() -> Result<Item>) -> Result<u64> {
    let mut r = halt_if_interrupted(registry());
    let item = make()?;
    r.next += 1;
    let id = r.next;
    r.items.insert(id, item);
    Ok(id)
}

fn undo(id: u64) {
    let item = halt_if_interrupted(registry()).items.remove(&id);
    if let Some(item) = item {
        item.undo();
    }
}

/// Installs the Ctrl-C (and SIGTERM) handler: undo everything, newest
/// first, then exit.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\n==> bench: interrupted, cleaning up");
        let items: Vec<Item> = {
            let mut r = registry();
            r.closed = true;
            std::mem::take(&mut r.items).into_values().rev().collect()
        };
        for item in items {
            item.undo();
        }
        std::process::exit(130);
    })
    .context("could not install the Ctrl-C handler")
}

impl Item {
    fn undo(self) {
        match self {
            Item::Child { name, child } => crate::util::stop_child(&name, child),
            Item::Netns(name) => {
                let out = Command::new("ip").args(["netns", "del", &name]).output();
                if !out.is_ok_and(|o| o.status.success()) {
                    eprintln!("warning: could not delete network namespace {name}");
                }
            }
            Item::Cgroup(path) => kill_and_remove(&path),
            Item::Pins { agent_bin, bpffs } => {
                let out = Command::new(&agent_bin)
                    .arg("cleanup")
                    .arg("--bpffs")
                    .arg(&bpffs)
                    .output();
                if !out.is_ok_and(|o| o.status.success()) {
                    eprintln!(
                        "warning: `mesh-agent cleanup --bpffs {}` failed",
                        bpffs.display()
                    );
                }
            }
            Item::Dir(path) => {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
}

/// A network namespace made for the benchmark, with `lo` up.
pub struct Netns {
    name: String,
    id: u64,
}

impl Netns {
    pub fn new(hint: &str) -> Result<Self> {
        let name = format!("{PREFIX}-{}-{hint}", std::process::id());
        let id = register(|| {
            ip(&["netns", "add", &name])?;
            Ok(Item::Netns(name.clone()))
        })?;
        let ns = Netns { name, id };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `ip netns exec <ns> <program>`.
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs a command inside the namespace, feeding `stdin`; fails on non-zero exit.
    pub fn run(&self, program: &str, args: &[&str], stdin: Option<&Path>) -> Result<String> {
        let mut cmd = self.exec(program);
        cmd.args(args);
        if let Some(path) = stdin {
            cmd.stdin(std::fs::File::open(path)?);
        }
        let out = cmd
            .output()
            .with_context(|| format!("could not run {program} in {}", self.name))?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in {} failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets a per-namespace sysctl.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")], None)
            .map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        undo(self.id);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("could not run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A cgroup v2 made for the benchmark; its processes are killed on drop.
pub struct Cgroup {
    path: PathBuf,
    procs: CString,
    id: u64,
}

impl Cgroup {
    pub fn new(hint: &str) -> Result<Self> {
        let path =
            crate::util::cgroup2_mount()?.join(format!("{PREFIX}-{}-{hint}", std::process::id()));
        let id = register(|| {
            std::fs::create_dir(&path)
                .with_context(|| format!("could not create cgroup {}", path.display()))?;
            Ok(Item::Cgroup(path.clone()))
        })?;
        let procs = CString::new(path.join("cgroup.procs").as_os_str().as_bytes())?;
        Ok(Cgroup { path, procs, id })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd`'s child join this cgroup between fork and exec.
    pub fn join_on_exec(&self, cmd: &mut Command) {
        let procs = self.procs.clone();
        // SAFETY: only async-signal-safe calls (open/write/close) between fork and exec.
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
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        undo(self.id);
    }
}

/// Kills everything in the cgroup (all ours), then removes it.
fn kill_and_remove(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("warning: could not remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A child process we started; stopped (by its PID only) on drop.
pub struct Proc {
    id: u64,
    pid: u32,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let mut pid = 0;
        let id = register(|| {
            let child = cmd
                .spawn()
                .with_context(|| format!("could not start {name}"))?;
            pid = child.id();
            Ok(Item::Child {
                name: name.to_string(),
                child,
            })
        })?;
        Ok(Proc { id, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if it has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        let mut r = halt_if_interrupted(registry());
        match r.items.get_mut(&self.id) {
            Some(Item::Child { child, .. }) => Ok(child.try_wait()?),
            _ => bail!("interrupted"),
        }
    }

    /// Waits up to `timeout` for it to exit; None if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends a signal to this child (only while it is unreaped).
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let r = halt_if_interrupted(registry());
        match r.items.get(&self.id) {
            Some(Item::Child { child, .. }) => {
                // SAFETY: plain syscall on our own unreaped child.
                if unsafe { libc::kill(child.id() as libc::pid_t, sig) } != 0 {
                    return Err(io::Error::last_os_error().into());
                }
                Ok(())
            }
            _ => bail!("interrupted"),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        undo(self.id);
    }
}

/// Pins of an agent: `mesh-agent cleanup --bpffs` on drop.
pub struct Pins {
    id: u64,
}

impl Pins {
    pub fn new(agent_bin: &Path, bpffs: &Path) -> Result<Self> {
        let (agent_bin, bpffs) = (agent_bin.to_path_buf(), bpffs.to_path_buf());
        let id = register(|| Ok(Item::Pins { agent_bin, bpffs }))?;
        Ok(Pins { id })
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        undo(self.id);
    }
}

/// A temp directory removed on drop.
pub struct TempDir {
    path: PathBuf,
    id: u64,
}

impl TempDir {
    pub fn new(hint: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{PREFIX}-{}-{hint}", std::process::id()));
        let id = register(|| {
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("could not create {}", path.display()))?;
            Ok(Item::Dir(path.clone()))
        })?;
        Ok(TempDir { path, id })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        undo(self.id);
    }
}

/// Output of a bounded run of a command: fails if it outlives `timeout`.
pub fn output_within(name: &str, cmd: &mut Command, timeout: Duration) -> Result<Vec<u8>> {
    let dir = TempDir::new(&format!("out-{}", next_seq()))?;
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let proc = Proc::spawn(name, cmd)?;
    let status = proc.wait_timeout(timeout)?;
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    match status {
        None => bail!("{name} did not finish within {timeout:?}; stderr: {stderr}"),
        Some(s) if !s.success() => bail!("{name} failed ({s}): {}", stderr.trim()),
        Some(_) => Ok(std::fs::read(&out_path)?),
    }
}

/// A number unique within this process, for names.
pub fn next_seq() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}
