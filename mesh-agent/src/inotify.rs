//! Change notification for the config: inotify (Linux) on one directory,
//! read through tokio, without a dependency.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;

/// Changes seen in one read (a burst of events becomes one reload).
#[derive(Debug, Default)]
pub struct Events {
    /// Config files (`*.yaml`, not hidden) that were written, created,
    /// moved in or out, or removed.
    pub paths: Vec<PathBuf>,
    /// Something else changed that may hide config changes (Kubernetes'
    /// `..data` symlink swap, the directory itself): look at everything.
    pub others: bool,
    /// The kernel dropped events: look at everything.
    pub overflow: bool,
}

pub struct Inotify {
    fd: AsyncFd<OwnedFd>,
    dir: PathBuf,
}

impl Inotify {
    /// Watches `dir` for files being written, created, moved and removed.
    pub fn watch(dir: &Path) -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: inotify_init1 returned a new fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c_dir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_dir.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: we own the fd and it stays open as long as the AsyncFd.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            fd,
            dir: dir.to_owned(),
        })
    }

    /// Waits for the next changes and returns all that are queued.
    pub async fn next(&self) -> io::Result<Events> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut events = Events::default();
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: reading into our own buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    self.parse(&buf[..n], &mut events);
                    // Take whatever else is queued right now, then report.
                    loop {
                        // SAFETY: as above.
                        let n = unsafe {
                            libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                        };
                        if n <= 0 {
                            break;
                        }
                        self.parse(&buf[..n as usize], &mut events);
                    }
                    if events.paths.is_empty() && !events.others && !events.overflow {
                        continue;
                    }
                    events.paths.sort();
                    events.paths.dedup();
                    return Ok(events);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    fn parse(&self, mut bytes: &[u8], events: &mut Events) {
        const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
        while bytes.len() >= HEADER {
            // SAFETY: the kernel writes whole events; read the header
            // unaligned.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let len = event.len as usize;
            let name = &bytes[HEADER..(HEADER + len).min(bytes.len())];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            bytes = &bytes[(HEADER + len).min(bytes.len())..];
            if event.mask & libc::IN_Q_OVERFLOW != 0 {
                events.overflow = true;
                continue;
            }
            if event.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 || name.is_empty() {
                events.others = true;
                continue;
            }
            let name = OsStr::from_bytes(name);
            let text = name.to_string_lossy();
            if text.ends_with(".yaml") && !text.starts_with('.') {
                events.paths.push(self.dir.join(name));
            } else if text.starts_with("..") {
                // Kubernetes' atomic writer swaps `..data`.
                events.others = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_written_and_renamed_config_files() {
        let dir = std::env::temp_dir().join(format!("mesh-inotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let watch = Inotify::watch(&dir).unwrap();
        std::fs::write(dir.join("a.yaml.tmp"), "x").unwrap();
        std::fs::rename(dir.join("a.yaml.tmp"), dir.join("a.yaml")).unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        let events = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(events.paths, [dir.join("a.yaml")]);
        assert!(!events.overflow);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
