//! `/v1/debug-log`: the kernel-side debug log switch. `GET` shows it;
//! `POST {"enabled": true|false}` flips it at runtime.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde::{Deserialize, Serialize};

use crate::agent::Shared;

/// Largest request body accepted (the only one is `{"enabled": …}`).
const MAX_BODY: usize = 4096;

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
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return super::server::error(
                        StatusCode::BAD_REQUEST,
                        &format!("reading the body (at most {MAX_BODY} bytes): {e}"),
                    );
                }
            };
            let set: SetDebugLogRequest = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => {
                    return super::server::error(
                        StatusCode::BAD_REQUEST,
                        &format!("expected {{\"enabled\": true|false}}: {e}"),
                    );
                }
            };
            match shared.set_debug_log(set.enabled) {
                Ok(()) => super::server::json(&view(shared)),
                Err(e) => super::server::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        _ => super::server::error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only"),
    }
}
