//! The layers between the source's desired model and the kernel: what this
//! node knows and the source does not, laid over each service in order:
//!
//! 1. drain: backends that left the source keep draining until their
//!    timeout (`drain`);
//! 2. overrides: `meshctl drain|weight` (`overrides`);
//! 3. placement: backends on other nodes go through the tunnel (`placement`);
//! 4. health: unhealthy or ejected backends take no new connections, or
//!    every backend does in panic mode (`health`);
//! 5. tiers: new connections go to the lowest backend priority that has a
//!    usable backend; the rest stand by (topology failover, terminating
//!    endpoints).
//!
//! A pass plans the services that may have changed without touching the
//! layers' own state; [`Overlays::commit`] takes the plan once the kernel
//! has it, so a refused apply changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use crate::config::Update;
use crate::drain::Draining;
use crate::health::HealthMonitor;
use crate::overrides::Overrides;
use crate::placement::Placement;
use crate::state::{BackendState, DesiredState, PRIORITY_TERMINATING, Service, ServiceSet};

pub struct Overlays {
    pub draining: Draining,
    pub overrides: Overrides,
    pub placement: Placement,
    pub health: HealthMonitor,
    /// Services whose effective state backend health can change (they
    /// have, or had, health checks or outlier detection).
    pub health_watch: BTreeSet<String>,
    /// Services whose backends are all unhealthy, served by panic mode.
    pub panicking: Vec<String>,
}

/// The source as a pass sees it: the committed state with a pending
/// update on top.
#[derive(Clone, Copy)]
pub struct SourceView<'a> {
    pub current: &'a ServiceSet,
    pub update: &'a Update,
}

impl<'a> SourceView<'a> {
    pub fn get(&self, name: &str) -> Option<&'a Arc<Service>> {
        match self.update.services.get(name) {
            Some(new) => new.as_ref(),
            None => self.current.get(name),
        }
    }
}

/// The outcome of one pass: each looked-at service as the kernel should
/// have it (None: removed), and the layers' state once that is applied.
pub struct Plan<'a> {
    pub effective: BTreeMap<&'a str, Option<Arc<Service>>>,
    draining: Draining,
    placement: Placement,
    watch: BTreeSet<String>,
    panicking: Vec<String>,
}

impl Plan<'_> {
    /// The services whose effective state differs from `applied`.
    pub fn changes<'s>(
        &'s self,
        applied: &'s ServiceSet,
    ) -> Vec<(Option<&'s Service>, Option<&'s Service>)> {
        self.effective
            .iter()
            .map(|(name, new)| (applied.get(name).map(|s| &**s), new.as_deref()))
            .filter(|(old, new)| old != new)
            .collect()
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Whether `name`'s backend health is watched once this plan applies.
    pub fn watches(&self, name: &str) -> bool {
        self.watch.contains(name)
    }
}

impl Overlays {
    pub fn new(placement: Placement, health: HealthMonitor) -> Self {
        Self {
            draining: Draining::default(),
            overrides: Overrides::default(),
            placement,
            health,
            health_watch: BTreeSet::new(),
            panicking: Vec::new(),
        }
    }

    /// Services to look at on every pass besides the source's changes:
    /// those whose health may have moved and those whose drain is over.
    pub fn due(&self, now: Instant) -> impl Iterator<Item = String> + '_ {
        self.health_watch
            .iter()
            .cloned()
            .chain(self.draining.expired_services(now))
    }

    /// Lays the layers over the services `dirty` (`applied`: what the
    /// kernel has now).
    pub fn plan<'a>(
        &mut self,
        applied: &ServiceSet,
        source: SourceView<'_>,
        dirty: &BTreeSet<&'a str>,
        now: Instant,
    ) -> Plan<'a> {
        let mut draining = self.draining.clone();
        let placement = Placement {
            mesh: source
                .update
                .mesh
                .clone()
                .unwrap_or_else(|| source.current.mesh.clone()),
            ..self.placement.clone()
        };
        let mut effective: BTreeMap<&'a str, Option<Arc<Service>>> = BTreeMap::new();
        for &name in dirty {
            let previous = applied.get(name).map(|s| &**s);
            let merged = draining.merge_service(name, previous, source.get(name), now);
            let merged = merged
                .map(|s| self.overrides.overlay_service(s))
                .map(|s| placement.overlay_service(s));
            effective.insert(name, merged);
        }
        let mut watch = self.health_watch.clone();
        for (name, new) in &source.update.services {
            match new {
                Some(svc) if svc.watches_health() => {
                    watch.insert(name.clone());
                }
                Some(_) => {}
                None => {
                    watch.remove(name);
                }
            }
        }
        // Health marks backends of the watched services unhealthy.
        let mut watched = DesiredState {
            services: watch
                .iter()
                .filter_map(|n| effective.get(n.as_str()).cloned().flatten())
                .map(|s| (*s).clone())
                .collect(),
            ..DesiredState::default()
        };
        let panicking = self.health.overlay(&mut watched, now);
        for svc in watched.services {
            if let Some(slot) = effective.get_mut(svc.name.as_str()) {
                *slot = Some(Arc::new(svc));
            }
        }
        for svc in effective.values_mut().flatten() {
            *svc = tiers(svc.clone());
        }
        Plan {
            effective,
            draining,
            placement,
            watch,
            panicking,
        }
    }

    /// Takes `plan`'s state once the kernel has its services (health
    /// checks, overrides and drains follow the source), and returns the
    /// services as applied.
    pub fn commit<'a>(
        &mut self,
        plan: Plan<'a>,
        source: SourceView<'_>,
    ) -> BTreeMap<&'a str, Option<Arc<Service>>> {
        let Plan {
            effective,
            draining,
            placement,
            mut watch,
            panicking,
        } = plan;
        let watched_source = DesiredState {
            services: watch
                .iter()
                .filter_map(|n| source.get(n))
                .map(|s| (**s).clone())
                .collect(),
            ..DesiredState::default()
        };
        self.health.sync(&watched_source);
        for &name in effective.keys() {
            self.overrides
                .prune_service(name, source.get(name).map(|s| &**s));
        }
        watch.retain(|n| source.get(n).is_some());
        self.health_watch = watch;
        self.draining = draining;
        self.panicking = panicking;
        self.placement = placement;
        effective
    }
}

/// `svc` with the backends above the lowest usable priority standing by
/// (a terminating one draining); the same `Arc` when nothing changes.
fn tiers(svc: Arc<Service>) -> Arc<Service> {
    let usable = |b: &crate::state::Backend| b.state == BackendState::Active && b.weight > 0;
    let Some(lowest) = svc
        .backends
        .iter()
        .filter(|b| usable(b))
        .map(|b| b.priority)
        .min()
    else {
        return svc;
    };
    let above = |b: &crate::state::Backend| b.state == BackendState::Active && b.priority > lowest;
    if !svc.backends.iter().any(above) {
        return svc;
    }
    let mut svc = (*svc).clone();
    for b in svc.backends.iter_mut().filter(|b| above(b)) {
        b.state = if b.priority == PRIORITY_TERMINATING {
            BackendState::Draining
        } else {
            BackendState::Standby
        };
    }
    Arc::new(svc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{PRIORITY_FALLBACK, PRIORITY_PREFERRED};

    /// A backend's priority, state and weight.
    type Spec = (u8, BackendState, u32);

    fn service(backends: &[Spec]) -> Arc<Service> {
        let mut svc = crate::config::parse_str(
            "services:\n  - name: web\n    vip: 127.0.0.5\n    port: 80\n    allow_empty: true\n    backends: []\n",
            "test",
        )
        .unwrap()
        .services
        .remove(0);
        svc.backends = backends
            .iter()
            .enumerate()
            .map(|(i, &(priority, state, weight))| crate::state::Backend {
                address: format!("10.0.0.{}", i + 1).parse().unwrap(),
                port: 80,
                weight,
                state,
                node: None,
                tunnel: false,
                priority,
            })
            .collect();
        Arc::new(svc)
    }

    fn states(svc: &Service) -> Vec<BackendState> {
        svc.backends.iter().map(|b| b.state).collect()
    }

    #[test]
    fn new_connections_go_to_the_lowest_priority_with_a_usable_backend() {
        use BackendState::*;
        const P: u8 = PRIORITY_PREFERRED;
        const F: u8 = PRIORITY_FALLBACK;
        const T: u8 = PRIORITY_TERMINATING;
        // (priority, state in, weight) per backend → states out.
        let table: &[(&[Spec], &[BackendState])] = &[
            // One tier: nothing to do.
            (&[(P, Active, 1), (P, Active, 1)], &[Active, Active]),
            // Preferred usable: the fallback and terminating stand by.
            (
                &[(P, Active, 1), (F, Active, 1), (T, Active, 1)],
                &[Active, Standby, Draining],
            ),
            // Preferred unhealthy: the fallback serves.
            (
                &[(P, Unhealthy, 1), (F, Active, 1), (T, Active, 1)],
                &[Unhealthy, Active, Draining],
            ),
            // Preferred drained by weight 0: the fallback serves.
            (&[(P, Active, 0), (F, Active, 1)], &[Active, Active]),
            // Only terminating endpoints left: they serve.
            (&[(P, Unhealthy, 1), (T, Active, 1)], &[Unhealthy, Active]),
            // Nothing usable at all: left as it is.
            (
                &[(P, Unhealthy, 1), (F, Draining, 1)],
                &[Unhealthy, Draining],
            ),
        ];
        for (backends, want) in table {
            let svc = tiers(service(backends));
            assert_eq!(states(&svc), *want, "for {backends:?}");
        }
    }

    #[test]
    fn a_service_the_tiers_do_not_change_stays_the_same_arc() {
        let svc = service(&[(0, BackendState::Active, 1), (0, BackendState::Active, 1)]);
        assert!(Arc::ptr_eq(&svc, &tiers(svc.clone())));
    }
}
