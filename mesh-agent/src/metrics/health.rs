//! Backend health as Prometheus sees it: `mesh_backend_health` (1 healthy,
//! 0 unhealthy) and `mesh_backend_health_transitions_total`.
//!
//! Every programmed backend starts healthy ([`Metrics::sync_backends`]);
//! a health checker reports changes with [`Metrics::set_health`], which
//! counts a transition only when the state actually changes. Backends that
//! leave the configuration leave both families.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

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

#[derive(Debug)]
pub struct Metrics {
    health: Family<BackendLabels, Gauge>,
    transitions: Family<BackendLabels, Counter>,
    /// The last known state of every backend (true: healthy).
    known: Mutex<BTreeMap<BackendLabels, bool>>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            health: Family::default(),
            transitions: Family::default(),
            known: Mutex::default(),
        };
        registry.register(
            "mesh_backend_health",
            "1 while a backend is healthy, 0 while it is unhealthy",
            metrics.health.clone(),
        );
        registry.register(
            "mesh_backend_health_transitions",
            "Times a backend changed between healthy and unhealthy",
            metrics.transitions.clone(),
        );
        metrics
    }

    fn known(&self) -> MutexGuard<'_, BTreeMap<BackendLabels, bool>> {
        // Only plain inserts happen under the lock; a poisoned map is whole.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a backend's health; returns true when it changed (a
    /// transition). A backend not seen before starts in this state.
    pub fn set_health(&self, service: &str, backend: impl ToString, healthy: bool) -> bool {
        let labels = BackendLabels::new(service, backend);
        let previous = self.known().insert(labels.clone(), healthy);
        self.health.get_or_create(&labels).set(i64::from(healthy));
        let changed = previous.is_some_and(|was| was != healthy);
        if changed {
            self.transitions.get_or_create(&labels).inc();
        } else {
            // Present, at zero, from the first sight of a backend.
            drop(self.transitions.get_or_create(&labels));
        }
        changed
    }

    /// The last recorded health of a backend.
    pub fn health(&self, service: &str, backend: impl ToString) -> Option<bool> {
        self.known()
            .get(&BackendLabels::new(service, backend))
            .copied()
    }

    /// Makes the families hold exactly `programmed`: new backends start
    /// healthy, known ones keep their state, removed ones are dropped.
    pub fn sync_backends(&self, programmed: impl IntoIterator<Item = BackendLabels>) {
        let wanted: BTreeMap<BackendLabels, ()> =
            programmed.into_iter().map(|label| (label, ())).collect();
        let (new, gone) = {
            let known = self.known();
            let new: Vec<_> = wanted
                .keys()
                .filter(|l| !known.contains_key(*l))
                .cloned()
                .collect();
            let gone: Vec<_> = known
                .keys()
                .filter(|l| !wanted.contains_key(*l))
                .cloned()
                .collect();
            (new, gone)
        };
        for labels in new {
            self.set_health(&labels.service, &labels.backend, true);
        }
        for labels in gone {
            self.known().remove(&labels);
            self.health.remove(&labels);
            self.transitions.remove(&labels);
        }
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
