//! Reload on change: the identity directory's three files are polled (their
//! metadata, every `poll`), which also sees atomic renames and Kubernetes'
//! symlink swaps, and reloaded once a change has settled for one poll (so
//! cert.pem and key.pem written one after the other are read together). A
//! failed reload keeps the current certificate, is retried with backoff and
//! on the next change, is logged once per distinct error, and shows in
//! `meshctl certs` ([`ReloadStatus`]) and in `mesh_identity_reloads_total`.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::ca::{BUNDLE_FILE, CERT_FILE, KEY_FILE};
use super::{IdentityError, IdentityMetrics, NodeCredentials};

/// How the watcher polls and backs off.
#[derive(Clone, Copy, Debug)]
pub struct WatchSettings {
    /// How often the files' metadata is read.
    pub poll: Duration,
    /// The first retry after a failed reload; doubled per failure.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(250),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// What the reloads of one identity did, for `meshctl certs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// Unix seconds of the last load that succeeded (the first included).
    pub last_reload_unix: Option<i64>,
    /// Reloads that succeeded / failed since the agent started.
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// The last failure, until a reload succeeds again.
    pub last_error: Option<String>,
    /// Its short label (`bad_file`, `key_mismatch`, `wrong_spiffe_id`, ...).
    pub last_error_reason: Option<String>,
    pub last_error_unix: Option<i64>,
    /// Failures in a row.
    pub failures: u64,
    /// When the watcher tries again (after a failure; a change of the files
    /// is tried at once).
    pub next_retry_unix: Option<i64>,
}

impl ReloadStatus {
    pub(crate) fn succeeded(&mut self) {
        self.last_reload_unix = Some(unix_now());
        self.reloads_ok += 1;
        self.last_error = None;
        self.last_error_reason = None;
        self.last_error_unix = None;
        self.failures = 0;
        self.next_retry_unix = None;
    }

    pub(crate) fn failed(&mut self, e: &IdentityError) {
        self.reloads_failed += 1;
        self.failures += 1;
        self.last_error = Some(e.to_string());
        self.last_error_reason = Some(e.reason().to_owned());
        self.last_error_unix = Some(unix_now());
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One file's metadata as far as a change is concerned; `None`: unreadable.
type Stamp = Option<[i64; 7]>;

fn stamp(path: &Path) -> Stamp {
    // metadata() follows symlinks: a swapped `..data` link changes it.
    let m = std::fs::metadata(path).ok()?;
    Some([
        m.dev() as i64,
        m.ino() as i64,
        m.size() as i64,
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ])
}

fn stamps(dir: &Path) -> [Stamp; 3] {
    [CERT_FILE, KEY_FILE, BUNDLE_FILE].map(|name| stamp(&dir.join(name)))
}

/// Watches `credentials`' directory until the task is aborted. Call it
/// right after loading them: changes from now on are seen.
pub fn spawn_watcher(
    credentials: NodeCredentials,
    metrics: IdentityMetrics,
    settings: WatchSettings,
) -> JoinHandle<()> {
    // Taken here, not in the task, so a change made before the task first
    // runs is not mistaken for the starting point.
    let seen = stamps(credentials.dir());
    tokio::spawn(async move { watch(credentials, metrics, settings, seen).await })
}

async fn watch(
    credentials: NodeCredentials,
    metrics: IdentityMetrics,
    settings: WatchSettings,
    mut seen: [Stamp; 3],
) {
    let dir = credentials.dir().to_owned();
    let mut dirty = false;
    let mut retry_at: Option<Instant> = None;
    let mut backoff = settings.min_backoff;
    let mut logged: Option<String> = None;
    let mut tick = tokio::time::interval(settings.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned_expiry = 0;
    loop {
        tick.tick().await;
        warned_expiry = warn_near_expiry(&credentials, warned_expiry);
        let now = stamps(&dir);
        if now != seen {
            // Wait for it to settle: the next poll reloads if nothing moved.
            seen = now;
            dirty = true;
            continue;
        }
        let retry_due = retry_at.is_some_and(|at| Instant::now() >= at);
        if !dirty && !retry_due {
            continue;
        }
        dirty = false;
        match credentials.reload() {
            Ok(changed) => {
                metrics.reloaded(true);
                retry_at = None;
                backoff = settings.min_backoff;
                if logged.take().is_some() {
                    tracing::info!(dir = %dir.display(), changed, "identity reload succeeded again");
                }
            }
            Err(e) => {
                metrics.reloaded(false);
                let text = e.to_string();
                if logged.as_deref() != Some(text.as_str()) {
                    tracing::warn!(
                        reason = e.reason(),
                        retry_in = ?backoff,
                        "{text}"
                    );
                    logged = Some(text);
                }
                retry_at = Some(Instant::now() + backoff);
                let secs = i64::try_from(backoff.as_secs()).unwrap_or(i64::MAX);
                credentials.set_next_retry(Some(unix_now().saturating_add(secs.max(1))));
                backoff = (backoff * 2).min(settings.max_backoff);
            }
        }
    }
}

/// Warns once per generation when the certificate in use enters its last
/// quarter (at most 10 minutes: the tunnel's retirement margin, see
/// `tunnel::lifetime`) unrenewed: tunnel connections opened from then on
/// are cut at its expiry. Returns the generation warned about.
fn warn_near_expiry(credentials: &NodeCredentials, warned: u64) -> u64 {
    let info = credentials.info();
    if info.generation == warned {
        return warned;
    }
    let lifetime = (info.not_after - info.not_before).max(0);
    let margin = (lifetime / 4).min(600);
    let left = info.not_after - unix_now();
    if left > margin {
        return warned;
    }
    tracing::warn!(
        spiffe_id = %info.spiffe_id,
        serial = %info.serial,
        seconds_left = left,
        dir = %info.dir.display(),
        "the node certificate expires soon and has not been renewed; issue a new one \
         (`meshctl ca issue`): tunnel connections end at its expiry"
    );
    info.generation
}

#[cfg(test)]
mod tests {
    use super::super::ca::{CA_CERT, Subject};
    use super::super::testutil::*;
    use super::*;

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn fast() -> WatchSettings {
        WatchSettings {
            poll: Duration::from_millis(20),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn a_new_certificate_is_picked_up_and_a_broken_one_kept_out() {
        let ca = new_ca(TD);
        let dir = node_dir(&ca, "a");
        let creds = NodeCredentials::load(dir.path()).unwrap();
        let metrics = IdentityMetrics::unregistered();
        let mut generations = creds.subscribe();
        let task = spawn_watcher(creds.clone(), metrics.clone(), fast());
        let first = creds.info();
        assert_eq!(first.generation, 1);

        // Re-issued into the directory: a new serial, a new generation.
        issue_into(
            &ca,
            Subject::Node("a".into()),
            window(-60, 3600),
            dir.path(),
        );
        tokio::time::timeout(Duration::from_secs(10), generations.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*generations.borrow_and_update(), 2);
        let second = creds.info();
        assert_ne!(second.serial, first.serial);
        assert_eq!(second.generation, 2);
        assert_eq!(metrics.reloads(true), 1);

        // Garbage: kept out, counted, retried, visible; nothing else changes.
        std::fs::write(dir.join(CERT_FILE), "garbage").unwrap();
        eventually("a failed reload", || metrics.reloads(false) >= 1).await;
        let status = creds.reload_status();
        assert_eq!(
            status.last_error_reason.as_deref(),
            Some("bad_file"),
            "{status:?}"
        );
        assert!(status.next_retry_unix.is_some(), "{status:?}");
        assert_eq!(creds.info(), second);
        eventually("a retry", || metrics.reloads(false) >= 2).await;
        assert!(!generations.has_changed().unwrap());

        // Fixed: back to normal.
        issue_into(
            &ca,
            Subject::Node("a".into()),
            window(-60, 3600),
            dir.path(),
        );
        std::fs::copy(ca.join(CA_CERT), dir.join(BUNDLE_FILE)).unwrap();
        eventually("a recovery", || creds.info().generation == 3).await;
        let status = creds.reload_status();
        assert_eq!(status.last_error, None, "{status:?}");
        assert_eq!(status.next_retry_unix, None);
        task.abort();
    }

    #[tokio::test]
    async fn the_same_files_again_keep_the_generation() {
        let ca = new_ca(TD);
        let dir = node_dir(&ca, "a");
        let creds = NodeCredentials::load(dir.path()).unwrap();
        let cert = std::fs::read(dir.join(CERT_FILE)).unwrap();
        std::fs::write(dir.join(CERT_FILE), &cert).unwrap();
        assert!(!creds.reload().unwrap());
        assert_eq!(creds.info().generation, 1);
        assert_eq!(creds.reload_status().reloads_ok, 1);
    }
}
