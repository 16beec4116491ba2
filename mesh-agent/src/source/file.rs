//! The file source: the YAML file or directory of `config/`, read again on
//! SIGHUP, when inotify reports a change, and when the poll sees the file's
//! (or a directory file's) size, times or inode change, which also catches
//! the symlink swap Kubernetes does for a mounted ConfigMap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::config::{ConfigError, ConfigSource, Scope, Update};
use crate::inotify::Inotify;
use crate::state::ServiceSet;

pub struct FileSource {
    config: ConfigSource,
    /// Watch with inotify; the poll every `interval` is the fallback and
    /// catches what inotify cannot.
    inotify: bool,
    interval: Duration,
}

/// How the file source notices changes; the agent's loop owns it.
pub struct FileChanges {
    path: PathBuf,
    is_dir: bool,
    hangup: Signal,
    inotify: Option<Inotify>,
    poll: tokio::time::Interval,
    last_stamp: Option<Stamp>,
}

/// What tells whether a file changed without reading it (None: missing).
type Stamp = (u64, i64, i64, i64, i64, u64);

impl FileSource {
    /// Reads `path` (a file or a directory of `*.yaml` files) for the first
    /// time. An error here is fatal: there is no earlier state to keep.
    pub fn open(
        path: &Path,
        inotify: bool,
        interval: Duration,
    ) -> Result<(Self, Update), ConfigError> {
        let config = ConfigSource::new(path);
        let first = config.load(&Scope::All)?;
        Ok((
            Self {
                config,
                inotify,
                interval,
            },
            first,
        ))
    }

    pub fn path(&self) -> &Path {
        self.config.path()
    }

    pub fn current(&self) -> &ServiceSet {
        self.config.current()
    }

    pub fn commit(&mut self, update: Update) {
        self.config.commit(update);
    }

    /// Starts noticing changes: SIGHUP, inotify, the poll.
    pub fn changes(&self) -> std::io::Result<FileChanges> {
        let (path, interval) = (self.config.path(), self.interval);
        let inotify = self
            .inotify
            .then(|| {
                // A file is watched through its directory: editors and
                // Kubernetes replace files by renaming.
                let dir = if self.config.is_dir() {
                    path.to_owned()
                } else {
                    path.parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new("."))
                        .to_owned()
                };
                Inotify::watch(&dir)
                    .inspect_err(|e| {
                        warn!(dir = %dir.display(), "inotify unavailable, polling every {interval:?}: {e}")
                    })
                    .ok()
            })
            .flatten();
        Ok(FileChanges {
            path: path.to_owned(),
            is_dir: self.config.is_dir(),
            hangup: signal(SignalKind::hangup())?,
            inotify,
            poll: tokio::time::interval(interval),
            last_stamp: stamp(path),
        })
    }

    /// Reads what `scope` names again; None when nothing of the
    /// configuration changed there (an editor's temporary file).
    pub fn load(&self, scope: &Scope) -> Option<Result<Update, ConfigError>> {
        let update = self.config.load(scope);
        if matches!(&update, Ok(u) if u.is_empty()) && matches!(scope, Scope::Paths(_)) {
            return None;
        }
        Some(update)
    }
}

impl FileChanges {
    /// Waits until the configuration may have changed, and says what to
    /// read again. Cancel-safe (the loop selects on it).
    pub async fn next(&mut self) -> Scope {
        let Self {
            path,
            is_dir,
            hangup,
            inotify,
            poll,
            last_stamp,
        } = self;
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    info!("SIGHUP: reloading {}", path.display());
                    *last_stamp = stamp(path);
                    return Scope::All;
                }
                events = async { inotify.as_ref().expect("guarded").next().await }, if inotify.is_some() => {
                    match events {
                        Ok(events) if events.overflow => return Scope::All,
                        Ok(events) if *is_dir => {
                            if events.others {
                                return Scope::All;
                            }
                            if !events.paths.is_empty() {
                                return Scope::Paths(events.paths);
                            }
                        }
                        Ok(_) => {
                            let now = stamp(path);
                            if now != *last_stamp {
                                info!("{} changed: reloading", path.display());
                                *last_stamp = now;
                                return Scope::All;
                            }
                        }
                        Err(e) => warn!("reading inotify events failed: {e}"),
                    }
                }
                _ = poll.tick() => {
                    if *is_dir {
                        // Without inotify, a directory is scanned each tick
                        // (one stat per file; only changed files are read).
                        if inotify.is_none() {
                            return Scope::All;
                        }
                    } else {
                        let now = stamp(path);
                        if now != *last_stamp {
                            *last_stamp = now;
                            return Scope::All;
                        }
                    }
                }
            }
        }
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
    ))
}
