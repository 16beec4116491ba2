//! `cargo xtask test --fresh`: the suite as a new user on a fresh machine
//! runs it, without a fresh machine. HEAD is cloned into a temporary
//! directory (no target dir, nothing built) and `cargo xtask test` runs
//! there, inside a private mount namespace in which every bpffs mount is
//! undone, so the run sees /sys/fs/bpf as a fresh boot leaves it.
//!
//! Safe on a shared machine: the host's mounts are never touched (the
//! namespace goes away with this process), and of the cgroups, network
//! namespaces, pins and temp dirs earlier runs left behind only those whose
//! creating process is gone are removed; see `leftovers`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{self, step};

/// Prefixes of what the test harness, the unit tests and the demo create;
/// each name ends in its creator's PID (and maybe a counter after it).
/// (`mesh-fresh-` is the clone of a `--fresh` run that was killed.)
const PREFIXES: &[&str] = &["mesh-test-", "mesh-unit-", "mesh-demo-", "mesh-fresh-"];

pub fn run(nextest_args: &[String]) -> Result<()> {
    let start = Instant::now();
    let root = util::workspace_root();
    let head = git(&root, &["rev-parse", "HEAD"])?;
    let short = &head[..head.len().min(12)];
    if !git(&root, &["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
        step(format!(
            "fresh: note: uncommitted changes are not tested, only HEAD ({short})"
        ));
    }

    let clone = std::env::temp_dir().join(format!("mesh-fresh-{}", std::process::id()));
    let _remove = RemoveOnDrop(clone.clone());
    step(format!(
        "fresh: cloning HEAD ({short}) into {}",
        clone.display()
    ));
    util::run(
        Command::new("git")
            .args(["clone", "--quiet", "--no-checkout", "--no-hardlinks"])
            .arg(&root)
            .arg(&clone),
    )?;
    util::run(
        Command::new("git")
            .arg("-C")
            .arg(&clone)
            .args(["checkout", "--quiet", "--detach", &head]),
    )?;

    leftovers::remove()?;
    private_mount_namespace_without_bpffs()?;

    step("fresh: running `cargo xtask test` in the clone");
    let mut test = util::cargo();
    test.current_dir(&clone)
        // The clone builds into its own target dir, from nothing.
        .env_remove("CARGO_TARGET_DIR")
        .args(["xtask", "test"]);
    if util::verbose() {
        test.arg("-v");
    }
    if !nextest_args.is_empty() {
        test.arg("--").args(nextest_args);
    }
    let result = util::run(&mut test);
    step(format!(
        "fresh: {} in {:.0} s; removing the clone (the host's mounts were never touched)",
        if result.is_ok() { "passed" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    ));
    result
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args(args);
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`", util::display(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            util::display(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Moves this process (and so everything it starts) into a mount namespace
/// of its own, with no propagation to or from the host, and unmounts every
/// bpffs there. The host keeps its mounts; ours vanish when we exit.
fn private_mount_namespace_without_bpffs() -> Result<()> {
    // SAFETY: unshare and mount take no pointers but the NUL-terminated
    // literals given; they change only this process's mount namespace.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error())
                .context("could not make a private mount namespace (unshare CLONE_NEWNS)");
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error())
                .context("could not make the new mount namespace private");
        }
    }
    // Deepest (latest) first, so a mount on top of another goes first.
    let mounts = util::mounts_of_type("bpf")?;
    for mount in mounts.iter().rev() {
        let path = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes())
            .context("a mount point with a NUL byte")?;
        // SAFETY: `path` is a valid NUL-terminated string for the call.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("could not unmount {}", mount.display()));
        }
    }
    if !util::mounts_of_type("bpf")?.is_empty() {
        bail!("bpffs is still mounted in the private mount namespace");
    }
    step(format!(
        "fresh: in a private mount namespace, unmounted bpffs ({}); the host keeps its own",
        if mounts.is_empty() {
            "none was mounted".to_owned()
        } else {
            mounts
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    Ok(())
}

/// What earlier runs left behind, removed only when provably finished.
mod leftovers {
    use super::*;

    pub fn remove() -> Result<()> {
        let mut removed = Vec::new();
        let mut kept = Vec::new();
        let cgroup_root = util::cgroup2_mount()?;
        for path in finished_entries(&cgroup_root) {
            match remove_cgroup(&path) {
                Ok(()) => removed.push(format!("cgroup {}", path.display())),
                Err(e) => kept.push(format!("cgroup {}: {e}", path.display())),
            }
        }
        let bpffs = Path::new("/sys/fs/bpf");
        if util::mounts_of_type("bpf")?.iter().any(|m| m == bpffs) {
            for path in finished_entries(bpffs) {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => removed.push(format!("pins {}", path.display())),
                    Err(e) => kept.push(format!("pins {}: {e}", path.display())),
                }
            }
        }
        for path in finished_entries(&std::env::temp_dir()) {
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match gone {
                Ok(()) => removed.push(format!("temp {}", path.display())),
                Err(e) => kept.push(format!("temp {}: {e}", path.display())),
            }
        }
        let netns = util::probe(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
        for name in netns.lines().filter_map(|l| l.split_whitespace().next()) {
            if !is_finished(name) {
                continue;
            }
            match util::probe(Command::new("ip").args(["netns", "del", name])) {
                Some(_) => removed.push(format!("netns {name}")),
                None => kept.push(format!("netns {name}: `ip netns del` failed")),
            }
        }
        if removed.is_empty() {
            step("fresh: no leftovers of finished runs on the host");
        } else {
            step(format!(
                "fresh: removed {} leftover(s) of finished runs (their creating PID is gone):",
                removed.len()
            ));
            for r in &removed {
                println!("    {r}");
            }
        }
        for k in &kept {
            println!("    kept {k}");
        }
        Ok(())
    }

    /// Entries of `dir` named by a project prefix whose creator has exited.
    fn finished_entries(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(is_finished))
            .map(|e| e.path())
            .collect();
        found.sort();
        found
    }

    /// True if `name` is one of ours and the process that made it is gone
    /// (a live PID, even if reused by something else, keeps it).
    pub(super) fn is_finished(name: &str) -> bool {
        PREFIXES.iter().any(|p| name.starts_with(p))
            && creator_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    }

    /// `…-<pid>-<n>` (the harness's names) or `…-<pid>`.
    pub(super) fn creator_pid(name: &str) -> Option<u32> {
        let mut fields = name.rsplit('-');
        let last: u32 = fields.next()?.parse().ok()?;
        let pid = match fields.next()?.parse::<u32>() {
            Ok(pid) => pid,
            Err(_) => last,
        };
        (pid > 1).then_some(pid)
    }

    /// A finished run's cgroup holds no processes; one that does is not
    /// provably finished and is kept. Children go first.
    fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path())?;
            }
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            return Err(std::io::Error::other("still has processes"));
        }
        std::fs::remove_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::leftovers::{creator_pid, is_finished};

    #[test]
    fn reads_the_creator_pid_from_a_name() {
        assert_eq!(creator_pid("mesh-test-unit-agent-4242-3"), Some(4242));
        assert_eq!(creator_pid("mesh-test-4242-0"), Some(4242));
        assert_eq!(creator_pid("mesh-test-atomic-4242"), Some(4242));
        assert_eq!(creator_pid("mesh-demo-77"), Some(77));
        assert_eq!(creator_pid("mesh-test-agent"), None);
    }

    #[test]
    fn a_live_creator_keeps_its_leftovers() {
        let me = std::process::id();
        assert!(!is_finished(&format!("mesh-test-x-{me}-0")));
        assert!(!is_finished(&format!("mesh-unit-migrate-{me}")));
        assert!(!is_finished(&format!("someone-else-{}-0", u32::MAX - 1)));
        // PIDs never reach u32::MAX - 1 (pid_max is at most 2^22).
        assert!(is_finished(&format!("mesh-test-x-{}-0", u32::MAX - 1)));
    }
}
