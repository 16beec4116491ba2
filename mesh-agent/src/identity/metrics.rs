//! Prometheus metrics of the identities a node holds, under `mesh_identity_`:
//! seconds until each certificate's notAfter (computed at scrape, so it is
//! exact and nothing has to tick) and reloads by result.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};

use super::NodeCredentials;
use super::watch::unix_now;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug)]
pub struct IdentityMetrics {
    reloads: Family<ResultLabels, Counter>,
    held: Arc<Held>,
}

/// The identities whose expiry is exported.
#[derive(Debug, Default)]
struct Held(Mutex<Vec<NodeCredentials>>);

impl IdentityMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        registry.sub_registry_with_prefix("mesh_identity").register(
            "reloads",
            "Reloads of an identity's files after they changed, by result (ok or failed)",
            metrics.reloads.clone(),
        );
        registry.register_collector(Box::new(HeldCollector(metrics.held.clone())));
        metrics
    }

    /// Metrics that no registry exports (tests).
    pub fn unregistered() -> Self {
        Self {
            reloads: Family::default(),
            held: Arc::default(),
        }
    }

    /// Exports `credentials`' expiry from now on.
    pub fn hold(&self, credentials: &NodeCredentials) {
        self.held
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(credentials.clone());
    }

    pub(crate) fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Reloads counted with `result` ok (true) or failed (false).
    pub fn reloads(&self, ok: bool) -> u64 {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabels { result }).get()
    }
}

#[derive(Debug)]
struct HeldCollector(Arc<Held>);

impl Collector for HeldCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let held = self
            .0
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if held.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        // The name carries the unit (no UNIT metadata), as the tunnel's
        // histogram does.
        let mut metric = encoder.encode_descriptor(
            "mesh_identity_cert_expiry_seconds",
            "Seconds until the certificate's notAfter (negative once expired), by SPIFFE ID",
            None,
            MetricType::Gauge,
        )?;
        for credentials in held {
            let info = credentials.info();
            let labels = [("spiffe_id", info.spiffe_id.to_string())];
            ConstGauge::new(info.not_after - now).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn expiry_is_computed_at_scrape_and_reloads_are_counted() {
        let mut registry = Registry::default();
        let metrics = IdentityMetrics::new(&mut registry);
        let ca = new_ca(TD);
        let dir = node_dir(&ca, "n1");
        let creds = NodeCredentials::load(dir.path()).unwrap();
        metrics.hold(&creds);
        metrics.reloaded(false);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("mesh_identity_reloads_total{result=\"failed\"} 1"),
            "{text}"
        );
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(
                    "mesh_identity_cert_expiry_seconds{spiffe_id=\"spiffe://cluster.local/node/n1\"}",
                )
            })
            .unwrap_or_else(|| panic!("no expiry sample in {text}"));
        let secs: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let left = creds.info().not_after - unix_now();
        assert!((left - 5..=left).contains(&secs), "{secs} vs {left}");
    }
}
