//! What the kernel-facing tests, the demo and the benchmark assume about the
//! host, checked (and where it is safe, made so) by `cargo xtask setup`:
//! bpffs at /sys/fs/bpf, a cgroup v2 mount, and a memlock limit that lets
//! BPF maps be made. A fresh machine may have none of these in place.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::util::{self, step};

const BPFFS: &str = "/sys/fs/bpf";

/// Checks every assumption; mounts bpffs if needed and we are root. Without
/// root (a plain `cargo xtask setup` for building) a missing mount is only
/// reported: building needs none of this.
pub fn check() -> Result<()> {
    bpffs()?;
    cgroup2()?;
    memlock();
    Ok(())
}

fn bpffs() -> Result<()> {
    if bpffs_mounted()? {
        step(format!("setup: bpffs at {BPFFS} ... mounted"));
        return Ok(());
    }
    if !util::is_root() {
        step(format!(
            "setup: bpffs at {BPFFS} ... not mounted; the tests and the demo (run as root) \
             mount it, or `sudo mount -t bpf bpf {BPFFS}`"
        ));
        return Ok(());
    }
    if mount_bpffs()? {
        step(format!(
            "setup: bpffs at {BPFFS} ... was not mounted, mounted it"
        ));
    } else {
        step(format!("setup: bpffs at {BPFFS} ... mounted"));
    }
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    Ok(util::mounts_of_type("bpf")?
        .iter()
        .any(|m| m == Path::new(BPFFS)))
}

/// Mounts bpffs at /sys/fs/bpf unless it is there; true if we mounted it.
/// The check and the mount hold a lock on the directory, as the agent's and
/// the test harness's do, so that two runs starting at once on a fresh
/// machine do not stack two mounts (pins made in the lower one would vanish
/// from view).
fn mount_bpffs() -> Result<bool> {
    let dir = File::open(BPFFS).with_context(|| format!("could not open {BPFFS}"))?;
    dir.lock()
        .with_context(|| format!("could not lock {BPFFS}"))?;
    if bpffs_mounted()? {
        return Ok(false);
    }
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .context("could not run mount")?;
    if !out.status.success() {
        bail!(
            "mounting bpffs at {BPFFS} failed: {}; the tests need it: mount it with \
             `mount -t bpf bpf {BPFFS}`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(true)
}

fn cgroup2() -> Result<()> {
    match util::cgroup2_mount() {
        Ok(mount) => {
            step(format!(
                "setup: cgroup v2 ... mounted at {}",
                mount.display()
            ));
            Ok(())
        }
        // Mounting one ourselves could clash with how this host's init uses
        // its cgroups; that is for its administrator to decide.
        Err(e) if util::is_root() => {
            Err(e).context("the tests, the demo and the agent attach to a cgroup v2")
        }
        Err(e) => {
            step(format!("setup: cgroup v2 ... {e:#}"));
            Ok(())
        }
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (often 8 MiB, too
/// little for the agent's maps); later ones charge the memory cgroup. Where
/// it matters, raise the limit for this run (the tests inherit it).
fn memlock() {
    let kernel = kernel_release();
    if kernel.is_some_and(|v| v >= (5, 11)) {
        step("setup: memlock limit ... not used for BPF by this kernel (5.11+)");
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0;
    if ok && limit.rlim_cur == libc::RLIM_INFINITY {
        step("setup: memlock limit ... unlimited");
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct given.
    if util::is_root() && unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        step("setup: memlock limit ... raised to unlimited for this run");
    } else {
        step(format!(
            "setup: memlock limit ... {} KiB on an old kernel; BPF maps may fail to load \
             (run as root, or raise it with `ulimit -l unlimited`)",
            limit.rlim_cur / 1024
        ));
    }
}

/// (major, minor) of the running kernel.
fn kernel_release() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_release(&text)
}

fn parse_release(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v1045\n"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("junk"), None);
    }
}
