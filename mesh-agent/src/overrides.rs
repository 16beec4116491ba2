//! Runtime overrides from `meshctl drain|undrain|weight`: they sit on top of
//! the configuration until cleared (or until the agent restarts), and every
//! view shows them as overrides, so nobody mistakes them for the config.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::state::{BackendState, DesiredState, Service};

/// What an operator asked for one backend of one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    pub drained: bool,
    pub weight: Option<u32>,
}

impl Override {
    fn is_empty(&self) -> bool {
        !self.drained && self.weight.is_none()
    }

    /// In words, for views.
    pub fn describe(&self) -> String {
        match (self.drained, self.weight) {
            (true, Some(w)) => format!("drained and weight {w} by meshctl"),
            (true, None) => "drained by meshctl".to_owned(),
            (false, Some(w)) => format!("weight {w} by meshctl"),
            (false, None) => String::new(),
        }
    }
}

/// `POST /v1/overrides`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideRequest {
    pub backend: SocketAddr,
    /// Only this service; every service with the backend when absent.
    pub service: Option<String>,
    pub action: Action,
}

/// The answer to an override: which services it changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideResponse {
    pub services: Vec<String>,
}

/// A change requested through the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Drain,
    Undrain,
    Weight(u32),
    ClearWeight,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OverrideError {
    #[error("no backend {backend} in {}; `meshctl backends` lists them", scope(.service))]
    UnknownBackend {
        backend: SocketAddr,
        service: Option<String>,
    },
    #[error("weight {0} is above the maximum 65535")]
    WeightTooLarge(u32),
}

fn scope(service: &Option<String>) -> String {
    match service {
        Some(s) => format!("service '{s}'"),
        None => "any service".to_owned(),
    }
}

#[derive(Clone, Debug, Default)]
pub struct Overrides {
    by_backend: BTreeMap<(String, SocketAddr), Override>,
}

impl Overrides {
    /// Applies `action` to `backend` in `service`, or in every service that
    /// has it. Returns the services it touched.
    pub fn set(
        &mut self,
        state: &DesiredState,
        backend: SocketAddr,
        service: Option<&str>,
        action: &Action,
    ) -> Result<Vec<String>, OverrideError> {
        self.set_in(state.services.iter(), backend, service, action)
    }

    /// `set` over services given one by one.
    pub fn set_in<'a>(
        &mut self,
        services: impl Iterator<Item = &'a Service>,
        backend: SocketAddr,
        service: Option<&str>,
        action: &Action,
    ) -> Result<Vec<String>, OverrideError> {
        if let Action::Weight(w) = action
            && *w > 65_535
        {
            return Err(OverrideError::WeightTooLarge(*w));
        }
        let touched: Vec<String> = services
            .filter(|s| service.is_none_or(|name| s.name == name))
            .filter(|s| s.backends.iter().any(|b| b.socket_addr() == backend))
            .map(|s| s.name.clone())
            .collect();
        if touched.is_empty() {
            return Err(OverrideError::UnknownBackend {
                backend,
                service: service.map(str::to_owned),
            });
        }
        for name in &touched {
            let key = (name.clone(), backend);
            let entry = self.by_backend.entry(key.clone()).or_default();
            match action {
                Action::Drain => entry.drained = true,
                Action::Undrain => entry.drained = false,
                Action::Weight(w) => entry.weight = Some(*w),
                Action::ClearWeight => entry.weight = None,
            }
            if entry.is_empty() {
                self.by_backend.remove(&key);
            }
        }
        Ok(touched)
    }

    pub fn get(&self, service: &str, backend: SocketAddr) -> Option<&Override> {
        self.by_backend.get(&(service.to_owned(), backend))
    }

    /// Puts the overrides on `state`: drained backends drain, weights change.
    pub fn overlay(&self, state: &mut DesiredState) {
        for svc in &mut state.services {
            for b in &mut svc.backends {
                let Some(o) = self.by_backend.get(&(svc.name.clone(), b.socket_addr())) else {
                    continue;
                };
                if o.drained && b.state == BackendState::Active {
                    b.state = BackendState::Draining;
                }
                if let Some(w) = o.weight {
                    b.weight = w;
                }
            }
        }
    }

    /// `overlay` for one service; shares it when nothing applies.
    pub fn overlay_service(&self, svc: Arc<Service>) -> Arc<Service> {
        if !self.by_backend.keys().any(|(s, _)| *s == svc.name) {
            return svc;
        }
        let mut state = DesiredState {
            services: vec![(*svc).clone()],
            ..DesiredState::default()
        };
        self.overlay(&mut state);
        Arc::new(state.services.pop().expect("one service"))
    }

    /// `prune` for one service (`None`: it left the source).
    pub fn prune_service(&mut self, name: &str, source: Option<&Service>) {
        self.by_backend.retain(|(service, addr), _| {
            service != name
                || source.is_some_and(|s| s.backends.iter().any(|b| b.socket_addr() == *addr))
        });
    }

    /// Forgets overrides of backends no longer in `source`.
    pub fn prune(&mut self, source: &DesiredState) {
        self.by_backend.retain(|(service, addr), _| {
            source
                .services
                .iter()
                .any(|s| &s.name == service && s.backends.iter().any(|b| b.socket_addr() == *addr))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    fn state() -> DesiredState {
        parse_str(
            "services:\n  - name: a\n    vip: 127.10.0.1\n    port: 80\n    backends: [{address: 127.0.0.1, port: 1}, {address: 127.0.0.1, port: 2}]\n  - name: b\n    vip: 127.10.0.2\n    port: 80\n    backends: [{address: 127.0.0.1, port: 1}]\n",
            "t.yaml",
        )
        .unwrap()
    }

    const ONE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

    #[test]
    fn drain_applies_to_every_service_with_the_backend_unless_scoped() {
        let mut o = Overrides::default();
        let touched = o.set(&state(), ONE, None, &Action::Drain).unwrap();
        assert_eq!(touched, ["a", "b"]);
        let mut s = state();
        o.overlay(&mut s);
        assert_eq!(s.services[0].backends[0].state, BackendState::Draining);
        assert_eq!(s.services[0].backends[1].state, BackendState::Active);
        assert_eq!(s.services[1].backends[0].state, BackendState::Draining);

        o.set(&state(), ONE, Some("b"), &Action::Undrain).unwrap();
        let mut s = state();
        o.overlay(&mut s);
        assert_eq!(s.services[1].backends[0].state, BackendState::Active);
        assert!(o.get("b", ONE).is_none(), "an empty override is forgotten");
    }

    #[test]
    fn weights_override_and_clear() {
        let mut o = Overrides::default();
        o.set(&state(), ONE, Some("a"), &Action::Weight(9)).unwrap();
        let mut s = state();
        o.overlay(&mut s);
        assert_eq!(s.services[0].backends[0].weight, 9);
        o.set(&state(), ONE, Some("a"), &Action::ClearWeight)
            .unwrap();
        let mut s = state();
        o.overlay(&mut s);
        assert_eq!(s.services[0].backends[0].weight, 1);
        assert_eq!(
            o.set(&state(), ONE, None, &Action::Weight(70_000)),
            Err(OverrideError::WeightTooLarge(70_000))
        );
    }

    #[test]
    fn unknown_backends_are_refused_with_a_hint() {
        let mut o = Overrides::default();
        let missing: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let err = o.set(&state(), missing, None, &Action::Drain).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no backend 127.0.0.1:9 in any service; `meshctl backends` lists them"
        );
    }
}
