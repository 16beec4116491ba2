//! Backend health as Prometheus sees it: `mesh_backend_health` (1 healthy,
//! 0 unhealthy) and `mesh_backend_health_transitions_total`.
//!
//! Every programmed backend starts healthy ([`Metrics::sync_backends`]);
//! a health checker reports changes with [`Metrics::set_health`], which
//! counts a transition only when the state actually changes. Backends that
//! leave the configuration leave both families.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::kernel::KernelCollector;

/// One backend of one service; `backend` is `ip:port` (`[ip]:port` for IPv6).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub backend: String,
}

impl BackendLabels {
    pub fn new(service: &str, backend: impl ToString) -> Self {
        Self {
            service: service.to_owned(),
            backend: backend.to_string(),
        }
    }
}

/// A backend's health as the families report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    healthy: bool,
    transitions: u64,
}

impl State {
    const NEW: State = State {
        healthy: true,
        transitions: 0,
    };
}

/// Which backends the families list, and the state of each that is not
/// healthy-without-transitions (most backends are, so they take no memory:
/// at 100,000 backends a label set each would be tens of MB).
#[derive(Debug, Default)]
struct Known {
    /// The backends listed when no view lists them (see `list_from`).
    listed: Vec<BackendLabels>,
    /// service → backend → state, for states other than `State::NEW`.
    sparse: BTreeMap<String, BTreeMap<String, State>>,
}

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    known: Mutex<Known>,
    /// Lists the programmed backends from the kernel view on each scrape.
    lister: OnceLock<Arc<KernelCollector>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("health::Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            inner: Arc::new(Inner {
                known: Mutex::default(),
                lister: OnceLock::new(),
            }),
        };
        registry.register_collector(Box::new(metrics.clone()));
        metrics
    }

    /// Lists the backends the kernel view has (every programmed backend)
    /// on each scrape, instead of a list kept by `sync_backends`.
    pub fn list_from(&self, kernel: Arc<KernelCollector>) {
        let _ = self.inner.lister.set(kernel);
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        // Only plain inserts happen under the lock; a poisoned map is whole.
        self.inner.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a backend's health; returns true when it changed (a
    /// transition). A backend not seen before starts healthy.
    pub fn set_health(&self, service: &str, backend: impl ToString, healthy: bool) -> bool {
        let backend = backend.to_string();
        let mut known = self.known();
        let previous = known
            .sparse
            .get(service)
            .and_then(|b| b.get(&backend))
            .copied()
            .unwrap_or(State::NEW);
        let changed = previous.healthy != healthy;
        let state = State {
            healthy,
            transitions: previous.transitions + u64::from(changed),
        };
        if state == State::NEW {
            if let Some(backends) = known.sparse.get_mut(service) {
                backends.remove(&backend);
                if backends.is_empty() {
                    known.sparse.remove(service);
                }
            }
        } else {
            known
                .sparse
                .entry(service.to_owned())
                .or_default()
                .insert(backend, state);
        }
        changed
    }

    /// The last recorded health of a backend (listed or recorded).
    pub fn health(&self, service: &str, backend: impl ToString) -> Option<bool> {
        let backend = backend.to_string();
        let known = self.known();
        if let Some(state) = known.sparse.get(service).and_then(|b| b.get(&backend)) {
            return Some(state.healthy);
        }
        known
            .listed
            .iter()
            .any(|l| l.service == service && l.backend == backend)
            .then_some(true)
    }

    /// Makes the families hold exactly `programmed`: new backends start
    /// healthy, known ones keep their state, removed ones are dropped.
    pub fn sync_backends(&self, programmed: impl IntoIterator<Item = BackendLabels>) {
        let listed: Vec<BackendLabels> = programmed.into_iter().collect();
        let mut known = self.known();
        let keep: std::collections::BTreeSet<(&str, &str)> = listed
            .iter()
            .map(|l| (l.service.as_str(), l.backend.as_str()))
            .collect();
        let mut sparse = std::mem::take(&mut known.sparse);
        for (service, backends) in &mut sparse {
            backends.retain(|b, _| keep.contains(&(service.as_str(), b.as_str())));
        }
        sparse.retain(|_, b| !b.is_empty());
        drop(keep);
        known.sparse = sparse;
        known.listed = listed;
    }

    /// Forgets the recorded state of `service`'s backends that `keep`
    /// rejects (they left the configuration).
    pub fn forget(&self, service: &str, keep: impl Fn(&str) -> bool) {
        let mut known = self.known();
        if let Some(backends) = known.sparse.get_mut(service) {
            backends.retain(|b, _| keep(b));
            if backends.is_empty() {
                known.sparse.remove(service);
            }
        }
    }

    /// Services with a recorded state.
    pub fn recorded_services(&self) -> Vec<String> {
        self.known().sparse.keys().cloned().collect()
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let view = self.inner.lister.get().map(|k| k.view());
        let known = self.known();
        let listed: Vec<(&str, &str)> = match &view {
            Some(view) => view
                .backends
                .iter()
                .map(|b| (b.service.as_str(), b.backend.as_str()))
                .collect(),
            None => known
                .listed
                .iter()
                .map(|l| (l.service.as_str(), l.backend.as_str()))
                .collect(),
        };
        if listed.is_empty() {
            // As with a family of labelled samples: nothing until the first.
            return Ok(());
        }
        let state = |service: &str, backend: &str| {
            known
                .sparse
                .get(service)
                .and_then(|b| b.get(backend))
                .copied()
                .unwrap_or(State::NEW)
        };
        let mut health = encoder.encode_descriptor(
            "mesh_backend_health",
            "1 while a backend is healthy, 0 while it is unhealthy",
            None,
            MetricType::Gauge,
        )?;
        for &(service, backend) in &listed {
            let labels = [("service", service), ("backend", backend)];
            ConstGauge::new(i64::from(state(service, backend).healthy))
                .encode(health.encode_family(&labels)?)?;
        }
        let mut transitions = encoder.encode_descriptor(
            "mesh_backend_health_transitions",
            "Times a backend changed between healthy and unhealthy",
            None,
            MetricType::Counter,
        )?;
        for &(service, backend) in &listed {
            let labels = [("service", service), ("backend", backend)];
            ConstCounter::new(state(service, backend).transitions)
                .encode(transitions.encode_family(&labels)?)?;
        }
        Ok(())
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
    fn new_backends_start_healthy_and_transitions_count_changes_only() {
        let mut registry = Registry::default();
        let health = Metrics::new(&mut registry);
        let a = BackendLabels::new("web", "127.0.0.1:8080");
        let b = BackendLabels::new("web", "[::1]:8080");
        health.sync_backends([a.clone(), b.clone()]);
        assert_eq!(health.health("web", "127.0.0.1:8080"), Some(true));

        assert!(
            !health.set_health("web", "127.0.0.1:8080", true),
            "no change"
        );
        assert!(health.set_health("web", "127.0.0.1:8080", false));
        assert!(!health.set_health("web", "127.0.0.1:8080", false));
        assert!(health.set_health("web", "127.0.0.1:8080", true));
        assert!(health.set_health("web", "[::1]:8080", false));

        let text = encode(&registry);
        assert!(
            text.contains("mesh_backend_health{service=\"web\",backend=\"127.0.0.1:8080\"} 1\n")
        );
        assert!(text.contains("mesh_backend_health{service=\"web\",backend=\"[::1]:8080\"} 0\n"));
        assert!(text.contains(
            "mesh_backend_health_transitions_total{service=\"web\",backend=\"127.0.0.1:8080\"} 2\n"
        ));
        assert!(text.contains(
            "mesh_backend_health_transitions_total{service=\"web\",backend=\"[::1]:8080\"} 1\n"
        ));

        // `a` stays (keeping its state), `b` leaves.
        health.sync_backends([a]);
        assert_eq!(health.health("web", "[::1]:8080"), None);
        let text = encode(&registry);
        assert!(!text.contains("[::1]:8080"), "{text}");
        assert!(text.contains(
            "mesh_backend_health_transitions_total{service=\"web\",backend=\"127.0.0.1:8080\"} 2\n"
        ));
        let _ = b;
    }
}
