//! bpffs for the tests: the one place a test (or the harness on its behalf)
//! makes sure /sys/fs/bpf is a bpffs before pinning under it. A fresh machine
//! boots without it, and no test may count on an earlier one (or an agent it
//! ran) having mounted it.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf unless it is already there. The check and
/// the mount hold a lock on the directory (as the agent's and xtask's do),
/// so tests starting at once mount it once: a second mount stacked on the
/// first would hide what other tests pinned in it.
pub fn ensure_bpffs() -> Result<()> {
    if mounted()? {
        return Ok(());
    }
    let dir = File::open(BPFFS).with_context(|| format!("opening {BPFFS}"))?;
    dir.lock().with_context(|| format!("locking {BPFFS}"))?;
    if mounted()? {
        return Ok(());
    }
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "{BPFFS} is not a bpffs and mounting one failed: {} (the tests need root)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `/sys/fs/bpf/<name>`, with bpffs mounted there first.
pub fn bpffs_dir(name: &str) -> Result<PathBuf> {
    ensure_bpffs()?;
    Ok(Path::new(BPFFS).join(name))
}

fn mounted() -> Result<bool> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info.lines().any(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> … - <fstype> …"
        line.split_once(" - ").is_some_and(|(left, right)| {
            right.split(' ').next() == Some("bpf") && left.split(' ').nth(4) == Some(BPFFS)
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpffs_is_mounted_after_ensure() {
        let dir = bpffs_dir("x").unwrap();
        assert!(mounted().unwrap());
        assert_eq!(dir, Path::new("/sys/fs/bpf/x"));
        // A second call finds it and stacks no second mount.
        let at_bpffs = || {
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            info.lines()
                .filter(|l| l.split(' ').nth(4) == Some(BPFFS))
                .count()
        };
        let before = at_bpffs();
        ensure_bpffs().unwrap();
        assert_eq!(at_bpffs(), before);
    }
}
