//! End-to-end behaviour of the tunnel over real loopback sockets and real
//! TLS: an outbound (node-a) and an inbound (node-b) with their own
//! `Tunnel`s, certificates from a CA the test makes, and backends the tests
//! run themselves.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::{
    test_support::{TestCa, TestInboundTls, TestOutboundTls, checksum, pattern},
    *,
};
use crate::tunnel::{metrics::Direction, outbound::OutboundError, socket};

const WAIT: Duration = Duration::from_secs(30);
const SOURCE: &str = "spiffe://test.local/ns/default/sa/client";

fn config() -> TunnelConfig {
    TunnelConfig {
        socket_mark: Some(0x4d45),
        ..TunnelConfig::default()
    }
}

fn allow_all() -> InboundPolicy {
    InboundPolicy::new(|_: SocketAddr| true, AllowAll)
}

struct Harness {
    ca: TestCa,
    out_tls: Arc<TestOutboundTls>,
    src: Tunnel,
    outbound: Outbound,
    dst: Tunnel,
    inbound: Inbound,
    inbound_addr: SocketAddr,
    serving: JoinHandle<()>,
}

impl Harness {
    async fn new(config: TunnelConfig, policy: InboundPolicy) -> Self {
        Self::with_client(config, policy, |ca| TestOutboundTls::new(ca, "node-a")).await
    }

    /// With the source node's TLS made by `client` (e.g. a short-lived
    /// certificate).
    async fn with_client(
        config: TunnelConfig,
        policy: InboundPolicy,
        client: impl FnOnce(&TestCa) -> Arc<TestOutboundTls>,
    ) -> Self {
        let ca = TestCa::new("mesh test CA");
        let src = Tunnel::new(config.clone(), TunnelMetrics::unregistered()).unwrap();
        let dst = Tunnel::new(config, TunnelMetrics::unregistered()).unwrap();
        let out_tls = client(&ca);
        let outbound = src.outbound(out_tls.clone());
        let inbound = dst.inbound(TestInboundTls::new(&ca, "node-b"), policy);
        let listener = socket::reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let inbound_addr = listener.local_addr().unwrap();
        let serving = tokio::spawn({
            let inbound = inbound.clone();
            async move { inbound.serve(listener).await }
        });
        Self {
            ca,
            out_tls,
            src,
            outbound,
            dst,
            inbound,
            inbound_addr,
            serving,
        }
    }

    fn dest(&self, backend: SocketAddr) -> Destination {
        Destination {
            node_name: "node-b".into(),
            node_addr: self.inbound_addr,
            backend,
            client_addr: "127.0.0.1:40000".parse().unwrap(),
            source_identity: SOURCE.into(),
            workload: Some(SOURCE.into()),
        }
    }

    /// A client socket whose other end the outbound carries to `backend`.
    async fn client(
        &self,
        backend: SocketAddr,
    ) -> (TcpStream, JoinHandle<Result<(), OutboundError>>) {
        self.client_to(self.dest(backend)).await
    }

    async fn client_to(
        &self,
        dest: Destination,
    ) -> (TcpStream, JoinHandle<Result<(), OutboundError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let outbound = self.outbound.clone();
        let handle = tokio::spawn(async move { outbound.handle(accepted, dest).await });
        (client, handle)
    }
}

/// Echoes every connection, then half-closes after the client's FIN.
async fn echo_backend() -> SocketAddr {
    spawn_backend(|mut conn| async move {
        let (mut r, mut w) = conn.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

async fn spawn_backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve(conn));
        }
    });
    addr
}

async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Sends `data`, half-closes, returns everything read until EOF.
async fn round_trip(client: TcpStream, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = client.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        io::Result::Ok(w)
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await?;
    let _w = writer.await.unwrap()?;
    Ok(got)
}

/// Reads until EOF or error; the error kind tells a reset from a FIN.
async fn read_until_end(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("no EOF or reset within the wait")?;
    Ok(got)
}

fn assert_reset(result: io::Result<Vec<u8>>) {
    match result {
        Err(e) => assert!(socket::is_reset(&e), "expected a reset, got {e}"),
        Ok(data) => panic!(
            "expected a reset, got a clean EOF after {} bytes",
            data.len()
        ),
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not reached within the wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_exactly_both_ways_at_every_size() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = echo_backend().await;
    let mut total = 0u64;
    for (i, len) in [
        1usize,
        7,
        1000,
        16 << 10,
        (16 << 10) + 1,
        300_000,
        1 << 20,
        (5 << 20) + 3,
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(len, i as u64 + 1);
        let (client, handle) = h.client(backend).await;
        let got = tokio::time::timeout(WAIT, round_trip(client, data.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), len);
        assert_eq!(
            checksum(&got),
            checksum(&data),
            "payload of {len} bytes differs"
        );
        handle.await.unwrap().unwrap();
        total += len as u64;
    }
    let m = h.src.metrics();
    assert_eq!(m.bytes_sent(Direction::Outbound), total);
    assert_eq!(m.bytes_received(Direction::Outbound), total);
    assert_eq!(h.dst.metrics().bytes_received(Direction::Inbound), total);
    assert_eq!(
        m.connections_opened(Direction::Outbound),
        1,
        "sequential streams share one connection"
    );
    let snapshot = h.src.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].node, "node-b");
    assert_eq!(snapshot[0].connections, 1);
    assert_eq!(snapshot[0].bytes_sent, total);
    assert!(snapshot[0].conns[0].local_cert_not_after_unix.is_some());
    let inbound_view = h.dst.snapshot();
    assert_eq!(inbound_view[0].node, "node-a");
    assert_eq!(inbound_view[0].bytes_received, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams_stay_separate() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = echo_backend().await;
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let (client, handle) = h.client(backend).await;
        let data = pattern(50_000 + (i as usize) * 977, 100 + i);
        tasks.push(tokio::spawn(async move {
            let got = round_trip(client, data.clone()).await.unwrap();
            assert_eq!(checksum(&got), checksum(&data), "stream {i} mixed up");
            handle.await.unwrap().unwrap();
        }));
    }
    for task in tasks {
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
    assert_eq!(h.src.metrics().streams_active(Direction::Outbound), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_backend_which_still_answers() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = spawn_backend(|mut conn| async move {
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        // EOF seen; the write side is still open.
        conn.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
        conn.shutdown().await.unwrap();
    })
    .await;
    let (mut client, handle) = h.client(backend).await;
    client.write_all(b"request body").await.unwrap();
    client.shutdown().await.unwrap();
    let got = read_until_end(&mut client).await.unwrap();
    assert_eq!(got, b"got 12 bytes");
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_reaches_client_which_still_sends() {
    let h = Harness::new(config(), allow_all()).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    let backend = spawn_backend(move |mut conn| {
        let tx = tx.clone();
        async move {
            conn.write_all(b"banner").await.unwrap();
            conn.shutdown().await.unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.unwrap();
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(got);
            }
        }
    })
    .await;
    let (mut client, handle) = h.client(backend).await;
    let got = read_until_end(&mut client).await.unwrap();
    assert_eq!(got, b"banner");
    client.write_all(b"after the backend's FIN").await.unwrap();
    client.shutdown().await.unwrap();
    let backend_got = tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
    assert_eq!(backend_got, b"after the backend's FIN");
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_resets_the_backend() {
    let h = Harness::new(config(), allow_all()).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<io::Result<Vec<u8>>>();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    let backend = spawn_backend(move |mut conn| {
        let tx = tx.clone();
        async move {
            conn.write_all(b"hello").await.unwrap();
            let result = read_until_end(&mut conn).await;
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(result);
            }
        }
    })
    .await;
    let (mut client, handle) = h.client(backend).await;
    let mut hello = [0u8; 5];
    client.read_exact(&mut hello).await.unwrap();
    client.write_all(b"partial").await.unwrap();
    socket::reset(client);
    assert_reset(tokio::time::timeout(WAIT, rx).await.unwrap().unwrap());
    assert!(handle.await.unwrap().is_err());
}

/// Bytes a client writes just before it resets still reach the backend,
/// then the reset, as on a direct connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_written_before_a_reset_arrive_before_it() {
    let h = Harness::new(config(), allow_all()).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<(usize, io::Error)>();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    let backend = spawn_backend(move |mut conn| {
        let tx = tx.clone();
        async move {
            // Let the reset arrive before reading anything.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = 0;
            let mut buf = vec![0u8; 1 << 16];
            let end = loop {
                match conn.read(&mut buf).await {
                    Ok(0) => break io::Error::other("clean EOF"),
                    Ok(n) => got += n,
                    Err(e) => break e,
                }
            };
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send((got, end));
            }
        }
    })
    .await;
    let (mut client, handle) = h.client(backend).await;
    client.write_all(&vec![7u8; 100_000]).await.unwrap();
    socket::reset(client);
    let (got, end) = tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
    assert_eq!(got, 100_000, "bytes before the reset");
    assert!(socket::is_reset(&end), "then a reset, not {end}");
    assert!(handle.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_resets_the_client() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = spawn_backend(|mut conn| async move {
        conn.write_all(b"partial response").await.unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.unwrap();
        socket::reset(conn);
    })
    .await;
    let (mut client, handle) = h.client(backend).await;
    let mut first = [0u8; 16];
    client.read_exact(&mut first).await.unwrap();
    client.write_all(b"go!!").await.unwrap();
    assert_reset(read_until_end(&mut client).await);
    assert!(handle.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_is_503_and_resets_the_client() {
    let h = Harness::new(config(), allow_all()).await;
    let (mut client, handle) = h.client(closed_port().await).await;
    assert_reset(read_until_end(&mut client).await);
    assert!(matches!(
        handle.await.unwrap(),
        Err(OutboundError::Refused {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..
        })
    ));
    assert_eq!(
        h.src
            .metrics()
            .rejections(Direction::Outbound, "backend_unavailable", 503),
        1
    );
    assert_eq!(
        h.dst
            .metrics()
            .rejections(Direction::Inbound, "backend_connect", 503),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_backend_is_400_and_denied_stream_is_401() {
    let backend = echo_backend().await;
    let local = backend;
    let policy = InboundPolicy::new(
        move |addr: SocketAddr| addr == local,
        |_: &PeerInfo, source: Option<&str>, _: SocketAddr| match source {
            Some(SOURCE) => Ok(None),
            _ => Err(Deny {
                reason: "denied",
                detail: "not allowed".into(),
            }),
        },
    );
    let h = Harness::new(config(), policy).await;

    let (mut client, handle) = h.client("127.0.0.1:1".parse().unwrap()).await;
    assert_reset(read_until_end(&mut client).await);
    assert!(matches!(
        handle.await.unwrap(),
        Err(OutboundError::Refused {
            status: StatusCode::BAD_REQUEST,
            ..
        })
    ));
    assert_eq!(
        h.dst
            .metrics()
            .rejections(Direction::Inbound, "not_local_backend", 400),
        1
    );

    let mut dest = h.dest(backend);
    dest.workload = Some("spiffe://test.local/ns/other/sa/intruder".into());
    let (mut client, handle) = h.client_to(dest).await;
    assert_reset(read_until_end(&mut client).await);
    assert!(matches!(
        handle.await.unwrap(),
        Err(OutboundError::Refused {
            status: StatusCode::UNAUTHORIZED,
            ..
        })
    ));
    assert_eq!(
        h.dst
            .metrics()
            .rejections(Direction::Inbound, "denied", 401),
        1
    );
    assert_eq!(
        h.src
            .metrics()
            .rejections(Direction::Outbound, "unauthorized", 401),
        1
    );

    // A policy swap takes effect for the next stream.
    h.inbound.set_policy(allow_all());
    let mut dest = h.dest(backend);
    dest.workload = Some("spiffe://test.local/ns/other/sa/intruder".into());
    let (client, handle) = h.client_to(dest).await;
    assert_eq!(round_trip(client, b"ok".to_vec()).await.unwrap(), b"ok");
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_closes_the_open_streams_it_denies_and_only_those() {
    const OTHER: &str = "spiffe://test.local/ns/default/sa/other";
    let denied: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let deny_list = denied.clone();
    let policy = InboundPolicy::new(
        |_: SocketAddr| true,
        move |_: &PeerInfo, source: Option<&str>, _: SocketAddr| {
            let denied = deny_list.lock().unwrap();
            match source {
                Some(id) if denied.iter().any(|d| d == id) => Err(Deny {
                    reason: "denied",
                    detail: format!("{id} is denied"),
                }),
                _ => Ok(Some("web".to_owned())),
            }
        },
    );
    let h = Harness::new(config(), policy.clone()).await;
    let backend = echo_backend().await;
    let mut open = Vec::new();
    for identity in [SOURCE, OTHER] {
        let mut dest = h.dest(backend);
        dest.workload = Some(identity.into());
        let (mut client, handle) = h.client_to(dest).await;
        client.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        tokio::time::timeout(WAIT, client.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echo, b"ping");
        open.push((client, handle));
    }
    eventually("both streams open at the destination", || {
        h.inbound.open_streams() == 2
    })
    .await;

    denied.lock().unwrap().push(SOURCE.into());
    assert_eq!(h.inbound.set_policy(policy), 1);

    let (mut other, other_handle) = open.pop().unwrap();
    let (mut source, _) = open.pop().unwrap();
    assert_reset(read_until_end(&mut source).await);
    // The other identity's stream carries on, byte-exact.
    other.write_all(b"still here").await.unwrap();
    other.shutdown().await.unwrap();
    assert_eq!(read_until_end(&mut other).await.unwrap(), b"still here");
    other_handle.await.unwrap().unwrap();
    assert_eq!(h.dst.metrics().streams_revoked("denied"), 1);
    eventually("no stream left open", || h.inbound.open_streams() == 0).await;
}

/// A raw h2 client over the harness's TLS, for requests outbound never sends.
async fn raw_h2(h: &Harness) -> h2::client::SendRequest<Bytes> {
    let cert = h.ca.node("node-a");
    let connector =
        tokio_rustls::TlsConnector::from(tls::client_with_alpn(h.ca.client_config(&cert)));
    let tcp = TcpStream::connect(h.inbound_addr).await.unwrap();
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("node-b").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = echo_backend().await;
    let sender = raw_h2(&h).await;
    let send = |req: Request<()>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.ready().await.unwrap();
            let (response, _body) = sender.send_request(req, true).unwrap();
            response.await
        }
    };
    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{backend}/"))
        .body(())
        .unwrap();
    assert_eq!(send(get).await.unwrap().status(), StatusCode::BAD_REQUEST);
    let hostname = Request::builder()
        .method(Method::CONNECT)
        .uri("example.com:80")
        .body(())
        .unwrap();
    assert_eq!(
        send(hostname).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let bad_forwarded = Request::builder()
        .method(Method::CONNECT)
        .uri(backend.to_string())
        .header(http::header::FORWARDED, "for=nobody")
        .body(())
        .unwrap();
    assert_eq!(
        send(bad_forwarded).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // h2's client drops :scheme and :path from a plain CONNECT (and h2's
    // server resets one that carries them with PROTOCOL_ERROR), so this
    // arrives as an authority-only CONNECT and is served.
    let with_path = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{backend}/x"))
        .body(())
        .unwrap();
    assert_eq!(send(with_path).await.unwrap().status(), StatusCode::OK);
    let m = h.dst.metrics();
    assert_eq!(m.rejections(Direction::Inbound, "method", 400), 1);
    assert_eq!(m.rejections(Direction::Inbound, "bad_authority", 400), 1);
    assert_eq!(m.rejections(Direction::Inbound, "bad_forwarded", 400), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_client_certificate_fails_the_handshake() {
    let h = Harness::new(config(), allow_all()).await;
    let other_ca = TestCa::new("someone else");
    let outbound = h.src.outbound(TestOutboundTls::new(&other_ca, "node-a"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    let result = outbound
        .handle(accepted, h.dest(echo_backend().await))
        .await;
    assert!(
        matches!(result, Err(OutboundError::Connect { .. })),
        "{result:?}"
    );
    assert_reset(read_until_end(&mut client).await);
    // The two sides trust different CAs: the client refuses the server's.
    assert_eq!(
        h.src
            .metrics()
            .handshake_failures(Direction::Outbound, "unknown_ca"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_opens_only_the_connections_the_stream_limit_needs() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = echo_backend().await;
    let release = Arc::new(tokio::sync::Barrier::new(201));
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let (mut client, handle) = h.client(backend).await;
        let release = release.clone();
        tasks.push(tokio::spawn(async move {
            let msg = i.to_be_bytes();
            client.write_all(&msg).await.unwrap();
            let mut back = [0u8; 4];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
            release.wait().await;
            client.shutdown().await.unwrap();
            assert!(read_until_end(&mut client).await.unwrap().is_empty());
            handle.await.unwrap().unwrap();
        }));
    }
    // All 200 streams are open at once here.
    tokio::time::timeout(WAIT, release.wait()).await.unwrap();
    let m = h.src.metrics();
    assert_eq!(
        m.connections_opened(Direction::Outbound),
        2,
        "200 streams at 100 per connection"
    );
    assert_eq!(m.handshakes(Direction::Outbound), 2);
    assert_eq!(h.dst.metrics().connections_opened(Direction::Inbound), 2);
    let snapshot = h.src.snapshot();
    assert_eq!(snapshot[0].connections, 2);
    assert_eq!(snapshot[0].streams, 200);
    assert!(snapshot[0].conns.iter().all(|c| c.streams == 100));
    for task in tasks {
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_are_not_reused() {
    let mut cfg = config();
    cfg.idle_timeout = Duration::from_millis(200);
    let h = Harness::new(cfg, allow_all()).await;
    let backend = echo_backend().await;
    let (client, handle) = h.client(backend).await;
    assert_eq!(round_trip(client, b"one".to_vec()).await.unwrap(), b"one");
    handle.await.unwrap().unwrap();
    let m = h.src.metrics().clone();
    eventually("idle connection closed", || {
        h.outbound.pooled_connections() == 0 && m.connections_active(Direction::Outbound) == 0
    })
    .await;
    let dm = h.dst.metrics().clone();
    eventually("inbound saw the close", || {
        dm.connections_active(Direction::Inbound) == 0
    })
    .await;
    let (client, handle) = h.client(backend).await;
    assert_eq!(round_trip(client, b"two".to_vec()).await.unwrap(), b"two");
    handle.await.unwrap().unwrap();
    assert_eq!(m.connections_opened(Direction::Outbound), 2);
}

/// ztunnel #1538: the application reads stream B only after all of stream
/// A, which carries more than a stream window. B's unread bytes must not
/// take the whole connection window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_stream_does_not_stall_the_others() {
    let h = Harness::new(config(), allow_all()).await;
    let a_len = 12 << 20;
    let b_len = 6 << 20;
    let backend = spawn_backend(move |mut conn| async move {
        let mut which = [0u8; 1];
        conn.read_exact(&mut which).await.unwrap();
        let len = if which[0] == b'A' { a_len } else { b_len };
        conn.write_all(&pattern(len, u64::from(which[0])))
            .await
            .unwrap();
        conn.shutdown().await.unwrap();
    })
    .await;
    let (mut b, b_handle) = h.client(backend).await;
    b.write_all(b"B").await.unwrap();
    let (mut a, a_handle) = h.client(backend).await;
    a.write_all(b"A").await.unwrap();
    let got_a = read_until_end(&mut a).await.unwrap();
    assert_eq!(checksum(&got_a), checksum(&pattern(a_len, u64::from(b'A'))));
    let got_b = read_until_end(&mut b).await.unwrap();
    assert_eq!(checksum(&got_b), checksum(&pattern(b_len, u64::from(b'B'))));
    drop((a, b));
    a_handle.await.unwrap().unwrap();
    b_handle.await.unwrap().unwrap();
    assert_eq!(h.src.metrics().connections_opened(Direction::Outbound), 1);
}

/// Forwards TCP both ways until `blackhole` is set, then stops reading and
/// writing while holding the sockets open: a peer that went silent.
async fn blackhole_proxy(upstream: SocketAddr, blackhole: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let up = TcpStream::connect(upstream).await.unwrap();
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            for (mut r, mut w) in [(dr, uw), (ur, dw)] {
                let blackhole = blackhole.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if blackhole.load(Ordering::SeqCst) {
                            // Hold both halves, move nothing.
                            std::future::pending::<()>().await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_detected_by_ping_and_clients_are_reset() {
    let mut cfg = config();
    cfg.ping_interval = Duration::from_millis(100);
    cfg.ping_timeout = Duration::from_millis(400);
    let h = Harness::new(cfg, allow_all()).await;
    let backend = echo_backend().await;
    let blackhole = Arc::new(AtomicBool::new(false));
    let proxy = blackhole_proxy(h.inbound_addr, blackhole.clone()).await;
    let mut dest = h.dest(backend);
    dest.node_addr = proxy;
    let (mut client, handle) = h.client_to(dest).await;
    client.write_all(b"ping?").await.unwrap();
    let mut back = [0u8; 5];
    client.read_exact(&mut back).await.unwrap();
    // Healthy pings for a few intervals keep it up.
    tokio::time::sleep(Duration::from_millis(600)).await;
    client.write_all(b"still").await.unwrap();
    client.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still");
    blackhole.store(true, Ordering::SeqCst);
    client.write_all(b"lost").await.unwrap();
    assert_reset(read_until_end(&mut client).await);
    assert!(handle.await.unwrap().is_err());
    let m = h.src.metrics().clone();
    assert_eq!(
        m.connections_dropped(Direction::Outbound, "ping_timeout"),
        1
    );
    eventually("dead connection left the pool", || {
        h.outbound.pooled_connections() == 0
    })
    .await;
    let dm = h.dst.metrics().clone();
    eventually("inbound dropped its side too", || {
        dm.connections_dropped(Direction::Inbound, "ping_timeout") == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_drains_across_a_restart_on_the_same_port() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = echo_backend().await;
    let (client, handle) = h.client(backend).await;
    let (mut r, mut w) = client.into_split();
    let first = pattern(100_000, 1);
    w.write_all(&first).await.unwrap();
    let mut echoed = vec![0u8; first.len()];
    r.read_exact(&mut echoed).await.unwrap();

    // The successor binds the same port while the old one runs.
    let next_metrics = TunnelMetrics::unregistered();
    let next_tunnel = Tunnel::new(config(), next_metrics.clone()).unwrap();
    let next = next_tunnel.inbound(TestInboundTls::new(&h.ca, "node-b"), allow_all());
    let listener = socket::reuseport_listener(h.inbound_addr).unwrap();
    tokio::spawn({
        let next = next.clone();
        async move { next.serve(listener).await }
    });

    let old = h.inbound.clone();
    let draining = tokio::spawn(async move { old.shutdown(Duration::from_secs(20)).await });
    // The old listener closes first.
    eventually("old listener closed", || h.serving.is_finished()).await;

    // New streams land on the successor (after the old connection's GOAWAY).
    let mut i = 0;
    while next_metrics.handshakes(Direction::Inbound) == 0 {
        i += 1;
        assert!(i < 200, "no stream reached the successor");
        let (client, handle) = h.client(backend).await;
        assert_eq!(round_trip(client, b"new".to_vec()).await.unwrap(), b"new");
        handle.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The stream in flight finishes on the old agent, even after the old
    // connection's GOAWAY exchange is over (its final GOAWAY follows a
    // PING round trip; give it time to happen first).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rest = pattern(2 << 20, 2);
    w.write_all(&rest).await.unwrap();
    w.shutdown().await.unwrap();
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    assert_eq!(checksum(&got), checksum(&rest));
    handle.await.unwrap().unwrap();
    tokio::time::timeout(WAIT, draining).await.unwrap().unwrap();
    assert_eq!(h.inbound.active_connections(), 0);
    assert_eq!(h.dst.metrics().connections_active(Direction::Inbound), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_shutdown_finishes_streams_then_resets_the_rest() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = echo_backend().await;
    // One stream that completes during the drain, one that never ends.
    let (finishing, finishing_handle) = h.client(backend).await;
    let (mut stuck, stuck_handle) = h.client(backend).await;
    stuck.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    stuck.read_exact(&mut one).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = h.dest(backend);
    let serving = tokio::spawn({
        let outbound = h.outbound.clone();
        async move {
            outbound
                .serve(listener, move |_, _| Ok::<_, String>(dest.clone()))
                .await
        }
    });
    let outbound = h.outbound.clone();
    let shutdown =
        tokio::spawn(async move { outbound.shutdown(Duration::from_millis(1500)).await });
    // The accept loop ends at once.
    tokio::time::timeout(WAIT, serving).await.unwrap().unwrap();
    let data = pattern(1 << 20, 9);
    let got = round_trip(finishing, data.clone()).await.unwrap();
    assert_eq!(checksum(&got), checksum(&data));
    finishing_handle.await.unwrap().unwrap();
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    assert_reset(read_until_end(&mut stuck).await);
    assert!(stuck_handle.await.unwrap().is_err());
    assert_eq!(h.outbound.active_streams(), 0);
}

#[test]
fn config_rejects_a_connection_window_equal_to_the_stream_window() {
    let mut cfg = TunnelConfig::default();
    assert_eq!(cfg.validate(), Ok(()));
    cfg.connection_window = cfg.stream_window;
    assert!(matches!(cfg.validate(), Err(ConfigError::Windows { .. })));
    cfg.connection_window = cfg.stream_window * 3 + 1;
    assert!(matches!(cfg.validate(), Err(ConfigError::Windows { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_change_retires_the_connection_make_before_break() {
    let h = Harness::new(config(), allow_all()).await;
    let backend = echo_backend().await;
    let m = h.src.metrics().clone();
    // A stream held open across the change, on the first connection.
    let (mut held, held_handle) = h.client(backend).await;
    held.write_all(b"before").await.unwrap();
    let mut back = [0u8; 6];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"before");
    let (c, done) = h.client(backend).await;
    assert_eq!(round_trip(c, b"same".to_vec()).await.unwrap(), b"same");
    done.await.unwrap().unwrap();
    assert_eq!(m.connections_opened(Direction::Outbound), 1);
    let first = h.src.snapshot()[0].conns[0].clone();
    assert_eq!(first.generation, 1);
    assert!(first.retire_at_unix.is_some() && first.close_at_unix.is_some());

    // This node's credentials changed: the connection takes no new stream.
    h.out_tls.generation.send_replace(2);
    eventually("the connection retired", || {
        m.connections_retired(Direction::Outbound, "rotation") == 1
    })
    .await;
    let (c, done) = h.client(backend).await;
    assert_eq!(round_trip(c, b"new".to_vec()).await.unwrap(), b"new");
    done.await.unwrap().unwrap();
    assert_eq!(m.connections_opened(Direction::Outbound), 2);
    let conns = h.src.snapshot()[0].conns.clone();
    assert_eq!(conns.len(), 2, "{conns:?}");
    let old = conns.iter().find(|c| c.id == first.id).unwrap();
    assert_eq!(old.retired.as_deref(), Some("rotation"));
    assert!(old.draining);
    assert_eq!(old.streams, 1);
    assert_eq!(
        conns.iter().find(|c| c.id != first.id).unwrap().generation,
        2
    );

    // The held stream still works on the old connection, which closes once
    // it ends; nothing was reset.
    held.write_all(b"after").await.unwrap();
    let mut back = [0u8; 5];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"after");
    held.shutdown().await.unwrap();
    assert!(read_until_end(&mut held).await.unwrap().is_empty());
    held_handle.await.unwrap().unwrap();
    eventually("the old connection closed", || {
        h.src.snapshot()[0].conns.iter().all(|c| c.id != first.id)
    })
    .await;
    assert_eq!(h.outbound.pooled_connections(), 1);
    assert_eq!(m.connections_dropped(Direction::Outbound, "expiry"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_nearing_its_certificates_expiry_is_replaced_then_closed_at_expiry() {
    // The source's certificate lives 8 s: margin 2 s, so its connection is
    // retired 5 s from now and closed 6 s from now.
    let now = std::time::SystemTime::now();
    let h = Harness::with_client(config(), allow_all(), |ca| {
        let cert = ca.node_valid(
            "node-a",
            now - Duration::from_secs(1),
            now + Duration::from_secs(7),
        );
        TestOutboundTls::with_cert(ca, cert)
    })
    .await;
    let backend = echo_backend().await;
    let (m, dm) = (h.src.metrics().clone(), h.dst.metrics().clone());
    let (mut held, held_handle) = h.client(backend).await;
    held.write_all(b"held").await.unwrap();
    let mut back = [0u8; 4];
    held.read_exact(&mut back).await.unwrap();
    let first = h.src.snapshot()[0].conns[0].clone();
    let not_after = first.local_cert_not_after_unix.unwrap();
    assert_eq!(first.retire_at_unix, Some(not_after - 2));
    assert_eq!(first.close_at_unix, Some(not_after - 1));

    // Retired ahead of the expiry on both sides (inbound: GOAWAY, since it
    // is the peer's certificate there); new streams get a new connection.
    eventually("the connection retired for expiry", || {
        m.connections_retired(Direction::Outbound, "expiry") == 1
            && dm.connections_retired(Direction::Inbound, "expiry") == 1
    })
    .await;
    let (c, done) = h.client(backend).await;
    assert_eq!(round_trip(c, b"new".to_vec()).await.unwrap(), b"new");
    done.await.unwrap().unwrap();
    assert_eq!(m.connections_opened(Direction::Outbound), 2);

    // A stream still open at the expiry is reset with its connection.
    assert_reset(read_until_end(&mut held).await);
    assert!(held_handle.await.unwrap().is_err());
    assert!(m.connections_dropped(Direction::Outbound, "expiry") >= 1);
    eventually("every connection of the certificate closed", || {
        h.src.snapshot().iter().all(|p| p.conns.is_empty())
            && dm.connections_active(Direction::Inbound) == 0
    })
    .await;
}
