//! Graceful backend removal: a backend that leaves a service whose
//! `drain_timeout_s` is set stays in the kernel as draining (no new
//! connections, established ones continue) until the timeout, and only then
//! is removed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::{Backend, BackendState, DesiredState, Service};

#[derive(Clone, Debug, Default)]
pub struct Draining {
    lingering: Vec<Lingering>,
}

#[derive(Clone, Debug)]
struct Lingering {
    service: String,
    backend: Backend,
    until: Instant,
}

impl Draining {
    /// The state to apply for a new `source`, given what was applied before
    /// (`previous`): backends that left keep draining until their timeout.
    pub fn merge(
        &mut self,
        previous: &DesiredState,
        source: &DesiredState,
        now: Instant,
    ) -> DesiredState {
        let services = source
            .services
            .iter()
            .map(|svc| {
                let before = previous.services.iter().find(|p| p.name == svc.name);
                let merged =
                    self.merge_service(&svc.name, before, Some(&Arc::new(svc.clone())), now);
                (*merged.expect("the service is in the source")).clone()
            })
            .collect();
        // The service is gone.
        self.lingering
            .retain(|l| source.services.iter().any(|s| s.name == l.service));
        DesiredState {
            services,
            workloads: source.workloads.clone(),
            mesh: source.mesh.clone(),
        }
    }

    /// One service of `merge`: its new effective definition (None when it
    /// left the source), given its previous effective one. Shares `source`
    /// when nothing drains.
    pub fn merge_service(
        &mut self,
        name: &str,
        previous: Option<&Service>,
        source: Option<&Arc<Service>>,
        now: Instant,
    ) -> Option<Arc<Service>> {
        if let (Some(svc), Some(before)) = (source, previous)
            && svc.drain_timeout_s > 0
        {
            let timeout = Duration::from_secs(u64::from(svc.drain_timeout_s));
            for b in &before.backends {
                let gone = !svc
                    .backends
                    .iter()
                    .any(|n| n.socket_addr() == b.socket_addr());
                if gone && !self.is_lingering(name, b.socket_addr()) {
                    self.lingering.push(Lingering {
                        service: name.to_owned(),
                        backend: Backend {
                            state: BackendState::Draining,
                            ..b.clone()
                        },
                        until: now + timeout,
                    });
                }
            }
        }
        // Done draining, back in the source, or the service is gone.
        self.lingering.retain(|l| {
            l.service != name
                || (l.until > now
                    && source.is_some_and(|s| {
                        s.drain_timeout_s > 0
                            && !s
                                .backends
                                .iter()
                                .any(|b| b.socket_addr() == l.backend.socket_addr())
                    }))
        });
        let source = source?;
        let mut lingering = self
            .lingering
            .iter()
            .filter(|l| l.service == name)
            .peekable();
        if lingering.peek().is_none() {
            return Some(source.clone());
        }
        let mut svc = (**source).clone();
        svc.backends.extend(lingering.map(|l| l.backend.clone()));
        Some(Arc::new(svc))
    }

    /// True when a draining backend's time is up and the state must be
    /// applied again to remove it.
    pub fn has_expired(&self, now: Instant) -> bool {
        self.lingering.iter().any(|l| l.until <= now)
    }

    /// Services with a draining backend whose time is up.
    pub fn expired_services(&self, now: Instant) -> Vec<String> {
        let mut names: Vec<String> = self
            .lingering
            .iter()
            .filter(|l| l.until <= now)
            .map(|l| l.service.clone())
            .collect();
        names.dedup();
        names
    }

    fn is_lingering(&self, service: &str, addr: SocketAddr) -> bool {
        self.lingering
            .iter()
            .any(|l| l.service == service && l.backend.socket_addr() == addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    fn state(ports: &[u16], drain: u32) -> DesiredState {
        let mut yaml = format!(
            "services:\n  - name: web\n    vip: 127.10.0.1\n    port: 80\n    drain_timeout_seconds: {drain}\n    backends:\n"
        );
        for p in ports {
            yaml += &format!("      - {{address: 127.0.0.1, port: {p}}}\n");
        }
        parse_str(&yaml, "t.yaml").unwrap()
    }

    fn backends(s: &DesiredState) -> Vec<(u16, BackendState)> {
        s.services[0]
            .backends
            .iter()
            .map(|b| (b.port, b.state))
            .collect()
    }

    #[test]
    fn a_removed_backend_drains_until_its_timeout() {
        let mut draining = Draining::default();
        let t0 = Instant::now();
        let first = draining.merge(&DesiredState::default(), &state(&[1, 2], 10), t0);
        assert_eq!(
            backends(&first),
            [(1, BackendState::Active), (2, BackendState::Active)]
        );

        let second = draining.merge(&first, &state(&[1], 10), t0);
        assert_eq!(
            backends(&second),
            [(1, BackendState::Active), (2, BackendState::Draining)]
        );
        assert!(!draining.has_expired(t0 + Duration::from_secs(9)));

        // A later reload keeps the original deadline.
        let third = draining.merge(&second, &state(&[1], 10), t0 + Duration::from_secs(5));
        assert_eq!(backends(&third), backends(&second));

        assert!(draining.has_expired(t0 + Duration::from_secs(10)));
        let last = draining.merge(&third, &state(&[1], 10), t0 + Duration::from_secs(10));
        assert_eq!(backends(&last), [(1, BackendState::Active)]);
    }

    #[test]
    fn without_a_timeout_removal_is_immediate_and_a_return_cancels_the_drain() {
        let mut draining = Draining::default();
        let t0 = Instant::now();
        let first = draining.merge(&DesiredState::default(), &state(&[1, 2], 0), t0);
        let second = draining.merge(&first, &state(&[1], 0), t0);
        assert_eq!(backends(&second), [(1, BackendState::Active)]);

        let first = draining.merge(&DesiredState::default(), &state(&[1, 2], 10), t0);
        let gone = draining.merge(&first, &state(&[1], 10), t0);
        let back = draining.merge(&gone, &state(&[1, 2], 10), t0);
        assert_eq!(
            backends(&back),
            [(1, BackendState::Active), (2, BackendState::Active)]
        );
        assert!(!draining.has_expired(t0 + Duration::from_secs(60)));
    }
}
