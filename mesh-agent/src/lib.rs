//! mesh's node agent: fills the kernel's service maps from a desired state,
//! serves the admin API, and the `meshctl` CLI that talks to it.
//!
//! Data flows one way: `config` (a source) → `state` (the model) →
//! `reconcile` (map writes) → the kernel (`bpf`); kernel counters →
//! `admin` → `cli`, and kernel counters → `metrics` (Prometheus, read at
//! scrape time).

pub mod admin;
pub mod agent;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod destroy;
pub mod diff;
pub mod drain;
pub mod events;
pub mod explain;
pub mod health;
pub mod identity;
pub mod inotify;
pub mod kernel_log;
pub mod maglev;
pub mod metrics;
pub mod migrate;
pub mod overlay;
pub mod overrides;
pub mod placement;
pub mod reconcile;
pub mod redirect;
pub mod slots;
pub mod source;
pub mod state;
pub mod tunnel;
