//! The admin API: JSON over HTTP/1.1 on a unix socket that only the owner
//! may open. `meshctl` is its client; nothing else is needed to drive a node.

mod client;
mod debug_log;
mod redirect;
mod server;
mod views;

pub use client::{AdminClientError, get, post};
pub use debug_log::{DebugLogResponse, SetDebugLogRequest};
pub use redirect::{RedirectCounters, RedirectResponse, SetRedirectRequest};
pub use server::{AdminServerError, serve};
pub use views::{
    BackendView, CertsResponse, EventView, EventsResponse, MapFill, ServiceView, ServicesResponse,
    SpokenIdentity, StatusResponse, TunnelsResponse,
};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mesh/admin.sock";

pub const PATH_STATUS: &str = "/v1/status";
pub const PATH_SERVICES: &str = "/v1/services";
/// Recent decisions; query `service=NAME`, `client=ID`, `after=SEQ` and
/// `limit=N` filter them.
pub const PATH_EVENTS: &str = "/v1/events";
/// `?service=NAME&cgroup=PATH`: what the kernel would do, and why.
pub const PATH_EXPLAIN: &str = "/v1/explain";
/// POST an `OverrideRequest`: drain, undrain, or change a weight at runtime.
pub const PATH_OVERRIDES: &str = "/v1/overrides";
/// Same-node redirect: GET shows, POST `{"enabled": bool}` switches.
pub const PATH_REDIRECT: &str = "/v1/redirect";
/// Kernel-side debug logs: GET shows, POST `{"enabled": bool}` switches.
pub const PATH_DEBUG_LOG: &str = "/v1/debug-log";
/// The cross-node tunnel: this node's identity and its connections per peer.
pub const PATH_TUNNELS: &str = "/v1/tunnels";
/// `?service=NAME&from=ID&node=NODE`: what the service's policy says of an
/// identity at a destination (`meshctl authz check`).
pub const PATH_AUTHZ: &str = "/v1/authz";
/// The identities this node holds, their expiry and their reloads.
pub const PATH_CERTS: &str = "/v1/certs";
/// Whether the source, the agent's state and the kernel agree
/// (`meshctl diff`).
pub const PATH_DIFF: &str = "/v1/diff";
