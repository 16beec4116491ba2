//! Metrics of the reconcile loop: how long `Reconciler::apply` takes, how
//! reloads end, the sockets destroyed for removed backends, and the socket
//! state an upgrade carried.

use std::{
    sync::atomic::AtomicU64,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// `result` of a configuration reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

pub const RESULT_SUCCESS: &str = "success";
pub const RESULT_FAILURE: &str = "failure";

#[derive(Clone, Debug)]
pub struct Metrics {
    duration: Histogram,
    reloads: Family<ReloadLabels, Counter>,
    last_success: Gauge<f64, AtomicU64>,
    sockets_destroyed: Counter,
    migrated: Counter,
}

/// Buckets from 100 µs to about 3.3 s: a small config applies in well
/// under a millisecond, a large maglev one in tens of milliseconds.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_1, 2.0, 16)
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            duration: Histogram::new(duration_buckets()),
            reloads: Family::default(),
            last_success: Gauge::default(),
            sockets_destroyed: Counter::default(),
            migrated: Counter::default(),
        };
        // The unit is in the name but not declared with `# UNIT`: some
        // OpenMetrics parsers (openmetrics-parser 0.5) refuse a unit on a
        // histogram, and Prometheus needs only the name.
        registry.register(
            "mesh_reconcile_duration_seconds",
            "Time one Reconciler::apply took to write a desired state to the kernel's maps",
            metrics.duration.clone(),
        );
        registry.register(
            "mesh_config_reloads",
            "Configurations applied (success) or refused (failure), the first one included",
            metrics.reloads.clone(),
        );
        registry.register_with_unit(
            "mesh_config_last_reload_success_timestamp",
            "Unix time of the last configuration that reached the kernel",
            Unit::Seconds,
            metrics.last_success.clone(),
        );
        registry.register(
            "mesh_sockets_destroyed",
            "Established sockets destroyed because their backend was removed",
            metrics.sockets_destroyed.clone(),
        );
        registry.register(
            "mesh_upgrade_migrated_entries",
            "Socket-state map entries carried from another map layout's pins at start",
            metrics.migrated.clone(),
        );
        // Both results exist from the start, so rate() works from the first scrape.
        for result in [RESULT_SUCCESS, RESULT_FAILURE] {
            drop(metrics.reloads.get_or_create(&ReloadLabels { result }));
        }
        metrics
    }

    /// Runs `apply` and observes how long it took.
    pub fn time_apply<T>(&self, apply: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let result = apply();
        self.observe_apply(start.elapsed());
        result
    }

    pub fn observe_apply(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a reload; a success also stamps the time.
    pub fn reload(&self, success: bool) {
        let result = if success {
            RESULT_SUCCESS
        } else {
            RESULT_FAILURE
        };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
        if success {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_success.set(now);
        }
    }

    pub fn sockets_destroyed(&self, count: u64) {
        self.sockets_destroyed.inc_by(count);
    }

    pub fn migrated(&self, entries: u64) {
        self.migrated.inc_by(entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn reloads_apply_time_and_destroyed_sockets() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let seven = metrics.time_apply(|| 7);
        assert_eq!(seven, 7);
        metrics.observe_apply(Duration::from_millis(3));
        metrics.reload(true);
        metrics.reload(true);
        metrics.reload(false);
        metrics.sockets_destroyed(5);
        metrics.migrated(4);
        let text = encode(&registry);
        assert!(text.contains("mesh_config_reloads_total{result=\"success\"} 2\n"));
        assert!(text.contains("mesh_config_reloads_total{result=\"failure\"} 1\n"));
        assert!(text.contains("mesh_reconcile_duration_seconds_count 2\n"));
        assert!(text.contains("mesh_reconcile_duration_seconds_bucket{le=\"0.0001\"}"));
        assert!(text.contains("mesh_sockets_destroyed_total 5\n"));
        assert!(text.contains("mesh_upgrade_migrated_entries_total 4\n"));
        let stamp = text
            .lines()
            .find_map(|l| l.strip_prefix("mesh_config_last_reload_success_timestamp_seconds "))
            .unwrap()
            .parse::<f64>()
            .unwrap();
        assert!(stamp > 1.7e9, "{stamp}");
    }

    #[test]
    fn buckets_cover_100us_to_seconds() {
        let buckets: Vec<f64> = duration_buckets().collect();
        assert_eq!(buckets.len(), 16);
        assert!((buckets[0] - 0.0001).abs() < 1e-12);
        assert!(buckets[15] > 3.0 && buckets[15] < 4.0, "{buckets:?}");
    }
}
