//! Prometheus metrics of the Kubernetes source, under `mesh_kubernetes_`:
//! events and relists per kind, broken watches, Services refused, and the
//! time from an event's arrival to the kernel map write.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug)]
pub struct KubeMetrics {
    events: Family<KindLabels, Counter>,
    relists: Family<KindLabels, Counter>,
    watch_errors: Family<KindLabels, Counter>,
    refused: Counter,
    to_kernel: Family<KindLabels, Histogram>,
}

impl KubeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            events: Family::default(),
            relists: Family::default(),
            watch_errors: Family::default(),
            refused: Counter::default(),
            to_kernel: Family::new_with_constructor(|| {
                // 100 µs to ~1.6 s.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1e-4, 2.0, 15,
                ))
            }),
        };
        let sub = registry.sub_registry_with_prefix("mesh_kubernetes");
        sub.register(
            "events",
            "Objects received from the API (added, modified, deleted, listed), by kind",
            metrics.events.clone(),
        );
        sub.register(
            "relists",
            "Complete lists of a kind (the first, and each after a broken watch or 410 Gone)",
            metrics.relists.clone(),
        );
        sub.register(
            "watch_errors",
            "Failed lists and watches, by kind (the watcher retries with backoff)",
            metrics.watch_errors.clone(),
        );
        sub.register(
            "services_refused",
            "Service changes refused as invalid (the Service's last good state keeps serving)",
            metrics.refused.clone(),
        );
        sub.register(
            "event_to_kernel_seconds",
            "From an API event's arrival to the kernel map write it caused, by kind",
            metrics.to_kernel.clone(),
        );
        metrics
    }

    pub(crate) fn event(&self, kind: &'static str) {
        self.events.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn relist(&self, kind: &'static str) {
        self.relists.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn watch_error(&self, kind: &'static str) {
        self.watch_errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn refused(&self) {
        self.refused.inc();
    }

    pub(crate) fn to_kernel(&self, kind: &'static str, seconds: f64) {
        self.to_kernel
            .get_or_create(&KindLabels { kind })
            .observe(seconds);
    }
}
