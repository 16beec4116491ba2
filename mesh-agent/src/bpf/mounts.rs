//! Finding the cgroup v2 and bpffs mounts. Neither is always where one
//! expects: some nodes mount cgroup v2 at /sys/fs/cgroup/unified, and bpffs
//! may not be mounted at all on a fresh machine.

use std::{
    io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[source] io::Error),
    #[error("no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo for type cgroup2)")]
    NoCgroup2,
    #[error(
        "{path} is not on a bpffs and mounting one at /sys/fs/bpf failed: {source}; mount it with `mount -t bpf bpf /sys/fs/bpf`"
    )]
    Bpffs { path: PathBuf, source: io::Error },
}

/// One line of /proc/self/mountinfo: mount point and filesystem type.
fn mounts() -> Result<Vec<(PathBuf, String)>, MountError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String)> {
    // Fields: id parent major:minor root mount-point options [optional...] - fstype source ...
    let mut fields = line.split(' ');
    let mount_point = fields.nth(4)?;
    let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
    Some((PathBuf::from(unescape(mount_point)), fstype.to_owned()))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The mount point of the cgroup v2 hierarchy.
pub fn cgroup2_mount() -> Result<PathBuf, MountError> {
    mounts()?
        .into_iter()
        .find(|(_, fstype)| fstype == "cgroup2")
        .map(|(path, _)| path)
        .ok_or(MountError::NoCgroup2)
}

/// Makes sure `pin_root` will be on a bpffs, mounting one at /sys/fs/bpf if
/// nothing covers it yet (as Cilium's agent does on a fresh node).
///
/// The check and the mount hold a lock on /sys/fs/bpf itself, so agents (or
/// tests) starting at once on a fresh node mount it once: a second mount
/// stacked on the first would hide whatever was pinned in the first.
pub fn ensure_bpffs(pin_root: &Path) -> Result<(), MountError> {
    let covered = || -> Result<bool, MountError> {
        Ok(mounts()?
            .iter()
            .any(|(mount_point, fstype)| fstype == "bpf" && pin_root.starts_with(mount_point)))
    };
    if covered()? {
        return Ok(());
    }
    let target = Path::new("/sys/fs/bpf");
    let fail = |source| MountError::Bpffs {
        path: pin_root.to_owned(),
        source,
    };
    if !pin_root.starts_with(target) {
        return Err(fail(io::Error::other(
            "the pin root is outside /sys/fs/bpf",
        )));
    }
    // Whoever held the lock before us may have mounted it meanwhile. (A
    // process that opens the directory after that mount locks the new
    // root instead, but then it also sees the mount.)
    let dir = std::fs::File::open(target).map_err(fail)?;
    dir.lock().map_err(fail)?;
    if covered()? {
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
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_optional_fields() {
        let line = "41 23 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_mountinfo_line(line),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "cgroup2".into()))
        );
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let line = "50 23 0:40 / /mnt/with\\040space rw - bpf bpf rw";
        assert_eq!(
            parse_mountinfo_line(line),
            Some((PathBuf::from("/mnt/with space"), "bpf".into()))
        );
    }

    #[test]
    fn finds_this_machines_cgroup2_mount() {
        let mount = cgroup2_mount().expect("cgroup v2 is mounted on every supported node");
        assert!(mount.join("cgroup.controllers").exists());
    }
}
