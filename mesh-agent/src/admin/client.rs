//! A minimal client of the admin API, used by meshctl and tests.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error(
        "cannot reach the agent at {socket}: {source}. Is mesh-agent running? (set --admin-socket or MESH_ADMIN_SOCKET if it listens elsewhere)"
    )]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the agent's answer was not understood: {0}")]
    Decode(#[from] serde_json::Error),
}

impl AdminClientError {
    /// True when no agent is listening, as opposed to an agent that failed.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// GETs `path` from the agent and decodes the JSON answer.
pub async fn get<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, AdminClientError> {
    request(socket, Method::GET, path, Bytes::new()).await
}

/// POSTs `body` as JSON to `path` and decodes the JSON answer.
pub async fn post<B: Serialize, T: DeserializeOwned>(
    socket: &Path,
    path: &str,
    body: &B,
) -> Result<T, AdminClientError> {
    request(
        socket,
        Method::POST,
        path,
        Bytes::from(serde_json::to_vec(body)?),
    )
    .await
}

async fn request<T: DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<T, AdminClientError> {
    let stream =
        UnixStream::connect(socket)
            .await
            .map_err(|source| AdminClientError::Unreachable {
                socket: socket.display().to_string(),
                source,
            })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "mesh-agent")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("static request is valid");
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(AdminClientError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(serde_json::from_slice(&body)?)
}
