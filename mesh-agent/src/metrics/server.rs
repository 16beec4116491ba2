//! The HTTP side: `/metrics`, `/healthz`, `/readyz` on a thread with a
//! current-thread tokio runtime of its own, so a slow scrape never competes
//! with the data plane's runtime, and a stuck data plane cannot hide behind
//! a healthy-looking metrics thread (`/healthz` checks its heartbeat).

use std::{
    convert::Infallible,
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::AsRawFd as _,
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, warn};

use super::{CONTENT_TYPE, Metrics, MetricsError, PATH_HEALTHZ, PATH_METRICS, PATH_READYZ};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The running endpoint; dropping it stops the thread.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The address actually bound (the chosen port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(super) fn start(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    socket_mark: u32,
) -> Result<MetricsServer, MetricsError> {
    let bind_error = |source| MetricsError::Bind { addr, source };
    let listener = bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    if let Err(e) = set_mark(&listener, socket_mark) {
        warn!(
            "metrics listener: cannot set SO_MARK {socket_mark:#x}: {e}; scrapes may be seen by the programs"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MetricsError::Thread)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("mesh-metrics".into())
        .spawn(move || runtime.block_on(serve(listener, metrics, rx)))
        .map_err(MetricsError::Thread)?;
    Ok(MetricsServer {
        addr: bound,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// A listener with SO_REUSEPORT, so that a new agent started beside a
/// running one (a DaemonSet rolling update with maxSurge, both on the host
/// network) can serve its probes on the same port; a port held by anything
/// else is still refused.
fn bind(addr: SocketAddr) -> std::io::Result<StdListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Accepted sockets inherit the listener's mark, which the programs skip.
fn set_mark(listener: &StdListener, mark: u32) -> std::io::Result<()> {
    // SAFETY: setsockopt on a descriptor we own, with a u32 of the right size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn serve(
    listener: StdListener,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("metrics listener unusable: {e}");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!("metrics accept: {e}");
                    // E.g. out of descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(route(&req, &metrics)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn route(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
    }
    match req.uri().path() {
        PATH_METRICS => match metrics.encode() {
            Ok(body) => Response::builder()
                .header("content-type", CONTENT_TYPE)
                .body(Full::new(Bytes::from(body)))
                .expect("static headers are valid"),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("encoding metrics failed: {e}\n"),
            ),
        },
        PATH_HEALTHZ if metrics.is_live() => text(StatusCode::OK, "ok\n"),
        PATH_HEALTHZ => text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the agent's data-plane runtime has not answered for {:.1}s\n",
                metrics.silent_for().as_secs_f64()
            ),
        ),
        PATH_READYZ => match metrics.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        other => text(
            StatusCode::NOT_FOUND,
            &format!(
                "no such endpoint: {other} (try {PATH_METRICS}, {PATH_HEALTHZ}, {PATH_READYZ})\n"
            ),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A bounded HTTP/1.1 GET over loopback: (status, content-type, body).
    fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        stream.take(4 << 20).read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        (status, content_type, body.to_owned())
    }

    #[test]
    fn serves_metrics_and_probes_on_its_own_thread() {
        let metrics = Arc::new(Metrics::new());
        metrics.beat();
        let server = metrics.serve("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let addr = server.addr();
        assert_ne!(addr.port(), 0);

        let (status, ct, body) = get(addr, PATH_READYZ);
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("not ready"), "{body}");
        metrics.set_ready();
        assert_eq!(get(addr, PATH_READYZ).0, 200);
        assert!(ct.starts_with("text/plain"));

        assert_eq!(get(addr, PATH_HEALTHZ), (200, ct.clone(), "ok\n".into()));

        let (status, ct, body) = get(addr, PATH_METRICS);
        assert_eq!(status, 200);
        assert_eq!(ct, CONTENT_TYPE);
        assert!(body.contains("# TYPE mesh_build info"), "{body}");
        assert!(body.ends_with("# EOF\n"));

        assert_eq!(get(addr, "/nope").0, 404);

        // A second agent (a rolling update's surge) shares the port...
        let surge = metrics.serve(addr, 0).expect("a second agent shares the port");
        drop(surge);
        // ...but a port something else holds is refused with what to do.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = metrics
            .serve(other.local_addr().unwrap(), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--metrics-addr"), "{err}");

        drop(server);
        assert!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "dropping the server closes the listener"
        );
    }
}
