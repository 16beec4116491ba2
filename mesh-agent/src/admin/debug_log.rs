//! `/v1/debug-log`: the kernel-side debug log switch. `GET` shows it;
//! `POST {"enabled": true|false}` flips it at runtime.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde::{Deserialize, Serialize};

use crate::agent::Shared;
use crate::kernel_log::KernelLogError;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DebugLogResponse {
    /// The switch as the kernel reads it (`MESH_CONFIG` flags).
    pub enabled: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SetDebugLogRequest {
    pub enabled: bool,
}

/// Handles `/v1/debug-log` for any method.
pub async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let view = |shared: &Shared| DebugLogResponse {
        enabled: shared.debug_log_enabled(),
    };
    match *req.method() {
        Method::GET => super::server::json(&view(shared)),
        Method::POST => {
            let enabled = match super::server::read_switch(req).await {
                Ok(enabled) => enabled,
                Err(response) => return response,
            };
            match shared.set_debug_log(enabled) {
                Ok(()) => super::server::json(&view(shared)),
                Err(e @ KernelLogError::SitesRemoved) => {
                    super::server::error(StatusCode::CONFLICT, &e.to_string())
                }
                Err(e) => super::server::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        _ => super::server::error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only"),
    }
}
