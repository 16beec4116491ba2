//! Serves the admin API from the agent's shared state.

use std::{convert::Infallible, os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use super::{PATH_EVENTS, PATH_REDIRECT, PATH_SERVICES, PATH_STATUS};
use crate::agent::Shared;

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
    match req.uri().path() {
        PATH_STATUS => json(&shared.status()),
        PATH_SERVICES => json(&shared.services()),
        PATH_EVENTS => {
            let query = req.uri().query().unwrap_or_default();
            let param = |name: &str| {
                query
                    .split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.to_owned())
            };
            let limit = match param("limit").map(|l| l.parse::<usize>()) {
                None => 100,
                Some(Ok(limit)) => limit,
                Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit must be a number"),
            };
            json(&shared.events(param("service").as_deref(), limit))
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
