//! Serves the admin API from the agent's shared state.

use std::{convert::Infallible, os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use super::{PATH_EVENTS, PATH_EXPLAIN, PATH_OVERRIDES, PATH_REDIRECT, PATH_SERVICES, PATH_STATUS};
use crate::agent::Shared;
use crate::events::EventFilter;
use crate::overrides::{OverrideRequest, OverrideResponse};

#[derive(Debug, thiserror::Error)]
pub enum AdminServerError {
    #[error("cannot listen on admin socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket (owner-only) and serves until the task is dropped.
pub async fn serve(
    socket: &Path,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>, AdminServerError> {
    let bind_error = |source| AdminServerError::Bind {
        path: socket.display().to_string(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    // A socket file left by an agent that was killed would block bind().
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(bind_error)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move {
                        if req.uri().path() == PATH_REDIRECT {
                            return Ok::<_, Infallible>(
                                super::redirect::handle(req, &shared).await,
                            );
                        }
                        if req.uri().path() == super::PATH_DEBUG_LOG {
                            return Ok::<_, Infallible>(
                                super::debug_log::handle(req, &shared).await,
                            );
                        }
                        if req.uri().path() == super::PATH_DIFF {
                            return Ok::<_, Infallible>(json(&shared.diff().await));
                        }
                        if req.uri().path() == PATH_OVERRIDES {
                            return Ok::<_, Infallible>(set_override(req, &shared).await);
                        }
                        Ok::<_, Infallible>(route(&req, &shared))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}

fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let query = req.uri().query().unwrap_or_default();
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| percent_decode(value))
    };
    match req.uri().path() {
        PATH_STATUS => json(&shared.status()),
        PATH_SERVICES => json(&shared.services()),
        super::PATH_TUNNELS => json(&shared.tunnels()),
        super::PATH_CERTS => json(&shared.certs()),
        PATH_EVENTS => {
            let number = |name: &str| param(name).map(|v| v.parse::<u64>());
            let (limit, client, after) = match (number("limit"), number("client"), number("after"))
            {
                (Some(Err(_)), _, _) | (_, Some(Err(_)), _) | (_, _, Some(Err(_))) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "limit, client and after are numbers",
                    );
                }
                (limit, client, after) => (
                    limit.map_or(100, |l| l.unwrap_or(100) as usize),
                    client.and_then(Result::ok),
                    after.and_then(Result::ok),
                ),
            };
            json(&shared.events(&EventFilter {
                service: param("service"),
                client,
                after,
                limit,
            }))
        }
        super::PATH_AUTHZ => {
            let Some(service) = param("service") else {
                return error(StatusCode::BAD_REQUEST, "authz needs ?service=NAME");
            };
            let (from, node) = (param("from"), param("node"));
            match shared.authz_check(&service, from.as_deref(), node.as_deref()) {
                Ok(view) => json(&view),
                Err(e) => error(StatusCode::NOT_FOUND, &e.to_string()),
            }
        }
        PATH_EXPLAIN => {
            let Some(service) = param("service") else {
                return error(StatusCode::BAD_REQUEST, "explain needs ?service=NAME");
            };
            let cgroup = param("cgroup").map(std::path::PathBuf::from);
            match shared.explain(&service, cgroup.as_deref()) {
                Ok(view) => json(&view),
                Err(e) => error(StatusCode::NOT_FOUND, &e.to_string()),
            }
        }
        other => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {other}")),
    }
}

pub(super) fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static headers are valid"),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

pub(super) fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}

/// `POST /v1/overrides`.
async fn set_override(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "overrides are set with POST",
        );
    }
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let request: OverrideRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("bad override request: {e}"),
            );
        }
    };
    match shared.set_override(request.backend, request.service.as_deref(), &request.action) {
        Ok(services) => json(&OverrideResponse { services }),
        Err(e) => error(StatusCode::NOT_FOUND, &e.to_string()),
    }
}

/// Query values arrive percent-encoded (cgroup paths have slashes).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| value.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Largest body of a switch request (`{"enabled": …}`).
const MAX_SWITCH_BODY: usize = 4096;

/// Reads the `{"enabled": true|false}` body of a POST to a runtime switch;
/// the error is the response to send back.
pub(super) async fn read_switch(req: Request<Incoming>) -> Result<bool, Response<Full<Bytes>>> {
    #[derive(serde::Deserialize)]
    struct Switch {
        enabled: bool,
    }
    let body = Limited::new(req.into_body(), MAX_SWITCH_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("reading the body (at most {MAX_SWITCH_BODY} bytes): {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice::<Switch>(&body)
        .map(|s| s.enabled)
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"enabled\": true|false}}: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("%2Fsys%2Ffs%2Fcgroup"), "/sys/fs/cgroup");
        assert_eq!(percent_decode("a+b%zz"), "a b%zz");
        assert_eq!(percent_decode("web"), "web");
    }
}
