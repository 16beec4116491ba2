//! A cgroup v2 made for one test. Workloads join it as child processes (see
//! [`TestCgroup::command`]); the test process itself never moves, so tests
//! sharing one process under plain `cargo test` do not disturb each other.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The cgroup v2 mount point, read from /proc/self/mountinfo (it is
/// /sys/fs/cgroup on most machines, /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <opts>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(unescape_mountinfo(mp)));
        }
    }
    bail!(
        "no cgroup2 mount in /proc/self/mountinfo; mount one (mount -t cgroup2 none /sys/fs/cgroup)"
    )
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub struct TestCgroup {
    path: PathBuf,
    id: u64,
    /// `<path>/cgroup.procs`, prepared before fork: pre_exec must not allocate.
    procs: CString,
}

impl TestCgroup {
    /// Creates `<mount>/mesh-test-<hint>-<pid>-<n>`.
    pub fn new(name_hint: &str) -> Result<Self> {
        let name = format!(
            "mesh-test-{}-{}-{}",
            crate::sanitize(name_hint),
            std::process::id(),
            crate::next_id()
        );
        Self::create(cgroup2_mount()?.join(name))
    }

    /// Creates a cgroup inside this one (a container inside a pod).
    pub fn child(&self, name: &str) -> Result<Self> {
        Self::create(self.path.join(crate::sanitize(name)))
    }

    fn create(path: PathBuf) -> Result<Self> {
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        // From here on Drop removes it, even if the lines below fail.
        let mut cg = TestCgroup {
            path,
            id: 0,
            procs: CString::default(),
        };
        cg.id = std::fs::metadata(&cg.path)?.ino();
        cg.procs = CString::new(cg.path.join("cgroup.procs").as_os_str().as_bytes())?;
        Ok(cg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id the kernel uses (bpf_get_current_cgroup_id): the
    /// directory's inode number on cgroup2.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A Command whose child joins this cgroup before exec, so the program
    /// runs inside it from its first instruction.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let procs = self.procs.clone();
        // SAFETY: only async-signal-safe calls (open/write/close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
        cmd
    }

    /// PIDs currently in the cgroup (not counting sub-cgroups).
    pub fn pids(&self) -> Vec<i32> {
        read_pids(&self.path)
    }
}

/// Kills everything in `dir` and below (all of it is ours: the cgroup was
/// made for the test), then removes the directories, deepest first.
fn kill_and_remove(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_and_remove(&e.path());
            }
        }
    }
    // cgroup.kill (5.14+) kills the whole subtree atomically, even processes
    // forking right now; fall back to killing listed PIDs one by one.
    let killed = std::fs::write(dir.join("cgroup.kill"), "1").is_ok();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if !killed {
            for pid in read_pids(dir) {
                // SAFETY: plain syscall; the PID is in our test-only cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // rmdir fails with EBUSY while live tasks remain (zombies do not count).
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("mesh-tests: could not remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        kill_and_remove(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_is_found() {
        let m = cgroup2_mount().unwrap();
        assert!(m.join("cgroup.procs").exists(), "{}", m.display());
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
    }

    #[test]
    fn child_runs_inside_and_cleanup() {
        let cg = TestCgroup::new("unit/join").unwrap();
        let path = cg.path().to_path_buf();
        assert!(path.is_dir());
        assert!(cg.id() > 1);
        let rel = path.strip_prefix(cgroup2_mount().unwrap()).unwrap();
        let want = format!("0::/{}", rel.display());

        let mut child = cg.command("sleep").arg("0.2").spawn().unwrap();
        let cgfile = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(cgfile.lines().any(|l| l == want), "{cgfile:?} lacks {want}");
        assert_eq!(cg.pids(), vec![child.id() as i32]);
        assert!(child.wait().unwrap().success());

        // A long-running child is killed by Drop and the directory goes away.
        let mut long = cg.command("sleep").arg("30").spawn().unwrap();
        let start = Instant::now();
        drop(cg);
        assert!(!path.exists());
        let status = long.wait().unwrap();
        assert!(!status.success());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn cleanup_on_panic() {
        let path = std::sync::Mutex::new(None);
        let r = std::panic::catch_unwind(|| {
            let cg = TestCgroup::new("unit-panic").unwrap();
            *path.lock().unwrap() = Some(cg.path().to_path_buf());
            panic!("boom");
        });
        assert!(r.is_err());
        assert!(!path.lock().unwrap().clone().unwrap().exists());
    }
}
