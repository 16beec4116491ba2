//! The cross-node scenario's backend and its 1 KiB request/response client.
//! Both are the usual `bench-server` / `bench-client` subcommands, switched
//! here by an environment variable (so their flags stay as they are):
//!
//! - the server speaks load.rs's protocol (64-byte exchanges; a first
//!   message starting with `B` is a bulk upload answered with its byte
//!   count), plus 1 KiB exchanges on a connection whose first byte is `K`,
//!   and it gives every connection a thread of its own (load.rs's serves
//!   four at a time per address; the 8-stream bulk needs eight at once);
//! - the client's `rr` mode exchanges 1 KiB instead of 64 bytes; its other
//!   modes are load.rs's.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::super::load::{self, ClientArgs, ClientReport, Mode, ServerArgs, new_hist};

/// Set (to anything) in the environment of `bench-client` / `bench-server`.
pub const ENV: &str = "MESH_BENCH_CROSS_NODE";
/// Request and response size of the round trips.
pub const EXCHANGE: usize = 1024;
/// load.rs's message size: every connection starts with one.
const HEADER: usize = 64;
const BULK_CHUNK: usize = 128 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Live connections the server takes at once (a thread each).
const MAX_CONNS: usize = 512;

pub fn enabled() -> bool {
    std::env::var_os(ENV).is_some()
}

pub fn client(args: ClientArgs) -> Result<()> {
    if args.mode != Mode::Rr {
        return load::client(args);
    }
    if let Some(cpu) = args.cpu {
        load::pin(0, Some(cpu))
            .with_context(|| format!("bench-client: cannot pin to CPU {cpu}"))?;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_millis(args.duration_ms);
    let target = SocketAddr::V4(args.first);
    let workers: Vec<_> = (0..args.threads)
        .map(|_| {
            let max_ops = args.max_ops;
            thread::spawn(move || round_trips(target, deadline, max_ops))
        })
        .collect();
    let mut hist = new_hist();
    let mut report = ClientReport::default();
    for w in workers {
        let (ops, err, h) = w
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        report.ops += ops;
        if let Some(e) = err {
            report.errors += 1;
            report.first_error = report.first_error.or(Some(e.to_string()));
        }
        hist.add(&h).context("merging histograms")?;
    }
    report.elapsed_ns = started.elapsed().as_nanos() as u64;
    report.hist = hist
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// One connection, 1 KiB each way, back to back until the deadline.
fn round_trips(
    target: SocketAddr,
    deadline: Instant,
    max_ops: u64,
) -> (u64, Option<io::Error>, hdrhistogram::Histogram<u64>) {
    let mut hist = new_hist();
    let mut ops = 0;
    let res = (|| -> io::Result<()> {
        let mut conn = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut req = [b'K'; EXCHANGE];
        let mut resp = [0u8; EXCHANGE];
        while ops < max_ops && Instant::now() < deadline {
            let t = Instant::now();
            conn.write_all(&req)?;
            conn.read_exact(&mut resp)?;
            let _ = hist.record(t.elapsed().as_nanos() as u64);
            ops += 1;
            // Later requests need not start with the marker; vary a byte so
            // nothing on the path can treat them as one repeated message.
            req[1] = req[1].wrapping_add(1);
        }
        Ok(())
    })();
    (ops, res.err(), hist)
}

pub fn server(args: ServerArgs) -> Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    for addr in &args.listen {
        let l =
            TcpListener::bind(addr).with_context(|| format!("bench-server: cannot bind {addr}"))?;
        let live = live.clone();
        thread::spawn(move || {
            for conn in l.incoming().flatten() {
                // Bounded: past the limit a connection is dropped, and the
                // client counts the error.
                if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNS {
                    live.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let live = live.clone();
                thread::spawn(move || {
                    let _ = serve(conn);
                    live.fetch_sub(1, Ordering::AcqRel);
                });
            }
        });
    }
    std::fs::write(&args.ready_file, "ready\n")?;
    // The parent kills us; this only bounds a forgotten server.
    thread::sleep(Duration::from_secs(args.max_secs));
    bail!("bench-server: stopped after --max-secs {}", args.max_secs)
}

fn serve(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut head = [0u8; HEADER];
    match conn.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e),
    }
    match head[0] {
        b'B' => {
            let mut total = HEADER as u64;
            let mut buf = vec![0u8; BULK_CHUNK];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            conn.write_all(&total.to_be_bytes())
        }
        b'K' => {
            let mut req = [0u8; EXCHANGE];
            let resp = [b'R'; EXCHANGE];
            conn.read_exact(&mut req[HEADER..])?;
            loop {
                conn.write_all(&resp)?;
                match conn.read_exact(&mut req) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        _ => {
            let resp = [b'R'; HEADER];
            loop {
                conn.write_all(&resp)?;
                match conn.read_exact(&mut head) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
    }
}
