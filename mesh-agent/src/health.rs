//! Backend health: active checks (TCP connect, HTTP GET) run by the agent
//! from its own marked sockets, and passive outlier detection from the
//! kernel's count of failed connects. Unhealthy backends take no new
//! connections until they recover; when a whole service is unhealthy, its
//! panic mode decides.

mod probe;
mod response;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::bpf::Maps;
use crate::reconcile::{Reconciler, service_keys};
use crate::state::{BackendState, DesiredState, HealthCheck, PanicMode};
use probe::Probe;

/// One backend of one service.
type Target = (String, SocketAddr);

/// Ejections in a row multiply the ejection time, up to this factor.
const MAX_EJECTION_FACTOR: u32 = 10;

#[derive(Clone, Debug, Default)]
struct Status {
    /// The active checks' verdict (true until they say otherwise).
    unhealthy: bool,
    successes: u32,
    failures: u32,
    /// Passive detection: ejected until then.
    ejected_until: Option<Instant>,
    /// Ejections in a row, for the back-off; forgotten after a quiet spell.
    ejections: u32,
    last_ejection: Option<Instant>,
    transitions: u64,
}

/// What `meshctl` shows for a backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Failed its active checks.
    Unhealthy,
    /// Ejected by outlier detection.
    Ejected,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Ejected => "ejected",
        }
    }
}

pub struct HealthMonitor {
    mark: u32,
    statuses: Arc<Mutex<BTreeMap<Target, Status>>>,
    /// Running checks, by target and the check they run.
    checks: BTreeMap<Target, (HealthCheck, JoinHandle<()>)>,
    changed: mpsc::UnboundedSender<()>,
    /// Services currently in panic mode, to say so once per episode.
    panicking: BTreeSet<String>,
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        for (_, task) in self.checks.values() {
            task.abort();
        }
    }
}

impl HealthMonitor {
    /// `mark` is set on every check socket so the programs leave it alone.
    /// The receiver wakes whenever a backend's health changes.
    pub fn new(mark: u32) -> (Self, mpsc::UnboundedReceiver<()>) {
        let (changed, rx) = mpsc::unbounded_channel();
        let monitor = Self {
            mark,
            statuses: Arc::default(),
            checks: BTreeMap::new(),
            changed,
            panicking: BTreeSet::new(),
        };
        (monitor, rx)
    }

    fn statuses(&self) -> MutexGuard<'_, BTreeMap<Target, Status>> {
        self.statuses.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts checks for new backends, restarts changed ones, stops those of
    /// backends and services that are gone. Must run inside a tokio runtime.
    pub fn sync(&mut self, source: &DesiredState) {
        let mut wanted: BTreeMap<Target, HealthCheck> = BTreeMap::new();
        for svc in &source.services {
            for b in &svc.backends {
                if let Some(check) = &svc.health_check {
                    wanted.insert((svc.name.clone(), b.socket_addr()), check.clone());
                }
            }
        }
        self.checks.retain(|target, (check, task)| {
            let keep = wanted.get(target) == Some(check);
            if !keep {
                task.abort();
            }
            keep
        });
        for (target, check) in wanted {
            if self.checks.contains_key(&target) {
                continue;
            }
            let task = tokio::spawn(run_checks(
                target.clone(),
                check.clone(),
                self.mark,
                self.statuses.clone(),
                self.changed.clone(),
            ));
            self.checks.insert(target, (check, task));
        }
        // Forget what no source mentions any more.
        let known: BTreeSet<Target> = source
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (s.name.clone(), b.socket_addr())))
            .collect();
        self.statuses().retain(|target, _| known.contains(target));
    }

    /// Reads the kernel's failure streaks and ejects or readmits backends of
    /// services with outlier detection. True when anything changed.
    pub fn observe_outliers(
        &self,
        effective: &DesiredState,
        reconciler: &Reconciler,
        maps: &mut Maps,
        now: Instant,
    ) -> bool {
        let mut changed = false;
        let mut statuses = self.statuses();
        for svc in &effective.services {
            let Some(outlier) = &svc.outlier_detection else {
                continue;
            };
            let programmed: Vec<_> = service_keys(svc)
                .filter_map(|k| reconciler.service(&k))
                .collect();
            for b in &svc.backends {
                let target = (svc.name.clone(), b.socket_addr());
                let status = statuses.entry(target).or_default();
                if status.ejected_until.is_some_and(|until| until <= now) {
                    status.ejected_until = None;
                    status.transitions += 1;
                    changed = true;
                    info!(service = %svc.name, backend = %b.socket_addr(), "ejection over: back in rotation");
                }
                let quiet =
                    Duration::from_millis(u64::from(outlier.ejection_ms)) * MAX_EJECTION_FACTOR;
                if status
                    .last_ejection
                    .is_some_and(|t| now.duration_since(t) > quiet)
                {
                    status.ejections = 0;
                }
                if status.ejected_until.is_some() {
                    continue;
                }
                for p in &programmed {
                    let Some(&id) = p.backends.get(&(b.address, b.port)) else {
                        continue;
                    };
                    let streak = maps
                        .backend_health
                        .get(&id, 0)
                        .map_or(0, |h| h.consecutive_failures);
                    if streak < outlier.consecutive_failures {
                        continue;
                    }
                    status.ejections = (status.ejections + 1).min(MAX_EJECTION_FACTOR);
                    let time =
                        Duration::from_millis(u64::from(outlier.ejection_ms)) * status.ejections;
                    status.ejected_until = Some(now + time);
                    status.last_ejection = Some(now);
                    status.transitions += 1;
                    changed = true;
                    // The streak that caused this ejection is spent.
                    let _ = maps
                        .backend_health
                        .set(id, mesh_common::BackendHealth::default(), 0);
                    warn!(
                        service = %svc.name,
                        backend = %b.socket_addr(),
                        failures = streak,
                        ejected_for = ?time,
                        "ejected: connects keep failing"
                    );
                    break;
                }
            }
        }
        changed
    }

    /// Marks unhealthy and ejected backends in `state` so they get no new
    /// connections, unless that would leave a service with none and its panic
    /// mode says to keep sending to all. Returns the services in panic.
    pub fn overlay(&mut self, state: &mut DesiredState, now: Instant) -> Vec<String> {
        let statuses = self.statuses().clone();
        let mut panicking = BTreeSet::new();
        for svc in &mut state.services {
            let down = |addr: SocketAddr| {
                statuses
                    .get(&(svc.name.clone(), addr))
                    .is_some_and(|s| s.unhealthy || s.ejected_until.is_some_and(|t| t > now))
            };
            let candidates: Vec<usize> = (0..svc.backends.len())
                .filter(|&i| svc.backends[i].state == BackendState::Active)
                .collect();
            let down_ones: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&i| down(svc.backends[i].socket_addr()))
                .collect();
            if down_ones.is_empty() {
                continue;
            }
            if down_ones.len() == candidates.len() && svc.panic_mode == PanicMode::All {
                panicking.insert(svc.name.clone());
                continue;
            }
            for i in down_ones {
                svc.backends[i].state = BackendState::Unhealthy;
            }
        }
        for name in panicking.difference(&self.panicking) {
            warn!(
                service = %name,
                "PANIC: every backend is unhealthy; sending to all of them (panic_mode: all)"
            );
        }
        for name in self.panicking.difference(&panicking) {
            info!(service = %name, "panic over: healthy backends again");
        }
        self.panicking = panicking;
        self.panicking.iter().cloned().collect()
    }

    pub fn health(&self, service: &str, addr: SocketAddr, now: Instant) -> Health {
        match self.statuses().get(&(service.to_owned(), addr)) {
            Some(s) if s.ejected_until.is_some_and(|t| t > now) => Health::Ejected,
            Some(s) if s.unhealthy => Health::Unhealthy,
            _ => Health::Healthy,
        }
    }

    /// Health changes of a backend so far.
    pub fn transitions(&self, service: &str, addr: SocketAddr) -> u64 {
        self.statuses()
            .get(&(service.to_owned(), addr))
            .map_or(0, |s| s.transitions)
    }
}

/// Checks one backend forever (until aborted), recording verdicts and
/// waking the agent when the backend's health flips.
async fn run_checks(
    target: Target,
    check: HealthCheck,
    mark: u32,
    statuses: Arc<Mutex<BTreeMap<Target, Status>>>,
    changed: mpsc::UnboundedSender<()>,
) {
    let interval = Duration::from_millis(u64::from(check.interval_ms));
    let timeout = Duration::from_millis(u64::from(check.timeout_ms));
    // Lives as long as the task: an HTTP check keeps its connection here.
    let mut probe = Probe::new(target.1, &check.kind, mark);
    loop {
        let jitter = jitter(interval, check.jitter_percent);
        tokio::time::sleep_until(on_tick(Instant::now() + interval + jitter, interval).into())
            .await;
        let passed = match tokio::time::timeout(timeout, probe.run()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                debug!(service = %target.0, backend = %target.1, error = %e, "check failed");
                false
            }
            Err(_) => {
                debug!(service = %target.0, backend = %target.1, ?timeout, "check timed out");
                false
            }
        };
        let flipped = {
            let mut statuses = statuses.lock().unwrap_or_else(|p| p.into_inner());
            // Looked up before inserting: a clone of the target per check
            // would be most of this task's own allocations.
            match statuses.get_mut(&target) {
                Some(status) => record(status, passed, &check),
                None => record(statuses.entry(target.clone()).or_default(), passed, &check),
            }
        };
        if flipped {
            if passed {
                info!(service = %target.0, backend = %target.1, "healthy again");
            } else {
                warn!(service = %target.0, backend = %target.1, "unhealthy: taken out of rotation");
            }
            let _ = changed.send(());
        }
    }
}

/// Counts a verdict; true when it flips the backend's health.
fn record(status: &mut Status, passed: bool, check: &HealthCheck) -> bool {
    if passed {
        status.successes += 1;
        status.failures = 0;
        if status.unhealthy && status.successes >= check.healthy_threshold {
            status.unhealthy = false;
            status.transitions += 1;
            return true;
        }
    } else {
        status.failures += 1;
        status.successes = 0;
        if !status.unhealthy && status.failures >= check.unhealthy_threshold {
            status.unhealthy = true;
            status.transitions += 1;
            return true;
        }
    }
    false
}

/// Checks are due on a common grid of ticks (10 ms, or a tenth of a
/// shorter interval), so the checks due close together run on one wakeup
/// of the agent instead of one each: at 1,000 checks a second that is a
/// hundred wakeups instead of a thousand.
fn on_tick(due: Instant, interval: Duration) -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    let tick = (interval / 10).clamp(Duration::from_millis(1), Duration::from_millis(10));
    let since = due.saturating_duration_since(start).as_nanos();
    let tick_ns = tick.as_nanos();
    let ticks = since.div_ceil(tick_ns);
    start + Duration::from_nanos(u64::try_from(ticks * tick_ns).unwrap_or(u64::MAX))
}

fn jitter(interval: Duration, percent: u32) -> Duration {
    if percent == 0 {
        return Duration::ZERO;
    }
    // Cheap, good-enough spread: the clock's nanoseconds.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    interval.mul_f64(f64::from(percent) / 100.0 * f64::from(nanos % 1000) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::state::CheckKind;

    fn check() -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval_ms: 100,
            timeout_ms: 100,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            jitter_percent: 0,
        }
    }

    #[test]
    fn thresholds_decide_when_health_flips() {
        let mut s = Status::default();
        assert!(!record(&mut s, false, &check()));
        assert!(!record(&mut s, false, &check()));
        assert!(record(&mut s, false, &check()), "third failure flips");
        assert!(s.unhealthy);
        assert!(!record(&mut s, true, &check()));
        assert!(
            !record(&mut s, false, &check()),
            "a failure resets the streak"
        );
        assert!(!record(&mut s, true, &check()));
        assert!(
            record(&mut s, true, &check()),
            "two successes in a row flip back"
        );
        assert_eq!(s.transitions, 2);
    }

    #[test]
    fn jitter_stays_within_its_share() {
        let interval = Duration::from_millis(1000);
        for _ in 0..100 {
            assert!(jitter(interval, 10) <= Duration::from_millis(100));
        }
        assert_eq!(jitter(interval, 0), Duration::ZERO);
    }
}
